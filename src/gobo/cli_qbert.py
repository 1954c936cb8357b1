"""``gobo sensitivity`` (Q-BERT's per-layer Hessian Omega) and ``gobo qat`` (quantization-aware fine-tuning)."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["register"]


def _resolve(model: str) -> Path:
    from .assets import resolve_model
    from .cli import UserError

    try:
        return resolve_model(model)
    except FileNotFoundError as exc:
        raise UserError(str(exc)) from None


def _cmd_sensitivity(args) -> int:
    from .cli import UserError, _Bar, _print_json, _table
    from .hessian import SensitivitySettings, measure_sensitivity
    from .methods.groupwise import mixed_plan

    try:
        settings = SensitivitySettings(subsets=args.subsets, subset_size=args.subset_size, max_tokens=args.max_tokens, iters=args.iters, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = _resolve(args.model)
    t0 = time.perf_counter()
    with _Bar(args.quiet, None, "Hessian (layer x subset)", "layer") as bar:
        sens = measure_sensitivity(model_dir, settings=settings, progress=bar.update, use_cache=not args.no_cache)
    seconds = time.perf_counter() - t0
    plans = {mp: mixed_plan(sens.omega, *map(int, mp.split("/"))) for mp in ("2/3", "2/4")}
    rank = {i: r + 1 for r, i in enumerate(sorted(range(len(sens.layers)), key=lambda i: (-sens.omega[i], i)))}
    if args.json:
        d = sens.to_dict()
        for i, row in enumerate(d["layers"]):
            row["rank"] = rank[i]
            row["plan"] = {mp: p[i] for mp, p in plans.items()}
        _print_json({"model": str(model_dir), "seconds": seconds, **d})
        return 0
    rows = [
        [str(i), name, f"{m:.4g}", f"{s:.3g}", f"{o:.4g}", str(rank[i]), str(plans["2/3"][i]), str(plans["2/4"][i])]
        for i, (name, m, s, o) in enumerate(zip(sens.layers, sens.mean, sens.std, sens.omega))
    ]
    print(f"top Hessian eigenvalue per layer: {settings.subsets} subsets of {settings.subset_size} training texts, "
          f"probe cross-entropy; Omega = |mean| + std")
    print(_table(["layer", "name", "mean", "std", "Omega", "rank", "2/3 MP", "2/4 MP"], rows))
    print(f"  time {seconds:.1f} s")
    return 0


def _cmd_qat(args) -> int:
    from .cli import UserError, _Bar, _print_json
    from .config import QBertConfig
    from .qat import QatSettings, evaluate, finetune, save

    out = Path(args.output)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another path or pass --force")
    try:
        config = QBertConfig(bits=args.bits, mixed=args.mixed or "")
        settings = QatSettings(texts=args.texts, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, head_lr=args.head_lr, seed=args.seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    model_dir = _resolve(args.model)
    with _Bar(args.quiet, None, "fine-tuning", "step") as bar:
        def progress(step: int, loss: float) -> None:
            if bar.bar is not None:
                bar.bar.set_postfix_str(f"loss {loss:.3f}", refresh=False)
            bar.update()

        result = finetune(model_dir, config, settings, progress=progress)
    save(result, out, overwrite=args.force)
    doc = {"output": str(out), "config": str(result.compressed.config), "steps": len(result.losses),
           "loss_start": result.loss_start, "loss_end": result.loss_end, "seconds": result.seconds}
    if args.eval:
        with _Bar(args.quiet, None, "test split", "text") as bar:
            ev = evaluate(out, n_test=args.limit, progress=bar.update)
        doc["eval"] = ev.to_dict()
    if args.json:
        _print_json(doc)
        return 0
    print(f"{out}: Q-BERT fine-tuned with quantized weights, {doc['steps']} steps in {result.seconds:.0f} s")
    print(f"  loss on {min(settings.monitor_texts, settings.texts)} training texts   {result.loss_start:.4f} -> {result.loss_end:.4f}")
    if args.eval:
        e = doc["eval"]
        print(f"  test accuracy, fine-tuned head    {100 * e['head_accuracy']:.2f}%  ({e['n_test']} texts)")
        print(f"  test accuracy, frozen FP32 probe  {100 * e['accuracy']:.2f}%  (FP32 {100 * e['fp32_accuracy']:.2f}%)")
    return 0


def register(add) -> None:
    s = add("sensitivity", "per-layer Hessian sensitivity (Q-BERT's Omega) on the training split, and the mixed-precision plans it gives",
            "example: gobo sensitivity minilm-l6 --subsets 4 --subset-size 64")
    s.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    s.add_argument("--subsets", type=int, default=4, help="disjoint random subsets of the training split (default 4)")
    s.add_argument("--subset-size", type=int, default=64, help="texts per subset (default 64)")
    s.add_argument("--max-tokens", type=int, default=64, help="truncate texts to this many tokens (default 64)")
    s.add_argument("--iters", type=int, default=20, help="power iterations at most (default 20)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true", help="measure again even if a cached result exists")
    s.set_defaults(fn=_cmd_sensitivity)

    q = add("qat", "Q-BERT with quantization-aware fine-tuning of the encoder and the probe head on the training split",
            "example: gobo qat minilm-l6 -o out/minilm-qbert3-qat --bits 3 --eval")
    q.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    q.add_argument("-o", "--output", required=True, help="output directory (the compressed model and head.json)")
    q.add_argument("--bits", type=int, default=3, help="bits of the encoder layers, 1-8 (default 3)")
    q.add_argument("--mixed", metavar="LOW/HIGH", help="Hessian-ranked mixed precision per layer, e.g. 2/3")
    q.add_argument("--texts", type=int, default=3000, help="training texts (default 3000)")
    q.add_argument("--epochs", type=int, default=1)
    q.add_argument("--batch-size", type=int, default=32)
    q.add_argument("--lr", type=float, default=2e-5, help="encoder learning rate (default 2e-5)")
    q.add_argument("--head-lr", type=float, default=1e-3, help="head learning rate (default 1e-3)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eval", action="store_true", help="then score the test split with the fine-tuned head and the frozen probe")
    q.add_argument("--limit", type=int, help="with --eval: this many test texts (default all)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.set_defaults(fn=_cmd_qat)

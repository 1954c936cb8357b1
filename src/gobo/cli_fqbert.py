"""``gobo fqbert``: build the fully quantized (FQ-BERT) encoder and score it against FP32."""

from __future__ import annotations

__all__ = ["register"]

EXAMPLE = "example: gobo fqbert minilm-l6 --limit 500"


def register(add) -> None:
    sp = add("fqbert", "fully quantized encoder (4-bit weights, 8-bit activations, integer-only inference) vs FP32", EXAMPLE)
    sp.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    sp.add_argument("--limit", type=int, help="evaluate on this many test texts, spread over the split (default: all)")
    sp.add_argument("--train-limit", type=int, help="train the probe on this many texts (default: all)")
    sp.add_argument("--calib", type=int, default=256, help="calibration texts from the train split (default 256)")
    sp.add_argument("--w-bits", type=int, default=4, help="weight bits, 2-8 (default 4)")
    sp.add_argument("--a-bits", type=int, default=8, help="activation bits, 4-8 (default 8)")
    sp.add_argument("--w-method", choices=["gptq", "rtn"], default="gptq",
                    help="Linear weights: gptq (default, uses the calibration texts) or rtn (round to nearest)")
    sp.add_argument("--smooth", type=int, default=None, metavar="K",
                    help="per-channel factors up to 2**K for outlier channels of LayerNorm/GELU outputs (0: off)")
    sp.set_defaults(fn=_cmd_fqbert)


def _cmd_fqbert(args) -> int:
    from .cli import UserError, _Bar, _fmt_bytes, _print_json, _table

    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be a positive number of texts, got {args.limit}")
    if args.train_limit is not None and args.train_limit < 2:
        raise UserError(f"--train-limit must be at least 2 texts, got {args.train_limit}")
    if args.calib < 1:
        raise UserError(f"--calib must be a positive number of texts, got {args.calib}")
    from .fqbert import FQBertConfig, evaluate_fqbert

    kw = {"w_bits": args.w_bits, "a_bits": args.a_bits, "w_method": args.w_method}
    if args.smooth is not None:
        kw["smooth"] = args.smooth
    try:
        config = FQBertConfig(**kw)
    except ValueError as exc:
        raise UserError(str(exc).replace("w_bits", "--w-bits").replace("a_bits", "--a-bits").replace("smooth", "--smooth")) from None

    bars: dict[str, _Bar] = {}
    labels = {"calibrate": "calibrating", "probe": "probe (FP32 train)", "fp32": "FP32 test",
              "int": "integer path", "sim": "float simulation"}

    def progress(stage: str, n: int, total: int) -> None:
        if stage not in bars:
            for bar in bars.values():
                bar.close()
            bars[stage] = _Bar(args.quiet, total or None, labels.get(stage, stage), "text")
        bars[stage].update(n)

    try:
        r = evaluate_fqbert(args.model, config, n_test=args.limit, n_calib=args.calib, n_train=args.train_limit,
                            progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        _print_json(r.to_dict())
        return 0
    size = r.size
    print(f"FQ-BERT on {r.model} ({r.model_type}): {r.config['w_bits']}-bit weights, {r.config['a_bits']}-bit "
          f"activations, calibrated on {r.n_calib} train texts")
    print(f"Rotten Tomatoes, frozen probe: {r.n_test} test texts, probe trained on {r.n_train} FP32 train embeddings")
    rows = [
        ["FP32", f"{100 * r.fp32_accuracy:.2f}", "-", "100.00", "1.0000"],
        ["integer path", f"{100 * r.accuracy:.2f}", f"{100 * (r.accuracy - r.fp32_accuracy):+.2f}",
         f"{100 * r.agreement:.2f}", f"{r.mean_cosine:.4f}"],
        ["float simulation", f"{100 * r.sim_accuracy:.2f}", f"{100 * (r.sim_accuracy - r.fp32_accuracy):+.2f}",
         f"{100 * r.sim_agreement:.2f}", "-"],
    ]
    print(_table(["model", "acc %", "delta", "agree % (FP32)", "cosine (FP32)"], rows))
    print(f"integer path vs float simulation: {100 * r.int_sim_agreement:.2f}% same predictions, "
          f"{100 * r.int_sim_identical:.2f}% identical embeddings, mean cosine {r.int_sim_cosine:.6f}")
    by = size["by_kind"]
    print(f"size: {_fmt_bytes(size['stored_bytes'])} vs {_fmt_bytes(size['fp32_bytes'])} FP32 "
          f"({size['ratio']:.2f}x, {size['bits_per_weight']:.3f} bits per weight; codes {_fmt_bytes(by['codes'])}, "
          f"row scales {_fmt_bytes(by['row_scales'])}, int32 biases {_fmt_bytes(by['biases'])}, "
          f"LayerNorm {_fmt_bytes(by['layernorm'])}, other {_fmt_bytes(by['other'])})")
    sec = r.seconds
    print(f"time: build {sec['build']:.1f} s, FP32 {sec['fp32']:.1f} s, integer {sec['int']:.1f} s, "
          f"simulation {sec['sim']:.1f} s")
    return 0

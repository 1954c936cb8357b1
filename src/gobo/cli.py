"""The ``gobo`` command: a thin layer over the Python API.

Every user error ends in one line on stderr (``gobo: error: ...``) and exit status 2;
``--json`` prints machine-readable results on stdout; ``--quiet`` hides progress bars.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from .runs import fmt_bytes, json_clean

__all__ = ["main"]

EXAMPLES = {
    "quantize": "example: gobo quantize minilm-l6 -o out/minilm-3b --bits 3",
    "inspect": "example: gobo inspect out/minilm-3b",
    "eval": "example: gobo eval out/minilm-3b --limit 1000",
    "demo": "example: gobo demo --out out/demo",
    "models": "example: gobo models fetch mpnet-base",
    "data": "example: gobo data fetch",
}


#: modules that add commands; each defines ``register(add)`` where ``add(name, help, example)``
#: returns an argparse subparser (with --json/--quiet) on which it sets ``fn``
COMMAND_MODULES: tuple[str, ...] = ("gobo.cli_report", "gobo.hw.cli", "gobo.cli_qbert", "gobo.cli_fqbert")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, like every other user error."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"gobo: error: {message} (see 'gobo {self.prog.split()[-1] if ' ' in self.prog else ''} --help')\n".replace("gobo  --help", "gobo --help"))


class UserError(Exception):
    """A problem with the user's input: reported as one line, no traceback."""


# ---------------------------------------------------------------------------- rendering


_fmt_bytes = fmt_bytes  # used by the command modules


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(headers), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    return "\n".join(out)


def _sqnr(x: float) -> str:
    return "inf" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.1f}")


def _json_default(o):
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _print_json(obj) -> None:
    print(json.dumps(json_clean(obj), indent=2, default=_json_default))


class _Bar:
    """tqdm progress bar on stderr, or nothing when quiet."""

    def __init__(self, quiet: bool, total: int | None, desc: str, unit: str = "it") -> None:
        self.bar = None
        if not quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False, dynamic_ncols=True, disable=None)  # off when stderr is not a terminal

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _model_summary_text(s, path: str) -> str:
    lines = [
        f"{path}: {s.method}, {s.n_quantized} tensors quantized ({s.quantized_weights:,} weights), {s.n_dense} kept",
        f"  code bits (average)   {s.avg_code_bits:.3f}",
        f"  bits per weight       {s.bits_per_weight:.3f}  (codes, codebooks, row statistics, outliers)",
        f"  outliers              {100 * s.outlier_fraction:.3f}%",
        f"  SQNR (min / mean)     {_sqnr(s.min_sqnr_db)} / {_sqnr(s.mean_sqnr_db)} dB",
        f"  FP32 weights          {_fmt_bytes(s.fp32_bytes)}",
        f"  compressed file       {_fmt_bytes(s.file_bytes or s.stored_bytes)}",
        f"  compression ratio     {s.ratio:.2f}x",
    ]
    return "\n".join(lines)


def _tensor_table(s) -> str:
    rows = [
        [
            t.name,
            "x".join(map(str, t.shape)),
            str(t.bits),
            f"{100 * t.outlier_fraction:.3f}",
            _sqnr(t.sqnr_db),
            f"{t.bits_per_weight:.2f}",
            _fmt_bytes(t.nbytes),
            f"{t.ratio:.1f}",
        ]
        for t in s.tensors
    ]
    return _table(["tensor", "shape", "bits", "outl %", "SQNR dB", "bits/w", "bytes", "ratio"], rows)


# ---------------------------------------------------------------------------- commands


def _cmd_quantize(args) -> int:
    import gobo
    from .config import GOBO_METHODS, GRID_METHODS, GoboConfig, method_config
    from .io import WEIGHTS_FILE
    from .report import summarize

    out = Path(args.output)
    if out.exists() and not args.force and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not empty; choose another path or pass --force")
    if getattr(args, "mixed", None) and args.method != "qbert":
        raise UserError("--mixed applies to --method qbert only")
    if args.size_mb is not None and args.method != "gobo":
        raise UserError("--size-mb applies to --method gobo only")
    if args.avg_bits is not None and args.method not in ("gobo", *GRID_METHODS):
        raise UserError("--avg-bits applies to --method gobo, gobo-grid or gobo-grid-fast only")
    if args.allocate is not None and args.method not in ("gobo", *GRID_METHODS):
        raise UserError("--allocate applies to --method gobo, gobo-grid or gobo-grid-fast only")
    if args.avg_bits is not None and args.size_mb is not None:
        raise UserError("give either --avg-bits or --size-mb, not both")
    if (args.codebook or args.feedback or args.calibration_texts or args.feedback_texts or args.act_outliers is not None
            or args.compact or args.bits_for) and args.method not in GOBO_METHODS:
        raise UserError("--codebook, --feedback, --calibration-texts, --feedback-texts, --act-outliers, --compact and --bits-for "
                        "apply to --method gobo, gobo-paper, gobo-grid or gobo-grid-fast only")
    if args.bits_for and args.allocate not in (None, "uniform"):
        raise UserError("--bits-for sets bits by name and needs every other tensor at --bits: leave out --allocate or give --allocate uniform")
    if args.bits_for and (args.avg_bits is not None or args.size_mb is not None):
        raise UserError("--bits-for does not combine with --avg-bits or --size-mb, which choose the bits themselves")
    bits_for = []
    for item in args.bits_for or []:
        glob, sep, b = item.rpartition("=")
        if not sep or not glob or not b.strip().isdigit():
            raise UserError(f"--bits-for takes GLOB=BITS, e.g. '*intermediate.dense*=4'; got {item!r}")
        bits_for.append((glob, int(b)))
    if (args.calibration_texts or args.feedback_texts or args.feedback_damp is not None or args.feedback_exclude
            or args.feedback_group is not None) and not args.feedback:
        raise UserError("--calibration-texts, --feedback-texts, --feedback-damp, --feedback-exclude and --feedback-group "
                        "need --feedback")
    if args.calibration_texts and args.feedback != "texts":
        raise UserError("--calibration-texts needs --feedback texts")
    if args.calibration_dtype is not None and not (args.feedback or args.act_outliers):
        raise UserError("--calibration-dtype needs a pass over calibration sentences: --feedback or --act-outliers")
    texts = None
    if args.calibration_texts:
        try:
            texts = [t for t in Path(args.calibration_texts).read_text(encoding="utf-8").splitlines() if t.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read calibration texts from {args.calibration_texts}: {exc}") from None
        if not texts:
            raise UserError(f"{args.calibration_texts} holds no text (one calibration text per line)")
    try:
        extra = {"mixed": args.mixed} if getattr(args, "mixed", None) else {}
        if args.avg_bits is not None:
            extra["average"] = args.avg_bits
        if args.allocate is not None:
            extra["allocate"] = args.allocate
        if args.codebook:
            extra["codebook"] = args.codebook
            if args.codebook in ("row", "grid") and args.allocate is None:
                extra["allocate"] = "uniform"
        if args.feedback:
            extra["feedback"] = args.feedback
        if args.feedback_texts:
            extra["feedback_texts"] = args.feedback_texts
        if args.act_outliers is not None:
            extra["act_outliers"] = args.act_outliers
        if args.feedback_damp is not None:
            extra["feedback_damp"] = args.feedback_damp
        if args.synthetic_seed is not None:
            extra["synthetic_seed"] = args.synthetic_seed
        if args.calibration_dtype is not None:
            extra["calibration_dtype"] = args.calibration_dtype
        if args.feedback_exclude:
            extra["feedback_exclude"] = tuple(args.feedback_exclude)
        if args.feedback_group is not None:
            extra["feedback_group"] = args.feedback_group
        if args.compact:
            extra["compact"] = True
        if bits_for:
            extra["bits_for"] = tuple(bits_for)
            extra.setdefault("allocate", "uniform")
        config = method_config(args.method, args.bits, **extra)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.synthetic_seed is not None and not (isinstance(config, GoboConfig) and config.draws_synthetic()):
        raise UserError("--synthetic-seed needs synthetic sentences: --method gobo-grid or gobo-grid-fast, --feedback "
                        "synthetic, --allocate sensitivity, or --act-outliers without --feedback texts")
    t0 = time.perf_counter()
    with _Bar(args.quiet, None, "quantizing", "tensor") as bar:
        def progress(name: str, total: int) -> None:
            if bar.bar is not None:
                bar.bar.total = total
                bar.bar.set_postfix_str(name.rsplit(".", 2)[-2] if "." in name else name, refresh=False)
            bar.update()

        cm = gobo.quantize(args.model, config, include=args.include or ("*",), exclude=args.exclude or (), progress=progress,
                           size_mb=args.size_mb, calibration_texts=texts)
    seconds = time.perf_counter() - t0
    gobo.save(cm, out, overwrite=args.force)
    s = summarize(cm, out / WEIGHTS_FILE)
    if args.json:
        _print_json({"output": str(out), "seconds": seconds, **s.to_dict()})
    else:
        if args.verbose:
            print(_tensor_table(s))
            print()
        print(_model_summary_text(s, str(out)))
        print(f"  time                  {seconds:.1f} s")
    return 0


def _cmd_inspect(args) -> int:
    from .io import WEIGHTS_FILE, read_compressed
    from .report import summarize

    cm = read_compressed(args.outdir)
    s = summarize(cm, Path(args.outdir) / WEIGHTS_FILE)
    if args.json:
        _print_json({"source": cm.source, **s.to_dict()})
    else:
        print(_tensor_table(s))
        print()
        print(_model_summary_text(s, args.outdir))
        if cm.source:
            print(f"  source                {cm.source.get('name', '?')} ({cm.source.get('model_type', '?')}), sha256 {cm.source.get('weights_sha256', '?')[:16]}...")
    return 0


def _source_for(cm, override: str | None) -> Path:
    from .assets import resolve_model

    if override:
        return resolve_model(override)
    name = cm.source.get("name")
    d = cm.source.get("dir")
    if d and Path(d).is_dir():
        return Path(d)
    if name:
        try:
            return resolve_model(name)
        except FileNotFoundError:
            pass
    raise UserError("the FP32 source model of this file is not available here; pass it with --source")


def evaluate_dirs(outdirs: list[str], source: str | None, limit: int | None, train_limit: int | None, quiet: bool) -> tuple[dict, list[dict]]:
    """FP32 and each compressed model on the same test texts, one run. Returns (fp32, rows)."""
    import gobo
    from transformers import AutoTokenizer

    from .evaluate import compare, encode, prepare_benchmark
    from .hf import load_source, weights_sha256
    from .io import WEIGHTS_FILE, read_compressed
    from .report import summarize

    cms = [read_compressed(d) for d in outdirs]
    src_dir = _source_for(cms[0], source)
    sha = weights_sha256(src_dir)
    for d, cm in zip(outdirs, cms):
        if cm.source.get("weights_sha256") and cm.source["weights_sha256"] != sha:
            raise UserError(f"{d} was made from other weights than {src_dir}; pass the right --source")
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    fp32 = load_source(src_dir)
    with _Bar(quiet, None, "probe (FP32 train)", "text") as bar:
        bench = prepare_benchmark(fp32, tok, source_sha=sha, n_train=train_limit, n_test=limit, progress=bar.update)
    with _Bar(quiet, len(bench.test_texts), "FP32 test", "text") as bar:
        t = time.perf_counter()
        e32 = encode(fp32, tok, bench.test_texts, progress=bar.update)
        s32 = time.perf_counter() - t
    del fp32
    rows = []
    fp32_bytes = None
    for d, cm in zip(outdirs, cms):
        model = gobo.load(d)
        with _Bar(quiet, len(bench.test_texts), f"{Path(d).name} test", "text") as bar:
            t = time.perf_counter()
            eq = encode(model, tok, bench.test_texts, progress=bar.update)
            sq = time.perf_counter() - t
        r = compare(bench.probe, e32, eq, bench.test_labels, s32, sq)
        s = summarize(cm, Path(d) / WEIGHTS_FILE)
        fp32_bytes = s.fp32_bytes
        rows.append({"model": d, "method": s.method, "avg_code_bits": s.avg_code_bits, "bits_per_weight": s.bits_per_weight,
                     "file_bytes": s.file_bytes, "ratio": s.ratio, **r.to_dict()})
    fp = {"model": "FP32", "source": str(src_dir), "accuracy": rows[0]["fp32_accuracy"], "n_test": rows[0]["n_test"],
          "n_train": len(bench.train_texts), "file_bytes": fp32_bytes, "seconds": s32}
    from .evalstore import save_eval

    for d, r in zip(outdirs, rows):
        save_eval(d, {**fp, "source_sha256": sha}, r)  # OUTDIR/eval.json, shown by 'gobo report'
    return fp, rows


def _eval_table(fp: dict, rows: list[dict]) -> str:
    table = [["FP32", "32", f"{100 * fp['accuracy']:.2f}", "-", "100.00", "1.0000", _fmt_bytes(fp["file_bytes"]), "1.0x"]]
    for r in rows:
        table.append([
            f"{Path(r['model']).name} ({r['method']})",
            f"{r['bits_per_weight']:.2f}",
            f"{100 * r['accuracy']:.2f}",
            f"{100 * r['accuracy_delta']:+.2f}",
            f"{100 * r['agreement']:.2f}",
            f"{r['mean_cosine']:.4f}",
            _fmt_bytes(r["file_bytes"]),
            f"{r['ratio']:.2f}x",
        ])
    head = f"Rotten Tomatoes, frozen probe: {fp['n_test']} test texts, probe trained on {fp['n_train']} FP32 train embeddings"
    return head + "\n" + _table(["model", "bits/w", "acc %", "delta", "agree %", "cosine", "size", "ratio"], table)


def _cmd_eval(args) -> int:
    fp, rows = evaluate_dirs(args.outdirs, args.source, args.limit, args.train_limit, args.quiet)
    if args.json:
        _print_json({"fp32": fp, "results": rows})
    else:
        print(_eval_table(fp, rows))
    return 0


def _cmd_demo(args) -> int:
    import gobo
    from .config import method_config

    base = Path(args.out)
    outs = []
    for method in args.methods:
        d = base / f"minilm-l6-{method}-{args.bits}b"
        cfg = method_config(method, args.bits)
        with _Bar(args.quiet, None, f"quantizing ({method})", "tensor") as bar:
            cm = gobo.quantize("minilm-l6", cfg, progress=lambda n, t: bar.update())
        gobo.save(cm, d, overwrite=True)
        outs.append(str(d))
    fp, rows = evaluate_dirs(outs, "minilm-l6", args.limit, args.train_limit, args.quiet)
    from .htmlreport import write_report

    try:
        report = str(write_report(outs[args.methods.index("gobo")] if "gobo" in args.methods else outs[0]).path)
    except ImportError:
        report = None  # matplotlib missing: the table is still the result
    if args.json:
        _print_json({"fp32": fp, "results": rows, "report": report})
    else:
        print(_eval_table(fp, rows))
        print(f"\ncompressed models: {', '.join(outs)}")
        print(f"report: {report}" if report else "report: not written (it needs matplotlib: pip install 'gobo[plot]')")
    return 0


def _cmd_models(args) -> int:
    from .assets import BUNDLED_MODELS, fetch_model, resolve_model

    if args.action == "list":
        rows = []
        for name, desc in BUNDLED_MODELS.items():
            try:
                where = str(resolve_model(name))
            except FileNotFoundError:
                where = f"not fetched (gobo models fetch {name})"
            rows.append({"name": name, "description": desc, "path": where})
        if args.json:
            _print_json(rows)
        else:
            print(_table(["name", "description", "path"], [[r["name"], r["description"], r["path"]] for r in rows]))
        return 0
    if args.name not in BUNDLED_MODELS:
        raise UserError(f"unknown model {args.name!r}; choose one of: {', '.join(BUNDLED_MODELS)}")
    path = fetch_model(args.name, force=args.force)
    print(str(path))
    return 0


def _cmd_data(args) -> int:
    from .assets import fetch_dataset

    print(str(fetch_dataset(force=args.force)))
    return 0


# ---------------------------------------------------------------------------- parser


def _parser() -> argparse.ArgumentParser:
    from .config import METHODS

    p = _Parser(prog="gobo", description="Compress BERT-family encoders after training (GOBO, Q-BERT, FQ-BERT, DirectQ) and check what it cost.")
    p.add_argument("--version", action="version", version="gobo 0.1.0")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, example: str | None = None) -> argparse.ArgumentParser:
        epilog = example or EXAMPLES.get(name)
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
        sp.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
        sp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
        return sp

    q = add("quantize", "quantize a model and write a compressed model directory")
    q.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    q.add_argument("-o", "--output", required=True, help="output directory (must not exist, or be empty, unless --force)")
    q.add_argument("--bits", type=int, default=3, help="bits per weight, 1-8 (default 3)")
    q.add_argument("--method", default="gobo", choices=list(METHODS), help="gobo (default: data-free improvements), gobo-paper (the paper's recipe), gobo-grid (the most accurate data-free setting: entropy-coded grids, steps weighed by output gain, error feedback on synthetic sentences, the embedding tables' under the gradients at their output; slower), gobo-grid-fast (gobo-grid in about half the time: one gradient direction, feedback on 32 sentences in groups of 768 inputs, the tables rounded), directq (uniform per-row), qbert (group-wise uniform, embeddings at 8 bits)")
    q.add_argument("--mixed", metavar="LOW/HIGH", help="qbert only: Hessian-ranked mixed precision per layer, e.g. 2/3 (measures the sensitivity on the training split first)")
    q.add_argument("--avg-bits", type=float, metavar="B", help="gobo, gobo-grid or gobo-grid-fast only: mixed precision (gobo-grid, or --codebook grid: grids) spending B bits per weight on average, all included (e.g. 2.5, or 3.5)")
    q.add_argument("--size-mb", type=float, metavar="MB", help="gobo only: mixed precision filling a file of at most MB megabytes")
    q.add_argument("--allocate", choices=["size", "sensitivity", "hessian", "uniform"], help="gobo only: how the mixed precision spends its bits: size (default: errors weighed by tensor size), sensitivity (data-free output gain), hessian (times each layer's Q-BERT Hessian sensitivity, measured on the training split first), uniform (every tensor at --bits)")
    q.add_argument("--codebook", choices=["tensor", "row", "grid"], help="gobo: one codebook per tensor (default) or per row (every tensor at --bits), or grid: a uniform grid per row, entropy coded, the file spending --bits (or --avg-bits) per weight all in; with --feedback, a scale per input column too (format version 3)")
    q.add_argument("--feedback", choices=["synthetic", "texts"], help="gobo: choose the codes of every Linear by error feedback on calibration inputs: synthetic sentences (data-free) or texts (--calibration-texts, default the benchmark's training split)")
    q.add_argument("--act-outliers", type=float, metavar="FRACTION", help="gobo: also keep exact this fraction of every Linear's weights (e.g. 0.006): those whose error weighs most once multiplied by its input's mean square on 64 synthetic sentences (data-free)")
    q.add_argument("--calibration-texts", metavar="FILE", help="with --feedback texts: one calibration text per line")
    q.add_argument("--feedback-texts", type=int, metavar="N", help="with --feedback: calibration sentences to use (default 256)")
    q.add_argument("--synthetic-seed", type=int, metavar="N", help="seed of the synthetic sentences (and the gains' gradient directions) behind --act-outliers, --feedback synthetic and --allocate sensitivity, gobo-grid and gobo-grid-fast among them (default 0); others show how much a result owes to the sample")
    q.add_argument("--feedback-damp", type=float, metavar="F", help="with --feedback: damping added to the diagonal of the inputs' second moments, as a fraction of its mean (default 0.1)")
    q.add_argument("--calibration-dtype", choices=["auto", "float32", "bfloat16"], help="with --feedback or --act-outliers: precision of the pass over the calibration sentences (default auto: bfloat16 where the processor multiplies it natively, about twice as fast; the file records the one used)")
    q.add_argument("--feedback-exclude", action="append", metavar="GLOB", help="with --feedback: Linear weights whose names match GLOB keep their nearest-centroid codes (repeatable), e.g. '*[0-9].output.dense*': the feed-forward outputs (not BERT's attention.output.dense), whose 3072-wide inputs in BERT-base-size models take most of the feedback's time")
    q.add_argument("--feedback-group", type=int, metavar="N", help="with --feedback: feed back inputs wider than N features in groups of about N, ranked by their mean square, each under its own block of the moments (768: a BERT-base feed-forward output's 3072-wide input in four groups, a quarter of its products and a sixteenth of its factorisation; 0: no groups)")
    q.add_argument("--compact", action="store_true", help="gobo: store centroids as float16 (rounded before coding) and outlier positions row by row as uint16 columns: fewer bytes, a format version 2 file")
    q.add_argument("--bits-for", action="append", metavar="GLOB=BITS", help="gobo: give tensors whose names match GLOB these bits, every other tensor --bits (repeatable, first match wins), e.g. '*intermediate.dense*=4'")
    q.add_argument("--include", action="append", metavar="GLOB", help="quantize only weights whose names match (repeatable; default all Linear/Embedding weights)")
    q.add_argument("--exclude", action="append", metavar="GLOB", help="leave weights whose names match in FP32 (repeatable)")
    q.add_argument("--force", action="store_true", help="replace an existing output directory")
    q.add_argument("-v", "--verbose", action="store_true", help="also print the per-tensor table")
    q.set_defaults(fn=_cmd_quantize)

    i = add("inspect", "print the per-tensor table of a compressed model, from the file alone")
    i.add_argument("outdir")
    i.set_defaults(fn=_cmd_inspect)

    e = add("eval", "FP32 vs compressed on the Rotten Tomatoes frozen-probe benchmark")
    e.add_argument("outdirs", nargs="+", metavar="OUTDIR")
    e.add_argument("--source", help="FP32 source model (default: the one recorded in the file)")
    e.add_argument("--limit", type=int, help="evaluate on this many test texts, spread over the split (default: all)")
    e.add_argument("--train-limit", type=int, help="train the probe on this many texts (default: all)")
    e.set_defaults(fn=_cmd_eval)

    d = add("demo", "quantize the default model at 3 bits, evaluate it against FP32, print the table")
    d.add_argument("--out", default="out/demo", help="where the compressed models go (default out/demo)")
    d.add_argument("--bits", type=int, default=3)
    d.add_argument("--methods", nargs="+", default=["gobo", "gobo-grid", "gobo-grid-fast", "gobo-paper", "directq"],
                   choices=["gobo", "gobo-grid", "gobo-grid-fast", "gobo-paper", "directq"])
    d.add_argument("--limit", type=int, help="test texts (default: all)")
    d.add_argument("--train-limit", type=int, help="train the probe on this many texts (default: all)")
    d.set_defaults(fn=_cmd_demo)

    m = add("models", "list or fetch the bundled models")
    m.add_argument("action", choices=["list", "fetch"])
    m.add_argument("name", nargs="?", default="minilm-l6")
    m.add_argument("--force", action="store_true", help="fetch again even if present")
    m.set_defaults(fn=_cmd_models)

    da = add("data", "fetch the Rotten Tomatoes corpus into the cache")
    da.add_argument("action", choices=["fetch"])
    da.add_argument("--force", action="store_true")
    da.set_defaults(fn=_cmd_data)

    # commands that live beside their subsystem: each module has register(add)
    import importlib

    for mod in COMMAND_MODULES:
        importlib.import_module(mod).register(add)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = _parser().parse_args(argv)
    if getattr(args, "bits", 3) is not None and not 1 <= getattr(args, "bits", 3) <= 8:
        print(f"gobo: error: --bits must be from 1 to 8, got {args.bits}", file=sys.stderr)
        return 2
    from .io import FormatError

    try:
        return args.fn(args)
    except UserError as exc:
        msg = str(exc)
    except FormatError as exc:
        msg = str(exc)
    except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError) as exc:
        msg = str(exc) if not getattr(exc, "filename", None) or str(exc).startswith("[Errno") is False else f"{exc.strerror}: {exc.filename}"
    except (ValueError, KeyError, RuntimeError, MemoryError) as exc:
        msg = str(exc).strip("'\"")
    except KeyboardInterrupt:
        print("gobo: interrupted; no output was written", file=sys.stderr)
        return 130
    print(f"gobo: error: {msg.splitlines()[0] if msg else 'failed'}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""``gobo report`` (one HTML page per compressed model), ``gobo sweep`` (accuracy vs size) and
``gobo compare`` (every method on one model, the Q-BERT-style table)."""

from __future__ import annotations

import time
from pathlib import Path

__all__ = ["register"]

_METHODS = ["gobo", "gobo-paper", "directq"]


def _need_matplotlib() -> None:
    from .cli import UserError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plots need matplotlib, which is not installed; run: pip install 'gobo[plot]'") from None


def _cmd_report(args) -> int:
    from .cli import UserError, _Bar, _fmt_bytes, _print_json
    from .htmlreport import REPORT_FILE, write_report
    from .io import WEIGHTS_FILE

    outdir = Path(args.outdir)
    if not outdir.is_dir():
        raise UserError(f"{outdir} is not a directory; pass a compressed model directory written by 'gobo quantize'")
    if not (outdir / WEIGHTS_FILE).is_file():
        raise UserError(f"{outdir} is not a gobo model directory (no {WEIGHTS_FILE}); make one with 'gobo quantize'")
    output = Path(args.output) if args.output else None
    if output is not None and output.is_dir():
        output = output / REPORT_FILE
    _need_matplotlib()
    t0 = time.perf_counter()
    with _Bar(args.quiet, None, "report", "tensor") as bar:
        def progress(done: int, total: int) -> None:
            if bar.bar is not None and bar.bar.total != total:
                bar.bar.total = total
            bar.update()

        info = write_report(outdir, output, source=args.source, progress=progress)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({"report": str(info.path), "tensors": info.n_tensors, "weights_from": info.weights_from,
                     "source_dir": info.source_dir, "evaluated": info.evaluated, "bytes": info.nbytes, "seconds": seconds})
    else:
        what = f"FP32 weights of {info.source_dir}" if info.weights_from == "source" else "dequantized values (FP32 source not found; pass --source)"
        print(f"report: {info.path}")
        print(f"  {info.n_tensors} tensors, histograms of the {what}")
        print(f"  {'with' if info.evaluated else 'without'} accuracy results{'' if info.evaluated else ' (run gobo eval first to include them)'}")
        print(f"  {_fmt_bytes(info.nbytes)}, {seconds:.1f} s")
    return 0


def _run_output(args, prefix: str):
    """The output directory of a sweep or compare run and its progress-bar factory; checks
    --limit, --train-limit and that the directory can be one."""
    from .cli import UserError, _Bar

    for name, v in (("--limit", args.limit), ("--train-limit", args.train_limit)):
        if v is not None and v < 1:
            raise UserError(f"{name} must be a positive number of texts, got {v}")
    out = Path(args.output) if args.output else Path("out") / f"{prefix}-{Path(str(args.model)).name}"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another output directory with -o")

    def stage(desc: str, total: int | None, unit: str):
        return _Bar(args.quiet, total, desc, unit)

    return out, stage


def _cmd_sweep(args) -> int:
    from .cli import UserError, _eval_table, _print_json
    from .sweep import SWEEP_JSON, SWEEP_PNG, run_sweep

    bad = [b for b in args.bits_list if not 1 <= b <= 8]
    if bad:
        raise UserError(f"--bits must be from 1 to 8, got {bad[0]}")
    out, stage = _run_output(args, "sweep")
    _need_matplotlib()

    t0 = time.perf_counter()
    res = run_sweep(args.model, args.bits_list, args.methods, out, limit=args.limit, train_limit=args.train_limit, stage=stage)
    seconds = time.perf_counter() - t0
    doc = res.to_dict()
    if args.json:
        _print_json({**doc, "output": str(out), "json": str(out / SWEEP_JSON), "plot": str(out / SWEEP_PNG), "seconds": seconds})
    else:
        rows = [{**r, "model": f"{r['method']}-{r['bits']}b"} for r in doc["results"]]
        print(_eval_table(doc["fp32"], rows))
        print(f"\nresults: {out / SWEEP_JSON}\nplot:    {out / SWEEP_PNG}\nmodels:  {out}/METHOD-BITSb ({seconds:.0f} s)")
    return 0


def register(add) -> None:
    r = add("report", "write one self-contained HTML page about a compressed model (histograms, per-tensor table, bits per layer, accuracy)",
            "example: gobo report out/minilm-3b            # writes out/minilm-3b/report.html")
    r.add_argument("outdir", metavar="OUTDIR", help="a compressed model directory")
    r.add_argument("-o", "--output", help="the HTML file to write (default OUTDIR/report.html)")
    r.add_argument("--source", help="FP32 source model for the histograms (default: the one recorded in the file)")
    r.set_defaults(fn=_cmd_report)

    s = add("sweep", "quantize at several bit widths and methods, evaluate each, plot accuracy against size",
            "example: gobo sweep minilm-l6 --bits 2 3 4 --methods gobo directq --limit 1000 -o out/sweep")
    s.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    s.add_argument("--bits", dest="bits_list", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8], metavar="B",
                   help="bit widths (default 2 3 4 5 6 8)")
    s.add_argument("--methods", nargs="+", default=["gobo", "directq"], choices=_METHODS, help="methods (default gobo directq)")
    s.add_argument("-o", "--output", help="output directory (default out/sweep-MODEL); its compressed models are reused when run again")
    s.add_argument("--limit", type=int, help="evaluate on this many test texts, spread over the split (default: all)")
    s.add_argument("--train-limit", type=int, help="train the probe on this many texts (default: all)")
    s.set_defaults(fn=_cmd_sweep)
    register_compare(add)


def _cmd_compare(args) -> int:
    from .cli import UserError, _print_json
    from .compare import COMPARE_JSON, COMPARE_MD, COMPARE_PNG, default_rows, markdown, run_compare, select_rows

    out, stage = _run_output(args, "compare")
    try:
        rows = select_rows(default_rows(qat=not args.no_qat), args.rows)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.list:
        for r in rows:
            print(f"{r.key:22s} {r.label}")
        return 0

    hessian = None
    given = {k: v for k, v in (("subsets", args.hessian_subsets), ("subset_size", args.hessian_texts)) if v is not None}
    if given:
        from .hessian import SensitivitySettings

        try:
            hessian = SensitivitySettings(**given)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    qat_settings = None
    if args.qat_texts is not None:
        from .qat import QatSettings

        try:
            qat_settings = QatSettings(texts=args.qat_texts)
        except ValueError as exc:
            raise UserError(f"--qat-texts: {exc}") from None
    t0 = time.perf_counter()
    doc = run_compare(args.model, out, rows, limit=args.limit, train_limit=args.train_limit, stage=stage, hessian=hessian,
                      qat_settings=qat_settings)
    seconds = time.perf_counter() - t0
    if args.json:
        _print_json({**doc, "output": str(out), "markdown": str(out / COMPARE_MD), "plot": str(out / COMPARE_PNG), "seconds": seconds})
    else:
        print(markdown(doc))
        print(f"table: {out / COMPARE_MD}\njson:  {out / COMPARE_JSON}\nplot:  {out / COMPARE_PNG}\nmodels: {out}/KEY ({seconds:.0f} s)")
    return 0


def register_compare(add) -> None:
    c = add("compare", "every method on one model, measured in one run: the Q-BERT-style comparison table (markdown, JSON, plot)",
            "example: gobo compare minilm-l6 -o out/compare-minilm           # --rows 'gobo-*' 'qbert-3*' for a part")
    c.add_argument("model", help="local model directory, or a bundled model: minilm-l6, mpnet-base")
    c.add_argument("-o", "--output", help="output directory (default out/compare-MODEL); rows already measured there are reused")
    c.add_argument("--rows", nargs="+", metavar="GLOB", help="only the rows whose keys match (FP32 always); --list shows the keys")
    c.add_argument("--no-qat", action="store_true", help="leave out the fine-tuned Q-BERT rows (the slow ones)")
    c.add_argument("--list", action="store_true", help="list the rows and exit")
    c.add_argument("--limit", type=int, help="evaluate on this many test texts, spread over the split (default: all)")
    c.add_argument("--train-limit", type=int, help="train the probe on this many texts (default: all)")
    c.add_argument("--hessian-subsets", type=int, metavar="N", help="Q-BERT MP and GOBO Hessian rows: Hessian eigenvalues on N training subsets (default 4)")
    c.add_argument("--hessian-texts", type=int, metavar="N", help="Q-BERT MP and GOBO Hessian rows: N texts per subset (default 64; fewer for a large model on a CPU)")
    c.add_argument("--qat-texts", type=int, metavar="N", help="+ QAT rows: fine-tune on N training texts, one epoch (default 3000; fewer for a large model on a CPU)")
    c.set_defaults(fn=_cmd_compare)

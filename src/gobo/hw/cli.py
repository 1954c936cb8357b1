"""``gobo hw``: the hardware models on a compressed model directory, as tables or JSON."""

from __future__ import annotations

from pathlib import Path

__all__ = ["register"]

EXAMPLE = """example: gobo hw out/minilm-3b --arch tpu     per-layer traffic, time, energy with FP32 / FP16 / GOBO weights
more:
  gobo hw out/minilm-3b --arch gobo --seq 256      the GOBO engine against Tensor Cores at equal area
  gobo hw out/minilm-3b --arch fqbert              FQ-BERT on ZCU102 / ZCU111 against CPU and GPU
  gobo hw out/minilm-3b --arch tpu --sources       the architecture's parameters and their sources
  gobo hw out/minilm-3b out/mpnet-3b --sweep -o out/hw   figures (PNG) and JSON"""


def register(add) -> None:
    sp = add("hw", "estimate time, traffic and energy of a compressed model on hardware models", EXAMPLE)
    sp.add_argument("outdirs", nargs="*", metavar="OUTDIR", help="compressed model directory (several with --sweep; none with --sources)")
    sp.add_argument("--arch", default="tpu", help="tpu, eyeriss, tensorcore, gobo, fqbert, or an architecture .json file (default tpu)")
    sp.add_argument("--seq", type=int, default=128, help="tokens per sequence (default 128)")
    sp.add_argument("--batch", type=int, default=1, help="sequences per inference (default 1)")
    sp.add_argument("--board", help="fqbert: zcu102 or zcu111 (default: both)")
    sp.add_argument("--sources", action="store_true", help="print the architecture's parameters with their sources")
    sp.add_argument("-v", "--verbose", action="store_true", help="also print every operation of every layer")
    sp.add_argument("--sweep", action="store_true", help="every architecture, every model, several sequence lengths: figures and JSON into -o")
    sp.add_argument("-o", "--output", help="--sweep: directory for the PNG figures and hw_sweep.json")
    sp.set_defaults(fn=_cmd_hw)


# ---------------------------------------------------------------------------- helpers


def _mb(x: float) -> str:
    return f"{x / 1e6:.2f}"


def _us(x: float) -> str:
    return f"{x * 1e6:.1f}" if x * 1e6 < 1e4 else f"{x * 1e6:.0f}"


def _uj(pj: float) -> str:
    return f"{pj / 1e6:.1f}" if pj < 1e10 else f"{pj / 1e6:.0f}"


def _x(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def _trio(vals) -> str:
    return " / ".join(vals)


def _paper(v) -> str:
    return "not known" if v is None else f"{v:g}x"


def _workload_line(w) -> str:
    wb = w.weights
    return (f"{w.model} ({w.model_type}), seq {w.seq}, batch {w.batch}: {w.macs / 1e9:.2f} GMAC; weights off chip "
            f"{_mb(wb.fp32)} MB FP32, {_mb(wb.fp16)} MB FP16, {_mb(wb.gobo)} MB GOBO ({wb.fp32 / wb.gobo:.2f}x)")


def _sources_table(arch) -> str:
    def value(obj, k):
        v = getattr(obj, k, "")
        return v.name if hasattr(v, "sources") else str(v)

    def block(obj, title: str) -> str:
        keys = [k for k in obj.sources if not k.startswith("baseline.")]
        kw = max(len(k) for k in keys)
        vw = max(len(value(obj, k)) for k in keys)
        return "\n".join([title] + [f"  {k.ljust(kw)}  {value(obj, k).ljust(vw)}  {obj.sources[k]}" for k in keys])

    parts = [block(arch, f"{arch.name}: {arch.title}")]
    for b in getattr(arch, "boards", {}).values():
        parts.append(block(b, f"board {b.name}"))
    for p in getattr(arch, "processors", {}).values():
        parts.append(block(p, f"processor {p.name}"))
    if hasattr(arch, "baseline"):
        parts.append(block(arch.baseline, f"baseline {arch.baseline.name}: {arch.baseline.title}"))
    return "\n\n".join(parts)


# ---------------------------------------------------------------------------- memory compression


def _baseline_text(w, arch, runs: dict, verbose: bool) -> str:
    from ..cli import _table
    from .papers import GOBO

    f32, f16, gb = runs["fp32"], runs["fp16"], runs["gobo"]
    headers = ["layer", "MMAC", "traffic MB fp32 / fp16 / gobo", "time us fp32 / fp16 / gobo", "bound fp32 > gobo", "speedup", "energy uJ fp32 / fp16 / gobo", "energy saving"]
    rows = []
    for l32, l16, lg in zip(f32.layers, f16.layers, gb.layers):
        rows.append([
            l32.name, f"{l32.macs / 1e6:.1f}",
            _trio([_mb(l32.traffic), _mb(l16.traffic), _mb(lg.traffic)]),
            _trio([_us(l32.seconds), _us(l16.seconds), _us(lg.seconds)]),
            f"{l32.bound} > {lg.bound}",
            _x(l32.seconds, lg.seconds),
            _trio([_uj(l32.energy.total), _uj(l16.energy.total), _uj(lg.energy.total)]),
            _x(l32.energy.total, lg.energy.total),
        ])
        if verbose:
            for o32, o16, og in zip(l32.ops, l16.ops, lg.ops):
                rows.append([
                    f"  {o32.name}", f"{o32.macs / 1e6:.1f}",
                    _trio([_mb(o32.traffic), _mb(o16.traffic), _mb(og.traffic)]),
                    _trio([_us(o32.seconds), _us(o16.seconds), _us(og.seconds)]),
                    f"{o32.bound} > {og.bound}",
                    _x(o32.seconds, og.seconds) if og.seconds else "-",
                    _trio([_uj(o32.energy.total), _uj(o16.energy.total), _uj(og.energy.total)]),
                    _x(o32.energy.total, og.energy.total) if og.energy.total else "-",
                ])
    rows.append([
        "total", f"{w.macs / 1e6:.1f}",
        _trio([_mb(f32.traffic), _mb(f16.traffic), _mb(gb.traffic)]),
        _trio([_us(f32.seconds), _us(f16.seconds), _us(gb.seconds)]),
        "", _x(f32.seconds, gb.seconds),
        _trio([_uj(f32.energy.total), _uj(f16.energy.total), _uj(gb.energy.total)]),
        _x(f32.energy.total, gb.energy.total),
    ])
    lines = [_workload_line(w), f"{arch.name}: {arch.describe()}", "", _table(headers, rows), ""]
    erows = []
    for fmt, r in runs.items():
        e = r.energy
        erows.append([fmt, _uj(e.dram), _uj(e.sram), _uj(e.compute), _uj(e.decode), _uj(e.total), _x(f32.seconds, r.seconds), _x(f32.energy.total, e.total)])
    lines.append(_table(["weights", "DRAM uJ", "SRAM uJ", "compute uJ", "decode uJ", "total uJ", "speedup vs fp32", "energy vs fp32"], erows))
    lines.append("")
    lines.append(f"GOBO paper (MICRO 2020): weight compression {_paper(GOBO['weight_compression']['value'])} (BERT-base, 3 bits); "
                 f"this model {w.weights.fp32 / w.weights.gobo:.2f}x. Memory-compression speedup: paper {_paper(GOBO['memory_compression_speedup']['value'])}, "
                 f"here {_x(f32.seconds, gb.seconds)} over FP32 weights.")
    return "\n".join(lines)


def _baseline_json(w, arch, runs: dict) -> dict:
    return {
        "workload": {k: v for k, v in w.to_dict().items() if k != "layers"},
        "arch": {"name": arch.name, "title": arch.title, **{k: getattr(arch, k) for k in arch.sources}},
        "formats": {fmt: r.to_dict() for fmt, r in runs.items()},
        "speedup_vs_fp32": {fmt: runs["fp32"].seconds / r.seconds for fmt, r in runs.items()},
        "energy_ratio_vs_fp32": {fmt: runs["fp32"].energy.total / r.energy.total for fmt, r in runs.items()},
    }


# ---------------------------------------------------------------------------- GOBO engine


def _engine_text(w, engine, eng, tc16, tc32, tcg, verbose: bool) -> str:
    from ..cli import _table
    from .papers import GOBO

    headers = ["layer", "MMAC", "tensorcore us fp16 / gobo-mem", "GOBO engine us", "bound", "speedup", "energy uJ tc fp16 / engine", "energy eff."]
    rows = []
    for a, b, c in zip(tc16.layers, tcg.layers, eng.layers):
        rows.append([a.name, f"{a.macs / 1e6:.1f}", _trio([_us(a.seconds), _us(b.seconds)]), _us(c.seconds), c.bound,
                     _x(a.seconds, c.seconds), _trio([_uj(a.energy.total), _uj(c.energy.total)]), _x(a.energy.total, c.energy.total)])
        if verbose:
            for oa, ob, oc in zip(a.ops, b.ops, c.ops):
                rows.append([f"  {oa.name}", f"{oa.macs / 1e6:.1f}", _trio([_us(oa.seconds), _us(ob.seconds)]), _us(oc.seconds), oc.bound,
                             _x(oa.seconds, oc.seconds) if oc.seconds else "-", _trio([_uj(oa.energy.total), _uj(oc.energy.total)]),
                             _x(oa.energy.total, oc.energy.total) if oc.energy.total else "-"])
    rows.append(["total", f"{w.macs / 1e6:.1f}", _trio([_us(tc16.seconds), _us(tcg.seconds)]), _us(eng.seconds), "",
                 _x(tc16.seconds, eng.seconds), _trio([_uj(tc16.energy.total), _uj(eng.energy.total)]), _x(tc16.energy.total, eng.energy.total)])
    adds = sum(o.detail.get("additions", 0) for layer in eng.layers for o in layer.ops)
    mults = sum(o.detail.get("multiplications", 0) for layer in eng.layers for o in layer.ops)
    outl = sum(o.detail.get("outlier_macs", 0) for layer in eng.layers for o in layer.ops)
    dense = sum(o.detail.get("dense_macs", 0) for layer in eng.layers for o in layer.ops)
    a = engine.area_dict()
    e = eng.energy
    lines = [
        _workload_line(w),
        f"gobo: {engine.describe()}",
        f"area: a tensorcore MAC {a['baseline_mac_area_um2']:.0f} um^2 x {a['baseline_macs']} = {a['baseline_area_um2'] / 1e6:.2f} mm^2; "
        f"a GOBO PE {a['pe_area_um2']:.0f} um^2 -> {a['n_pe']} PEs (45 nm, Horowitz ISSCC 2014; see --sources)",
        "",
        _table(headers, rows),
        "",
        f"operations: {adds / 1e6:.1f} M additions, {mults / 1e6:.2f} M multiplications, {outl / 1e6:.3f} M outlier MACs, "
        f"{dense / 1e6:.1f} M dense MACs (attention, unquantized weights); dense reference {w.macs / 1e6:.1f} M MACs",
        f"engine energy: DRAM {_uj(e.dram)} uJ, SRAM {_uj(e.sram)} uJ, compute {_uj(e.compute)} uJ, total {_uj(e.total)} uJ",
        f"tensorcore with FP32 weights: {_us(tc32.seconds)} us, {_uj(tc32.energy.total)} uJ (engine {_x(tc32.seconds, eng.seconds)} faster, "
        f"{_x(tc32.energy.total, eng.energy.total)} less energy)",
        "",
        f"GOBO paper's abstract: {_paper(GOBO['engine_speedup_vs_tensorcore']['value'])} speedup and {_paper(GOBO['engine_energy_efficiency_vs_tensorcore']['value'])} "
        f"energy efficiency vs Tensor Cores; this model: {_x(tc16.seconds, eng.seconds)} and {_x(tc16.energy.total, eng.energy.total)} (vs FP16 weights).",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- FQ-BERT


def _fqbert_text(w, fq, fpga: dict, procs: dict) -> str:
    from ..cli import _table
    from .fpga import fqbert_weight_bytes
    from .papers import FQBERT

    rows = []
    for name, r in fpga.items():
        paper = FQBERT.get(f"fps_per_w_{name}", {}).get("value")
        rows.append([name, f"{r.dsp_used}/{r.board.dsp}", f"{r.bram_used}/{r.board.bram36}" + ("" if r.fits else " (spills)"), f"{r.board.clock_mhz:g}",
                     f"{r.latency_s * 1e3:.2f}", f"{r.fps:.1f}", f"{r.power_w:.2f}", f"{r.fps_per_w:.2f}", "not known" if paper is None else f"{paper:g} (BERT-base)"])
    for name, p in procs.items():
        rows.append([f"{name}: {p.processor.title}", "-", "-", f"{p.processor.clock_mhz:g}", f"{p.latency_s * 1e3:.2f}", f"{p.fps:.1f}",
                     f"{p.processor.power_w:g}", f"{p.fps_per_w:.3f}", "not known"])
    wq = sum(fqbert_weight_bytes(op, fq.weight_bits, fq.scale_bytes_per_row) for op in w.ops())
    lines = [
        _workload_line(w),
        f"fqbert: {fq.title}",
        "",
        _table(["target", "DSP used", "BRAM36 used", "MHz", "latency ms", "fps", "power W", "fps/W", "paper fps/W"], rows),
        "",
        f"weight compression, FQ-BERT format: {wq and w.weights.fp32 / wq:.2f}x (paper: {FQBERT['weight_compression']['value']:g}x, BERT-base)",
    ]
    first = next(iter(fpga.values()))
    for name, p in procs.items():
        paper = FQBERT.get(f"efficiency_vs_{name}", {}).get("value")
        lines.append(f"energy efficiency of {first.board.name} vs {name}: {first.fps_per_w / p.fps_per_w:.2f}x "
                     f"(paper's abstract: {'not known' if paper is None else f'{paper:g}x'}; the {name} here runs at its peak, its best case)")
    for name, r in fpga.items():
        ej = r.energy_per_frame_j
        lines.append(f"{name} energy per frame: " + ", ".join(f"{k} {v * 1e3:.3f} mJ" for k, v in ej.items()) + f"; total {sum(ej.values()) * 1e3:.3f} mJ")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command


def _cmd_hw(args) -> int:
    from ..cli import UserError, _Bar, _print_json

    if not args.outdirs and not args.sources:
        raise UserError("pass a compressed model directory (written by 'gobo quantize')")
    if args.seq < 1 or args.batch < 1:
        raise UserError(f"--seq and --batch must be positive integers, got {args.seq} and {args.batch}")
    for d in args.outdirs:
        if not Path(d).is_dir():
            raise UserError(f"{d} is not a directory; pass a directory written by 'gobo quantize'")
    if args.sweep:
        return _sweep(args)
    if args.output:
        raise UserError("-o/--output is only used with --sweep")

    from .accel import Accelerator, FqBertEngine, GoboEngine, load_arch
    from .workload import load_workload

    try:
        arch = load_arch(args.arch)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.board and not isinstance(arch, FqBertEngine):
        raise UserError("--board is only used with --arch fqbert")
    if args.sources:
        if args.json:
            _print_json({"name": arch.name, "title": arch.title, "sources": dict(arch.sources)})
        else:
            print(_sources_table(arch))
        return 0
    results = []
    for d in args.outdirs:
        with _Bar(args.quiet, None, f"reading {Path(d).name}", "model"):
            try:
                w = load_workload(d, seq=args.seq, batch=args.batch)
            except (ValueError, FileNotFoundError) as exc:
                raise UserError(str(exc)) from None
        if isinstance(arch, Accelerator):
            from .roofline import compare_formats

            runs = compare_formats(w, arch)
            results.append(_baseline_json(w, arch, runs) if args.json else _baseline_text(w, arch, runs, args.verbose))
        elif isinstance(arch, GoboEngine):
            from .engine import simulate_engine
            from .roofline import simulate

            eng = simulate_engine(w, arch)
            tc16, tc32, tcg = (simulate(w, arch.baseline, f) for f in ("fp16", "fp32", "gobo"))
            if args.json:
                results.append({
                    "workload": {k: v for k, v in w.to_dict().items() if k != "layers"},
                    "area": arch.area_dict(),
                    "engine": eng.to_dict(),
                    "baseline": {"fp16": tc16.to_dict(), "fp32": tc32.to_dict(), "gobo": tcg.to_dict()},
                    "speedup_vs_baseline_fp16": tc16.seconds / eng.seconds,
                    "energy_ratio_vs_baseline_fp16": tc16.energy.total / eng.energy.total,
                })
            else:
                results.append(_engine_text(w, arch, eng, tc16, tc32, tcg, args.verbose))
        else:
            from .fpga import simulate_fqbert, simulate_processor

            boards = [args.board] if args.board else list(arch.boards)
            try:
                fpga = {b: simulate_fqbert(w, arch, b) for b in boards}
            except ValueError as exc:
                raise UserError(str(exc)) from None
            procs = {name: simulate_processor(w, p) for name, p in arch.processors.items()}
            if args.json:
                first = next(iter(fpga.values()))
                results.append({
                    "workload": {k: v for k, v in w.to_dict().items() if k != "layers"},
                    "boards": {b: r.to_dict() for b, r in fpga.items()},
                    "processors": {n: p.to_dict() for n, p in procs.items()},
                    "efficiency_vs": {n: first.fps_per_w / p.fps_per_w for n, p in procs.items()},
                })
            else:
                results.append(_fqbert_text(w, arch, fpga, procs))
    if args.json:
        _print_json(results[0] if len(results) == 1 else results)
    else:
        print("\n\n".join(results))
    return 0


def _sweep(args) -> int:
    from ..cli import UserError, _Bar, _print_json
    from ..io import read_compressed
    from .sweep import run_sweep, write_figures
    from .workload import read_config

    if not args.output:
        raise UserError("--sweep writes figures: pass the output directory with -o")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory; choose another -o")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--sweep draws with matplotlib, which is not installed; pip install 'gobo[plot]'") from None
    models = []
    for d in args.outdirs:
        cm = read_compressed(d)
        try:
            config = read_config(d)
        except (ValueError, FileNotFoundError) as exc:
            raise UserError(str(exc)) from None
        models.append((Path(d).resolve().name, cm, config))
    seqs = (32, 64, 128, 256, 512)
    with _Bar(args.quiet, len(models) + len(seqs), "sweep", "run") as bar:
        try:
            result = run_sweep(models, seq=args.seq, batch=args.batch, seqs=seqs, progress=lambda _: bar.update())
        except ValueError as exc:
            raise UserError(str(exc)) from None
    paths = write_figures(result, out)
    if args.json:
        _print_json({"written": [str(p) for p in paths], **result})
    else:
        from ..cli import _table

        rows = []
        for m in result["models"]:
            a = m["archs"]
            rows.append([m["model"], f"{m['compression']:.2f}x"]
                        + [f"{a[x]['gobo']['speedup_vs_fp32']:.2f}x / {a[x]['gobo']['energy_ratio_vs_fp32']:.2f}x" for x in ("tpu", "eyeriss", "tensorcore")]
                        + [f"{a['gobo']['gobo']['speedup_vs_baseline_fp16']:.2f}x / {a['gobo']['gobo']['energy_ratio_vs_baseline_fp16']:.2f}x"])
        print(f"seq {result['seq']}, batch {result['batch']}; speedup / energy ratio of GOBO weights over FP32 weights, and of the GOBO engine over tensorcore FP16")
        print(_table(["model", "weights fp32/gobo", "tpu", "eyeriss", "tensorcore", "GOBO engine"], rows))
        print("\nwritten: " + ", ".join(str(p) for p in paths))
    return 0

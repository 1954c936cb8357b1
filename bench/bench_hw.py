"""Hardware-model sweep: GOBO as memory compression and as an accelerator, FQ-BERT on FPGA.

    .venv/bin/python bench/bench_hw.py                          # minilm-l6 (+ mpnet-base if fetched), gobo and gobo-paper at 3 bits
    .venv/bin/python bench/bench_hw.py --dirs out/minilm-3b     # existing compressed directories instead

Each model is quantized into a temporary directory (or read from ``--dirs``), then
``gobo.hw.sweep`` estimates every architecture at ``--seq`` / ``--batch`` and the first
model over sequence lengths 32-512. Written to ``--out`` (default bench/results/hw):
``hw_sweep.json`` (everything), ``speedup.png``, ``energy.png``, ``traffic.png``, ``seq.png``,
and ``fqbert.json`` (FQ-BERT on ZCU102 / ZCU111 against the CPU and GPU rooflines). These are
analytical models, not measurements; the architectures' parameters and their sources are in
``src/gobo/hw/arch/*.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]


def _quantized_dirs(models: list[str], methods: list[str], bits: int, tmp: Path) -> list[Path]:
    import gobo
    from gobo.assets import resolve_model

    dirs = []
    for model in models:
        try:
            resolve_model(model)
        except FileNotFoundError:
            print(f"skipping {model}: not fetched (gobo models fetch {model})", file=sys.stderr)
            continue
        for method in methods:
            d = tmp / f"{model}-{method}-{bits}b"
            print(f"quantizing {model} ({method}, {bits} bits)", file=sys.stderr)
            gobo.save(gobo.quantize(model, gobo.method_config(method, bits)), d)
            dirs.append(d)
    return dirs


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["minilm-l6", "mpnet-base"])
    p.add_argument("--methods", nargs="+", default=["gobo", "gobo-paper"])
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--dirs", nargs="+", help="compressed model directories (skip quantizing)")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "hw"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    from gobo.hw import build_workload, load_arch, simulate_fqbert, simulate_processor
    from gobo.hw.sweep import run_sweep, write_figures
    from gobo.hw.workload import read_config
    from gobo.io import read_compressed

    with tempfile.TemporaryDirectory(prefix="gobo-hw-") as tmp:
        dirs = [Path(d) for d in args.dirs] if args.dirs else _quantized_dirs(args.models, args.methods, args.bits, Path(tmp))
        if not dirs:
            print("no models to run", file=sys.stderr)
            return 1
        models = [(d.name, read_compressed(d), read_config(d)) for d in dirs]
        result = run_sweep(models, seq=args.seq, batch=args.batch)
        written = write_figures(result, args.out)

        fq = load_arch("fqbert")
        fpga = {}
        for name, cm, config in models:
            w = build_workload(cm.quantized, cm.dense, config, seq=args.seq, batch=args.batch, model=name)
            boards = {b: simulate_fqbert(w, fq, b) for b in fq.boards}
            procs = {n: simulate_processor(w, pr) for n, pr in fq.processors.items()}
            fpga[name] = {
                "boards": {b: {k: v for k, v in r.to_dict().items() if k != "layers"} for b, r in boards.items()},
                "processors": {n: pr.to_dict() for n, pr in procs.items()},
            }
        fq_path = Path(args.out) / "fqbert.json"
        fq_path.write_text(json.dumps({"seq": args.seq, "batch": args.batch, "models": fpga}, indent=2))
        written.append(fq_path)

    print(f"seq {args.seq}, batch {args.batch}: speedup / energy ratio, GOBO weights over FP32 weights (memory compression), "
          "and the GOBO engine over the Tensor-Core-like baseline with FP16 weights")
    head = f"{'model':<28} {'fp32/gobo':>9} {'tpu':>14} {'eyeriss':>14} {'tensorcore':>14} {'GOBO engine':>14}"
    print(head)
    print("-" * len(head))
    for m in result["models"]:
        a = m["archs"]
        cells = [f"{a[x]['gobo']['speedup_vs_fp32']:.2f}x/{a[x]['gobo']['energy_ratio_vs_fp32']:.2f}x" for x in ("tpu", "eyeriss", "tensorcore")]
        eng = a["gobo"]["gobo"]
        cells.append(f"{eng['speedup_vs_baseline_fp16']:.2f}x/{eng['energy_ratio_vs_baseline_fp16']:.2f}x")
        print(f"{m['model']:<28} {m['compression']:>8.2f}x " + " ".join(f"{c:>14}" for c in cells))
    print()
    print(f"{'model':<28} {'board':<8} {'fps':>8} {'W':>7} {'fps/W':>7}   (FQ-BERT paper: 3.18 fps/W, BERT-base on ZCU102)")
    for name, d in fpga.items():
        for b, r in d["boards"].items():
            print(f"{name:<28} {b:<8} {r['fps']:>8.1f} {r['power_w']:>7.2f} {r['fps_per_w']:>7.2f}")
    print("\nwritten: " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

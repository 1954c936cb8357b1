"""CPU inference benchmark: FP32 PyTorch vs gobo packed (3-bit, 4-bit) vs torch dynamic int8.

    .venv/bin/python bench/bench_cpu.py                 # minilm-l6 and mpnet-base, all shapes
    .venv/bin/python bench/bench_cpu.py --quick         # minilm-l6, batch 1 and 8, seq 128

All contenders use the same thread count (``--threads``, default ``torch.get_num_threads()``).
Timing: one subprocess loads every contender and runs them round-robin (rep i of each within
the same few seconds), so that a busy machine slows them alike; the median latency of a
forward pass (``last_hidden_state``) per batch x sequence length, throughput in sequences per
second, and the speed ratio to FP32 from that same process (> 1 means faster than FP32).
Memory: each contender alone in its own subprocess: peak RSS (VmHWM) after each shape, and
the bytes of the model's resident weights (every parameter and buffer; for int8, the packed
int8 weights, their scales and the FP32 rest). A table goes to stdout, everything to JSON.

Contenders:

* ``fp32``: the source model, transformers, FP32.
* ``gobo-3b`` / ``gobo-4b``: ``gobo.quantize(model, GoboConfig(bits=b))`` (size-aware mixed
  widths averaging b bits, row statistics), loaded with ``gobo.load(dir, packed=True)``.
* ``gobo-paper-3b``: the MICRO 2020 recipe (every tensor 3 bits, one codebook, no row stats).
* ``int8-dynamic``: ``torch.ao.quantization.quantize_dynamic`` on every nn.Linear.

Optional peers (torchao, optimum-quanto, onnxruntime) are not run: none is a dependency.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODELS = ("minilm-l6", "mpnet-base")
BATCHES = (1, 8, 32)
SEQS = (16, 128)
GOBO_CONFIGS = {
    "gobo-3b": ("GoboConfig", {"bits": 3}),
    "gobo-4b": ("GoboConfig", {"bits": 4}),
    "gobo-paper-3b": ("paper", {"bits": 3}),
}
CONTENDERS = ("fp32", *GOBO_CONFIGS, "int8-dynamic")


# ---------------------------------------------------------------------------- worker side


def _peak_rss_mib() -> float:
    """This process' peak resident set (VmHWM: unlike ru_maxrss it does not inherit the
    parent's peak across fork + exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _weight_bytes(model) -> int:
    import torch

    from gobo.nn import resident_weight_bytes

    total = resident_weight_bytes(model)
    for mod in model.modules():  # dynamic int8 Linear keeps its weights outside parameters
        if hasattr(mod, "_weight_bias") and type(mod).__module__.startswith("torch.ao.nn.quantized"):
            w, b = mod._weight_bias()
            total += w.int_repr().numel()
            if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
                total += w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
            else:
                total += 16
            if b is not None:
                total += b.numel() * b.element_size()
    return total


def _load(contender: str, model_dir: str, packed_dir: str | None):
    import torch

    if contender.startswith("gobo"):
        import gobo

        return gobo.load(packed_dir, packed=True)
    from gobo.hf import load_source

    model = load_source(model_dir)
    if contender == "int8-dynamic":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _inputs(vocab: int, batch: int, seq: int):
    import torch

    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def worker_memory(args) -> None:
    """One contender alone: load time, resident weights, peak RSS after each shape."""
    import torch

    torch.set_num_threads(args.threads)
    rss_imports = _peak_rss_mib()
    t0 = time.perf_counter()
    model = _load(args.contender, args.model_dir, args.packed_dir)
    load_s = time.perf_counter() - t0
    rss_loaded = _peak_rss_mib()
    peaks = {}
    with torch.inference_mode():
        for batch, seq in sorted(args.shapes, key=lambda s: s[0] * s[1]):
            model(**_inputs(model.config.vocab_size, batch, seq))
            peaks[f"{batch}x{seq}"] = _peak_rss_mib()
    out = {
        "load_s": load_s,
        "rss_after_imports_mib": rss_imports,
        "peak_rss_after_load_mib": rss_loaded,
        "peak_rss_mib": peaks,
        "weight_bytes": _weight_bytes(model),
    }
    print("RESULT " + json.dumps(out))


def worker_timing(args) -> None:
    """All contenders in one process, run round-robin, so that they share whatever else the
    machine is doing: rep i of every contender runs within the same few seconds."""
    import torch

    torch.set_num_threads(args.threads)
    models = {c: _load(c, args.model_dir, d or None) for c, d in zip(args.contenders_list, args.packed_dirs)}
    vocab = next(iter(models.values())).config.vocab_size
    rows = []
    with torch.inference_mode():
        for batch, seq in args.shapes:
            x = _inputs(vocab, batch, seq)
            times: dict[str, list[float]] = {c: [] for c in models}
            for m in models.values():
                m(**x)  # warm-up
            start = time.perf_counter()
            while True:
                n = len(times["fp32"])
                if n >= args.max_reps or (n >= args.min_reps and time.perf_counter() - start > args.budget_s):
                    break
                for c, m in models.items():
                    t = time.perf_counter()
                    m(**x)
                    times[c].append(time.perf_counter() - t)
            for c, ts in times.items():
                med = statistics.median(ts)
                rows.append({"contender": c, "batch": batch, "seq": seq, "median_ms": med * 1e3, "min_ms": min(ts) * 1e3, "reps": len(ts), "seq_per_s": batch / med})
            print(f"  {batch}x{seq}: " + ", ".join(f"{c} {statistics.median(ts) * 1e3:.1f} ms" for c, ts in times.items()), file=sys.stderr, flush=True)
    from gobo import kernels

    print("RESULT " + json.dumps({"threads": torch.get_num_threads(), "simd": kernels.simd_enabled(), "rows": rows}))


# ---------------------------------------------------------------------------- driver side


def _quantize(model: str, contender: str, workdir: Path) -> tuple[Path, float]:
    import gobo

    kind, kw = GOBO_CONFIGS[contender]
    cfg = gobo.GoboConfig.paper(**kw) if kind == "paper" else gobo.GoboConfig(**kw)
    out = workdir / f"{model}-{contender}"
    if (out / "gobo.safetensors").is_file():
        return out, 0.0
    t = time.perf_counter()
    cm = gobo.quantize(model, cfg)
    gobo.save(cm, out, overwrite=True)
    return out, time.perf_counter() - t


def _run(cmd: list[str]) -> dict:
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)  # progress passes through
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"worker exited with {proc.returncode}"}


def _common(args, model_dir: Path, shapes) -> list[str]:
    return [
        sys.executable, __file__, "--model-dir", str(model_dir), "--threads", str(args.threads),
        "--min-reps", str(args.min_reps), "--max-reps", str(args.max_reps), "--budget-s", str(args.budget_s),
        "--shapes", ",".join(f"{b}x{s}" for b, s in shapes),
    ]


def _parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in part.split("x")) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "cpu.json"))
    ap.add_argument("--quick", action="store_true", help="minilm-l6 only, batch 1 and 8, seq 128")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--contenders", nargs="*", default=None, choices=CONTENDERS)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--max-reps", type=int, default=30)
    ap.add_argument("--budget-s", type=float, default=2.0, help="time per shape after the minimum reps")
    ap.add_argument("--workdir", default=None, help="keep the quantized models here (reused when present)")
    # worker modes (internal)
    ap.add_argument("--worker", choices=("memory", "timing"), help=argparse.SUPPRESS)
    ap.add_argument("--contender", help=argparse.SUPPRESS)
    ap.add_argument("--contenders-list", type=lambda t: t.split(","), help=argparse.SUPPRESS)
    ap.add_argument("--packed-dirs", type=lambda t: t.split(","), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--packed-dir", help=argparse.SUPPRESS)
    ap.add_argument("--shapes", type=_parse_shapes, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "memory":
        worker_memory(args)
        return 0
    if args.worker == "timing":
        worker_timing(args)
        return 0

    from gobo.assets import resolve_model

    models = args.models or (["minilm-l6"] if args.quick else list(MODELS))
    shapes = [(1, 128), (8, 128)] if args.quick else [(b, s) for b in BATCHES for s in SEQS]
    contenders = args.contenders or list(CONTENDERS)
    contenders = ["fp32"] + [c for c in contenders if c != "fp32"]
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gobo-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_at_start": os.getloadavg(),
            "torch": torch.__version__,
            "threads": args.threads,
        },
        "shapes": shapes,
        "models": {},
    }
    try:
        for model in models:
            try:
                model_dir = resolve_model(model)
            except FileNotFoundError as exc:
                print(f"skipping {model}: {exc}")
                report["models"][model] = {"skipped": str(exc)}
                continue
            entry: dict = {"contenders": {c: {} for c in contenders}, "quantize_s": {}}
            dirs: dict[str, str] = {}
            for c in contenders:
                if c.startswith("gobo"):
                    print(f"[{model}] quantizing {c} ...", flush=True)
                    d, secs = _quantize(model, c, workdir)
                    dirs[c] = str(d)
                    entry["quantize_s"][c] = secs
            for c in contenders:
                print(f"[{model}] memory of {c} ...", flush=True)
                cmd = _common(args, model_dir, shapes) + ["--worker", "memory", "--contender", c]
                if c in dirs:
                    cmd += ["--packed-dir", dirs[c]]
                entry["contenders"][c].update(_run(cmd))
            print(f"[{model}] timing, round-robin over {', '.join(contenders)} ...", flush=True)
            cmd = _common(args, model_dir, shapes) + [
                "--worker", "timing", "--contenders-list", ",".join(contenders),
                "--packed-dirs", ",".join(dirs.get(c, "") for c in contenders),
            ]
            timing = _run(cmd)
            entry["threads"], entry["simd"] = timing.get("threads"), timing.get("simd")
            if "error" in timing:
                entry["error"] = timing["error"]
            for r in timing.get("rows", []):
                c = r.pop("contender")
                r["peak_rss_mib"] = entry["contenders"][c].get("peak_rss_mib", {}).get(f"{r['batch']}x{r['seq']}")
                entry["contenders"][c].setdefault("rows", []).append(r)
            _add_ratios(entry)
            report["models"][model] = entry
            _print_table(model, entry)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report["machine"]["load_average_at_end"] = os.getloadavg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return 0


def _add_ratios(entry: dict) -> None:
    base = entry["contenders"].get("fp32", {})
    if "rows" not in base:
        return
    by_shape = {(r["batch"], r["seq"]): r["median_ms"] for r in base["rows"]}
    for res in entry["contenders"].values():
        if "rows" not in res:
            continue
        if "weight_bytes" in res and "weight_bytes" in base:
            res["weight_bytes_vs_fp32"] = res["weight_bytes"] / base["weight_bytes"]
        for r in res["rows"]:
            ref = by_shape.get((r["batch"], r["seq"]))
            r["speedup_vs_fp32"] = ref / r["median_ms"] if ref else None


def _print_table(model: str, entry: dict) -> None:
    print(f"\n{model}")
    head = f"{'contender':<14} {'batch':>5} {'seq':>4} {'median ms':>10} {'seq/s':>8} {'vs fp32':>8} {'peak RSS MiB':>12} {'weights MiB':>11}"
    print(head)
    print("-" * len(head))
    for name, res in entry["contenders"].items():
        if "rows" not in res:
            print(f"{name:<14} error: {res.get('error', 'no timing')}")
            continue
        wmib = res.get("weight_bytes", float("nan")) / 2**20
        for r in res["rows"]:
            ratio = r.get("speedup_vs_fp32")
            print(
                f"{name:<14} {r['batch']:>5} {r['seq']:>4} {r['median_ms']:>10.1f} {r['seq_per_s']:>8.1f} "
                f"{(f'{ratio:.2f}x' if ratio else '-'):>8} {(r['peak_rss_mib'] or float('nan')):>12.0f} {wmib:>11.1f}"
            )
    print()


if __name__ == "__main__":
    sys.exit(main())

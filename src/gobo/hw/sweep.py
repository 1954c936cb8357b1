"""Paper-style comparisons over models and sequence lengths, as JSON and PNG figures.

:func:`run_sweep` returns a plain dict (JSON-able); :func:`write_figures` draws it with
matplotlib (imported here, Agg backend), which is optional: ``pip install gobo[plot]``.

Figures, one bar group per model:

* ``speedup.png``: GOBO memory compression (weights cross the interface compressed) over
  FP32 weights on each baseline, FP16 for reference, and the GOBO engine over the
  Tensor-Core-like baseline with FP16 weights;
* ``energy.png``: the same as energy ratios (baseline energy / energy);
* ``traffic.png``: off-chip bytes per inference on each baseline, split into weights (FP32,
  FP16, or GOBO's codes, centroids, outliers and unquantized tensors) and activations;
* ``seq.png``: the speedups against sequence length, for the first model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .accel import load_arch
from .engine import simulate_engine
from .roofline import simulate
from .workload import FORMATS, Workload, build_workload

__all__ = ["BASELINES", "model_summary", "run_sweep", "write_figures"]

BASELINES = ("tpu", "eyeriss", "tensorcore")


def model_summary(w: Workload) -> dict:
    """Speedups, energy ratios and traffic of one workload on every architecture."""
    out: dict = {"model": w.model, "seq": w.seq, "batch": w.batch, "macs": w.macs, "archs": {}}
    wb = w.weights
    out["weight_bytes"] = wb.to_dict()
    out["compression"] = wb.fp32 / wb.gobo
    for name in BASELINES:
        arch = load_arch(name)
        runs = {fmt: simulate(w, arch, fmt) for fmt in FORMATS}
        base = runs["fp32"]
        out["archs"][name] = {
            fmt: {
                "seconds": r.seconds,
                "energy_pj": r.energy.total,
                "energy": r.energy.to_dict(),
                "weight_bytes": r.weight_bytes,
                "act_bytes": r.act_bytes,
                "traffic_bytes": r.traffic,
                "speedup_vs_fp32": base.seconds / r.seconds,
                "energy_ratio_vs_fp32": base.energy.total / r.energy.total,
            }
            for fmt, r in runs.items()
        }
    engine = load_arch("gobo")
    e = simulate_engine(w, engine)
    tc = simulate(w, engine.baseline, "fp16")
    out["archs"]["gobo"] = {
        "gobo": {
            "seconds": e.seconds,
            "energy_pj": e.energy.total,
            "energy": e.energy.to_dict(),
            "weight_bytes": e.weight_bytes,
            "act_bytes": e.act_bytes,
            "traffic_bytes": e.traffic,
            "speedup_vs_baseline_fp16": tc.seconds / e.seconds,
            "energy_ratio_vs_baseline_fp16": tc.energy.total / e.energy.total,
        },
        "area": engine.area_dict(),
    }
    return out


def run_sweep(
    models: Sequence[tuple[str, object, dict]],
    seq: int = 128,
    batch: int = 1,
    seqs: Iterable[int] = (32, 64, 128, 256, 512),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """``models``: ``(name, CompressedModel, config dict)``; every architecture at ``seq``, and
    the first model at each of ``seqs`` (those its positions allow)."""
    result: dict = {"seq": seq, "batch": batch, "models": [], "seq_sweep": []}
    for name, cm, config in models:
        w = build_workload(cm.quantized, cm.dense, config, seq=seq, batch=batch, model=name)
        result["models"].append(model_summary(w))
        if progress:
            progress(name)
    if models:
        name, cm, config = models[0]
        max_pos = config.get("max_position_embeddings") if isinstance(config, dict) else None
        for s in seqs:
            if isinstance(max_pos, int) and s > max_pos:
                continue
            w = build_workload(cm.quantized, cm.dense, config, seq=int(s), batch=batch, model=name)
            result["seq_sweep"].append(model_summary(w))
            if progress:
                progress(f"{name} seq {s}")
    return result


def _bars(ax, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str) -> None:
    import numpy as np

    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, (label, vals) in enumerate(series.items()):
        bars = ax.bar(x + (i - (len(series) - 1) / 2) * width, vals, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=1)
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(x, groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)


def _ratio_series(models: list[dict], key_mem: str, key_engine: str) -> dict[str, list[float]]:
    series: dict[str, list[float]] = {}
    for arch in BASELINES:
        series[f"{arch} FP16"] = [m["archs"][arch]["fp16"][key_mem] for m in models]
        series[f"{arch} GOBO"] = [m["archs"][arch]["gobo"][key_mem] for m in models]
    series["GOBO engine vs tensorcore FP16"] = [m["archs"]["gobo"]["gobo"][key_engine] for m in models]
    return series


def write_figures(result: dict, outdir: str | os.PathLike) -> list[Path]:
    """Write ``hw_sweep.json`` and the PNG figures into ``outdir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    p = out / "hw_sweep.json"
    p.write_text(json.dumps(result, indent=2))
    written.append(p)
    models = result["models"]
    names = [m["model"] for m in models]
    for fname, key_mem, key_eng, ylabel, title in (
        ("speedup.png", "speedup_vs_fp32", "speedup_vs_baseline_fp16", "speedup (x)", "Speedup over FP32 weights"),
        ("energy.png", "energy_ratio_vs_fp32", "energy_ratio_vs_baseline_fp16", "energy ratio (x)", "Energy efficiency over FP32 weights"),
    ):
        fig, ax = plt.subplots(figsize=(max(6, 3 + 2.5 * len(models)), 4))
        _bars(ax, names, _ratio_series(models, key_mem, key_eng), ylabel, f"{title} (seq {result['seq']}, batch {result['batch']})")
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)
        written.append(out / fname)

    fig, axes = plt.subplots(len(models), len(BASELINES), figsize=(4 * len(BASELINES), 3 * len(models)), squeeze=False)
    colors = {"weights": "tab:blue", "codes": "tab:orange", "centroids": "tab:green", "outliers": "tab:red", "unquantized": "tab:purple", "activations": "tab:gray"}
    for row, m in zip(axes, models):
        wb = m["weight_bytes"]
        for ax, arch in zip(row, BASELINES):
            bottom = [0.0] * len(FORMATS)
            for part, color in colors.items():
                vals = []
                for fmt in FORMATS:
                    r = m["archs"][arch][fmt]
                    # a gobo run moves the workload's gobo bytes: split them as the file stores them
                    share = r["weight_bytes"] / wb["gobo"] if fmt == "gobo" and wb["gobo"] else 0.0
                    if part == "weights":
                        v = 0.0 if fmt == "gobo" else r["weight_bytes"]
                    elif part == "activations":
                        v = r["act_bytes"]
                    elif part == "unquantized":
                        v = (wb["dense"] + wb["row_stats"]) * share
                    else:
                        v = wb[part] * share
                    vals.append(v / 1e6)
                ax.bar(range(len(FORMATS)), vals, bottom=bottom, color=color, label=part)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_xticks(range(len(FORMATS)), list(FORMATS))
            ax.set_title(f"{m['model']} on {arch}", fontsize=10)
            ax.set_ylabel("off-chip MB")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"Off-chip traffic per inference (seq {result['seq']}, batch {result['batch']})")
    fig.tight_layout()
    fig.savefig(out / "traffic.png", dpi=120)
    plt.close(fig)
    written.append(out / "traffic.png")

    if result.get("seq_sweep"):
        sw = result["seq_sweep"]
        fig, ax = plt.subplots(figsize=(6.5, 4))
        seqs = [m["seq"] for m in sw]
        for arch in BASELINES:
            ax.plot(seqs, [m["archs"][arch]["gobo"]["speedup_vs_fp32"] for m in sw], marker="o", label=f"{arch}: GOBO vs FP32 weights")
        ax.plot(seqs, [m["archs"]["gobo"]["gobo"]["speedup_vs_baseline_fp16"] for m in sw], marker="s", label="GOBO engine vs tensorcore FP16")
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs, [str(s) for s in seqs])
        ax.set_xlabel("sequence length")
        ax.set_ylabel("speedup (x)")
        ax.set_title(f"{sw[0]['model']}: speedup against sequence length")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "seq.png", dpi=120)
        plt.close(fig)
        written.append(out / "seq.png")
    return written

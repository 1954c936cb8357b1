"""Accuracy against size over bit widths and methods, on the frozen-probe benchmark.

For every (method, bits) the model is quantized into ``OUT/METHOD-BITSb`` (a normal
compressed model directory, kept: a sweep that is stopped resumes from what it already
made), evaluated against FP32 on the same test texts with the same frozen probe
(:mod:`gobo.evaluate`), and the evaluation is stored beside it (``eval.json``, shown by
``gobo report``). ``OUT/sweep.json`` collects every point and is rewritten after each one;
``OUT/sweep.png`` plots accuracy and agreement against file size, FP32 as the reference.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .runs import Stage, atomic_write, json_clean, save_png, setup_run

__all__ = ["SWEEP_JSON", "SWEEP_PNG", "SweepPoint", "SweepResult", "plot_sweep", "run_sweep", "sweep_config"]

SWEEP_JSON = "sweep.json"
SWEEP_PNG = "sweep.png"
_VERSION = 1


@dataclass(frozen=True)
class SweepPoint:
    """One quantized model of the sweep, measured against FP32."""

    method: str
    bits: int  # the requested width (gobo's size-aware default: the average)
    model: str  # its compressed model directory
    avg_code_bits: float
    bits_per_weight: float  # stored bits per quantized weight, everything included
    file_bytes: int
    ratio: float  # FP32 bytes / file bytes
    accuracy: float
    accuracy_delta: float  # accuracy - FP32 accuracy
    agreement: float  # fraction of test predictions equal to FP32's
    mean_cosine: float
    n_test: int
    quantize_seconds: float  # nan when an existing directory was reused
    reused: bool  # the directory (and possibly its evaluation) came from an earlier run


@dataclass(frozen=True)
class SweepResult:
    model: str
    source: str  # the FP32 model directory
    source_sha256: str
    n_test: int
    n_train: int
    fp32_accuracy: float
    fp32_bytes: int
    points: tuple[SweepPoint, ...]

    def to_dict(self) -> dict:
        """The JSON document (``sweep.json``); ``fp32`` and ``results`` have the keys that
        ``gobo eval --json`` prints."""
        return json_clean({
            "version": _VERSION,
            "benchmark": "rotten-tomatoes-frozen-probe",
            "model": self.model,
            "source": self.source,
            "source_sha256": self.source_sha256,
            "fp32": {"model": "FP32", "accuracy": self.fp32_accuracy, "n_test": self.n_test, "n_train": self.n_train,
                     "file_bytes": self.fp32_bytes, "bits_per_weight": 32.0},
            "results": [asdict(p) for p in self.points],
        })


def sweep_config(method: str, bits: int):
    """The method config of one sweep point. gobo's size-aware allocation keeps each tensor
    within [2, 6] bits; a sweep point outside that range widens the bounds to reach it."""
    from .config import method_config

    if method == "gobo":
        return method_config("gobo", bits, min_bits=min(2, bits), max_bits=max(6, bits))
    return method_config(method, bits)


def _reusable(d: Path, config_json: dict, sha: str) -> bool:
    """``d`` holds a compressed model made with this config from these weights."""
    from .io import FormatError, read_header

    if not (d / "gobo.safetensors").is_file():
        return False
    try:
        header, _ = read_header(d)
    except FormatError:
        return False
    return header.get("config") == config_json and header.get("source", {}).get("weights_sha256") == sha


def run_sweep(
    model: str | os.PathLike,
    bits: Sequence[int],
    methods: Sequence[str],
    out: str | os.PathLike,
    *,
    limit: int | None = None,
    train_limit: int | None = None,
    stage: Stage | None = None,
) -> SweepResult:
    """Quantize ``model`` at every (method, bits), evaluate each point, write the results.

    ``limit``/``train_limit``: test texts and probe training texts (evenly spread subsets;
    None: the full splits). ``stage`` reports progress (see :data:`Stage`). A directory of
    ``out`` already made with the same config from the same weights is reused, and so is
    its stored evaluation when it was made on the same texts.
    """
    import gobo

    from .config import config_to_json
    from .evalstore import load_eval, save_eval
    from .evaluate import compare, encode
    from .io import WEIGHTS_FILE, read_compressed
    from .report import summarize

    if not bits or not methods:
        raise ValueError("a sweep needs at least one bit width and one method")
    settings = [(m, b, sweep_config(m, b)) for m in dict.fromkeys(methods) for b in dict.fromkeys(bits)]
    run = setup_run(model, out, limit, train_limit, stage)
    src_dir, sha, tok, fp32, bench, bar = run.src_dir, run.sha, run.tokenizer, run.fp32, run.bench, run.bar
    n_test, n_train = run.n_test, run.n_train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    e32 = s32 = None
    points: list[SweepPoint] = []
    fp32_accuracy = float("nan")
    fp32_bytes = 0
    result = None
    for k, (method, b_, cfg) in enumerate(settings, 1):
        tag = f"[{k}/{len(settings)}] {method} {b_}b"
        d = out / f"{method}-{b_}b"
        reused = _reusable(d, config_to_json(cfg), sha)
        qsec = float("nan")
        if not reused:
            with bar(f"{tag} quantizing", None, "tensor") as pb:
                t = time.perf_counter()
                cm = gobo.quantize(src_dir, cfg, progress=lambda name, total: pb.update())
                qsec = time.perf_counter() - t
            cm.source["name"] = str(model)
            gobo.save(cm, d, overwrite=True)
        cm = read_compressed(d)
        s = summarize(cm, d / WEIGHTS_FILE)
        fp32_bytes = s.fp32_bytes
        stored = load_eval(d) if reused else None
        if stored and stored["fp32"].get("n_test") == n_test and stored["fp32"].get("n_train") == n_train and stored["fp32"].get("source_sha256") == sha:
            r = stored["result"]
            fp32_accuracy = float(r["fp32_accuracy"])
        else:
            if e32 is None:
                with bar("FP32 test", n_test, "text") as pb:
                    t = time.perf_counter()
                    e32 = encode(fp32, tok, bench.test_texts, progress=pb.update)
                    s32 = time.perf_counter() - t
            qmodel = gobo.load(d)
            with bar(f"{tag} test", n_test, "text") as pb:
                t = time.perf_counter()
                eq = encode(qmodel, tok, bench.test_texts, progress=pb.update)
                sq = time.perf_counter() - t
            del qmodel
            r = compare(bench.probe, e32, eq, bench.test_labels, s32, sq).to_dict()
            fp32_accuracy = r["fp32_accuracy"]
            fp = {"model": "FP32", "source": str(src_dir), "source_sha256": sha, "accuracy": fp32_accuracy,
                  "n_test": n_test, "n_train": n_train, "file_bytes": s.fp32_bytes, "seconds": s32}
            row = {"model": str(d), "method": s.method, "avg_code_bits": s.avg_code_bits, "bits_per_weight": s.bits_per_weight,
                   "file_bytes": s.file_bytes, "ratio": s.ratio, **r}
            save_eval(d, fp, row)
        points.append(SweepPoint(
            method=method, bits=b_, model=str(d), avg_code_bits=s.avg_code_bits, bits_per_weight=s.bits_per_weight,
            file_bytes=s.file_bytes, ratio=s.ratio, accuracy=float(r["accuracy"]),
            accuracy_delta=float(r["accuracy"]) - fp32_accuracy, agreement=float(r["agreement"]),
            mean_cosine=float(r["mean_cosine"]), n_test=n_test, quantize_seconds=qsec, reused=reused,
        ))
        result = SweepResult(str(model), str(src_dir), sha, n_test, n_train, fp32_accuracy, fp32_bytes, tuple(points))
        atomic_write(out / SWEEP_JSON, (json.dumps(result.to_dict(), indent=2) + "\n").encode())
    assert result is not None
    plot_sweep(result, out / SWEEP_PNG)
    return result


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> Path:
    """Accuracy and agreement against file size, one line per method, FP32 as reference;
    written atomically as PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.0, 3.6), dpi=100)
    a1, a2 = fig.subplots(1, 2)
    methods = list(dict.fromkeys(p.method for p in result.points))
    fp_mb = result.fp32_bytes / 1e6
    for m in methods:
        pts = sorted((p for p in result.points if p.method == m), key=lambda p: p.file_bytes)
        x = [p.file_bytes / 1e6 for p in pts]
        for ax, key in ((a1, "accuracy"), (a2, "agreement")):
            y = [100 * getattr(p, key) for p in pts]
            ax.plot(x, y, "o-", ms=4, lw=1.2, label=m)
            for p, xi, yi in zip(pts, x, y):
                ax.annotate(f"{p.bits}b", (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    a1.axhline(100 * result.fp32_accuracy, color="k", ls="--", lw=1, label=f"FP32 ({100 * result.fp32_accuracy:.1f}%)")
    a2.axhline(100.0, color="k", ls="--", lw=1, label="FP32")
    if fp_mb > 0:
        a1.plot([fp_mb], [100 * result.fp32_accuracy], "k*", ms=8)
        a2.plot([fp_mb], [100.0], "k*", ms=8)
    for ax, label in ((a1, "test accuracy %"), (a2, "agreement with FP32 %")):
        ax.set_xscale("log")
        ax.set_xlabel("file size, MB (log scale)", fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(lw=0.3, alpha=0.6, which="both")
        ax.legend(fontsize=7, frameon=False)
    fig.suptitle(f"{Path(result.model).name}: frozen probe, {result.n_test} test texts", fontsize=9)
    fig.tight_layout(pad=0.5)
    return save_png(fig, path)

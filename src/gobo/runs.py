"""Pieces shared by the commands that make and measure models in one run (sweep, compare,
report): atomic writes, JSON without NaN, byte formatting, and the benchmark set-up."""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

__all__ = ["NoBar", "RunSetup", "Stage", "atomic_write", "fmt_bytes", "json_clean", "setup_run"]

#: stage(description, total or None, unit) -> a context manager with update(n): progress
Stage = Callable[[str, "int | None", str], ContextManager]


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and a rename: readers see the
    old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def json_clean(x):
    """``x`` with non-finite floats as None (JSON has no NaN), tuples as lists."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_clean(v) for v in x]
    return x


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000.0
    return f"{n:.2f} GB"


class NoBar:
    def update(self, n: int = 1) -> None:
        pass


@dataclass
class RunSetup:
    """The FP32 model and the frozen-probe benchmark a run measures everything against."""

    src_dir: Path
    sha: str  # of the source weights
    tokenizer: object
    fp32: object  # the FP32 transformers model
    bench: object  # gobo.evaluate.Benchmark
    bar: Callable[[str, "int | None", str], ContextManager]  # progress, or a silent stand-in

    @property
    def n_test(self) -> int:
        return len(self.bench.test_texts)

    @property
    def n_train(self) -> int:
        return len(self.bench.train_texts)


def setup_run(model, out: str | os.PathLike, limit: int | None, train_limit: int | None, stage: Stage | None) -> RunSetup:
    """Resolve ``model``, check ``out`` can be a directory, load FP32, train (or reuse) the probe."""
    from transformers import AutoTokenizer

    from .assets import resolve_model
    from .evaluate import prepare_benchmark
    from .hf import load_source, weights_sha256

    src_dir = resolve_model(model)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory; choose another output directory")

    def bar(desc: str, total: int | None, unit: str):
        return stage(desc, total, unit) if stage is not None else contextlib.nullcontext(NoBar())

    sha = weights_sha256(src_dir)
    tok = AutoTokenizer.from_pretrained(str(src_dir))
    fp32 = load_source(src_dir)
    with bar("probe (FP32 train)", None, "text") as b:
        bench = prepare_benchmark(fp32, tok, source_sha=sha, n_train=train_limit, n_test=limit, progress=b.update)
    return RunSetup(Path(src_dir), sha, tok, fp32, bench, bar)


def save_png(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as PNG, written atomically, with no software tag (same bytes each run)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return atomic_write(path, buf.getvalue())

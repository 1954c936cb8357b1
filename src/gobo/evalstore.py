"""Evaluation results kept beside a compressed model, so a report can show them later.

``OUTDIR/eval.json`` holds the last frozen-probe evaluation of ``OUTDIR/gobo.safetensors``:
``{"version": 1, "payload_sha256": ..., "fp32": {...}, "result": {...}, "created": ...}``.
The payload hash ties it to the exact file: a model quantized again into the same
directory does not inherit the old numbers.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

__all__ = ["EVAL_FILE", "load_eval", "save_eval"]

EVAL_FILE = "eval.json"
_VERSION = 1


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item"):  # numpy scalars
        return _clean(x.item())
    return x


def save_eval(outdir: str | os.PathLike, fp32: dict, result: dict) -> Path | None:
    """Write ``OUTDIR/eval.json`` atomically; returns its path, or None where it cannot be
    written (a read-only directory): the evaluation itself has still succeeded."""
    from .io import read_header

    outdir = Path(outdir)
    header, _ = read_header(outdir)
    doc = {
        "version": _VERSION,
        "payload_sha256": header.get("payload_sha256"),
        "benchmark": "rotten-tomatoes-frozen-probe",
        "fp32": _clean(dict(fp32)),
        "result": _clean(dict(result)),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = outdir / EVAL_FILE
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{EVAL_FILE}.", suffix=".partial", dir=outdir)
    except OSError:
        return None
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(doc, fh, indent=2, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        Path(tmp).unlink(missing_ok=True)
        return None
    return path


def load_eval(outdir: str | os.PathLike) -> dict | None:
    """The stored evaluation of ``OUTDIR``'s current file, or None (absent, unreadable, or
    made for another file)."""
    from .io import read_header

    outdir = Path(outdir)
    path = outdir / EVAL_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("version") != _VERSION:
        return None
    header, _ = read_header(outdir)
    if doc.get("payload_sha256") != header.get("payload_sha256"):
        return None
    if not isinstance(doc.get("fp32"), dict) or not isinstance(doc.get("result"), dict):
        return None
    return doc

"""The compressed file: safetensors with packed codes and a JSON header, written atomically.

``OUTDIR/gobo.safetensors`` holds, for each quantized tensor ``NAME``, the arrays
``q:NAME:codes``, ``q:NAME:codebook`` and, when present, ``q:NAME:row_scale``,
``q:NAME:row_offset``, ``q:NAME:outlier_index`` (or, for a compact tensor, the row-by-row
``q:NAME:outlier_col`` and ``q:NAME:outlier_count``), ``q:NAME:outlier_value``; every tensor kept
as it was is ``d:NAME``. A file with compact tensors (:class:`gobo.qtensor.QuantizedTensor`)
is format version 2; one with grid tensors (entropy-coded codes, column scales: the fields
``q:NAME:code_freq`` and ``q:NAME:col_scale``) is version 3; any other is version 1, byte for
byte as before version 2 existed.
The safetensors metadata holds ``format = "gobo"``,
``format_version`` and ``gobo``: a JSON document with the method config
(``{type, version, data}``), per-tensor attributes and statistics, the source model's hash,
and the SHA-256 of all tensor bytes (a tampered file fails to load).

The config and tokenizer files of the source model are copied beside it, so
``AutoTokenizer.from_pretrained(OUTDIR)`` works.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .config import config_from_json, config_to_json
from .qtensor import FIELDS, ROW_FIELDS, QuantizedTensor
from .quantizer import CompressedModel, TensorStats

__all__ = ["FORMAT_VERSION", "WEIGHTS_FILE", "FormatError", "read_compressed", "write_compressed"]

FORMAT_VERSION = 3  # the newest this gobo reads and writes; 2 for compact tensors, 1 for files without any
WEIGHTS_FILE = "gobo.safetensors"
PACKING = "lsb-bitstream-v1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx", ".ot")
_SKIP_NAMES = {"desktop.ini", ".gitattributes"}


class FormatError(ValueError):
    """The compressed file is missing, damaged, tampered with, or from a newer gobo."""


def _payload_digest(tensors: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        a = np.ascontiguousarray(tensors[key])
        h.update(key.encode())
        h.update(str(a.dtype).encode())
        h.update(repr(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _canonical_safetensors(data: bytes) -> bytes:
    """Same file with the header's metadata keys sorted: equal inputs give equal bytes.

    safetensors orders the metadata map arbitrarily; the header keeps its length (padded
    with spaces, as the format allows), so the tensor offsets are unchanged.
    """
    n = int.from_bytes(data[:8], "little")
    head = json.loads(data[8 : 8 + n])
    if "__metadata__" in head:
        head["__metadata__"] = dict(sorted(head["__metadata__"].items()))
    text = json.dumps(head, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen: same content, compact separators
        raise RuntimeError("safetensors header grew while sorting its metadata")
    return data[:8] + text.ljust(n, b" ") + data[8 + n :]


def _stats_json(s: TensorStats) -> dict:
    return {
        "sqnr_db": None if not np.isfinite(s.sqnr_db) else round(float(s.sqnr_db), 6),
        "outlier_fraction": float(s.outlier_fraction),
        "fp32_bytes": int(s.fp32_bytes),
        "nbytes": int(s.nbytes),
    }


def _copy_side_files(src: Path, dst: Path) -> None:
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if p.is_dir() or p.name in _SKIP_NAMES or p.suffix in _WEIGHT_SUFFIXES or any(part.startswith(".") for part in rel.parts):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, target)


def write_compressed(cm: CompressedModel, outdir: str | os.PathLike, source_dir: str | os.PathLike | None = None, overwrite: bool = False) -> Path:
    """Write ``cm`` (and the source's config/tokenizer files) to ``outdir`` atomically.

    Everything is written into a temporary sibling directory that is renamed into place at
    the end, so an interrupted or failed write leaves no partial output.
    """
    from safetensors.numpy import save

    outdir = Path(outdir)
    if outdir.exists() and not overwrite:
        if not outdir.is_dir() or any(outdir.iterdir()):
            raise FileExistsError(f"{outdir} already exists and is not empty; choose another path or pass --force")
    parent = outdir.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    tmeta: dict[str, dict] = {}
    for name in sorted(cm.quantized):
        qt = cm.quantized[name]
        for field, arr in qt.to_tensors().items():
            tensors[f"q:{name}:{field}"] = np.ascontiguousarray(arr)
        entry = qt.meta()
        if name in cm.stats:
            entry["stats"] = _stats_json(cm.stats[name])
        tmeta[name] = entry
    for name in sorted(cm.dense):
        tensors[f"d:{name}"] = np.ascontiguousarray(cm.dense[name])
    header = {
        "config": config_to_json(cm.config),
        "packing": PACKING,
        "tensors": tmeta,
        "source": cm.source,
        "payload_sha256": _payload_digest(tensors),
    }
    version = 3 if any(qt.entropy or qt.col_scale is not None for qt in cm.quantized.values()) else \
        2 if any(qt.compact for qt in cm.quantized.values()) else 1
    metadata = {"format": "gobo", "format_version": str(version), "gobo": json.dumps(header, sort_keys=True)}
    tmp = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".partial", dir=parent))
    try:
        if source_dir is not None:
            _copy_side_files(Path(source_dir), tmp)
        (tmp / WEIGHTS_FILE).write_bytes(_canonical_safetensors(save(tensors, metadata=metadata)))
        if outdir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.", suffix=".old", dir=parent))
            os.replace(outdir, old / "x")
            os.replace(tmp, outdir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, outdir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return outdir


def read_header(outdir: str | os.PathLike) -> tuple[dict, Path]:
    """The parsed JSON header of a compressed model directory (cheap: no tensor is read)."""
    path = Path(outdir)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise FormatError(f"{outdir} is not a gobo model directory (no {WEIGHTS_FILE}); make one with 'gobo quantize'")
    from safetensors import safe_open

    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise FormatError(f"{path} is damaged or truncated ({exc}); quantize the model again") from None
    if meta.get("format") != "gobo":
        raise FormatError(f"{path} is not a gobo file (no gobo metadata); point to a directory written by 'gobo quantize'")
    try:
        version = int(meta.get("format_version", "0"))
    except ValueError:
        raise FormatError(f"{path} has an unreadable format version") from None
    if version > FORMAT_VERSION:
        raise FormatError(f"{path} was written by a newer gobo (format {version}); upgrade gobo to read it")
    if version < 1:
        raise FormatError(f"{path} has an unknown format version {version}")
    try:
        header = json.loads(meta["gobo"])
    except (KeyError, json.JSONDecodeError):
        raise FormatError(f"{path} has a damaged header; quantize the model again") from None
    if header.get("packing") != PACKING:
        raise FormatError(f"{path} uses the unknown packing {header.get('packing')!r}")
    header["format_version"] = version  # from the safetensors metadata, beside the JSON
    return header, path


def read_compressed(outdir: str | os.PathLike) -> CompressedModel:
    """Read and fully validate a compressed model written by :func:`write_compressed`."""
    header, path = read_header(outdir)
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise FormatError(f"{path} is damaged or truncated ({exc}); quantize the model again") from None
    if _payload_digest(tensors) != header.get("payload_sha256"):
        raise FormatError(f"{path} does not match its checksum: the file was modified or damaged; quantize the model again")
    try:
        config = config_from_json(header["config"])
    except (KeyError, ValueError, TypeError) as exc:
        raise FormatError(f"{path} has an invalid method config: {exc}") from None
    grouped: dict[str, dict[str, np.ndarray]] = {}
    dense: dict[str, np.ndarray] = {}
    for key, arr in tensors.items():
        kind, _, rest = key.partition(":")
        if kind == "d":
            dense[rest] = arr
        elif kind == "q":
            name, _, field = rest.rpartition(":")
            if field not in FIELDS + ROW_FIELDS:
                raise FormatError(f"{path} holds an unknown field {key!r}")
            grouped.setdefault(name, {})[field] = arr
        else:
            raise FormatError(f"{path} holds an unexpected tensor {key!r}")
    tmeta = header.get("tensors", {})
    if set(tmeta) != set(grouped):
        raise FormatError(f"{path}: header and tensors disagree on the quantized tensors")
    quantized, stats = {}, {}
    for name in sorted(grouped):
        try:
            qt = QuantizedTensor.from_tensors(tmeta[name], grouped[name])
        except (KeyError, ValueError, TypeError) as exc:
            raise FormatError(f"{path}: tensor {name} is invalid ({exc})") from None
        if qt.compact and header["format_version"] < 2:
            raise FormatError(f"{path}: tensor {name} is compact, which format version 1 does not allow; the file is damaged")
        if (qt.entropy or qt.col_scale is not None) and header["format_version"] < 3:
            raise FormatError(f"{path}: tensor {name} is a grid tensor, which format versions 1 and 2 do not allow; "
                              "the file is damaged")
        quantized[name] = qt
        s = tmeta[name].get("stats")
        if s:
            sq = s.get("sqnr_db")
            stats[name] = TensorStats(
                shape=qt.shape,
                bits=qt.bits,
                sqnr_db=float("inf") if sq is None else float(sq),
                outlier_fraction=float(s["outlier_fraction"]),
                fp32_bytes=int(s["fp32_bytes"]),
                nbytes=int(s["nbytes"]),
            )
    return CompressedModel(quantized=quantized, dense=dense, config=config, stats=stats, source=header.get("source", {}))

"""What one inference asks of the hardware: per layer, the matrix products and the bytes they move.

A :class:`Workload` is read from a compressed model (a :class:`~gobo.quantizer.CompressedModel`
and the model's ``config.json``) for a sequence length and batch. Nothing here knows an
architecture's layer names; the structure comes from tensor names and shapes:

* an encoder block is every tensor under the first numbered path component
  (``encoder.layer.3.``, ``encoder.albert_layer_groups.0.``);
* in a block, ``(H, H)`` weights are attention projections (``q``/``k``/``v`` by their module
  name: ``query``/``q``/``q_proj``/``q_lin``..., the rest ``o``), a ``(3H, H)`` weight is a
  fused ``qkv``, ``(I, H)`` is the feed-forward input and ``(H, I)`` its output; a block with
  projections also gets the two weight-free products of attention, scores ``Q K^T`` and
  context ``A V``, per head and sequence;
* outside the blocks, tables (names with ``embed``, and ``*_bias.weight`` tables such as
  MPNet's relative attention bias) are read row by row: ``min(rows, tokens)`` rows move;
  the pooler and classifier heads run on one vector per sequence, other matrices on every
  token.

Every product is ``(m x k) @ (k x n)``, repeated ``count`` times (heads x batch for attention).
Weight bytes come from what the file stores for each tensor (:class:`WeightBytes`): FP32 and
FP16 are ``4`` and ``2`` bytes per element; GOBO is the stored codes, centroid tables,
outliers and row statistics, and the tensors kept unquantized as they are stored (biases,
LayerNorms). Biases travel with their matrix; a block's other vectors (LayerNorm) form one
``params`` operation with no arithmetic.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from ..qtensor import QuantizedTensor

if TYPE_CHECKING:  # gobo.dataflow imports torch: loaded only when a workload is built
    from ..dataflow import OpCounts

__all__ = ["FORMATS", "Layer", "Op", "WeightBytes", "Workload", "build_workload", "load_workload"]

#: weight formats off chip: FP32, FP16, and the GOBO-compressed file
FORMATS = ("fp32", "fp16", "gobo")

_ROLE_NAMES = {
    "q": {"query", "q", "q_proj", "q_lin", "wq", "query_proj"},
    "k": {"key", "k", "k_proj", "k_lin", "wk", "key_proj"},
    "v": {"value", "v", "v_proj", "v_lin", "wv", "value_proj"},
}
_ORDER = {"q": 0, "k": 1, "v": 2, "qkv": 2, "qk": 3, "av": 4, "o": 5, "ffn_in": 6, "ffn_out": 7, "params": 9}


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a set of parameters in each off-chip format; ``gobo`` is itemised.

    ``gobo == codes + centroids + outliers + row_stats + dense`` (``dense``: tensors the
    file keeps unquantized, at their stored width). Values are floats because a table read
    row by row moves a fraction of its codes.
    """

    numel: float = 0.0
    codes: float = 0.0
    centroids: float = 0.0
    outliers: float = 0.0
    row_stats: float = 0.0
    dense: float = 0.0

    @property
    def fp32(self) -> float:
        return 4.0 * self.numel

    @property
    def fp16(self) -> float:
        return 2.0 * self.numel

    @property
    def gobo(self) -> float:
        return self.codes + self.centroids + self.outliers + self.row_stats + self.dense

    def bytes(self, fmt: str) -> float:
        if fmt not in FORMATS:
            raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
        return getattr(self, fmt)

    def __add__(self, other: "WeightBytes") -> "WeightBytes":
        return WeightBytes(**{k: getattr(self, k) + getattr(other, k) for k in _WB_FIELDS})

    def scaled(self, f: float) -> "WeightBytes":
        return WeightBytes(**{k: getattr(self, k) * f for k in _WB_FIELDS})

    def to_dict(self) -> dict:
        return {**asdict(self), "fp32": self.fp32, "fp16": self.fp16, "gobo": self.gobo}


_WB_FIELDS = ("numel", "codes", "centroids", "outliers", "row_stats", "dense")


def _qt_bytes(qt: QuantizedTensor) -> WeightBytes:
    """The bytes the file stores (a compact tensor: float16 centroids, row-by-row positions)."""
    return WeightBytes(numel=qt.numel, **qt.nbytes_by_part())


def _dense_bytes(a: np.ndarray) -> WeightBytes:
    return WeightBytes(numel=a.size, dense=a.nbytes)


@dataclass(frozen=True)
class Op:
    """One operation of a layer.

    ``kind``: ``linear`` (activations x a weight matrix), ``matmul`` (two activation operands:
    attention), ``gather`` (rows of a table) or ``params`` (vectors read, no arithmetic).
    """

    name: str
    kind: str
    m: int  # rows of the activation operand (tokens)
    k: int  # reduction length
    n: int  # output features
    count: int = 1  # identical products (heads x batch for attention)
    weight: str | None = None  # tensor name, for linear and gather
    weights: WeightBytes = field(default_factory=WeightBytes)  # what crosses the interface
    weight_numel: int = 0  # elements held on chip while the op runs (the whole matrix)
    code_bits: int | None = None  # bits of the weight's codes when quantized
    gobo_ops: OpCounts | None = None  # exact GOBO dataflow counts (gobo.dataflow.count_ops)

    @property
    def macs(self) -> int:
        return self.m * self.k * self.n * self.count if self.kind in ("linear", "matmul") else 0

    @property
    def in_elems(self) -> int:
        """Activation elements read: the input, and for ``matmul`` the second operand too."""
        if self.kind == "linear":
            return self.m * self.k * self.count
        if self.kind == "matmul":
            return (self.m * self.k + self.k * self.n) * self.count
        return 0

    @property
    def out_elems(self) -> int:
        return self.m * self.n * self.count if self.kind in ("linear", "matmul", "gather") else 0

    def to_dict(self) -> dict:
        d = {
            "name": self.name,
            "kind": self.kind,
            "m": self.m,
            "k": self.k,
            "n": self.n,
            "count": self.count,
            "weight": self.weight,
            "macs": self.macs,
            "in_elems": self.in_elems,
            "out_elems": self.out_elems,
            "code_bits": self.code_bits,
            "weight_bytes": self.weights.to_dict(),
        }
        if self.gobo_ops is not None:
            g = self.gobo_ops
            d["gobo_ops"] = {"additions": g.additions, "multiplications": g.multiplications, "outlier_macs": g.outlier_macs, "dense_macs": g.dense_macs}
        return d


@dataclass(frozen=True)
class Layer:
    name: str
    ops: tuple[Op, ...]
    softmax_elems: int = 0  # attention probabilities computed
    layernorm_elems: int = 0  # values normalised
    gelu_elems: int = 0  # feed-forward activations

    @property
    def macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def weights(self) -> WeightBytes:
        total = WeightBytes()
        for o in self.ops:
            total = total + o.weights
        return total

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "macs": self.macs,
            "softmax_elems": self.softmax_elems,
            "layernorm_elems": self.layernorm_elems,
            "gelu_elems": self.gelu_elems,
            "weight_bytes": self.weights.to_dict(),
            "ops": [o.to_dict() for o in self.ops],
        }


@dataclass(frozen=True)
class Workload:
    """One forward pass of ``batch`` sequences of ``seq`` tokens."""

    model: str
    model_type: str
    seq: int
    batch: int
    hidden: int
    heads: int
    layers: tuple[Layer, ...]

    @property
    def tokens(self) -> int:
        return self.seq * self.batch

    @property
    def macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def weights(self) -> WeightBytes:
        total = WeightBytes()
        for layer in self.layers:
            total = total + layer.weights
        return total

    def ops(self):
        for layer in self.layers:
            yield from layer.ops

    def to_dict(self) -> dict:
        w = self.weights
        return {
            "model": self.model,
            "model_type": self.model_type,
            "seq": self.seq,
            "batch": self.batch,
            "hidden": self.hidden,
            "heads": self.heads,
            "macs": self.macs,
            "weight_bytes": w.to_dict(),
            "compression": w.fp32 / max(w.gobo, 1e-30),
            "layers": [layer.to_dict() for layer in self.layers],
        }


# ---------------------------------------------------------------------------- building


def _config_value(config, *keys, default=None):
    for k in keys:
        v = config.get(k) if isinstance(config, Mapping) else getattr(config, k, None)
        if v is not None:
            return v
    return default


_BLOCK = re.compile(r"^(.*?\.\d+)\.(.+)$")


def _module(name: str) -> str:
    """``encoder.layer.0.attention.self.query.weight`` -> ``query``."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else parts[-1]


def _is_table(name: str) -> bool:
    return "embed" in name.lower() or name.endswith("_bias.weight")


def build_workload(
    quantized: Mapping[str, QuantizedTensor],
    dense: Mapping[str, np.ndarray],
    config: Mapping | object,
    seq: int = 128,
    batch: int = 1,
    model: str = "model",
) -> Workload:
    """The workload of ``batch`` x ``seq`` tokens through a model with these tensors.

    ``quantized`` and ``dense`` are a :class:`~gobo.quantizer.CompressedModel`'s fields;
    ``config`` is the model's config (``config.json`` as a dict, or a transformers config)
    and gives the hidden size, the number of heads and, for models that share one block
    over several layers (ALBERT), the number of layers.
    """
    from ..dataflow import count_ops

    if not isinstance(seq, int) or seq < 1:
        raise ValueError(f"seq must be a positive integer, got {seq!r}")
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    tensors: dict[str, tuple[tuple[int, ...], WeightBytes, QuantizedTensor | None]] = {}
    for name, qt in quantized.items():
        tensors[name] = (qt.shape, _qt_bytes(qt), qt)
    for name, a in dense.items():
        if a.dtype.kind == "f":  # int buffers (position_ids) are not parameters
            tensors[name] = (tuple(a.shape), _dense_bytes(a), None)
    if not tensors:
        raise ValueError("the model has no parameters")

    blocks: dict[str, list[str]] = {}
    outside: list[str] = []
    for name in tensors:
        m = _BLOCK.match(name)
        (blocks.setdefault(m.group(1), []) if m else outside).append(name)
    if not blocks:
        raise ValueError("no encoder blocks found: expected numbered layers such as encoder.layer.0")

    mats = [tensors[n][0] for names in blocks.values() for n in names if len(tensors[n][0]) == 2]
    if not mats:
        raise ValueError("the encoder blocks hold no weight matrices")
    hidden = int(_config_value(config, "hidden_size", "dim", "d_model", default=0) or 0)
    if not hidden:  # the most common input width of the blocks' matrices
        cols = [s[1] for s in mats]
        hidden = max(set(cols), key=cols.count)
    heads = int(_config_value(config, "num_attention_heads", "n_heads", "num_heads", default=0) or max(1, hidden // 64))
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
    tokens = seq * batch
    layers: list[Layer] = []
    used: set[str] = set()  # tensors already placed in an operation

    def linear(name: str, role: str, m: int) -> Op:
        shape, wb, qt = tensors[name]
        bias = name[: -len("weight")] + "bias" if name.endswith("weight") else None
        if bias in tensors and bias not in used:
            wb = wb + tensors[bias][1]
            used.add(bias)
        used.add(name)
        n_out, k_in = shape
        ops = count_ops(qt, tokens=m) if qt is not None else None
        return Op(role, "linear", m=m, k=k_in, n=n_out, weight=name, weights=wb, weight_numel=int(np.prod(shape)),
                  code_bits=qt.bits if qt is not None else None, gobo_ops=ops)

    # tables read row by row (embeddings): one layer in front
    tables = [n for n in outside if len(tensors[n][0]) == 2 and _is_table(n)]
    if tables:
        ops = []
        for name in tables:
            shape, wb, qt = tensors[name]
            rows = shape[0]
            moved = min(rows, tokens)
            frac = moved / rows
            # codes, outliers and row statistics move with their rows; the centroid table whole
            part = WeightBytes(numel=wb.numel * frac, codes=wb.codes * frac, centroids=wb.centroids,
                               outliers=wb.outliers * frac, row_stats=wb.row_stats * frac, dense=wb.dense * frac)
            ops.append(Op(_module(name) if _module(name) != "weight" else name, "gather", m=moved, k=1, n=shape[1],
                          weight=name, weights=part, weight_numel=int(moved * shape[1]), code_bits=qt.bits if qt is not None else None))
            used.add(name)
        groups_of_tables = {n.split(".")[0] for n in tables}
        extra = [n for n in outside if n not in used and len(tensors[n][0]) == 1 and n.split(".")[0] in groups_of_tables]
        if extra:
            wb = WeightBytes()
            for n in extra:
                wb = wb + tensors[n][1]
                used.add(n)
            ops.append(Op("params", "params", 0, 0, 0, weights=wb))
        ln = sum(1 for n in extra if n.endswith("weight"))
        layers.append(Layer("embeddings", tuple(ops), layernorm_elems=ln * tokens * hidden))

    # encoder blocks, in numeric order
    def block_key(prefix: str):
        return [int(p) if p.isdigit() else p for p in prefix.split(".")]

    n_blocks = len(blocks)
    n_layers = int(_config_value(config, "num_hidden_layers", "n_layers", "num_layers", default=n_blocks) or n_blocks)
    repeat = n_layers // n_blocks if n_layers > n_blocks and n_layers % n_blocks == 0 else 1
    block_layers: list[Layer] = []
    for prefix in sorted(blocks, key=block_key):
        names = blocks[prefix]
        ops: list[Op] = []
        squares = [n for n in names if tensors[n][0] == (hidden, hidden)]
        fused = [n for n in names if tensors[n][0] == (3 * hidden, hidden)]
        roles: dict[str, str] = {}
        for n in squares:
            mod = _module(n).lower()
            role = next((r for r, keys in _ROLE_NAMES.items() if mod in keys), None)
            roles[n] = role if role and role not in roles.values() else "o"
        n_o = [n for n, r in roles.items() if r == "o"]
        if len(n_o) > 1:  # several unnamed squares: keep them apart by module name
            for n in n_o:
                roles[n] = f"o.{_module(n)}"
        for n in fused:
            roles[n] = "qkv"
        for n in names:
            shape = tensors[n][0]
            if len(shape) != 2 or n in roles:
                continue
            if shape[1] == hidden and shape[0] != hidden:
                roles[n] = "ffn_in"
            elif shape[0] == hidden and shape[1] != hidden:
                roles[n] = "ffn_out"
            else:
                roles[n] = _module(n)
        for n, role in roles.items():
            ops.append(linear(n, role, tokens))
        has_attention = fused or sum(1 for r in roles.values() if r in ("q", "k", "v")) == 3
        dh = hidden // heads
        if has_attention:
            ops.append(Op("qk", "matmul", m=seq, k=dh, n=seq, count=heads * batch))
            ops.append(Op("av", "matmul", m=seq, k=seq, n=dh, count=heads * batch))
        vec = [n for n in names if n not in used and len(tensors[n][0]) <= 1]
        if vec:
            wb = WeightBytes()
            for n in vec:
                wb = wb + tensors[n][1]
                used.add(n)
            ops.append(Op("params", "params", 0, 0, 0, weights=wb))
        ops.sort(key=lambda o: (_ORDER.get(o.name.split(".")[0], 8), o.name))
        norms = sum(1 for n in vec if "norm" in n.lower() and n.endswith("weight"))
        inter = next((o.n for o in ops if o.name == "ffn_in"), 0)
        block_layers.append(Layer(
            prefix.split(".", 1)[-1] if prefix.count(".") else prefix,
            tuple(ops),
            softmax_elems=heads * batch * seq * seq if has_attention else 0,
            layernorm_elems=norms * tokens * hidden,
            gelu_elems=tokens * inter,
        ))
    for r in range(repeat):
        layers.extend(block_layers if r == 0 else [replace(layer, name=f"{layer.name}#{r + 1}") for layer in block_layers])

    # the rest: the pooler and classifier heads run on one vector per sequence, other
    # matrices (an embedding projection) on every token; vectors go with their group
    rest = [n for n in outside if n not in used]
    groups: dict[str, list[str]] = {}
    for n in rest:
        groups.setdefault(n.split(".")[0], []).append(n)
    for g, names in groups.items():
        per_seq = any(key in g.lower() for key in ("pool", "classif"))
        ops = [linear(n, _module(n), batch if per_seq else tokens) for n in names if len(tensors[n][0]) == 2 and n not in used]
        left = [n for n in names if n not in used]
        if left:
            wb = WeightBytes()
            for n in left:
                wb = wb + tensors[n][1]
                used.add(n)
            ops.append(Op("params", "params", 0, 0, 0, weights=wb))
        if ops:
            layers.append(Layer(g, tuple(ops)))
    return Workload(
        model=model,
        model_type=str(_config_value(config, "model_type", default="?")),
        seq=seq,
        batch=batch,
        hidden=hidden,
        heads=heads,
        layers=tuple(layers),
    )


def read_config(outdir: str | os.PathLike) -> dict:
    """``config.json`` of a model directory as a dict (no transformers import)."""
    path = Path(outdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{outdir} has no config.json; it is needed for the hidden size and heads")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc.msg})") from None


def load_workload(outdir: str | os.PathLike, seq: int = 128, batch: int = 1) -> Workload:
    """The workload of a compressed model directory written by ``gobo quantize``."""
    from ..io import read_compressed

    cm = read_compressed(outdir)
    config = read_config(outdir)
    max_pos = config.get("max_position_embeddings")
    if isinstance(max_pos, int) and seq > max_pos:
        raise ValueError(f"seq {seq} is longer than the model's {max_pos} positions")
    name = cm.source.get("name") or Path(outdir).name
    return build_workload(cm.quantized, cm.dense, config, seq=seq, batch=batch, model=str(name))

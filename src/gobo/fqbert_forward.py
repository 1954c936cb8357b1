"""The encoder's forward pass three ways: float (FP32 reference and calibration), its float64
fake-quantized simulation, and integer-only (see :mod:`gobo.fqbert` for the number formats).

Architectures are described by a table of module paths (:data:`LAYOUTS`); the code below knows
only architecture-neutral tensor names (:class:`EncoderSpec`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .intops import Dyadic, IntLayerNorm, i_gelu, i_layernorm, i_softmax, int_matmul, qmax, requantize

__all__ = [
    "ACT_POINTS",
    "LINEARS",
    "PROB_BITS",
    "SUPPORTED_MODEL_TYPES",
    "WIDE_POINTS",
    "Check",
    "EncoderSpec",
    "FloatOps",
    "IntEncoder",
    "IntLayer",
    "IntLinear",
    "SimOps",
    "extract_encoder",
    "float_forward",
    "input_point",
    "int_forward",
    "point_kind",
]


# ---------------------------------------------------------------------------- architecture

#: transformers model_type -> module paths inside one encoder layer, embedding scheme
LAYOUTS = {
    "bert": dict(
        q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
        ln1="attention.output.LayerNorm", fc1="intermediate.dense", fc2="output.dense", ln2="output.LayerNorm",
        positions="absolute",
    ),
    "roberta": dict(
        q="attention.self.query", k="attention.self.key", v="attention.self.value", o="attention.output.dense",
        ln1="attention.output.LayerNorm", fc1="intermediate.dense", fc2="output.dense", ln2="output.LayerNorm",
        positions="after-padding",
    ),
    "mpnet": dict(
        q="attention.attn.q", k="attention.attn.k", v="attention.attn.v", o="attention.attn.o",
        ln1="attention.LayerNorm", fc1="intermediate.dense", fc2="output.dense", ln2="output.LayerNorm",
        positions="after-padding",
    ),
}
SUPPORTED_MODEL_TYPES = tuple(LAYOUTS)
LINEARS = ("q", "k", "v", "o", "fc1", "fc2")


@dataclass
class EncoderSpec:
    """An encoder's FP32 tensors under architecture-neutral names, and its shape.

    Names: ``emb.word``, ``emb.pos``, ``emb.type`` (absent for MPNet), ``emb.ln.w/.b``,
    ``rel_bias`` (MPNet: ``(buckets, heads)``), and per layer ``l{i}.{q,k,v,o,fc1,fc2}.w/.b``
    (``nn.Linear`` layout ``(out, in)``) and ``l{i}.{ln1,ln2}.w/.b``.
    """

    model_type: str
    hidden: int
    heads: int
    layers: int
    eps: float
    pad_id: int
    positions: str  # "absolute": 0..T-1; "after-padding": pad_id + 1 + index among non-pad tokens
    tensors: dict[str, torch.Tensor]
    rel_buckets: int = 0
    rel_max_distance: int = 128

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


def _get(module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def extract_encoder(model) -> EncoderSpec:
    """The FP32 tensors of a transformers encoder (BertModel, RobertaModel, MPNetModel).

    Raises ValueError, naming what is supported, for any other architecture or activation.
    """
    model = getattr(model, "base_model", model)  # a model with a task head: its encoder
    cfg = getattr(model, "config", None)
    mt = getattr(cfg, "model_type", None)
    if mt not in LAYOUTS:
        raise ValueError(
            f"FQ-BERT supports {', '.join(SUPPORTED_MODEL_TYPES)} encoders; got {type(model).__name__} "
            f"(model_type {mt!r})"
        )
    if getattr(cfg, "hidden_act", None) != "gelu":
        raise ValueError(f"FQ-BERT needs the erf GELU activation ('gelu'); this model uses {cfg.hidden_act!r}")
    if mt != "mpnet" and getattr(cfg, "position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"FQ-BERT supports absolute position embeddings only; got {cfg.position_embedding_type!r}")
    if getattr(cfg, "is_decoder", False):
        raise ValueError("FQ-BERT supports encoders only; this model is configured as a decoder")
    lay = LAYOUTS[mt]
    emb = model.embeddings
    t: dict[str, torch.Tensor] = {
        "emb.word": emb.word_embeddings.weight,
        "emb.pos": emb.position_embeddings.weight,
        "emb.ln.w": emb.LayerNorm.weight,
        "emb.ln.b": emb.LayerNorm.bias,
    }
    if getattr(emb, "token_type_embeddings", None) is not None:
        t["emb.type"] = emb.token_type_embeddings.weight
    layers = model.encoder.layer
    for i, layer in enumerate(layers):
        for name in LINEARS:
            lin = _get(layer, lay[name])
            t[f"l{i}.{name}.w"] = lin.weight
            t[f"l{i}.{name}.b"] = lin.bias
        for name in ("ln1", "ln2"):
            ln = _get(layer, lay[name])
            t[f"l{i}.{name}.w"] = ln.weight
            t[f"l{i}.{name}.b"] = ln.bias
    rel_buckets = 0
    if mt == "mpnet":
        t["rel_bias"] = model.encoder.relative_attention_bias.weight
        rel_buckets = int(cfg.relative_attention_num_buckets)
    tensors = {k: v.detach().float().clone() for k, v in t.items()}
    if mt == "mpnet":
        pad_id = emb.padding_idx
    else:
        pad_id = int(cfg.pad_token_id if cfg.pad_token_id is not None else 0)
    hidden, heads = int(cfg.hidden_size), int(cfg.num_attention_heads)
    if hidden % heads:
        raise ValueError(f"hidden size {hidden} is not a multiple of the {heads} attention heads")
    return EncoderSpec(
        model_type=mt, hidden=hidden, heads=heads, layers=len(layers), eps=float(cfg.layer_norm_eps),
        pad_id=pad_id, positions=lay["positions"], tensors=tensors, rel_buckets=rel_buckets,
    )


def _position_ids(spec: EncoderSpec, ids: torch.Tensor) -> torch.Tensor:
    if spec.positions == "absolute":
        return torch.arange(ids.shape[1]).expand_as(ids)
    keep = (ids != spec.pad_id).to(torch.int64)
    return torch.cumsum(keep, dim=1) * keep + spec.pad_id


def _relative_buckets(spec: EncoderSpec, t: int) -> torch.Tensor:
    """MPNet's bucket of ``key - query`` for a ``(T, T)`` attention map (int64)."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    pos = torch.arange(t)
    rel = pos[None, :] - pos[:, None]
    return MPNetEncoder.relative_position_bucket(rel, num_buckets=spec.rel_buckets, max_distance=spec.rel_max_distance)


# ---------------------------------------------------------------------------- float path

#: kinds of quantization points; a point is named "emb.<kind>" or "l<i>.<kind>"
ACT_POINTS = ("ln", "q", "k", "v", "ctx", "h1", "gelu_out", "h2")  # a_bits, signed
WIDE_POINTS = ("sum", "res1", "gelu_in", "res2")  # wide_bits, signed
PROB_BITS = 8  # softmax output: unsigned codes at 2**-8


def point_kind(point: str) -> str:
    return point.split(".", 1)[1]


def input_point(layer: int, linear: str) -> str:
    """The quantization point whose codes are the input of ``linear`` in ``layer``."""
    prev = f"l{layer - 1}.h2" if layer else "emb.ln"
    return {"q": prev, "k": prev, "v": prev, "o": f"l{layer}.ctx", "fc1": f"l{layer}.h1", "fc2": f"l{layer}.gelu_out"}[linear]


class FloatOps:
    """The encoder's operations in plain float (FP32 reference); ``observe(point, x)`` sees every
    value that the quantized model puts on a grid (used for calibration)."""

    def __init__(self, observe: Callable[[str, torch.Tensor], None] | None = None) -> None:
        self.observe = observe

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if self.observe is not None:
            self.observe(name, x)
        return x

    def add(self, name: str, terms: list[torch.Tensor]) -> torch.Tensor:
        return self.act(name, sum(terms[1:], terms[0]))

    def scores(self, layer: int, s: torch.Tensor) -> torch.Tensor:
        return s

    def softmax(self, layer: int, s: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        return torch.softmax(s.masked_fill(~keys, float("-inf")), dim=-1)

    def gelu(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x)

    def layer_norm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def float_forward(spec: EncoderSpec, w: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor,
                  types: torch.Tensor | None = None, ops: FloatOps | None = None) -> torch.Tensor:
    """The encoder in float: last hidden state ``(B, T, H)``.

    ``w`` holds the tensors under :class:`EncoderSpec` names (FP32 or dequantized) and, for
    MPNet, a per-layer ``l{i}.rel`` table; ``ops`` decides what happens at each quantization
    point (:class:`FloatOps`: nothing; the simulation: fake quantization).
    """
    ops = ops or FloatOps()
    b, t = ids.shape
    nh, d = spec.heads, spec.head_dim
    terms = [w["emb.word"][ids], w["emb.pos"][_position_ids(spec, ids)]]
    if "emb.type" in w:
        terms.append(w["emb.type"][types if types is not None else torch.zeros_like(ids)])
    x = ops.add("emb.sum", terms)
    h = ops.act("emb.ln", ops.layer_norm(x, w["emb.ln.w"], w["emb.ln.b"], spec.eps))
    keys = mask.bool()[:, None, None, :]  # (B, 1, 1, T)
    buckets = _relative_buckets(spec, t) if spec.rel_buckets else None

    def heads(x):  # (B, T, H) -> (B, nh, T, d)
        return x.view(b, t, nh, d).transpose(1, 2)

    for i in range(spec.layers):
        p = f"l{i}."
        q = heads(ops.act(p + "q", F.linear(h, w[p + "q.w"], w[p + "q.b"])))
        k = heads(ops.act(p + "k", F.linear(h, w[p + "k.w"], w[p + "k.b"])))
        v = heads(ops.act(p + "v", F.linear(h, w[p + "v.w"], w[p + "v.b"])))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)  # (B, nh, T, T)
        if buckets is not None:
            scores = scores + w[p + "rel"][buckets].permute(2, 0, 1)
        probs = ops.softmax(i, ops.scores(i, scores), keys)
        ctx = ops.act(p + "ctx", (probs @ v).transpose(1, 2).reshape(b, t, spec.hidden))
        r = ops.add(p + "res1", [F.linear(ctx, w[p + "o.w"], w[p + "o.b"]), h])
        h1 = ops.act(p + "h1", ops.layer_norm(r, w[p + "ln1.w"], w[p + "ln1.b"], spec.eps))
        g = ops.act(p + "gelu_in", F.linear(h1, w[p + "fc1.w"], w[p + "fc1.b"]))
        g = ops.act(p + "gelu_out", ops.gelu(i, g))
        r = ops.add(p + "res2", [F.linear(g, w[p + "fc2.w"], w[p + "fc2.b"]), h1])
        h = ops.act(p + "h2", ops.layer_norm(r, w[p + "ln2.w"], w[p + "ln2.b"], spec.eps))
    return h


def _fake(x: torch.Tensor, scale, lo: int, hi: int) -> torch.Tensor:
    """Round to nearest on the grid (ties up, like the integer path) and clamp."""
    return torch.clamp(torch.floor(x / scale + 0.5), lo, hi) * scale


class SimOps(FloatOps):
    """Float simulation (float64) of the fully quantized model.

    Fake quantization at every point, with the integer path's scales and rounding (nearest,
    ties up); residual and embedding sums round each term, as the integer path rescales each;
    softmax and GELU evaluate I-BERT's polynomials in float with the same grid-quantized
    coefficients; LayerNorm, the division of the softmax and every rescaling are exact.
    """

    def __init__(self, model) -> None:  # an FQBertModel
        super().__init__()
        self.m = model
        self.aq = qmax(model.config.a_bits)
        self.wq = qmax(model.config.wide_bits)

    def _bound(self, name: str) -> int:
        return self.wq if point_kind(name) in WIDE_POINTS else self.aq

    def act(self, name: str, x: torch.Tensor) -> torch.Tensor:
        q = self._bound(name)
        return _fake(x, self.m.act_scales[name] * self.m.factor(name), -q, q)

    def add(self, name: str, terms: list[torch.Tensor]) -> torch.Tensor:
        s, q = self.m.act_scales[name], self._bound(name)
        codes = sum(torch.clamp(torch.floor(t / s + 0.5), -q, q) for t in terms)
        return torch.clamp(codes, -q, q) * s

    def scores(self, layer: int, s: torch.Tensor) -> torch.Tensor:
        return torch.floor(s / self.m.score_scale(layer) + 0.5)  # integer-valued: the accumulator's codes

    def softmax(self, layer: int, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        from .intops import exp_constants

        x0, b, c = exp_constants(self.m.score_scale(layer))
        x = x.masked_fill(~keys, float("-inf"))
        x = torch.clamp(x - x.amax(dim=-1, keepdim=True), min=62 * x0)
        z = torch.floor(x / x0)
        r = x - z * x0
        e = ((r + b) * r + c) * torch.pow(2.0, -z)
        e = torch.where(keys, e, torch.zeros_like(e))
        p = e / e.sum(dim=-1, keepdim=True)
        return torch.clamp(torch.floor(p * 2**PROB_BITS + 0.5), 0, 2**PROB_BITS - 1) * 2.0**-PROB_BITS

    def gelu(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        from .intops import gelu_constants

        s = self.m.act_scales[f"l{layer}.gelu_in"]
        b, c, one, out_scale = gelu_constants(s)
        x = x / s  # integer-valued (gelu_in codes)
        t = torch.clamp(x.abs(), max=-b) + b
        return x * (one - torch.sign(x) * (t * t + c)) * out_scale


# ---------------------------------------------------------------------------- integer path


@dataclass
class IntLinear:
    w_t: torch.Tensor  # int8 (in, out): codes, transposed for x @ w_t
    bias: torch.Tensor  # int32 (out,): at scale in_scale * row scale
    out: Dyadic  # per output channel: in_scale * row scale / out_scale
    x_max: int  # bound on the input codes
    w_max: int  # bound on the weight codes

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return int_matmul(x, self.w_t, self.x_max, self.w_max) + self.bias  # int32 accumulator


@dataclass
class IntLayer:
    q: IntLinear
    k: IntLinear
    v: IntLinear
    score_scale: float  # scale of the int32 Q K^T accumulator (1/sqrt(d) folded in)
    rel: torch.Tensor | None  # int32 (buckets, heads) relative bias at score_scale
    ctx: Dyadic  # 2**-8 * v scale / ctx scale
    o: IntLinear  # to the res1 scale
    res1_skip: Dyadic  # layer input scale / res1 scale
    ln1: IntLayerNorm
    fc1: IntLinear  # to the gelu_in scale
    gelu_scale: float  # scale of the GELU input
    gelu_out: Dyadic  # i_gelu output scale / gelu_out scale
    fc2: IntLinear  # to the res2 scale
    res2_skip: Dyadic  # h1 scale / res2 scale
    ln2: IntLayerNorm


@dataclass
class IntEncoder:
    word: torch.Tensor  # int8 codes (V, H)
    word_d: Dyadic  # per row: row scale / emb.sum scale, shape (V, 1)
    pos: torch.Tensor
    pos_d: Dyadic
    typ: torch.Tensor | None
    typ_d: Dyadic | None
    ln: IntLayerNorm
    layers: list[IntLayer]
    aq: int  # qmax of the a_bits points
    wq: int  # qmax of the wide points
    out_scale: float  # scale of the last hidden state's codes


Check = Callable[[str, torch.Tensor], torch.Tensor]


def int_forward(spec: EncoderSpec, enc: IntEncoder, ids: torch.Tensor, mask: torch.Tensor,
                types: torch.Tensor | None = None, check: Check | None = None) -> torch.Tensor:
    """The encoder in integer arithmetic: int8 codes ``(B, T, H)`` of the last hidden state.

    ``check(point, tensor)`` sees every intermediate (debug mode asserts integer dtypes and ranges).
    """
    chk = check or (lambda name, x: x)
    b, t = ids.shape
    nh, d = spec.heads, spec.head_dim
    aq, wq = enc.aq, enc.wq
    pos = _position_ids(spec, ids)
    x = requantize(enc.word[ids], enc.word_d.index(ids), -wq, wq).to(torch.int32)
    x = x + requantize(enc.pos[pos], enc.pos_d.index(pos), -wq, wq)
    if enc.typ is not None:
        tt = types if types is not None else torch.zeros_like(ids)
        x = x + requantize(enc.typ[tt], enc.typ_d.index(tt), -wq, wq)
    x = chk("emb.sum", x.clamp_(-wq, wq))
    h = chk("emb.ln", i_layernorm(x, enc.ln))
    keys = mask.bool()[:, None, None, :]
    buckets = _relative_buckets(spec, t) if spec.rel_buckets else None

    def heads(x):
        return x.view(b, t, nh, d).transpose(1, 2)

    for i, L in enumerate(enc.layers):
        p = f"l{i}."
        q = heads(chk(p + "q", requantize(chk(p + "q.acc", L.q(h)), L.q.out, -aq, aq)))
        k = heads(chk(p + "k", requantize(chk(p + "k.acc", L.k(h)), L.k.out, -aq, aq)))
        v = heads(chk(p + "v", requantize(chk(p + "v.acc", L.v(h)), L.v.out, -aq, aq)))
        scores = int_matmul(q, k.transpose(-1, -2), aq, aq)  # (B, nh, T, T) int32 at score_scale
        if buckets is not None:
            scores = scores + L.rel[buckets].permute(2, 0, 1)
        probs = chk(p + "p", i_softmax(chk(p + "scores", scores), L.score_scale, keys, PROB_BITS))  # uint8
        ctx = chk(p + "ctx.acc", int_matmul(probs, v, 255, aq))  # (B, nh, T, d) int32
        ctx = chk(p + "ctx", requantize(ctx, L.ctx, -aq, aq).transpose(1, 2).reshape(b, t, spec.hidden))
        acc = chk(p + "o.acc", L.o(ctx))
        r = requantize(acc, L.o.out, -wq, wq).to(torch.int32) + requantize(h, L.res1_skip, -wq, wq)
        h1 = chk(p + "h1", i_layernorm(chk(p + "res1", r.clamp_(-wq, wq)), L.ln1))
        g = chk(p + "gelu_in", requantize(chk(p + "fc1.acc", L.fc1(h1)), L.fc1.out, -wq, wq))
        y, _ = i_gelu(g, L.gelu_scale)
        g = chk(p + "gelu_out", requantize(chk(p + "gelu", y), L.gelu_out, -aq, aq))
        acc = chk(p + "fc2.acc", L.fc2(g))
        r = requantize(acc, L.fc2.out, -wq, wq).to(torch.int32) + requantize(h1, L.res2_skip, -wq, wq)
        h = chk(p + "h2", i_layernorm(chk(p + "res2", r.clamp_(-wq, wq)), L.ln2))
    return h



"""Modules that keep their weights packed: QuantLinear, QuantEmbedding, and the module swap.

A swapped model holds, per quantized weight, only what the file stores (packed uint8 codes,
codebook(s), optional per-row scale/offset, outlier positions and values) plus the FP32 bias;
no FP32 copy of a quantized weight stays resident. A Linear's forward pass decodes its weight
block by block straight into the panels of its GEMM (per-thread scratch that every layer
reuses); an Embedding decodes just the looked-up rows. See :mod:`gobo.kernels`.

Modules are matched to quantized tensors by their state-dict names (``NAME.weight``), so the
swap works on any module tree without knowing an architecture's layer names.

:func:`fuse_epilogues` then folds what follows a packed Linear into its GEMM where a
BERT-family layer has the known shape: the GELU after the feed-forward's first matrix, and
the residual add before the LayerNorm after the second (``BertOutput`` and its copies).
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import math
import os
import threading
import weakref
from typing import Mapping

import torch
from torch import nn

from . import kernels
from .qtensor import QuantizedTensor

__all__ = ["FusedOutput", "QuantEmbedding", "QuantLinear", "build_packed_model", "fuse_epilogues", "resident_weight_bytes", "swap_modules"]

_FIELDS = ("codes", "codebook", "row_scale", "row_offset", "outlier_index", "outlier_value", "col_scale")


class _Packed(nn.Module):
    """Shared buffer handling of the two packed modules."""

    #: class-wide switch to the pure reference path (dequantize everything, then compute)
    use_reference: bool = False

    def _register_packed(self, p: kernels.Packed) -> None:
        self.rows, self.cols, self.bits, self.group_rows = p.rows, p.cols, p.bits, p.group_rows
        for name in _FIELDS:
            self.register_buffer(name, getattr(p, name))
        #: (buffer pointers and dtypes, Packed, QMat) of the last call
        self._view: tuple | None = None

    def packed(self) -> kernels.Packed:
        """The module's buffers as a :class:`gobo.kernels.Packed` (no copies)."""
        return kernels.Packed(
            rows=self.rows,
            cols=self.cols,
            bits=self.bits,
            group_rows=self.group_rows,
            codes=self.codes,
            codebook=self.codebook,
            row_scale=self.row_scale,
            row_offset=self.row_offset,
            outlier_index=self.outlier_index,
            outlier_value=self.outlier_value,
            col_scale=self.col_scale,
        )

    def _packed_view(self) -> tuple[kernels.Packed, kernels.QMat]:
        """:meth:`packed` and its C view, built again only when a buffer was replaced or
        moved (the C view holds raw pointers); a forward pass's fast path."""
        b = self._buffers
        key = tuple(None if t is None else (t.data_ptr(), t.dtype) for t in map(b.__getitem__, _FIELDS))
        view = self._view
        if view is None or view[0] != key:
            p = self.packed()
            view = self._view = (key, p, kernels._qmat(p))
        return view[1], view[2]

    def dequantize(self) -> torch.Tensor:
        """The float32 weight (a temporary: the module never keeps it)."""
        return self.packed().dequantize()

    def packed_nbytes(self) -> int:
        return self.packed().nbytes()

    def _packed_repr(self) -> str:
        groups = self.codebook.shape[0]
        stats = "none" if self.row_scale is None and self.row_offset is None else str(
            (self.row_scale if self.row_scale is not None else self.row_offset).dtype
        ).replace("torch.", "")
        return f"bits={self.bits}, codebooks={groups}, outliers={self.outlier_index.numel()}, row_stats={stats}"


def _layer_norm_args(layer_norm: nn.Module | None, n: int):
    """``(args, after)``: the ``(weight, bias, eps)`` the GEMM applies for an ``nn.LayerNorm``
    over the last ``n`` features, or None and the module itself to call afterwards (any other
    module, a subclass, or a LayerNorm over another shape)."""
    if layer_norm is None:
        return None, None
    if type(layer_norm) is nn.LayerNorm and tuple(layer_norm.normalized_shape) == (n,) and float(layer_norm.eps) > 0:
        return (layer_norm.weight, layer_norm.bias, float(layer_norm.eps)), None
    return None, layer_norm


class QuantLinear(_Packed):
    """``nn.Linear`` whose weight stays packed; ``forward`` decodes it into a reused buffer.

    By default the fused kernel multiplies straight from the codes (:func:`gobo.kernels.linear`);
    ``tile_rows`` asks for the tiled path instead (that many rows of W decoded, then
    ``torch.addmm``), which is also what CPUs without AVX2/FMA get. ``act`` (None or
    ``"gelu"``) is applied to the output inside the GEMM; ``forward(x, residual)`` adds
    ``residual`` to the output before it, and ``forward(x, residual, layer_norm)`` applies the
    ``nn.LayerNorm`` ``layer_norm`` (over the output features) last, also inside the GEMM.
    """

    def __init__(self, packed: kernels.Packed, bias: torch.Tensor | None = None, tile_rows: int | None = None, act: str | None = None):
        super().__init__()
        self.in_features, self.out_features = packed.cols, packed.rows
        self._register_packed(packed)
        if bias is not None:
            if tuple(bias.shape) != (packed.rows,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({packed.rows},)")
            self.bias = nn.Parameter(bias.detach().to(torch.float32).contiguous(), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.tile_rows = tile_rows
        kernels._check_act(act)
        self.act = act
        #: write outputs into a reused per-thread buffer (:func:`gobo.kernels.linear`); set by
        #: :func:`fuse_epilogues` for a feed-forward's hidden activations, which live briefly
        self.reuse_output = False

    @classmethod
    def from_qtensor(cls, qt: QuantizedTensor, bias: torch.Tensor | None = None, tile_rows: int | None = None) -> "QuantLinear":
        if len(qt.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D, got shape {qt.shape}")
        return cls(kernels.Packed.from_qtensor(qt), bias, tile_rows)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, layer_norm: nn.LayerNorm | None = None) -> torch.Tensor:
        # (..., in_features) -> (..., out_features)
        p, q = self._packed_view()
        ln, after = _layer_norm_args(layer_norm, self.out_features)
        if self.use_reference:
            y = kernels.linear_reference(x, p, self.bias, residual=residual, act=self.act, layer_norm=ln)
        else:
            y = kernels.linear(
                x, p, self.bias, residual=residual, act=self.act, layer_norm=ln, reuse_output=self.reuse_output, tile_rows=self.tile_rows, q=q
            )
        return after(y) if after is not None else y

    def forward_reference(self, x: torch.Tensor, residual: torch.Tensor | None = None, layer_norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """``layer_norm(act(F.linear(x, dequantize(), bias) + residual))``: what :meth:`forward` must reproduce."""
        y = kernels.linear_reference(x, self.packed(), self.bias, residual=residual, act=self.act)
        return y if layer_norm is None else layer_norm(y)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"{self._packed_repr()}" + ("" if self.tile_rows is None else f", tile_rows={self.tile_rows}")
            + ("" if self.act is None else f", act={self.act}")
        )


class QuantEmbedding(_Packed):
    """``nn.Embedding`` whose table stays packed; a lookup decodes only the rows it needs."""

    def __init__(self, packed: kernels.Packed, padding_idx: int | None = None):
        super().__init__()
        self.num_embeddings, self.embedding_dim = packed.rows, packed.cols
        self.padding_idx = padding_idx  # kept for code that reads it; lookups do not treat it specially
        self._register_packed(packed)

    @classmethod
    def from_qtensor(cls, qt: QuantizedTensor, padding_idx: int | None = None) -> "QuantEmbedding":
        if len(qt.shape) != 2:
            raise ValueError(f"an embedding table must be 2-D, got shape {qt.shape}")
        return cls(kernels.Packed.from_qtensor(qt), padding_idx)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (...) -> (..., embedding_dim)
        p, q = self._packed_view()
        if self.use_reference or ids.device.type != "cpu" or not kernels.fast_available():
            return kernels.embedding_reference(ids, p)
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), self.embedding_dim, dtype=torch.float32)
        rc = kernels._lib().gobo_decode_row_list(ctypes.byref(q), flat.data_ptr(), flat.numel(), out.data_ptr(), 1)
        if rc == 2:
            raise IndexError(f"index out of range in an embedding table of {self.num_embeddings} rows")
        if rc:
            raise ValueError("the native decoder rejected its arguments")
        return kernels.scale_columns(out, p).reshape(*ids.shape, self.embedding_dim)

    def forward_reference(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding_reference(ids, self.packed())

    def extra_repr(self) -> str:
        pad = f", padding_idx={self.padding_idx}" if self.padding_idx is not None else ""
        return f"{self.num_embeddings}, {self.embedding_dim}{pad}, {self._packed_repr()}"


# ---------------------------------------------------------------------------- module swap


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def swap_modules(model: nn.Module, quantized: Mapping[str, QuantizedTensor], tile_rows: int | None = None) -> list[str]:
    """Replace every nn.Linear / nn.Embedding whose ``NAME.weight`` is in ``quantized``.

    The original weight is dropped (only the packed form stays); a Linear's bias is kept in
    FP32. A weight tied between several modules is packed once and its buffers are shared.
    Returns the swapped weight names, in module order.
    """
    swapped: list[str] = []
    packed_by_weight: dict[int, kernels.Packed] = {}
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, (nn.Linear, nn.Embedding)) or not name:
            continue
        key = f"{name}.weight"
        w = mod.weight
        p = packed_by_weight.get(id(w))
        if p is None:
            if key not in quantized:
                continue
            qt = quantized[key]
            if tuple(qt.shape) != tuple(w.shape):
                raise ValueError(f"{key}: the compressed tensor has shape {qt.shape}, the model expects {tuple(w.shape)}")
            p = kernels.Packed.from_qtensor(qt)
            packed_by_weight[id(w)] = p
        if isinstance(mod, nn.Linear):
            new: nn.Module = QuantLinear(p, mod.bias, tile_rows)
        else:
            if mod.max_norm is not None:
                raise ValueError(f"{name}: embeddings with max_norm cannot stay packed")
            new = QuantEmbedding(p, mod.padding_idx)
        new.train(mod.training)
        _set_submodule(model, name, new)
        swapped.append(key)
    return swapped


# ---------------------------------------------------------------------------- epilogue fusion

#: (Linear, activation) attribute pairs of modules whose forward applies the activation to the
#: Linear's output and to nothing else: the feed-forward of BERT, RoBERTa, ELECTRA and MPNet
#: (``*Intermediate``), DistilBERT (``FFN``) and ALBERT (``AlbertLayer``)
_ACT_PAIRS = (("dense", "intermediate_act_fn"), ("lin1", "activation"), ("ffn", "activation"))


def _is_exact_gelu(act: nn.Module) -> bool:
    """True for GELU in its erf form: ``nn.GELU()`` or transformers' ``GELUActivation``."""
    if isinstance(act, nn.GELU):
        return act.approximate == "none"
    if type(act).__name__ == "GELUActivation":
        fn = getattr(act, "act", None)
        return fn is nn.functional.gelu or getattr(fn, "__name__", "") == "_gelu_python"
    return False


class FusedOutput(nn.Module):
    """``LayerNorm(dropout(dense(h)) + input)`` (``BertOutput``, ``BertSelfOutput`` and their
    copies) with the residual add and the LayerNorm done by the packed GEMM (the add on each
    tile, the LayerNorm on each row once its threads have all finished). Same submodules and
    state-dict names as the module it replaces; in training mode with dropout it computes
    the original way."""

    def __init__(self, dense: QuantLinear, layer_norm: nn.LayerNorm, dropout: nn.Dropout):
        super().__init__()
        self.dense, self.LayerNorm, self.dropout = dense, layer_norm, dropout

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout.p > 0:
            return self.LayerNorm(self.dropout(self.dense(hidden_states)) + input_tensor)
        return self.dense(hidden_states, residual=input_tensor, layer_norm=self.LayerNorm)


def _forward_params(mod: nn.Module) -> list[str]:
    """The parameter names of ``type(mod).forward`` ([] where they cannot be read)."""
    try:
        return list(inspect.signature(type(mod).forward).parameters)
    except (TypeError, ValueError):
        return []


def _same_output(mod: nn.Module, want, got) -> bool:
    """True when ``want()`` (the module's own forward) and ``got()`` (its fused replacement),
    run with ``mod`` in eval mode and without autograd, give tensors of the same shape that
    agree to float32 rounding; False where either raises (a forward that does not take these
    inputs is not the one looked for)."""
    was_training = mod.training
    mod.eval()
    try:
        with torch.no_grad():
            a, b = want(), got()
    except Exception:  # noqa: BLE001
        return False
    finally:
        mod.train(was_training)
    return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))


def _is_residual_output(mod: nn.Module) -> bool:
    """A module shaped like ``BertOutput``: exactly dense (packed, no activation), LayerNorm and
    dropout, ``forward(hidden_states, input_tensor)``, and the output of
    ``LayerNorm(dense(hidden_states) + input_tensor)`` on a random input."""
    children = dict(mod.named_children())
    if set(children) != {"dense", "LayerNorm", "dropout"} or isinstance(mod, FusedOutput):
        return False
    if not (isinstance(children["dense"], QuantLinear) and children["dense"].act is None and isinstance(children["LayerNorm"], nn.LayerNorm) and isinstance(children["dropout"], nn.Dropout)):
        return False
    if _forward_params(mod) != ["self", "hidden_states", "input_tensor"]:
        return False
    # and it computes LayerNorm(dense(h) + input): checked on two random tokens, in eval mode
    dense = children["dense"]
    gen = torch.Generator().manual_seed(0)
    h, inp = torch.randn(1, 2, dense.in_features, generator=gen), torch.randn(1, 2, dense.out_features, generator=gen)
    return _same_output(mod, lambda: mod(h, inp), lambda: dense(h, residual=inp, layer_norm=mod.LayerNorm))


class FusedAttention(nn.Module):
    """MPNet's attention block, ``LayerNorm(dropout(o(attention(q(h), k(h), v(h)))) + h)`` with
    the scores' additive mask and relative-position bias, computed by one call of
    :func:`gobo.kernels.attention` (instead of two batched matmuls, the scaling, two adds,
    the softmax and a copy: one pass of threads instead of about eight), and the residual
    add and LayerNorm in the output GEMM. Same submodules and state-dict names as the module
    it replaces; asked for the attention probabilities, or in training mode with dropout, it
    runs the original forward."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.attn, self.LayerNorm, self.dropout = original.attn, original.LayerNorm, original.dropout
        # the replaced class's forward, for what the fast path does not cover
        object.__setattr__(self, "_original_forward", type(original).forward)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, position_bias: torch.Tensor | None = None,
                output_attentions: bool = False, **kwargs):
        a = self.attn
        if output_attentions or (self.training and (self.dropout.p > 0 or a.dropout.p > 0)):
            return self._original_forward(self, hidden_states, attention_mask, position_bias, output_attentions=output_attentions, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, a.attention_head_size)
        q = a.q(hidden_states).view(shape).transpose(1, 2)
        k = a.k(hidden_states).view(shape).transpose(1, 2)
        v = a.v(hidden_states).view(shape).transpose(1, 2)
        c = kernels.attention(q, k, v, _score_mask(position_bias, attention_mask), scale=1.0 / math.sqrt(a.attention_head_size))
        c = c.transpose(1, 2).reshape(*hidden_states.shape[:-1], a.all_head_size)  # a view: the kernel writes (B, S, H, D)
        return (a.o(c, residual=hidden_states, layer_norm=self.LayerNorm),)


def _make_score_mask(position_bias: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    mask = attention_mask
    if mask is not None and mask.dtype == torch.bool:  # True: attend (an additive mask in the eager form)
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
    if position_bias is not None:
        mask = position_bias if mask is None else position_bias + mask
    if mask is not None and mask.stride(-1) != 1:  # MPNet's bias is a permuted view
        mask = mask.contiguous()
    return mask


#: per thread: how deep in forward passes of models with gobo's attention, and the score
#: mask made last in the current one
_scope = threading.local()


def _enter_forward(module, args) -> None:
    _scope.depth = getattr(_scope, "depth", 0) + 1


def _leave_forward(module, args, output) -> None:
    _scope.depth = getattr(_scope, "depth", 1) - 1
    if _scope.depth <= 0:
        _scope.__dict__.pop("mask", None)


def _score_mask(position_bias: torch.Tensor | None, attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """``position_bias + attention_mask`` (either may be None; a boolean mask becomes
    additive), contiguous along the keys. Every layer of an MPNet forward pass gets the same
    two tensors: within one forward pass of the model (the hooks :func:`fuse_epilogues`
    sets), the sum is made once and reused while the same two tensors come."""
    inside = getattr(_scope, "depth", 0) > 0
    if inside:
        last = getattr(_scope, "mask", None)
        if last is not None and all(r() is t if r is not None else t is None for r, t in zip(last[0], (position_bias, attention_mask))):
            return last[1]
    mask = _make_score_mask(position_bias, attention_mask)
    if inside and mask is not None and mask is not position_bias and mask is not attention_mask:
        _scope.mask = (tuple(None if t is None else weakref.ref(t) for t in (position_bias, attention_mask)), mask)
    return mask


#: the name gobo's attention is registered under in transformers' AttentionInterface
ATTENTION_NAME = "gobo"


def _attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs):
    """transformers' attention-function protocol (``AttentionInterface``) on
    :func:`gobo.kernels.attention`; what it does not cover (dropout in training, causal or
    grouped-query attention, a position bias, soft-capping, attention probabilities) goes to
    transformers' ``sdpa`` function."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", False)
    if ((dropout and module.training) or causal or key.shape[1] != query.shape[1] or kwargs.get("position_bias") is not None
            or kwargs.get("softcap") is not None or kwargs.get("output_attentions")
            or (attention_mask is not None and attention_mask.dim() != 4)):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
    seen = getattr(_scope, "attention_modules", None)
    if seen is not None:
        seen.add(id(module))
    out = kernels.attention(query, key, value, _score_mask(None, attention_mask), scale=scaling)
    return out.transpose(1, 2), None  # (B, S, H, D), contiguous: what the sdpa function returns


def _register_attention() -> bool:
    """Registers :func:`_attention_forward` (with sdpa's mask format) in transformers; False
    where this transformers has no attention interface."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(ATTENTION_NAME, _attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return True


def _use_gobo_attention(model: nn.Module) -> int:
    """Switches a transformers model whose attention goes through ``AttentionInterface`` with
    ``sdpa`` to gobo's attention, if it then gives the same output on a random padded batch
    (else it is switched back). Returns the number of attention modules that use it."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return 0
    if not (hasattr(model, "_can_set_attn_implementation") and model._can_set_attn_implementation()) or not _register_attention():
        return 0
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 8:
        return 0
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    seen: set = set()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)[0]
            model.set_attn_implementation(ATTENTION_NAME)
            _scope.attention_modules = seen  # which modules run through it
            try:
                got = model(input_ids=ids, attention_mask=mask)[0]
            finally:
                _scope.attention_modules = None
        ok = isinstance(got, torch.Tensor) and got.shape == want.shape and bool(torch.allclose(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-5))
    except Exception:  # noqa: BLE001  (a model this does not fit keeps sdpa)
        ok = False
    finally:
        model.train(was_training)
    if not ok or not seen:
        if config._attn_implementation == ATTENTION_NAME:
            model.set_attn_implementation("sdpa")
        return 0
    return len(seen)


def _is_mpnet_attention(mod: nn.Module) -> bool:
    """A module shaped like ``MPNetAttention``: children ``attn`` (packed ``q``, ``k``, ``v``,
    ``o`` without activation, and ``dropout``), ``LayerNorm`` and ``dropout``;
    ``forward(hidden_states, attention_mask, position_bias, output_attentions)``; and the
    output of :class:`FusedAttention` on a random input with a padded key and a random
    position bias."""
    children = dict(mod.named_children())
    if set(children) != {"attn", "LayerNorm", "dropout"} or isinstance(mod, FusedAttention):
        return False
    a = children["attn"]
    lins = dict(a.named_children())
    if set(lins) != {"q", "k", "v", "o", "dropout"} or not isinstance(children["LayerNorm"], nn.LayerNorm):
        return False
    if not all(isinstance(lins[n], QuantLinear) and lins[n].act is None for n in "qkvo"):
        return False
    heads, size, total = (getattr(a, n, None) for n in ("num_attention_heads", "attention_head_size", "all_head_size"))
    if not all(isinstance(n, int) and n > 0 for n in (heads, size, total)) or heads * size != total or lins["q"].out_features != total:
        return False
    if _forward_params(mod)[:5] != ["self", "hidden_states", "attention_mask", "position_bias", "output_attentions"]:
        return False
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, 3, lins["o"].out_features, generator=gen)
    bias = torch.randn(1, heads, 3, 3, generator=gen)
    mask = torch.tensor([0.0, 0.0, torch.finfo(torch.float32).min]).view(1, 1, 1, 3)
    return _same_output(mod, lambda: mod(h, mask, bias)[0], lambda: FusedAttention(mod).eval()(h, mask, bias)[0])


def fuse_epilogues(model: nn.Module) -> dict[str, int]:
    """Fold into the packed GEMMs what BERT-family layers do right after them:

    * the erf GELU after a feed-forward's first matrix (the pairs in ``_ACT_PAIRS``): the
      :class:`QuantLinear` applies it (``act="gelu"``), writing into a reused buffer, and the
      activation becomes Identity;
    * the residual add and LayerNorm of ``*Output`` modules (dense, dropout,
      ``LayerNorm(h + input)``): replaced by :class:`FusedOutput`, which passes the input to
      the GEMM as its residual and the LayerNorm to apply after it.
    * MPNet's attention blocks (``MPNetAttention``, whose attention has no fused form in
      transformers): replaced by :class:`FusedAttention` (one :func:`gobo.kernels.attention`
      call, the residual add and LayerNorm in the output GEMM), where it computes what they
      compute.
    * models whose attention goes through transformers' ``AttentionInterface`` with ``sdpa``
      (BERT, RoBERTa, ELECTRA, DistilBERT, ALBERT): switched to gobo's attention function
      (``config._attn_implementation == "gobo"``, the same kernel), where a random padded
      batch gives the same output.

    Anything else is left alone. Outputs match the unfused model's to float32 rounding (the
    GELU's erf is the same approximation PyTorch vectorises). Returns the counts fused.
    """
    counts = {"gelu": 0, "residual": 0, "attention": 0}
    for name, mod in list(model.named_modules()):
        for lin_name, act_name in _ACT_PAIRS:
            lin, act = getattr(mod, lin_name, None), getattr(mod, act_name, None)
            if isinstance(lin, QuantLinear) and lin.act is None and isinstance(act, nn.Module) and _is_exact_gelu(act):
                lin.act = "gelu"
                lin.reuse_output = True
                setattr(mod, act_name, nn.Identity())
                counts["gelu"] += 1
        if name and _is_residual_output(mod):
            fused = FusedOutput(mod.dense, mod.LayerNorm, mod.dropout)
            fused.train(mod.training)
            _set_submodule(model, name, fused)
            counts["residual"] += 1
        elif name and _is_mpnet_attention(mod):
            fused = FusedAttention(mod)
            fused.train(mod.training)
            _set_submodule(model, name, fused)
            counts["attention"] += 1
    counts["attention"] += _use_gobo_attention(model)
    if counts["attention"] and not getattr(model, "_gobo_forward_scope", False):
        # the score mask of all the layers is made once per forward pass of the whole model
        model.register_forward_pre_hook(_enter_forward)
        model.register_forward_hook(_leave_forward, always_call=True)
        model._gobo_forward_scope = True
    return counts


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``model`` (shared tensors counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _no_init():
    """transformers' context that skips random initialisation (absent in old releases)."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            mod = __import__(where, fromlist=["no_init_weights"])
            return mod.no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


@contextlib.contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory), buffers on
    the CPU as usual (their values, e.g. position ids, come from the constructors)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and not param.is_meta:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_packed_model(outdir: str | os.PathLike, cm, tile_rows: int | None = None, fuse: bool = True):
    """A transformers model from ``outdir``'s config with quantized weights kept packed.

    ``cm`` is the :class:`gobo.quantizer.CompressedModel` read from ``outdir``. Every tensor
    of the model must come from ``cm`` (dense ones as they are), else ValueError. The model is
    in eval mode with every parameter frozen (``requires_grad=False``). ``fuse`` folds GELUs
    and residual adds into the GEMMs (:func:`fuse_epilogues`).
    """
    from transformers import AutoModel

    from .hf import check_fit, model_config

    cfg = model_config(outdir)
    # no FP32 weight is ever allocated: parameters start on the meta device, quantized ones
    # are swapped for packed modules, the rest are assigned from the file
    with _no_init(), _parameters_on_meta():
        model = AutoModel.from_config(cfg)
    swapped = swap_modules(model, cm.quantized, tile_rows)
    not_found = sorted(set(cm.quantized) - set(swapped))
    if not_found:
        raise ValueError(f"the compressed weights do not fit the model config: no Linear/Embedding for {', '.join(not_found[:5])}")
    packed_keys = {f"{k[: -len('.weight')]}.{f}" for k in swapped for f in _FIELDS}
    dense = {k: torch.from_numpy(v.copy()) for k, v in cm.dense.items()}
    result = model.load_state_dict(dense, strict=False, assign=True)
    missing = sorted(set(result.missing_keys) - packed_keys)
    missing += [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta and n not in missing]
    check_fit(missing, result.unexpected_keys)
    # an inference model: packed weights cannot be trained, and frozen parameters keep plain
    # forward calls (outside torch.no_grad) on the fast kernels
    model.requires_grad_(False)
    if fuse:
        fuse_epilogues(model)
    return model.eval()

"""gobo.nn: packed modules, the module swap, and gobo.load(..., packed=True) on the real model.

Bound for the packed model: max |last_hidden_state difference| <= 1e-4 against the
dequantized model (same weights bit for bit; only GEMM tiling and the fused GELU's float32
rounding differ; observed 0 to ~2e-6 on 2 cores, with outputs of magnitude ~5).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gobo  # noqa: E402
from gobo import kernels  # noqa: E402
from gobo.nn import FusedAttention, FusedOutput, QuantEmbedding, QuantLinear, fuse_epilogues, resident_weight_bytes, swap_modules  # noqa: E402

from test_kernels import make_qt  # noqa: E402

pytestmark = pytest.mark.skipif(not kernels.fast_available(), reason="gobo's compiled routines are not built")


# ---------------------------------------------------------------------------- modules


def test_quant_linear_forward_matches_reference_and_repr():
    qt = make_qt(50, 24, 3, stats=np.float16, outlier_frac=0.02)
    m = QuantLinear.from_qtensor(qt, bias=torch.randn(50), tile_rows=16)
    x = torch.randn(2, 5, 24)
    ref = m.forward_reference(x)
    assert torch.allclose(m(x), ref, rtol=0, atol=1e-5 * ref.abs().max().item())
    QuantLinear.use_reference = True
    try:
        assert torch.equal(m(x), ref)
    finally:
        QuantLinear.use_reference = False
    # inputs that need gradients take the (differentiable) reference path
    xg = x.clone().requires_grad_(True)
    m(xg).sum().backward()
    assert torch.allclose(xg.grad, m.dequantize().sum(0).expand_as(x), atol=1e-5)
    names = {n for n, _ in m.named_buffers()}
    assert names == {"codes", "codebook", "row_scale", "row_offset", "outlier_index", "outlier_value"}
    assert m.codes.dtype == torch.uint8 and m.row_scale.dtype == torch.float16
    r = repr(m)
    assert "in_features=24" in r and "out_features=50" in r and "bits=3" in r and "tile_rows=16" in r


def test_quant_linear_survives_buffer_replacement():
    # the cached C view must follow buffers that load_state_dict or .to() replaced
    qt1, qt2 = make_qt(8, 16, 4, seed=1), make_qt(8, 16, 4, seed=2)
    m = QuantLinear.from_qtensor(qt1)
    x = torch.randn(3, 16)
    m(x)
    other = QuantLinear.from_qtensor(qt2)
    m.codes = other.codes.clone()
    m.codebook = other.codebook.clone()
    m.outlier_index, m.outlier_value = other.outlier_index.clone(), other.outlier_value.clone()
    assert torch.equal(m(x), other(x))


def test_quant_embedding_is_bit_exact():
    qt = make_qt(100, 24, 5, stats=np.float32, outlier_frac=0.03, group_rows=30)
    e = QuantEmbedding.from_qtensor(qt, padding_idx=0)
    ids = torch.tensor([[0, 99, 5, 5], [42, 1, 0, 77]])
    want = torch.from_numpy(qt.dequantize())[ids]
    assert torch.equal(e(ids), want)
    assert e(ids).shape == (2, 4, 24)
    with pytest.raises(IndexError):
        e(torch.tensor([100]))
    assert "100, 24, padding_idx=0" in repr(e)


def test_swap_modules_by_name_and_shared_weights():
    net2 = torch.nn.ModuleDict({"emb": torch.nn.Embedding(10, 6), "head": torch.nn.Linear(6, 10, bias=False)})
    net2["head"].weight = net2["emb"].weight
    quantized = {"emb.weight": make_qt(10, 6, 3)}
    swapped = swap_modules(net2, quantized)
    assert swapped == ["emb.weight", "head.weight"]
    assert isinstance(net2["emb"], QuantEmbedding) and isinstance(net2["head"], QuantLinear)
    assert net2["emb"].codes.data_ptr() == net2["head"].codes.data_ptr()  # packed once, shared
    with pytest.raises(ValueError, match="shape"):
        swap_modules(torch.nn.ModuleDict({"emb": torch.nn.Embedding(11, 6)}), quantized)


# ---------------------------------------------------------------------------- epilogue fusion

#: what fuse_epilogues finds in each tiny model of test_quantize (2 layers): BERT-style trees
#: have a GELU feed-forward and two *Output modules per layer; MPNet's attention output is
#: added inside MPNetAttention, which becomes a FusedAttention; the others' attention goes
#: through transformers' AttentionInterface and switches to gobo's; DistilBERT's FFN and
#: ALBERT's layer have the GELU but their residual adds are not in an *Output module; ALBERT's
#: layer (one attention module) is shared, and its default activation is the tanh
#: approximation ("gelu_new"), which is not fused.
FUSED = {
    "bert": {"gelu": 2, "residual": 4, "attention": 2},
    "roberta": {"gelu": 2, "residual": 4, "attention": 2},
    "electra": {"gelu": 2, "residual": 4, "attention": 2},
    "mpnet": {"gelu": 2, "residual": 2, "attention": 2},
    "distilbert": {"gelu": 2, "residual": 0, "attention": 2},
    "albert": {"gelu": 0, "residual": 0, "attention": 1},
}
NOTHING = {"gelu": 0, "residual": 0, "attention": 0}


@pytest.mark.parametrize("arch", sorted(FUSED))
def test_fuse_epilogues_on_every_architecture(arch):
    import copy

    from gobo import GoboConfig
    from gobo.hf import quantizable_names, state_numpy
    from gobo.quantizer import quantize_state

    from test_quantize import _tiny_model

    model = _tiny_model(arch)
    state = state_numpy(model)
    cm = quantize_state(state, quantizable_names(model), GoboConfig())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in cm.state_dict().items()})
    packed = copy.deepcopy(model)
    swap_modules(packed, cm.quantized)
    unfused = copy.deepcopy(packed)
    counts = fuse_epilogues(packed)
    assert counts == FUSED[arch]
    assert fuse_epilogues(packed) == NOTHING  # nothing is fused twice
    assert sum(isinstance(m, FusedOutput) for m in packed.modules()) == counts["residual"]
    assert sum(isinstance(m, FusedAttention) for m in packed.modules()) == (counts["attention"] if arch == "mpnet" else 0)
    assert packed.config._attn_implementation == ("eager" if arch == "mpnet" else "gobo")
    assert sum(isinstance(m, QuantLinear) and m.act == "gelu" for m in packed.modules()) == counts["gelu"] or arch == "albert"
    ids = torch.tensor([[1, 5, 17, 42, 99, 3], [2, 8, 64, 0, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.inference_mode():
        want = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = packed(input_ids=ids, attention_mask=mask).last_hidden_state
        plain = unfused(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-5
    assert (plain - want).abs().max().item() <= 1e-5
    if arch == "mpnet":
        # the layers' score mask (position bias + padding) is made once per forward pass
        import gobo.nn as gnn

        made = []
        real = gnn._make_score_mask
        gnn._make_score_mask = lambda *a: made.append(1) or real(*a)
        try:
            with torch.inference_mode():
                again = packed(input_ids=ids, attention_mask=mask).last_hidden_state
                packed(input_ids=ids, attention_mask=mask)
        finally:
            gnn._make_score_mask = real
        assert len(made) == 2 and torch.equal(again, got)  # once in each of the two passes
        # asked for the attention probabilities, it computes them the original way
        with torch.inference_mode():
            a = packed(input_ids=ids, attention_mask=mask, output_attentions=True)
            b = unfused(input_ids=ids, attention_mask=mask, output_attentions=True)
        assert len(a.attentions) == len(b.attentions) == 2
        assert all((x - y).abs().max().item() <= 1e-5 for x, y in zip(a.attentions, b.attentions))
        assert (a.last_hidden_state - want).abs().max().item() <= 1e-5
    # the state dict is unchanged by the fusion: same names, same tensors
    assert list(packed.state_dict()) == list(unfused.state_dict())
    # in training mode the fused outputs apply dropout again, as the originals do
    packed.train()
    torch.manual_seed(0)
    a = packed(input_ids=ids, attention_mask=mask).last_hidden_state
    unfused.train()
    torch.manual_seed(0)
    b = unfused(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.allclose(a, b, atol=1e-5)


def test_fuse_leaves_unknown_activations_and_shapes_alone():
    net = torch.nn.Module()
    net.dense = QuantLinear.from_qtensor(make_qt(8, 4, 3))
    net.intermediate_act_fn = torch.nn.GELU(approximate="tanh")  # not the erf form
    assert fuse_epilogues(net) == NOTHING
    net.intermediate_act_fn = torch.nn.ReLU()
    assert fuse_epilogues(net) == NOTHING
    net.intermediate_act_fn = torch.nn.GELU()
    assert fuse_epilogues(net) == {**NOTHING, "gelu": 1}
    assert isinstance(net.intermediate_act_fn, torch.nn.Identity) and net.dense.act == "gelu"
    assert "act=gelu" in repr(net.dense)

    # an *Output-shaped module that computes something else (here: no residual inside the
    # LayerNorm) is not replaced
    class PreNormOutput(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dense = QuantLinear.from_qtensor(make_qt(8, 4, 3))
            self.LayerNorm = torch.nn.LayerNorm(8)
            self.dropout = torch.nn.Dropout(0.1)

        def forward(self, hidden_states, input_tensor):
            return self.LayerNorm(self.dropout(self.dense(hidden_states))) + input_tensor

    holder = torch.nn.Sequential(PreNormOutput())
    assert fuse_epilogues(holder) == NOTHING
    assert isinstance(holder[0], PreNormOutput)

    # nor is an MPNetAttention-shaped block that computes something else (here: the position
    # bias is ignored)
    class SelfAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.num_attention_heads, self.attention_head_size, self.all_head_size = 2, 4, 8
            for n in "qkvo":
                setattr(self, n, QuantLinear.from_qtensor(make_qt(8, 8, 3, seed=ord(n))))
            self.dropout = torch.nn.Dropout(0.1)

    class NoBiasAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.LayerNorm, self.dropout = SelfAttention(), torch.nn.LayerNorm(8), torch.nn.Dropout(0.1)

        def forward(self, hidden_states, attention_mask=None, position_bias=None, output_attentions=False):
            a, (b, t, _) = self.attn, hidden_states.shape
            q, k, v = (getattr(a, n)(hidden_states).view(b, t, 2, 4).transpose(1, 2) for n in "qkv")
            c = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
            return (self.LayerNorm(a.o(c.transpose(1, 2).reshape(b, t, 8)) + hidden_states),)

    holder = torch.nn.Sequential(NoBiasAttention())
    assert fuse_epilogues(holder) == NOTHING
    assert isinstance(holder[0], NoBiasAttention)


# ---------------------------------------------------------------------------- real model


@pytest.fixture(scope="module")
def default_dir(tmp_path_factory):
    """``gobo.quantize('minilm-l6')`` (size-aware default: 2..6 bits, row stats), saved."""
    cm = gobo.quantize("minilm-l6")
    out = tmp_path_factory.mktemp("packed") / "minilm-default"
    gobo.save(cm, out)
    return out, cm


@pytest.fixture(scope="module")
def sentences():
    from gobo.data import load_rotten_tomatoes

    _, test = load_rotten_tomatoes()
    return list(test.stride(5).texts)


def test_packed_model_matches_dequantized(default_dir, sentences):
    from transformers import AutoTokenizer

    outdir, cm = default_dir
    dense = gobo.load(outdir)
    packed = gobo.load(outdir, packed=True)
    tok = AutoTokenizer.from_pretrained(str(outdir))
    batch = tok(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        want = dense(**batch).last_hidden_state
        got = packed(**batch).last_hidden_state
        one = packed(**{k: v[:1] for k, v in batch.items()}).last_hidden_state
    diff = (got - want).abs().max().item()
    assert diff <= 1e-4, diff
    assert (one - want[:1]).abs().max().item() <= 1e-4
    # the feed-forward GELUs and the residual adds of the six layers run in the GEMMs
    n_layers = dense.config.num_hidden_layers
    assert sum(isinstance(m, QuantLinear) and m.act == "gelu" for m in packed.modules()) == n_layers
    assert sum(isinstance(m, FusedOutput) for m in packed.modules()) == 2 * n_layers
    unfused = gobo.load(outdir, packed=True, fuse=False)
    assert not any(isinstance(m, FusedOutput) for m in unfused.modules())
    with torch.inference_mode():
        assert (unfused(**batch).last_hidden_state - want).abs().max().item() <= 1e-4

    # every quantized weight is swapped, and no tensor of its full FP32 shape stays resident
    mods = dict(packed.named_modules())
    for name, qt in cm.quantized.items():
        mod = mods[name[: -len(".weight")]]
        assert isinstance(mod, (QuantLinear, QuantEmbedding)), name
    fp32_shapes = {tuple(qt.shape) for qt in cm.quantized.values()}
    for name, t in list(packed.named_parameters()) + list(packed.named_buffers()):
        if t.dtype == torch.float32:
            assert tuple(t.shape) not in fp32_shapes, name
    assert not any(p.requires_grad for p in packed.parameters())  # frozen: fast path outside no_grad
    packed_bytes = resident_weight_bytes(packed)
    dense_bytes = resident_weight_bytes(dense)
    print(f"\nresident weight bytes: packed {packed_bytes:,} vs dequantized {dense_bytes:,} ({dense_bytes / packed_bytes:.1f}x)")
    assert packed_bytes < dense_bytes / 6

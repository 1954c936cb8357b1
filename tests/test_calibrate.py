"""Data-free sensitivity: synthetic sentences from the tokenizer, output error per tensor."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gobo.calibrate import OutputSensitivity, synthetic_batch
from gobo.config import GoboConfig
from gobo.quantizer import quantize_state, select


def test_synthetic_batch_is_deterministic_framed_and_frequent_word_heavy(tokenizer):
    ids, mask = synthetic_batch(tokenizer, n_seqs=16, max_len=32, seed=3)
    ids2, mask2 = synthetic_batch(tokenizer, n_seqs=16, max_len=32, seed=3)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    assert not torch.equal(ids, synthetic_batch(tokenizer, n_seqs=16, max_len=32, seed=4)[0])
    lengths = mask.sum(1)
    assert ((lengths >= 8) & (lengths <= 32)).all()
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert all(ids[i, n - 1] == tokenizer.sep_token_id for i, n in enumerate(lengths.tolist()))
    inner = [int(t) for i, n in enumerate(lengths.tolist()) for t in ids[i, 1 : n - 1]]
    words = tokenizer.convert_ids_to_tokens(inner)
    # a Zipf law over the frequency-ordered vocabulary: the 1000 commonest words take about
    # ln(500)/ln(V/2) ~ 64% of the draws (uniform ids would give 3%)
    the = tokenizer.convert_tokens_to_ids("the")
    assert np.mean(np.asarray(inner) < the + 1000) >= 0.5
    assert not set(words) & set(tokenizer.all_special_tokens)


def test_output_sensitivity_is_zero_for_the_original_and_restores_the_model(minilm_fp32, minilm_state, tokenizer):
    sens = OutputSensitivity(minilm_fp32, tokenizer, n_seqs=4, max_len=16)
    name = "encoder.layer.0.attention.self.value.weight"
    before = minilm_fp32.get_parameter(name).detach().clone()
    assert sens(name, minilm_state[name]) == 0.0
    noisy = minilm_state[name] + np.float32(0.01) * np.random.default_rng(0).standard_normal(minilm_state[name].shape).astype(np.float32)
    err = sens(name, noisy)
    assert 0.0 < err < 1.0
    assert torch.equal(minilm_fp32.get_parameter(name), before)  # put back exactly
    # the pooler does not feed the last hidden state
    assert sens("pooler.dense.weight", np.zeros_like(minilm_state["pooler.dense.weight"])) == 0.0


def test_sensitivity_allocation_needs_a_measure():
    state = {"dense.weight": np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32)}
    with pytest.raises(ValueError, match="sensitivity"):
        quantize_state(state, ["dense.weight"], GoboConfig(allocate="sensitivity"))


def test_sensitivity_allocation_follows_the_measured_gain(minilm_state):
    """Two tensors with the same statistics: the one said to matter more gets more bits,
    and the budget holds."""
    names = select(minilm_state, ["encoder.layer.0.attention.self.*weight"])
    gains = {n: (100.0 if "value" in n else 0.01) for n in names}
    cm = quantize_state(minilm_state, names, GoboConfig(allocate="sensitivity"), sensitivity=lambda n, w: gains[n] * 1e-3)
    bits = {n: cm.quantized[n].bits for n in names}
    value = next(n for n in names if "value" in n)
    assert bits[value] == max(bits.values()) and bits[value] > min(bits.values())
    numel = sum(q.numel for q in cm.quantized.values())
    assert 8 * sum(q.nbytes() for q in cm.quantized.values()) / numel <= 3.0 + 1e-9

"""Data-free sensitivity: synthetic sentences from the tokenizer, output error per tensor."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from gobo.calibrate import JacobianSensitivity, OutputSensitivity, match_output_means, synthetic_batch
from gobo.config import GoboConfig, config_from_json, config_to_json
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


def test_synthetic_batch_with_punctuation_is_deterministic_and_punctuated(tokenizer):
    ids, mask = synthetic_batch(tokenizer, n_seqs=64, max_len=48, seed=0, punctuation=True)
    ids2, mask2 = synthetic_batch(tokenizer, n_seqs=64, max_len=48, seed=0, punctuation=True)
    assert torch.equal(ids, ids2) and torch.equal(mask, mask2)
    lengths = mask.sum(1).tolist()
    assert all(mask[i, :n].all() and not mask[i, n:].any() for i, n in enumerate(lengths))
    assert max(lengths) <= 128 and max(lengths) > 48  # punctuation comes on top of up to 46 words
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    ends = tokenizer.convert_ids_to_tokens([int(ids[i, n - 2]) for i, n in enumerate(lengths)])
    assert all(ids[i, n - 1] == tokenizer.sep_token_id for i, n in enumerate(lengths))
    assert set(ends) <= {".", "!", "?"} and ends.count(".") > len(ends) // 2
    inner = tokenizer.convert_ids_to_tokens([int(t) for i, n in enumerate(lengths) for t in ids[i, 1 : n - 1]])
    # about one comma per 20 words: far more than the Zipf draw alone would give
    assert 0.02 < inner.count(",") / len(inner) < 0.08
    assert not set(inner) & set(tokenizer.all_special_tokens)
    # the words are the same Zipf draw: without punctuation the first call is unchanged
    assert torch.equal(synthetic_batch(tokenizer, 16, 32, seed=3)[0], synthetic_batch(tokenizer, 16, 32, seed=3, punctuation=False)[0])


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


def test_output_sensitivity_reuses_the_layers_before_the_tensor_exactly(minilm_fp32, minilm_state, tokenizer):
    """The layers before a tensor's own give back their reference outputs instead of running:
    the errors are the very ones of full passes, and the model is left as it was."""
    sens = OutputSensitivity(minilm_fp32, tokenizer, n_seqs=4, max_len=16, punctuation=True)
    assert [p for p, _ in sens.layers] == [f"encoder.layer.{i}." for i in range(6)] and len(sens.outputs) == 6
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.3.intermediate.dense.weight", "encoder.layer.5.output.dense.weight"]
    rng = np.random.default_rng(1)
    noisy = {n: minilm_state[n] + np.float32(0.01) * rng.standard_normal(minilm_state[n].shape).astype(np.float32) for n in names}
    fast = {n: sens(n, noisy[n]) for n in names}
    assert [sens._first_layer(n) for n in names] == [0, 0, 3, 5]
    layers, sens.layers = sens.layers, []  # every layer runs
    slow = {n: sens(n, noisy[n]) for n in names}
    assert fast == slow and all(v > 0 for v in fast.values())
    assert all("forward" not in vars(layer) for _, layer in layers)  # the layers' own forward is back
    sens.layers = layers
    assert sens(names[2], minilm_state[names[2]]) == 0.0


def test_jacobian_sensitivity_matches_the_measured_error_of_small_changes(minilm_fp32, minilm_state, tokenizer):
    """The first-order estimate from one forward and a few backward passes agrees with the
    error measured by running the model, for changes small enough to be linear; it leaves
    the model as it was (values and requires_grad)."""
    before = {k: v.detach().clone() for k, v in minilm_fp32.state_dict().items()}
    grads = {n: p.requires_grad for n, p in minilm_fp32.named_parameters()}
    jac = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=8, punctuation=True, probes=8)
    assert all(torch.equal(v, before[k]) for k, v in minilm_fp32.state_dict().items())
    assert {n: p.requires_grad for n, p in minilm_fp32.named_parameters()} == grads
    run = OutputSensitivity(minilm_fp32, tokenizer, n_seqs=8, punctuation=True)
    rng = np.random.default_rng(2)
    names = ["embeddings.word_embeddings.weight", "encoder.layer.0.attention.self.query.weight",
             "encoder.layer.2.attention.self.value.weight", "encoder.layer.4.intermediate.dense.weight",
             "encoder.layer.5.output.dense.weight"]
    ratios = []
    for n in names:
        w = minilm_state[n]
        noisy = w + np.float32(0.02) * w.std() * rng.standard_normal(w.shape).astype(np.float32)
        ratios.append(jac(n, noisy) / run(n, noisy))
    assert all(0.75 < r < 1.33 for r in ratios), ratios
    assert jac(names[1], minilm_state[names[1]]) == 0.0
    assert jac("pooler.dense.weight", np.zeros_like(minilm_state["pooler.dense.weight"])) == 0.0
    again = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=8, punctuation=True, probes=8)
    assert jac(names[2], minilm_state[names[2]] * 1.01) == again(names[2], minilm_state[names[2]] * 1.01)


def test_output_moments_give_the_error_of_changes_at_a_tables_output(minilm_fp32, tokenizer):
    """``output_moments``: changes ``d_t`` made independently at the word table's output, one
    per real token, move the last hidden state by ``sum_t d_t^T G d_t`` (to first order); the
    direction LayerNorm removes (all features alike) costs nothing. Measured by running the
    model with the changes added, signs drawn per token, on the sentences of the estimate."""
    word = "embeddings.word_embeddings.weight"
    jac = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=8, punctuation=True, probes=16,
                              names=[word, "embeddings.position_embeddings.weight"])
    assert set(jac.output_moments) == {word}  # the positions' output is one vector per position, not per token
    g = jac.output_moments[word].double()
    assert torch.equal(g, g.T) and float(torch.linalg.eigvalsh(g)[0]) > -1e-6 * float(g.diagonal().mean())
    flat = torch.full((g.shape[0],), g.shape[0] ** -0.5, dtype=torch.float64)
    assert float(flat @ g @ flat) < 1e-4 * float(g.diagonal().mean())  # measured 3e-8 of it
    ids, mask = synthetic_batch(tokenizer, 8, 32, 0, punctuation=True)
    real = mask.bool()
    table = minilm_fp32.embeddings.word_embeddings
    with torch.no_grad():
        base = minilm_fp32(input_ids=ids, attention_mask=mask).last_hidden_state[real].double()
    gen = torch.Generator().manual_seed(0)
    ratios = []
    for _ in range(3):
        u = torch.nn.functional.normalize(torch.randn(g.shape[0], generator=gen, dtype=torch.float64), dim=0)
        measured = 0.0
        for _ in range(4):
            sign = (torch.randint(0, 2, real.shape, generator=gen) * 2 - 1).to(torch.float32) * real
            change = 0.01 * sign[..., None] * u.to(torch.float32)
            hook = table.register_forward_hook(lambda mod, inp, out: out + change)
            try:
                with torch.no_grad():
                    h = minilm_fp32(input_ids=ids, attention_mask=mask).last_hidden_state[real].double()
            finally:
                hook.remove()
            measured += float(((h - base) ** 2).sum()) / 4
        ratios.append(measured / (0.01**2 * int(real.sum()) * float(u @ g @ u)))
    assert all(0.8 < r < 1.25 for r in ratios), ratios  # measured 0.94 to 0.98


def test_grid_steps_from_first_order_gains_summed_in_parts_are_those_of_the_whole_tensors(minilm_fp32, minilm_state,
                                                                                          tokenizer):
    """grid.step_factors sums a JacobianSensitivity's weighted errors a few rows at a time
    (its columns_of); the steps are those of calling it on each whole rounded tensor."""
    from gobo.methods import grid

    jac = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=4, punctuation=True, probes=1)
    names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
             "encoder.layer.0.attention.self.query.weight", "encoder.layer.3.output.dense.weight", "pooler.dense.weight"]
    parts = grid.step_factors(minilm_state, names, jac)
    whole = grid.step_factors(minilm_state, names, lambda n, w: jac(n, w))
    assert parts == whole
    assert len(set(parts.values())) == len(names)  # the gains differ, so the comparison says something
    only = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=4, punctuation=True, probes=1, names=names[:3])
    assert set(only.column) == set(names[:3])  # the tensors left out get no gradient
    for n in names[:3]:
        np.testing.assert_array_equal(only.columns_of(n), jac.columns_of(n))


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


def _linear_output_means(model, ids, mask, over):
    means, hooks = {}, []
    m = over.unsqueeze(-1).double()
    for n, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(mod, inp, out, n=n):
                if out.dim() == 3:
                    means[n] = (out.double() * m).sum((0, 1)) / m.sum()
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    return means


def test_matched_biases_give_every_linear_its_fp32_mean_output(minilm_fp32, minilm_state, tokenizer):
    names = select(minilm_state, ["encoder.layer.*.weight", "embeddings.word_embeddings.weight"], ["*LayerNorm*"])
    cm = quantize_state(minilm_state, names, GoboConfig(bits=2, allocate="uniform"))
    deq = {n: q.dequantize() for n, q in cm.quantized.items()}
    before = {k: v.detach().clone() for k, v in minilm_fp32.state_dict().items()}
    new = match_output_means(minilm_fp32, tokenizer, deq, cm.dense, n_seqs=16, max_len=24, seed=1)
    assert all(torch.equal(v, before[k]) for k, v in minilm_fp32.state_dict().items())  # model put back
    assert len(new) == 6 * 6  # q, k, v, attention output, intermediate, output in 6 layers; not the pooler
    assert all(np.isfinite(b).all() and b.dtype == np.float32 for b in new.values())
    again = match_output_means(minilm_fp32, tokenizer, deq, cm.dense, n_seqs=16, max_len=24, seed=1)
    assert all(np.array_equal(new[k], again[k]) for k in new)  # deterministic
    ids, mask = synthetic_batch(tokenizer, 16, 24, seed=1)
    words = mask.clone()  # the matched means are over word tokens: not the start and end tokens
    words[:, 0] = 0
    words[torch.arange(16), mask.sum(1) - 1] = 0
    ref = _linear_output_means(minilm_fp32, ids, mask, words)
    quant = copy.deepcopy(minilm_fp32)
    quant.load_state_dict({**before, **{k: torch.from_numpy(v) for k, v in {**deq, **new}.items()}}, strict=True)
    got = _linear_output_means(quant, ids, mask, words)
    plain = copy.deepcopy(minilm_fp32)
    plain.load_state_dict({**before, **{k: torch.from_numpy(v) for k, v in deq.items()}}, strict=True)
    raw = _linear_output_means(plain, ids, mask, words)
    for n in (k[: -len(".bias")] for k in new):
        scale = ref[n].abs().max().item() + 1e-3
        assert (got[n] - ref[n]).abs().max().item() <= 1e-4 * scale, n  # float32 rounding only
    # 2-bit weights shift the mean outputs visibly before the correction
    assert max((raw[n] - ref[n]).abs().max().item() for n in got) > 1e-2


def test_correct_bias_is_recorded_only_when_set_and_old_files_read_as_off():
    assert "correct_bias" not in config_to_json(GoboConfig())["data"]
    doc = config_to_json(GoboConfig(correct_bias=True))
    assert doc["data"]["correct_bias"] is True and config_from_json(doc) == GoboConfig(correct_bias=True)
    assert GoboConfig.paper(3).correct_bias is False
    with pytest.raises(ValueError, match="correct_bias"):
        GoboConfig(correct_bias="yes")


def test_expected_gains_agree_with_those_of_a_rounding(minilm_fp32, minilm_state, tokenizer):
    """``expected_gains``: each tensor's gain under the error rounding is expected to make
    (``var_r`` times its row's ``|J|^2``) against the gain the rounding at relative step 0.5
    measures: the same order of the tensors and, for most, the same step to a few percent.
    Where the output gain sits in input columns whose weights are small next to their row's
    spread (the value matrices of all-MiniLM-L6-v2's middle layers), the rounding sends them
    to zero, an error below the expected one, and the two part (by up to 0.46 in log)."""
    from gobo.hf import quantizable_names
    from gobo.methods import grid

    names = quantizable_names(minilm_fp32)
    jac = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=16, punctuation=True, probes=1, names=names)
    rounded = grid.step_factors(minilm_state, names, jac)
    expected = grid.step_factors(minilm_state, names, jac, expected=True)
    logs = np.array([math.log(expected[n] / rounded[n]) for n in names])
    ranks = [np.argsort(np.argsort([f[n] for n in names])) for f in (rounded, expected)]
    assert np.median(np.abs(logs)) < 0.06  # measured 0.037
    assert np.corrcoef(*ranks)[0, 1] > 0.97  # measured 0.993
    assert np.abs(logs).max() < 0.6  # measured 0.46 (layer 3's value matrix)
    with pytest.raises(ValueError, match="first-order"):
        grid.step_factors(minilm_state, names[:1], lambda n, w: jac(n, w), expected=True)


def test_row_gains_without_weight_gradients_equal_the_gradients_row_sums(minilm_fp32, minilm_state, tokenizer):
    """``rows=True`` sums each Linear row's ``|J_i|^2`` as ``G_r^T (X X^T) G_r`` over the
    real tokens instead of squaring the weight gradient: the same sums to float32 rounding
    (tables and the pooler, whose gradients it still forms, as well), in one pass or in
    batches, the same expected step factors, and no per-weight gains to ask for. With one
    direction for all sentences (``batch`` 0) its passes take 8 sentences at a time
    (:data:`gobo.calibrate.JOINT_CHUNK`) and the sums are those of the one pass all the same."""
    from gobo.hf import quantizable_names
    from gobo.methods import grid

    names = quantizable_names(minilm_fp32)
    for batch in (0, 8):
        cols = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=16, punctuation=True, probes=2, names=names, batch=batch)
        rows = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=16, punctuation=True, probes=2, names=names, batch=batch,
                                   rows=True)
        # the same hidden states, from passes over fewer positions with batch 0
        assert rows.energy == (pytest.approx(cols.energy, rel=1e-6) if batch == 0 else cols.energy) and not rows.column
        for n in names:
            want, got = cols.rows_of(n), rows.rows_of(n)
            assert got.shape == (minilm_state[n].shape[0],) and got.dtype == np.float64
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * float(want.max()))
        assert not rows.rows_of("pooler.dense.weight").any()  # its output does not reach the hidden state
        assert grid.step_factors(minilm_state, names, rows, expected=True) == \
            grid.step_factors(minilm_state, names, cols, expected=True)
    with pytest.raises(ValueError, match="row's sum"):
        rows.columns_of(names[0])
    with pytest.raises(ValueError, match="rows' sums alone"):
        grid.step_factors(minilm_state, names[:1], rows)


def test_the_gains_passes_give_the_feedback_moments_of_their_sentences(minilm_fp32, tokenizer):
    """``shared_pass``: the gains' forward passes (8 sentences at a time, shortest first)
    feed a :class:`MomentsRecorder`; with the moments of 16 more sentences added, they are
    the moments of all 32 taken in one :func:`input_moments` (to float32 rounding), grouped
    inputs included; the gains are those of one pass to the Hutchinson noise."""
    from gobo import feedback

    ids, mask = synthetic_batch(tokenizer, 16, 32, 0, punctuation=True)
    more_ids, more_mask = feedback.calibration_batch(tokenizer, None, 16, seed=3, punctuation=True)
    from gobo.hf import quantizable_names

    weights = feedback.linear_weights(minilm_fp32, quantizable_names(minilm_fp32))
    rec = feedback.MomentsRecorder(minilm_fp32, weights, group=768)
    jac = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=16, punctuation=True, probes=1, batch=8, moments=rec)
    shared: dict = {}
    got = feedback.input_moments(minilm_fp32, more_ids, more_mask, weights, shared=shared, group=768, recorder=rec)
    assert not rec.hooks  # closed
    width = max(ids.shape[1], more_ids.shape[1])
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]), value=0)  # noqa: E731
    whole_shared: dict = {}
    want = feedback.input_moments(minilm_fp32, torch.cat([pad(ids), pad(more_ids)]), torch.cat([pad(mask), pad(more_mask)]),
                                  weights, shared=whole_shared, group=768)
    assert shared == whole_shared and set(got) == set(want)
    assert len(want) == len(weights) - 1  # all but the pooler, whose input has no tokens
    for n in want:
        a, b = got[n], want[n]
        if isinstance(b, feedback.GroupedMoments):  # the 1536-wide feed-forward outputs, in groups of 768
            assert [g.tolist() for g in a.index] == [g.tolist() for g in b.index]
            a, b = torch.block_diag(*a.blocks), torch.block_diag(*b.blocks)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.diagonal().mean()))
    one = JacobianSensitivity(minilm_fp32, tokenizer, n_seqs=16, punctuation=True, probes=1)
    assert jac.energy == pytest.approx(one.energy, rel=1e-5)  # the same tokens' hidden states


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "albert", "electra", "mpnet"])
def test_joint_row_gains_are_the_one_pass_gradients_on_every_architecture(arch, monkeypatch):
    """The row gains of one direction taken 8 sentences at a time (``rows=True``, ``batch``
    0) equal each row's squared weight gradient of one pass over all 16, to float32 rounding,
    on every architecture's module tree: ALBERT's Linears used by every layer (their
    gradients summed over the passes before they are squared), DistilBERT without token
    types, ELECTRA's embedding projection. Tiny random models (a vocabulary of 100: the
    sentences are drawn from it, lengths 4 to 19)."""
    from test_quantize import _tiny_model

    from gobo import calibrate
    from gobo.hf import quantizable_names

    def sentences(tokenizer, n_seqs=8, max_len=32, seed=0, punctuation=False):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(4, 20, (n_seqs,), generator=g)
        ids = torch.zeros((n_seqs, int(lengths.max())), dtype=torch.int64)
        for i, n in enumerate(lengths.tolist()):
            ids[i, :n] = torch.randint(3, 100, (n,), generator=g)
        return ids, (ids != 0).long()

    monkeypatch.setattr(calibrate, "synthetic_batch", sentences)
    model = _tiny_model(arch)
    names = quantizable_names(model)
    for probes in (1, 2):
        one = JacobianSensitivity(model, None, n_seqs=16, probes=probes, names=names)
        joint = JacobianSensitivity(model, None, n_seqs=16, probes=probes, names=names, rows=True)
        assert joint.energy == pytest.approx(one.energy, rel=1e-7)
        for n in names:
            want = one.rows_of(n)
            np.testing.assert_allclose(joint.rows_of(n), want, rtol=0, atol=2e-6 * float(np.abs(want).max()) + 1e-30)

"""Per-row codebooks and error feedback (``codebook="row"``, ``feedback=...``), on real MiniLM
weights and real critic snippets."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import gobo
from gobo import feedback, native
from gobo.config import GoboConfig, config_from_json, config_to_json
from gobo.io import WEIGHTS_FILE
from gobo.quantizer import quantize_state
from gobo.methods.gobo import (Prepared, _kth_largest, _sorted_inliers, act_outlier_mask, act_scores, act_scores_reference, assign,
                               assign_rows, cluster_rows, cluster_rows_reference, cluster_sorted, drop_sorted, gaussian_outlier_mask)
from gobo.quantizer import TensorStats

LAYER = "encoder.layer.1.intermediate.dense.weight"


@pytest.fixture(scope="module")
def snippets() -> list[str]:
    """96 critic snippets spread over the test split."""
    from gobo.data import load_rotten_tomatoes

    return list(load_rotten_tomatoes()[1].stride(96).texts)
SLICE = dict(include=("encoder.layer.1.*",), exclude=("*bias", "*LayerNorm*"))


def test_cluster_rows_is_lloyd_on_every_row(minilm_state):
    w = minilm_state[LAYER][:64]
    mask = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    mask[0, :] = True  # a row of outliers only: its codebook is all zeros
    mask[1, 3:] = True  # fewer inliers than centroids
    c = cluster_rows(w, mask, 8)
    codes = assign_rows(w, c)
    for r in range(2, w.shape[0]):
        ref = cluster_sorted(np.sort(w[r][~mask[r]]).astype(np.float64), 8, "lloyd")
        np.testing.assert_allclose(c[r], ref, rtol=0, atol=1e-12)
        assert (codes[r] == assign(w[r], c[r])).all()
    assert (c[0] == 0).all() and np.all(np.diff(c, axis=1) >= 0)
    assert set(c[1]) == set(w[1, :3].astype(np.float64))


@pytest.mark.parametrize("shape,k", [((37, 384), 8), ((5, 1536), 4), ((9, 7), 8), ((3, 300), 2), ((4, 700), 256), ((1, 1), 1)])
def test_compiled_row_clustering_gives_the_reference_bits(minilm_state, shape, k):
    w = minilm_state[LAYER][: shape[0], : shape[1]].copy()
    mask = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    if shape[0] > 2:
        w[1] = w[1, 0]  # a constant row: every centroid the same value
        mask[2, :] = True  # no inliers at all
    c = cluster_rows(w, mask, k)
    assert np.array_equal(c, cluster_rows_reference(w, mask, k))  # the same bits, not just close
    codes = assign_rows(w, c)
    mids = (c[:, 1:] + c[:, :-1]) * 0.5
    ref = np.stack([np.searchsorted(mids[r], w[r].astype(np.float64), side="left") for r in range(w.shape[0])])
    assert np.array_equal(codes, ref)


def test_row_codebooks_cut_the_error_and_cost_their_bytes(minilm_state):
    w = minilm_state[LAYER]
    per_tensor = Prepared(w, GoboConfig(allocate="uniform")).build(3)
    per_row = Prepared(w, GoboConfig(allocate="uniform", codebook="row")).build(3)
    err = [float(np.sum((q.dequantize() - w) ** 2)) for q in (per_tensor, per_row)]
    assert err[1] < 0.9 * err[0]
    assert per_row.codebook.shape == (w.shape[0], 8) and per_row.group_rows == 1
    assert per_row.nbytes() - per_tensor.nbytes() == (w.shape[0] - 1) * 8 * 4


def _moments(minilm_fp32, tokenizer, texts, name):
    ids, mask = feedback.calibration_batch(tokenizer, texts, len(texts))
    return feedback.input_moments(minilm_fp32, ids, mask, [name])[name].double()


@pytest.mark.parametrize("codebook", ["tensor", "row"])
def test_feedback_lowers_the_output_error_and_keeps_the_layout(minilm_state, minilm_fp32, tokenizer, snippets, codebook):
    w = minilm_state[LAYER]
    qt = Prepared(w, GoboConfig(allocate="uniform", codebook=codebook)).build(3)
    h = _moments(minilm_fp32, tokenizer, snippets[:32], LAYER)
    fb = feedback.requantize(qt, w, h)
    assert np.array_equal(fb.codebook, qt.codebook) and np.array_equal(fb.outlier_index, qt.outlier_index)
    assert fb.nbytes() == qt.nbytes() and not np.array_equal(fb.codes, qt.codes)

    def output_error(q):  # E |(W - Q) x|^2 under the moments of held-out sentences
        d = torch.from_numpy((q.dequantize() - w).astype(np.float64))
        return float(torch.einsum("rc,cd,rd->", d, h_test, d))

    h_test = _moments(minilm_fp32, tokenizer, snippets[32:64], LAYER)
    assert output_error(fb) < 0.8 * output_error(qt)


def _reference_requantize(qt, w, h, damp):
    """:func:`feedback.requantize` without the compiled routine: torch, column by column."""
    from gobo import native

    saved = native.available
    native.available = lambda: False
    try:
        return feedback.requantize(qt, w, h, damp=damp)
    finally:
        native.available = saved


@pytest.mark.parametrize("rows,cols,codebook", [(96, 384, "row"), (37, 1536, "row"), (64, 384, "tensor")])
def test_compiled_feedback_gives_the_reference_codes(minilm_state, minilm_fp32, tokenizer, snippets, rows, cols, codebook):
    name = LAYER if cols == 384 else "encoder.layer.1.output.dense.weight"
    w = minilm_state[name][:rows].copy()
    w[:, 5] = 0.0
    h = _moments(minilm_fp32, tokenizer, snippets[:16], name).clone()
    h[7, :] = h[:, 7] = 0.0  # an input feature that never fires: its column is zeroed
    cfg = GoboConfig(allocate="uniform", codebook=codebook, act_outliers=0.01)
    qt = Prepared(w, cfg, np.diag(h.numpy()).copy()).build(3)
    for damp in (0.01, 1.0):
        fast = feedback.requantize(qt, w, h, damp=damp)
        ref = _reference_requantize(qt, w, h, damp)
        assert np.array_equal(fast.codes, ref.codes)  # the same codes, not just close ones
        np.testing.assert_allclose(fast.outlier_value, ref.outlier_value, rtol=0, atol=1e-6)
    # the codes do not depend on how the rows are shared among threads
    cb = np.repeat(np.asarray(qt.codebook, np.float64), qt.group_rows, axis=0)[:rows]
    mask = np.zeros(w.size, bool)
    mask[qt.outlier_index] = True
    runs = [feedback.feedback_rows(w, h, cb, mask.reshape(w.shape), 0.1, threads=t) for t in (1, 3)]
    assert np.array_equal(runs[0][0], runs[1][0]) and np.array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("kind", ["grid", "uneven"])
def test_compiled_feedback_with_wide_codebooks_gives_the_reference_codes(minilm_state, minilm_fp32, tokenizer, snippets, kind):
    """Codebooks of more than 16 centroids: the compiled routine guesses each code from the
    spacing of the ends (exact on a grid) and checks it; uneven ones fall back to bisection.
    Either way, the codes of the torch reference."""
    from gobo.methods import grid
    from gobo.qtensor import QuantizedTensor

    w = minilm_state[LAYER][:48].copy()
    h = _moments(minilm_fp32, tokenizer, snippets[:16], LAYER)
    if kind == "grid":  # error feedback's grids: 256 levels a row, some weights beyond them
        steps = grid.row_steps(w, 0.05)
        qt = grid.coding_form(w, steps, None, w.shape)
        assert qt.outlier_index.size > 0
    else:  # 32 centroids a row, unevenly spaced, no outliers
        rng = np.random.default_rng(0)
        cb = np.sort(rng.standard_normal((w.shape[0], 32)), axis=1).astype(np.float32) * w.std()
        qt = QuantizedTensor.from_codes(np.zeros(w.size, np.uint8), shape=w.shape, bits=5, codebook=cb, group_rows=1,
                                        outlier_index=np.zeros(0, np.int64), outlier_value=np.zeros(0, np.float32),
                                        method="gobo")
    for damp in (0.01, 1.0):
        fast = feedback.requantize(qt, w, h, damp=damp)
        ref = _reference_requantize(qt, w, h, damp)
        assert np.array_equal(fast.codes, ref.codes)
        np.testing.assert_allclose(fast.outlier_value, ref.outlier_value, rtol=0, atol=1e-6)
    assert len(np.unique(fast.unpacked_codes())) > 16  # the wide codebook is used, not its first centroids


def test_apply_feeds_linears_back_side_by_side_with_the_codes_of_one_at_a_time(minilm_fp32, minilm_state, tokenizer, snippets):
    """apply() feeds the Linears back two at a time with one-threaded products: the codes are
    those of each Linear fed back on its own, whatever torch's thread count, which it puts back."""
    names = [n for n in feedback.linear_weights(minilm_fp32, list(minilm_state)) if n.startswith("encoder.layer.1.") and n.endswith(".weight")]
    ids, mask = feedback.calibration_batch(tokenizer, snippets[:16], 16)
    shared: dict = {}
    h = feedback.input_moments(minilm_fp32, ids, mask, names, shared=shared)
    cfg = GoboConfig(allocate="uniform", codebook="row")
    quantized = {n: Prepared(minilm_state[n], cfg).build(3) for n in names}
    before = torch.get_num_threads()
    runs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            runs.append(feedback.apply(minilm_fp32, None, quantized, minilm_state, None, 0, damp=0.1, moments=(h, shared)))
            assert torch.get_num_threads() == t
    finally:
        torch.set_num_threads(before)
    assert list(runs[0]) == names and list(runs[1]) == names
    q = feedback.requantize_group([quantized[n] for n in names[:3]], [minilm_state[n] for n in names[:3]], h[names[0]], damp=0.1)
    for n, one in zip(names[:3], q):  # query, key and value, fed back together
        assert np.array_equal(runs[0][n].codes, one.codes) and np.array_equal(runs[1][n].codes, one.codes)
    for n in names[3:]:
        assert np.array_equal(runs[0][n].codes, runs[1][n].codes)


def test_moments_factor_is_the_ldl_factor_of_the_damped_moments(minilm_fp32, tokenizer, snippets):
    h = _moments(minilm_fp32, tokenizer, snippets[:8], LAYER).clone()
    h[3, :] = h[:, 3] = 0.0  # an input no token reaches
    t, perm, dead = feedback.moments_factor(h, 0.1)
    assert dead.tolist() == [i == 3 for i in range(h.shape[0])]
    assert torch.equal(t, torch.triu(t)) and torch.equal(torch.diag(t), torch.ones(h.shape[0], dtype=torch.float64))
    hd = h.clone()
    hd[3, 3] = 1.0
    hp = hd[perm][:, perm] + 0.1 * torch.mean(torch.diag(hd)) * torch.eye(h.shape[0], dtype=torch.float64)
    # H = T D T^T: T^-1 H T^-T is diagonal (and positive), to float32's rounding
    ti = torch.linalg.solve_triangular(t, torch.eye(h.shape[0], dtype=torch.float64), upper=True)
    d = ti @ hp @ ti.T
    torch.testing.assert_close(d, torch.diag(torch.diag(d)), rtol=0, atol=1e-5 * float(hp.diag().max()))
    assert (torch.diag(d) > 0).all()
    assert torch.equal(torch.diag(hd)[perm], torch.sort(torch.diag(hd), descending=True, stable=True).values)


def test_moments_factor_falls_back_to_float64_then_says_what_to_do():
    h = torch.tensor([[1.0, 1.0 - 1e-10], [1.0 - 1e-10, 1.0]], dtype=torch.float64)  # singular in float32 only
    t, perm, dead = feedback.moments_factor(h, 0.0)
    assert t.dtype == torch.float64 and abs(float(t[0, 1]) - (1.0 - 1e-10)) < 1e-12
    with pytest.raises(ValueError, match="raise the damping"):
        feedback.moments_factor(torch.ones((3, 3), dtype=torch.float64), 0.0)


def test_feedback_is_gptq_in_its_textbook_form(minilm_state, minilm_fp32, tokenizer, snippets):
    """The LDL form gives the codes of GPTQ as published: the error of each column, divided by
    the diagonal of the upper Cholesky factor of the inverse moments, pushed through its row."""
    w = torch.from_numpy(minilm_state[LAYER][:48].astype(np.float64))
    h = _moments(minilm_fp32, tokenizer, snippets[:16], LAYER)
    step = 0.02

    def rounded(col, j):
        c = torch.round(col / step)
        return c * step, c.to(torch.int64)

    codes, _ = feedback.error_feedback(w, h, rounded, damp=0.1, block=32)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    hp = h[perm][:, perm] + 0.1 * torch.mean(torch.diag(h)) * torch.eye(h.shape[0], dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(hp), upper=True)
    ww = w[:, perm].clone()
    ref = torch.zeros(ww.shape, dtype=torch.int64)
    for i in range(ww.shape[1]):
        v, ref[:, i] = rounded(ww[:, i], i)
        ww[:, i + 1 :] -= ((ww[:, i] - v) / u[i, i])[:, None] * u[i, i + 1 :][None, :]
    agree = float((codes[:, perm] == ref).double().mean())
    assert agree > 0.999  # the same codes but for rare ties that rounding in the two forms breaks apart


def test_linears_reading_one_input_are_fed_back_together(minilm_state, minilm_fp32, tokenizer, snippets):
    names = [f"encoder.layer.0.attention.self.{m}.weight" for m in ("query", "key", "value")]
    names.append("encoder.layer.0.attention.output.dense.weight")
    ids, mask = feedback.calibration_batch(tokenizer, snippets[:8], 8)
    shared: dict = {}
    h = feedback.input_moments(minilm_fp32, ids, mask, names, shared=shared)
    assert [shared[n] for n in names] == [names[0]] * 3 + [names[3]]
    assert torch.equal(h[names[0]], h[names[2]])
    cfg = GoboConfig(allocate="uniform", codebook="row")
    qts = [Prepared(minilm_state[n], cfg).build(3) for n in names[:3]]
    together = feedback.requantize_group(qts, [minilm_state[n] for n in names[:3]], h[names[0]], damp=0.1)
    for qt, n, t in zip(qts, names, together):
        assert np.array_equal(t.codes, feedback.requantize(qt, minilm_state[n], h[n], damp=0.1).codes)
    # other bit widths in one group (bits_for): each is fed back on its own, with the same codes
    mixed = [qts[0], Prepared(minilm_state[names[1]], cfg).build(4), qts[2]]
    got = feedback.requantize_group(mixed, [minilm_state[n] for n in names[:3]], h[names[0]], damp=0.1)
    assert [q.bits for q in got] == [3, 4, 3]
    for qt, n, t in zip(mixed, names, got):
        assert np.array_equal(t.codes, feedback.requantize(qt, minilm_state[n], h[n], damp=0.1).codes)
    with pytest.raises(ValueError, match="one width"):
        feedback.requantize_group([qts[0], Prepared(minilm_state[LAYER].T.copy(), cfg).build(3)],
                                  [minilm_state[names[0]], minilm_state[LAYER].T.copy()], h[names[0]])


@pytest.mark.parametrize("act_texts", [40, 8])
def test_progress_counts_tensors_batches_and_fed_back_linears(act_texts):
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.005, act_texts=act_texts, feedback="synthetic",
                     feedback_texts=40)
    calls = []
    cm = gobo.quantize("minilm-l6", cfg, progress=lambda name, total: calls.append((name, total)), **SLICE)
    linears = [n for n in cm.quantized if n.endswith(".weight")]
    assert {t for _, t in calls} == {len(calls)}  # one total, reached exactly
    assert len(calls) == len(cm.quantized) + 2 + len(linears)  # tensors, 2 batches of 32, each Linear fed back
    assert sum(n == feedback.CALIBRATION_STEP for n, _ in calls) == 2
    assert sorted(n for n, _ in calls[-len(linears):]) == sorted(linears)


def test_act_outliers_and_feedback_on_the_same_sentences_share_one_pass(monkeypatch):
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.005, act_texts=8, feedback="synthetic",
                     feedback_texts=8)
    calls = []
    real = feedback.input_moments
    monkeypatch.setattr(feedback, "input_moments", lambda *a, **k: calls.append(k.get("diagonal") is True) or real(*a, **k))
    one = gobo.quantize("minilm-l6", cfg, **SLICE)
    assert calls == [False]  # one pass, full moments; the energies are their diagonal
    calls.clear()
    two = gobo.quantize("minilm-l6", dataclasses.replace(cfg, feedback_texts=16), **SLICE)
    assert calls == [True, False]
    for name, q in one.quantized.items():
        assert q.n_outliers == two.quantized[name].n_outliers and not np.array_equal(q.codes, two.quantized[name].codes)


def test_diagonal_moments_are_the_diagonal_of_the_full_ones(minilm_fp32, tokenizer, snippets):
    ids, mask = feedback.calibration_batch(tokenizer, snippets[:8], 8)
    full = feedback.input_moments(minilm_fp32, ids, mask, [LAYER])[LAYER]
    diag = feedback.input_moments(minilm_fp32, ids, mask, [LAYER], diagonal=True)[LAYER]
    assert full.dtype == torch.float32 and diag.dtype == torch.float64
    torch.testing.assert_close(diag, torch.diagonal(full).double(), rtol=1e-5, atol=0)  # full: float32 products


def test_bfloat16_pass_gives_nearly_the_same_moments(minilm_fp32, tokenizer, snippets):
    """The bfloat16 pass (autocast forward, float32 sums of products) moves the moments by a
    fraction of a percent and keeps them positive semi-definite (to float32's rounding)."""
    ids, mask = feedback.calibration_batch(tokenizer, snippets[:16], 16)
    names = [LAYER, "encoder.layer.1.output.dense.weight"]
    full = feedback.input_moments(minilm_fp32, ids, mask, names)
    half = feedback.input_moments(minilm_fp32, ids, mask, names, dtype="bfloat16")
    for n in names:
        rel = float(torch.linalg.norm(half[n] - full[n]) / torch.linalg.norm(full[n]))
        assert 0 < rel < 0.02, (n, rel)  # moved (the pass did run in bfloat16), but little
        assert torch.equal(half[n], half[n].T)
        ev = torch.linalg.eigvalsh(half[n].double())
        assert float(ev[0]) > -1e-6 * float(ev[-1])
    auto = feedback.input_moments(minilm_fp32, ids, mask, names, dtype="auto")  # fast_dtype()'s choice
    chosen = half if feedback.fast_dtype() == "bfloat16" else full
    assert all(torch.equal(auto[n], chosen[n]) for n in names)
    with pytest.raises(ValueError, match="dtype must be one of"):
        feedback.input_moments(minilm_fp32, ids, mask, names, dtype="float16")


@pytest.mark.parametrize("codebook", ["tensor", "row"])
def test_act_outliers_keep_the_weights_whose_error_reaches_the_output_most(minilm_state, codebook):
    w = minilm_state[LAYER]
    cfg = GoboConfig(allocate="uniform", codebook=codebook, act_outliers=0.01)
    energy = np.ones(w.shape[1])
    energy[:7] = 1e4  # seven loud input features
    energy[7] = 0.0  # and one that never fires
    base = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    mask = act_outlier_mask(w, base, energy, cfg)
    assert (mask & base).sum() == base.sum()
    extra = mask & ~base
    assert extra.sum() == round(0.01 * w.size)
    assert not extra[:, 7].any()  # no output error to save there
    assert extra[:, :7].sum() > 0.5 * extra.sum()  # a loud feature's errors are worth more
    # exactly the largest weighted errors of the plain quantization went
    plain = Prepared(w, GoboConfig(allocate="uniform", codebook=codebook)).build(3).dequantize()
    score = np.where(base, -1.0, np.square((w - plain).astype(np.float64)) * energy)
    assert score[extra].min() >= score[~mask].max()
    err = [float(np.sum(np.square((q - w).astype(np.float64)) * energy))
           for q in (plain, Prepared(w, cfg, energy).build(3).dequantize())]
    assert err[1] < 0.5 * err[0]
    with pytest.raises(ValueError, match="does not fit"):
        act_outlier_mask(w, base, energy[:-1], cfg)


@pytest.mark.parametrize("n,k", [(2_359_296, 14_156), (589_824, 3_539), (100_000, 6_000), (100, 3), (5_000, 1), (2_000, 1_999)])
def test_kth_largest_is_what_a_full_partition_gives(n, k):
    rng = np.random.default_rng(n + k)
    for a in (rng.random(n) ** 4, rng.integers(0, 5, n).astype(np.float64), np.sort(rng.random(n)),
              np.where(rng.random(n) < 0.99, -1.0, rng.random(n))):  # mostly masked scores, as outliers leave them
        assert _kth_largest(a, k) == np.partition(a, n - k)[n - k]


@pytest.mark.parametrize("k", [2, 8, 16, 32])
def test_compiled_act_scores_give_the_reference_bits(minilm_state, k):
    w = minilm_state[LAYER][:96].copy()
    w[3] = w[3, 0]  # a constant row
    mask = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    energy = np.random.default_rng(k).random(w.shape[1]) + 0.01
    c = cluster_rows(w, mask, k)
    got = act_scores(w, c, energy, mask)
    assert np.array_equal(got, act_scores_reference(w, c, energy, mask))
    assert (got[mask] == -1.0).all() and (got[~mask] >= 0).all()


def test_dropping_values_from_sorted_rows_is_sorting_them_again(minilm_state):
    w = minilm_state[LAYER][:64].copy()
    w[:, :100] = np.round(w[:, :100] * 50) / 50  # ties, and zeros of both signs
    w[0, :6] = [0.0, -0.0, 0.0, -0.0, -0.0, 0.0]
    rng = np.random.default_rng(0)
    mask = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    drop = (rng.random(w.shape) < 0.02) & ~mask
    drop[0, :6], mask[0, :6] = [True, True, False, False, True, False], False
    drop[1] = ~mask[1]  # every inlier of a row goes
    x, n = _sorted_inliers(w, mask)
    got = drop_sorted(x, n, w, mask, drop)
    want = _sorted_inliers(w, mask | drop)
    assert np.array_equal(got[1], want[1]) and np.array_equal(got[0], want[0])
    for k in (2, 8, 16):
        assert np.array_equal(cluster_rows(w, mask | drop, k, sorted_rows=got), cluster_rows(w, mask | drop, k))
    x, n = _sorted_inliers(w, mask)
    with pytest.raises(ValueError, match="not among"):
        drop_sorted(x, n, w + 1.0, mask, drop)  # values that are not in the rows


def test_act_outliers_of_per_row_codebooks_reuse_the_sorted_rows(minilm_state):
    w = minilm_state[LAYER]
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006)
    energy = np.random.default_rng(1).random(w.shape[1]) ** 4
    base = gaussian_outlier_mask(w.reshape(-1), -4.0).reshape(w.shape)
    mask = act_outlier_mask(w, base, energy, cfg)
    assert np.array_equal(mask, act_outlier_mask(w, base, energy, cfg, sorted_rows=_sorted_inliers(w, base)))
    prep = Prepared(w, cfg, energy, 3)  # sorts once: the final rows are those rows less the new outliers
    assert np.array_equal(prep.mask, mask)
    assert np.array_equal(prep.build(3).codebook, cluster_rows(w, mask, 8).astype(np.float32))


def test_recoded_tensors_get_their_codebooks_and_outliers_but_no_codes(minilm_state):
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006)
    names = [LAYER, "encoder.layer.1.output.dense.weight"]
    energy = {n: np.random.default_rng(2).random(minilm_state[n].shape[1]) for n in names}
    full = quantize_state(minilm_state, names, cfg, input_energy=energy)
    part = quantize_state(minilm_state, names, cfg, input_energy=energy, recoded={LAYER})
    a, b = full.quantized[LAYER], part.quantized[LAYER]
    assert not b.codes.any() and a.codes.any()
    assert np.array_equal(a.codebook, b.codebook) and np.array_equal(a.outlier_index, b.outlier_index)
    assert np.array_equal(a.outlier_value, b.outlier_value)
    assert LAYER not in part.stats and part.stats[names[1]] == full.stats[names[1]]
    assert np.array_equal(part.quantized[names[1]].codes, full.quantized[names[1]].codes)


def test_a_linear_left_for_the_feedback_that_it_does_not_reach_is_an_error_not_zero_codes(monkeypatch):
    """Linears the shared pass reaches get no codes before the feedback; one the feedback then
    failed to return must stop the run rather than be written with codes nobody chose."""
    victim = "encoder.layer.2.attention.self.value.weight"
    real = feedback.apply

    def losing_one(*args, **kwargs):
        out = real(*args, **kwargs)
        assert victim in out  # the feedback does reach it
        del out[victim]
        return out

    monkeypatch.setattr(feedback, "apply", losing_one)
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006, act_texts=8, feedback="synthetic",
                     feedback_texts=8)
    with pytest.raises(RuntimeError, match=r"did not reach encoder\.layer\.2\.attention\.self\.value\.weight"):
        gobo.quantize("minilm-l6", cfg)


def test_feedback_with_act_outliers_leaves_the_pooler_its_codes_and_measures_what_it_keeps():
    """The Linears the pass reaches are fed back without first being coded; the pooler, which
    it does not reach, keeps nearest-centroid codes; every tensor's stats are its final ones."""
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006, act_texts=8, feedback="synthetic",
                     feedback_texts=8)
    cm = gobo.quantize("minilm-l6", cfg)
    from gobo.assets import resolve_model
    from gobo.hf import load_source, state_numpy

    src = state_numpy(load_source(resolve_model("minilm-l6")))
    pooler = cm.quantized["pooler.dense.weight"]
    plain = Prepared(src["pooler.dense.weight"], cfg, None, 3).build(3)  # no energy: the pass does not reach it
    assert pooler.codes.any() and np.array_equal(pooler.codes, plain.codes)
    for name, qt in cm.quantized.items():
        assert cm.stats[name] == TensorStats.measure(np.asarray(src[name], np.float32), qt), name
    assert set(cm.stats) == set(cm.quantized)


def test_quantize_with_act_outliers_measures_synthetic_inputs():
    cfg = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.005, act_texts=8)
    one = gobo.quantize("minilm-l6", cfg, **SLICE)
    plain = gobo.quantize("minilm-l6", GoboConfig(allocate="uniform", codebook="row"), **SLICE)
    for name, q in one.quantized.items():
        assert q.n_outliers - plain.quantized[name].n_outliers == round(0.005 * q.numel)
    again = gobo.quantize("minilm-l6", cfg, **SLICE)
    assert all(np.array_equal(q.outlier_index, again.quantized[n].outlier_index) for n, q in one.quantized.items())
    assert one.config.calibration_dtype == feedback.fast_dtype()  # "auto", resolved and recorded
    # a float32 pass chooses nearly the same weights: the two precisions move the energies by little
    full = gobo.quantize("minilm-l6", dataclasses.replace(cfg, calibration_dtype="float32"), **SLICE)
    half = gobo.quantize("minilm-l6", dataclasses.replace(cfg, calibration_dtype="bfloat16"), **SLICE)
    for name, q in full.quantized.items():
        same = np.intersect1d(q.outlier_index, half.quantized[name].outlier_index).size / q.n_outliers
        assert same > 0.9, (name, same)
    with pytest.raises(ValueError, match="input energy"):
        quantize_state({LAYER: np.ones((4, 4), np.float32)}, [LAYER], cfg)


def test_synthetic_seed_draws_other_sentences_for_the_energies():
    base = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.005, act_texts=8)
    one = gobo.quantize("minilm-l6", base, **SLICE)
    other = gobo.quantize("minilm-l6", dataclasses.replace(base, synthetic_seed=3), **SLICE)
    same = gobo.quantize("minilm-l6", dataclasses.replace(base, synthetic_seed=3), **SLICE)
    idx = lambda cm: {n: q.outlier_index for n, q in cm.quantized.items()}  # noqa: E731
    assert any(not np.array_equal(i, idx(other)[n]) for n, i in idx(one).items())  # other sentences, other outliers
    assert all(np.array_equal(i, idx(same)[n]) for n, i in idx(other).items())  # and the same for the same seed
    assert other.config.synthetic_seed == 3


def test_config_fields_round_trip_and_refuse_bad_values():
    cfg = GoboConfig(allocate="uniform", codebook="row", feedback="texts", feedback_texts=64, feedback_sha256="ab" * 32,
                     act_outliers=0.004, act_texts=16)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    assert "codebook" not in config_to_json(GoboConfig())["data"]  # files without these fields keep their bytes
    # the synthetic sentences and the damping are recorded where they are used, and a file
    # from before them reads as what it was made with (words alone, damping 0.01)
    assert not {"synthetic", "feedback_damp"} & set(config_to_json(GoboConfig(feedback="texts", feedback_damp=0.01))["data"])
    fb = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006, feedback="synthetic")
    assert (fb.synthetic, fb.feedback_damp) == ("punct", 0.1)
    doc = config_to_json(fb)
    assert doc["data"]["synthetic"] == "punct" and doc["data"]["feedback_damp"] == 0.1
    for k in ("synthetic", "feedback_damp"):
        del doc["data"][k]
    assert (config_from_json(doc).synthetic, config_from_json(doc).feedback_damp) == ("words", 0.01)
    # the seed of the synthetic sentences likewise: recorded where they are used and not 0
    seeded = GoboConfig(allocate="uniform", codebook="row", act_outliers=0.006, synthetic_seed=7)
    assert config_to_json(seeded)["data"]["synthetic_seed"] == 7
    assert config_from_json(json.loads(json.dumps(config_to_json(seeded)))) == seeded
    assert "synthetic_seed" not in config_to_json(dataclasses.replace(seeded, synthetic_seed=0))["data"]
    assert GoboConfig(feedback="texts", synthetic_seed=7).synthetic_seed == 0  # no synthetic sentence read
    for bad in [dict(synthetic_seed=-1), dict(synthetic_seed=True), dict(synthetic_seed=1.5), dict(synthetic_seed=2**32)]:
        with pytest.raises(ValueError, match="synthetic_seed"):
            GoboConfig(act_outliers=0.01, **bad)
    # the precision of the calibration pass: recorded where there is one, float32 for files before it
    assert GoboConfig().calibration_dtype == "float32" and "calibration_dtype" not in config_to_json(GoboConfig())["data"]
    assert GoboConfig(act_outliers=0.01).calibration_dtype == "auto"  # gobo.quantize resolves it
    half = GoboConfig(act_outliers=0.01, calibration_dtype="bfloat16")
    assert config_from_json(json.loads(json.dumps(config_to_json(half)))) == half
    with pytest.raises(ValueError, match="calibration_dtype"):
        GoboConfig(act_outliers=0.01, calibration_dtype="float16")
    # Linears left out of the feedback: recorded where given, and only with feedback
    some = GoboConfig(allocate="uniform", codebook="row", feedback="synthetic", feedback_exclude=["*output.dense*"])
    assert some.feedback_exclude == ("*output.dense*",) and list(config_to_json(some)["data"]["feedback_exclude"]) == ["*output.dense*"]
    assert config_from_json(json.loads(json.dumps(config_to_json(some)))) == some
    assert "feedback_exclude" not in config_to_json(dataclasses.replace(some, feedback_exclude=()))["data"]
    assert not some.fed_back("encoder.layer.0.output.dense.weight") and some.fed_back("encoder.layer.0.intermediate.dense.weight")
    assert not GoboConfig().fed_back("encoder.layer.0.intermediate.dense.weight")  # no feedback at all
    # wide inputs fed back in groups: recorded where set, and only with feedback
    grouped = GoboConfig(allocate="uniform", codebook="row", feedback="synthetic", feedback_group=768)
    assert config_to_json(grouped)["data"]["feedback_group"] == 768
    assert config_from_json(json.loads(json.dumps(config_to_json(grouped)))) == grouped
    assert "feedback_group" not in config_to_json(dataclasses.replace(grouped, feedback_group=0))["data"]
    for bad in [dict(feedback_group=768), dict(feedback="synthetic", feedback_group=-1),
                dict(feedback="synthetic", feedback_group=True), dict(feedback="synthetic", feedback_group=76.8)]:
        with pytest.raises(ValueError, match="feedback_group"):
            GoboConfig(**bad)
    for bad in [dict(feedback_exclude=("*",)), dict(feedback="synthetic", feedback_exclude="*output*"),
                dict(feedback="synthetic", feedback_exclude=("",)), dict(feedback="synthetic", feedback_exclude=(3,))]:
        with pytest.raises(ValueError, match="feedback_exclude"):
            GoboConfig(**bad)
    for bad in [dict(codebook="row"), dict(codebook="col", allocate="uniform"), dict(feedback="real"),
                dict(feedback="texts", normalize_rows=True), dict(feedback="texts", feedback_texts=0),
                dict(act_outliers=-0.1), dict(act_outliers=0.5), dict(act_outliers=True), dict(act_texts=0),
                dict(act_outliers=0.01, normalize_rows=True), dict(synthetic="zipf"), dict(feedback_damp=0),
                dict(feedback_damp=True), dict(feedback_damp=float("nan"))]:
        with pytest.raises(ValueError):
            GoboConfig(**bad)


def test_feedback_exclude_keeps_nearest_codes_and_skips_full_moments(minilm_fp32, tokenizer):
    model, tok = minilm_fp32, tokenizer
    x = "*[0-9].output.dense*"  # the feed-forward output, not attention.output.dense
    base = dict(allocate="uniform", codebook="row", feedback="synthetic", feedback_texts=8, act_texts=8, calibration_dtype="float32")
    for act in (0.0, 0.005):  # moments from apply's own pass, or shared with the outliers' energies
        full = gobo.quantize("minilm-l6", GoboConfig(**base, act_outliers=act), **SLICE)
        part = gobo.quantize("minilm-l6", GoboConfig(**base, act_outliers=act, feedback_exclude=(x,)), **SLICE)
        none = gobo.quantize("minilm-l6", GoboConfig(**{**base, "feedback": ""}, act_outliers=act), **SLICE)
        for name, q in part.quantized.items():
            kept = name == "encoder.layer.1.output.dense.weight"
            assert part.stats[name] == (none if kept else full).stats[name]
            assert np.array_equal(q.dequantize(), (none if kept else full).quantized[name].dequantize()), name
            assert np.array_equal(q.outlier_index, full.quantized[name].outlier_index)  # the same energies
        assert not np.array_equal(full.quantized["encoder.layer.1.output.dense.weight"].dequantize(),
                                  none.quantized["encoder.layer.1.output.dense.weight"].dequantize())
        assert part.config.feedback_exclude == (x,) and part.config.fed_back("encoder.layer.1.intermediate.dense.weight")
    # only the diagonal of an excluded Linear's input is formed; a Linear sharing its input that is fed
    # back still gets the full moments
    ids, mask = feedback.calibration_batch(tok, None, 4, seed=0, punctuation=True)
    q, k = "encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.key.weight"
    out = "encoder.layer.1.output.dense.weight"
    full = feedback.input_moments(model, ids, mask, [q, k, out])
    shared: dict = {}
    some = feedback.input_moments(model, ids, mask, [q, k, out], diagonal=[q, out], shared=shared)
    assert some[q].dim() == 1 and some[out].dim() == 1 and some[k].dim() == 2 and shared[k] == k
    torch.testing.assert_close(some[k], full[k])
    for n in (q, out):
        torch.testing.assert_close(some[n].to(torch.float32), torch.diag(full[n]), rtol=1e-5, atol=1e-7)


def test_grouped_moments_are_blocks_of_the_full_ones_and_each_group_is_fed_back_alone(minilm_fp32, tokenizer, monkeypatch):
    model, tok = minilm_fp32, tokenizer
    ids, mask = feedback.calibration_batch(tok, None, 8, seed=0, punctuation=True)
    q, k, out = ("encoder.layer.1.attention.self.query.weight", "encoder.layer.1.attention.self.key.weight",
                 "encoder.layer.1.output.dense.weight")
    full = feedback.input_moments(model, ids, mask, [q, k, out])
    shared: dict = {}
    some = feedback.input_moments(model, ids, mask, [q, k, out], group=384, shared=shared)
    assert shared == {q: q, k: q, out: out}  # 384-wide inputs are not cut; query and key still share theirs
    torch.testing.assert_close(some[q], full[q])
    g = some[out]
    assert isinstance(g, feedback.GroupedMoments) and [len(i) for i in g.index] == [384] * 4 and g.shape == (1536, 1536)
    d = torch.diagonal(full[out])
    assert sorted(torch.cat(g.index).tolist()) == list(range(1536))
    for a, b in zip(g.index, g.index[1:]):  # ranked: every feature of a group louder than those of the next
        assert float(d[a].min()) >= float(d[b].max())
    for i, blk in zip(g.index, g.blocks):
        torch.testing.assert_close(blk, full[out][i[:, None], i[None, :]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g.diagonal(), d, rtol=1e-5, atol=1e-7)
    assert g.mean == pytest.approx(float(d.double().mean()), rel=1e-6)
    np.testing.assert_allclose(feedback.diagonal(g), feedback.diagonal(full[out]), rtol=1e-5)
    # fed back group by group: the codes of the full matrix with the terms between groups set to zero
    state = {out: model.state_dict()[out].numpy()}
    cfg = GoboConfig(bits=3, codebook="row", allocate="uniform", act_outliers=0.01)
    qt = quantize_state(state, [out], cfg, input_energy={out: feedback.diagonal(g)}).quantized[out]
    grouped = feedback.requantize(qt, state[out], g, damp=1.0)
    dense = feedback.requantize(qt, state[out], g.dense(), damp=1.0)
    assert np.array_equal(grouped.codes, dense.codes) and np.array_equal(grouped.outlier_index, qt.outlier_index)
    np.testing.assert_allclose(grouped.outlier_value, dense.outlier_value, rtol=0, atol=1e-6)
    monkeypatch.setattr(native, "available", lambda: False)
    ref = feedback.requantize(qt, state[out], g, damp=1.0)  # the torch reference, group by group
    assert np.array_equal(ref.codes, grouped.codes)
    np.testing.assert_allclose(ref.outlier_value, grouped.outlier_value, rtol=0, atol=1e-6)

    def error(t):  # output error under the full moments
        w = torch.from_numpy(state[out].astype(np.float64))
        e = w - torch.from_numpy(t.dequantize().astype(np.float64)).reshape(w.shape)
        return float(torch.trace(e @ full[out].double() @ e.T))

    whole = feedback.requantize(qt, state[out], full[out], damp=1.0)
    assert error(whole) < error(grouped) < error(qt)  # between the full feedback and nearest-centroid codes


def test_quantize_with_grouped_feedback(minilm_fp32):
    x = "encoder.layer.1.output.dense.weight"  # MiniLM's only input wider than 384
    base = dict(allocate="uniform", codebook="row", feedback="synthetic", feedback_texts=8, act_texts=8, calibration_dtype="float32")
    for act in (0.0, 0.005):  # moments from apply's own pass, or shared with the outliers' energies
        full = gobo.quantize("minilm-l6", GoboConfig(**base, act_outliers=act), **SLICE)
        part = gobo.quantize("minilm-l6", GoboConfig(**base, act_outliers=act, feedback_group=384), **SLICE)
        wide = gobo.quantize("minilm-l6", GoboConfig(**base, act_outliers=act, feedback_group=1536), **SLICE)
        for name, q in part.quantized.items():
            assert np.array_equal(wide.quantized[name].dequantize(), full.quantized[name].dequantize())  # nothing wider
            if name != x:
                assert part.stats[name] == full.stats[name] and np.array_equal(q.dequantize(), full.quantized[name].dequantize())
        assert not np.array_equal(part.quantized[x].codes, full.quantized[x].codes)
        assert part.config.feedback_group == 384


def test_quantize_with_feedback_saves_loads_and_repeats(tmp_path, snippets):
    cfg = GoboConfig(allocate="uniform", codebook="row", feedback="texts", feedback_texts=16)
    cms = [gobo.quantize("minilm-l6", cfg, calibration_texts=snippets, **SLICE) for _ in range(2)]
    assert cms[0].config.feedback_sha256 == feedback.texts_sha256(snippets[:16])
    paths = [gobo.save(cm, tmp_path / f"m{i}") for i, cm in enumerate(cms)]
    assert (paths[0] / WEIGHTS_FILE).read_bytes() == (paths[1] / WEIGHTS_FILE).read_bytes()
    model = gobo.load(paths[0])
    params = dict(model.named_parameters())
    for name, q in cms[0].quantized.items():
        assert torch.equal(params[name].detach(), torch.from_numpy(q.dequantize()).reshape(params[name].shape))
    packed = gobo.load(paths[0], packed=True)
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 1012, 102]])
    with torch.inference_mode():
        a = model(input_ids=ids).last_hidden_state
        b = packed(input_ids=ids).last_hidden_state
    assert float((a - b).abs().max()) <= 1e-4  # the packed kernel reads one codebook per row
    plain = gobo.quantize("minilm-l6", GoboConfig(allocate="uniform", codebook="row"), **SLICE)
    assert all(np.array_equal(plain.quantized[n].codebook, cms[0].quantized[n].codebook) for n in plain.quantized)


def test_cli_feedback_flags(tmp_path, capsys):
    from gobo.cli import main

    texts = tmp_path / "texts.txt"
    texts.write_text("A fine film.\n\nA dull, overlong one.\n")
    args = ["quantize", "minilm-l6", "-o", str(tmp_path / "f"), "--codebook", "row", "--feedback", "texts",
            "--calibration-texts", str(texts), "--include", "encoder.layer.0.attention.self.query.weight", "--json", "-q"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)["config"]["data"]
    assert data["codebook"] == "row" and data["allocate"] == "uniform" and data["feedback"] == "texts"
    assert data["feedback_sha256"] == feedback.texts_sha256(["A fine film.", "A dull, overlong one."])
    assert data["feedback_damp"] == 0.1  # recorded, since the feedback used it
    assert main([*args[:3], str(tmp_path / "a"), "--act-outliers", "0.01", *args[10:]]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["data"]["act_outliers"] == 0.01
    assert main([*args[:3], str(tmp_path / "s"), "--act-outliers", "0.01", "--synthetic-seed", "5", *args[10:]]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["data"]["synthetic_seed"] == 5
    assert main([*args[:3], str(tmp_path / "d"), "--act-outliers", "0.01", *args[10:]]) == 0
    # "auto" records the precision it chose; float32, the choice without native bfloat16, is
    # what a file without the field implies
    data = json.loads(capsys.readouterr().out)["config"]["data"]
    assert data.get("calibration_dtype", "float32") == feedback.fast_dtype()
    assert main([*args[:3], str(tmp_path / "d32"), "--act-outliers", "0.01", "--calibration-dtype", "float32", *args[10:]]) == 0
    assert "calibration_dtype" not in json.loads(capsys.readouterr().out)["config"]["data"]  # float32: as files before it
    assert main([*args[:3], str(tmp_path / "x1"), "--feedback-exclude", "*query*", "--feedback-exclude", "*self.query*", *args[4:]]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["data"]["feedback_exclude"] == ["*query*", "*self.query*"]
    assert main([*args[:3], str(tmp_path / "g"), "--feedback-group", "128", *args[4:]]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["data"]["feedback_group"] == 128
    (tmp_path / "empty.txt").write_text("\n \n")
    for extra, msg in [(["--calibration-texts", str(texts)], "need --feedback"),
                       (["--feedback", "synthetic", "--calibration-texts", str(texts)], "needs --feedback texts"),
                       (["--synthetic-seed", "1"], "needs synthetic sentences"),
                       (["--feedback", "texts", "--act-outliers", "0.01", "--synthetic-seed", "1"], "needs synthetic sentences"),
                       (["--feedback", "texts", "--calibration-texts", str(tmp_path / "empty.txt")], "holds no text"),
                       (["--feedback", "texts", "--calibration-texts", str(tmp_path / "nope.txt")], "cannot read"),
                       (["--codebook", "row", "--method", "directq"], "apply to --method gobo"),
                       (["--codebook", "row", "--allocate", "size"], "codebook='row' needs allocate='uniform'"),
                       (["--act-outliers", "0.01", "--method", "qbert"], "apply to --method gobo"),
                       (["--act-outliers", "0.7"], "act_outliers must be a fraction"),
                       (["--feedback-damp", "0.1"], "need --feedback"),
                       (["--feedback-exclude", "*output.dense*"], "need --feedback"),
                       (["--feedback-group", "768"], "need --feedback"),
                       (["--feedback", "synthetic", "--feedback-group", "-2"], "feedback_group must be"),
                       (["--feedback", "synthetic", "--feedback-exclude", "*outptu.dense*"], "matches none of the Linear"),
                       (["--calibration-dtype", "bfloat16"], "needs a pass over calibration sentences"),
                       (["--feedback", "synthetic", "--feedback-damp", "-1"], "feedback_damp must be a positive")]:
        assert main(["quantize", "minilm-l6", "-o", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gobo: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert", "albert", "electra", "mpnet"])
def test_feedback_runs_on_every_architecture_and_groups_shared_inputs(arch):
    from test_quantize import _tiny_model

    from gobo.hf import quantizable_names, state_numpy

    model = _tiny_model(arch)
    state = state_numpy(model)
    mods = dict(model.named_modules())
    linears = [n for n in quantizable_names(model) if isinstance(mods[n.rsplit(".", 1)[0]], torch.nn.Linear)]
    cfg = GoboConfig(allocate="uniform", codebook="row")
    quantized = {n: Prepared(state[n], cfg).build(3) for n in linears}
    ids = torch.tensor([[1, 5, 17, 42, 99, 3, 7, 8], [2, 8, 64, 11, 12, 0, 0, 0]] * 4)
    mask = (ids != 0).long()
    shared: dict = {}
    h = feedback.input_moments(model, ids, mask, linears, shared=shared)
    steps = []
    out = feedback.apply(model, None, quantized, state, None, 0, damp=0.1, moments=(h, shared), progress=steps.append)
    assert set(out) == set(h) and sorted(steps) == sorted(linears)  # poolers (2-D inputs) keep their codes
    groups = {}
    for n in h:
        groups.setdefault(shared[n], []).append(n)
    assert max(len(g) for g in groups.values()) == 3  # query, key and value read one input
    for n, fb in out.items():  # each fed-back Linear's output error under the moments it was fed back with
        d0 = torch.from_numpy((quantized[n].dequantize() - state[n]).astype(np.float64))
        d1 = torch.from_numpy((fb.dequantize() - state[n]).astype(np.float64))
        e0, e1 = (float(torch.einsum("rc,cd,rd->", d, h[n].double(), d)) for d in (d0, d1))
        assert e1 <= e0 * 1.0001


def test_compact_files_hold_the_same_model_in_fewer_bytes(tmp_path):
    """compact=True: float16 centroids, outlier positions row by row; feedback keeps it,
    the file is format version 2, and gobo.load (plain and packed) runs it."""
    from gobo.io import read_header

    base = dict(allocate="uniform", codebook="row", act_outliers=0.006, feedback="synthetic", feedback_texts=16)
    plain = gobo.quantize("minilm-l6", GoboConfig(**base), **SLICE)
    cm = gobo.quantize("minilm-l6", GoboConfig(**base, compact=True), **SLICE)
    by_rows = 0
    for name, q in cm.quantized.items():
        p = plain.quantized[name]
        assert q.compact and np.array_equal(q.codebook.astype(np.float16).astype(np.float32), q.codebook), name
        assert np.array_equal(q.outlier_index, p.outlier_index), name  # the same outliers, stored otherwise
        assert q.nbytes() < p.nbytes(), name
        assert cm.stats[name].sqnr_db >= plain.stats[name].sqnr_db - 0.05, name  # float16 centroids cost next to nothing
        by_rows += "outlier_col" in q.to_tensors()
    assert by_rows > 0
    path = gobo.save(cm, tmp_path / "c")
    assert read_header(path)[0]["format_version"] == 2
    from gobo.report import summarize

    assert summarize(gobo.load_compressed(path)).method == "gobo+rows+feedback+compact"
    data = sum(q.nbytes() for q in cm.quantized.values()) + sum(a.nbytes for a in cm.dense.values())
    assert data <= (path / WEIGHTS_FILE).stat().st_size <= data + 64_000
    model, packed = gobo.load(path), gobo.load(path, packed=True)
    params = dict(model.named_parameters())
    for name, q in cm.quantized.items():
        assert torch.equal(params[name].detach(), torch.from_numpy(q.dequantize()).reshape(params[name].shape))
    ids = torch.tensor([[101, 2023, 3185, 2001, 2307, 1012, 102]])
    with torch.inference_mode():
        assert float((model(input_ids=ids).last_hidden_state - packed(input_ids=ids).last_hidden_state).abs().max()) <= 1e-4


def test_compact_default_allocation_stays_within_its_budget(minilm_state):
    """The mixed allocation counts the compact outlier positions: the all-in budget holds."""
    from gobo.quantizer import quantize_state, select

    names = select(minilm_state, ["encoder.layer.0.*", "encoder.layer.1.*"], ["*bias", "*LayerNorm*"])
    for average in (2.5, 3.0):
        cm = quantize_state(minilm_state, names, GoboConfig(average=average, compact=True))
        numel = sum(q.numel for q in cm.quantized.values())
        assert average - 0.1 <= 8 * sum(q.nbytes() for q in cm.quantized.values()) / numel <= average
        assert all(q.compact for q in cm.quantized.values())


def test_bits_for_sets_bits_by_name_and_round_trips(minilm_state, tmp_path):
    from gobo.config import config_from_json, config_to_json
    from gobo.quantizer import quantize_state, select

    names = select(minilm_state, ["encoder.layer.0.*"], ["*bias", "*LayerNorm*"])
    cfg = GoboConfig(allocate="uniform", codebook="row", bits_for=[["*intermediate.dense*", 4], ["*.query.*", 2]])
    assert cfg.bits_for == (("*intermediate.dense*", 4), ("*.query.*", 2))
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    assert "bits_for" not in config_to_json(GoboConfig())["data"]  # files made before it keep their bytes
    cm = quantize_state(minilm_state, names, cfg)
    got = {n: q.bits for n, q in cm.quantized.items()}
    assert got["encoder.layer.0.intermediate.dense.weight"] == 4 and got["encoder.layer.0.attention.self.query.weight"] == 2
    assert {b for n, b in got.items() if "intermediate" not in n and "query" not in n} == {3}
    # activation-weighted outliers are chosen at each tensor's own width
    ff = "encoder.layer.0.intermediate.dense.weight"
    w = minilm_state[ff]
    energy = {n: np.linspace(0.1, 3.0, minilm_state[n].shape[1]) for n in names}
    act = quantize_state(minilm_state, names, dataclasses.replace(cfg, act_outliers=0.01), input_energy=energy)
    at4, at3 = (Prepared(w, dataclasses.replace(cfg, act_outliers=0.01), energy[ff], b).build(4) for b in (4, 3))
    assert np.array_equal(act.quantized[ff].outlier_index, at4.outlier_index)
    assert not np.array_equal(at4.outlier_index, at3.outlier_index)  # the width does change the choice
    with pytest.raises(ValueError, match="'\\*intermediat\\.dense\\*' matches none"):
        quantize_state(minilm_state, names, GoboConfig(allocate="uniform", bits_for=(("*intermediat.dense*", 4),)))
    for bad, match in [(dict(bits_for=(("*", 9),)), "from 1 to 8"), (dict(bits_for=(("", 3),)), "non-empty"),
                       (dict(bits_for=3), "pairs"), (dict(bits_for=(("*", 4),), allocate="size"), "allocate='uniform'")]:
        with pytest.raises(ValueError, match=match):
            GoboConfig(**{"allocate": "uniform", **bad})


def test_cli_bits_for(tmp_path, capsys):
    from gobo.cli import main

    out = tmp_path / "m"
    assert main(["quantize", "minilm-l6", "-o", str(out), "--codebook", "row", "--bits-for", "*intermediate.dense*=4",
                 "--compact", "--include", "encoder.layer.1.*", "--exclude", "*bias", "-q"]) == 0
    cm = gobo.load_compressed(out)
    assert cm.quantized["encoder.layer.1.intermediate.dense.weight"].bits == 4
    assert cm.quantized["encoder.layer.1.output.dense.weight"].bits == 3 and cm.config.compact
    for args, match in [(["--bits-for", "*=x"], "GLOB=BITS"), (["--bits-for", "*=4", "--allocate", "size"], "--allocate uniform"),
                        (["--bits-for", "*=4", "--method", "directq"], "gobo, gobo-paper, gobo-grid or gobo-grid-fast"), (["--bits-for", "*=9"], "from 1 to 8")]:
        assert main(["quantize", "minilm-l6", "-o", str(tmp_path / "bad"), *args, "-q"]) != 0
        assert match in capsys.readouterr().err
        assert not (tmp_path / "bad").exists()

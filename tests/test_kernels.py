"""gobo.kernels: the C decoders and the tiled linear against the pure reference.

Every decoder must reproduce QuantizedTensor.dequantize() bit for bit (it is the format's
definition); the tiled linear multiplies exactly those bits, so it may differ from
F.linear(x, dequantize()) only by GEMM summation order: the bound below is 1e-5 of the output
scale (observed: 0 or a few float32 ulps).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gobo import kernels
from gobo.kernels import Packed, decode_row_list, decode_rows, linear, linear_reference
from gobo.qtensor import QuantizedTensor

pytestmark = pytest.mark.skipif(not kernels.fast_available(), reason="gobo's compiled routines are not built")

SHAPES = [(1, 1), (7, 9), (13, 64), (37, 384), (3, 1001)]


def make_qt(rows, cols, bits, *, seed=0, group_rows=None, stats=None, outlier_frac=0.0) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << bits, size=(rows, cols))
    group_rows = group_rows or rows
    groups = -(-rows // group_rows)
    codebook = rng.standard_normal((groups, 1 << bits)).astype(np.float32)
    scale = offset = None
    if stats is not None:
        scale = (rng.random(rows) * 0.1 + 0.01).astype(stats)
        offset = (rng.standard_normal(rows) * 0.01).astype(stats)
    n_out = int(round(rows * cols * outlier_frac))
    idx = np.sort(rng.choice(rows * cols, size=n_out, replace=False)).astype(np.int64)
    val = (rng.standard_normal(n_out) * 5).astype(np.float32)
    return QuantizedTensor.from_codes(
        codes, shape=(rows, cols), bits=bits, codebook=codebook, group_rows=group_rows,
        row_scale=scale, row_offset=offset, outlier_index=idx, outlier_value=val,
    )


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("stats", [None, np.float16, np.float32])
def test_decoders_are_bit_exact(bits, stats):
    for i, (rows, cols) in enumerate(SHAPES):
        qt = make_qt(rows, cols, bits, seed=i, group_rows=max(1, rows // 3), stats=stats, outlier_frac=0.05)
        ref = qt.dequantize()
        p = Packed.from_qtensor(qt)
        for path in kernels.DECODERS:
            assert same_bits(decode_rows(p, path=path).numpy(), ref), (path, rows, cols)
            # a row range that starts mid-matrix (unaligned bit offsets for odd widths)
            if rows > 2:
                assert same_bits(decode_rows(p, 1, rows - 1, path=path).numpy(), ref[1 : rows - 1]), (path, rows, cols)
            ids = torch.tensor([[rows - 1, 0, rows // 2], [0, 0, rows - 1]])
            assert same_bits(decode_row_list(p, ids, path=path).numpy(), ref[ids.numpy()]), (path, rows, cols)


def test_decode_into_strided_buffer_and_fp16_extremes():
    qt = make_qt(9, 24, 3, stats=np.float16)
    # float16 subnormals, infinities' neighbours and negative zero widen exactly
    qt.row_scale[:4] = np.array([6e-8, -0.0, 65504, 1e-5], dtype=np.float16)
    ref = qt.dequantize()
    big = torch.full((9, 40), 7.0)
    decode_rows(Packed.from_qtensor(qt), out=big[:, 3:27])
    assert same_bits(big[:, 3:27].contiguous().numpy(), ref)
    assert torch.all(big[:, :3] == 7.0) and torch.all(big[:, 27:] == 7.0)


def test_bad_arguments_are_rejected():
    p = Packed.from_qtensor(make_qt(5, 8, 3))
    with pytest.raises(ValueError):
        decode_rows(p, 2, 9)
    with pytest.raises(IndexError):
        decode_row_list(p, torch.tensor([0, 5]))
    with pytest.raises(IndexError):
        decode_row_list(p, torch.tensor([-1]))
    with pytest.raises(ValueError, match="features"):
        linear(torch.randn(2, 7), p)


@pytest.mark.parametrize("bits", range(1, 9))
def test_linear_matches_reference(bits):
    rng = torch.Generator().manual_seed(bits)
    cases = [(1, 1, None, 0.0), (7, 9, np.float16, 0.1), (45, 64, np.float32, 0.01), (130, 96, None, 0.02)]
    for rows, cols, stats, frac in cases:
        qt = make_qt(rows, cols, bits, seed=rows, stats=stats, outlier_frac=frac, group_rows=max(1, rows // 2))
        p = Packed.from_qtensor(qt)
        bias = torch.randn(rows, generator=rng)
        for batch in (1, 33):
            for shape in ((batch, cols), (batch, 3, cols)):
                x = torch.randn(*shape, generator=rng)
                for b in (None, bias):
                    ref = linear_reference(x, p, b)
                    # tiles of 8 rows force several tiles and a ragged last one
                    for tile in (8, None):
                        y = linear(x, p, b, tile_rows=tile)
                        assert y.shape == ref.shape
                        scale = max(ref.abs().max().item(), 1e-6)
                        assert (y - ref).abs().max().item() <= 1e-5 * scale, (bits, rows, cols, batch, tile)


def test_linear_one_tile_is_exact_against_the_same_gemm():
    # with the whole matrix in one tile the fast path is addmm on dequantize()'s bits
    qt = make_qt(96, 128, 3, stats=np.float16, outlier_frac=0.01)
    p = Packed.from_qtensor(qt)
    x, b = torch.randn(33, 128), torch.randn(96)
    y = linear(x, p, b, tile_rows=96)
    ref = torch.addmm(b, x, torch.from_numpy(qt.dequantize()).t())
    assert torch.equal(y, ref)


needs_gemm = pytest.mark.skipif(not kernels.simd_enabled(), reason="the fused kernel needs x86-64 with AVX2 and FMA")


#: the fused GEMM's inner kernels this CPU runs (AVX-512 CPUs run both)
ISAS_HERE = ["avx2", "avx512"] if kernels.gemm_isa() == "avx512" else ["avx2"]
# rows around the 16- and 32-wide panels and 128-row blocks, columns around the 8-wide
# transposes and 384-deep k blocks, batches around the 6- and 8-row strips
RAGGED = [(1, 1), (15, 7), (17, 9), (33, 24), (129, 257), (40, 769), (33, 8), (17, 520)]


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_fused_gemm_matches_reference_on_ragged_shapes(bits, isa):
    rng = torch.Generator().manual_seed(100 + bits)
    for rows, cols in RAGGED:
        qt = make_qt(rows, cols, bits, seed=rows + cols, stats=np.float16, outlier_frac=0.02, group_rows=max(1, rows // 3))
        p = Packed.from_qtensor(qt)
        bias = torch.randn(rows, generator=rng)
        for m in (1, 5, 6, 7, 9, 13, 17):
            x = torch.randn(m, cols, generator=rng)
            for b in (None, bias):
                ref = linear_reference(x, p, b)
                y = linear(x, p, b, isa=isa)
                scale = max(ref.abs().max().item(), 1e-6)
                assert (y - ref).abs().max().item() <= 1e-5 * scale, (bits, rows, cols, m)


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_rows,stats", [(None, None), (1, None), (3, np.float16), (None, np.float32)])
def test_fused_gemm_multiplies_exactly_the_decoded_weights(bits, group_rows, stats, isa):
    # x = identity: every output is one weight times 1 plus exact zeros, whatever the
    # summation order, so y must be W^T to the bit. Widths up to 4 with K a multiple of 8
    # decode straight into the panels; the others (and K = 36) through decoded rows.
    for rows, cols in [(1, 8), (16, 16), (17, 24), (45, 64), (129, 520), (31, 36)]:
        qt = make_qt(rows, cols, bits, seed=7 * rows + cols, group_rows=group_rows, stats=stats, outlier_frac=0.03)
        y = linear(torch.eye(cols), Packed.from_qtensor(qt), isa=isa)
        assert np.array_equal(y.numpy(), qt.dequantize().T), (bits, rows, cols, group_rows, stats)


@needs_gemm
@pytest.mark.skipif(len(ISAS_HERE) < 2, reason="this CPU has no AVX-512")
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_avx2_and_avx512_kernels_give_the_same_bits(bits):
    # one summation order per output (bias, k ascending, residual) in both kernels; the GELU
    # is the same 8-wide code in both
    rng = torch.Generator().manual_seed(bits)
    for rows, cols in RAGGED + [(768, 768)]:
        p = Packed.from_qtensor(make_qt(rows, cols, bits, seed=rows * cols, outlier_frac=0.01, group_rows=1))
        b = torch.randn(rows, generator=rng)
        for m in (1, 7, 8, 31, 128):
            x, res = torch.randn(m, cols, generator=rng), torch.randn(m, rows, generator=rng)
            ln = (torch.randn(rows, generator=rng), torch.randn(rows, generator=rng), 1e-5)
            for kw in ({}, {"residual": res}, {"act": "gelu"}, {"residual": res, "act": "gelu"}, {"residual": res, "layer_norm": ln}):
                assert torch.equal(linear(x, p, b, isa="avx2", **kw), linear(x, p, b, isa="avx512", **kw)), (rows, cols, m, kw)


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_fused_epilogue_matches_reference(isa):
    # the residual is added after the whole sum (exactly as F.linear's output + residual,
    # up to the GEMM's order), then GELU; ragged tiles go through the same 8-wide code
    rng = torch.Generator().manual_seed(5)
    for rows, cols in RAGGED:
        p = Packed.from_qtensor(make_qt(rows, cols, 3, seed=rows, stats=np.float32, outlier_frac=0.02))
        b = torch.randn(rows, generator=rng)
        for m in (1, 6, 9, 13):
            x = torch.randn(2, m, cols, generator=rng)
            res = torch.randn(2, m, rows, generator=rng)
            for kw in ({"residual": res}, {"act": "gelu"}, {"residual": res, "act": "gelu"}):
                ref = linear_reference(x, p, b, **kw)
                y = linear(x, p, b, isa=isa, **kw)
                assert y.shape == ref.shape
                scale = max(ref.abs().max().item(), 1.0)
                assert (y - ref).abs().max().item() <= 1e-5 * scale, (rows, cols, m, kw)
    # a residual that is a strided view is read correctly
    p = Packed.from_qtensor(make_qt(40, 24, 3))
    x, big = torch.randn(5, 24), torch.randn(5, 80)
    assert torch.allclose(linear(x, p, residual=big[:, ::2], isa=isa), linear_reference(x, p, residual=big[:, ::2]), atol=1e-5)


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_fused_gelu_is_torchs_gelu_to_float32_rounding(isa):
    # x = 0 makes the output the residual alone, so the GELU sees exactly these values:
    # zeros, tiny and huge magnitudes, the tails where erf saturates, and a dense sweep
    values = torch.cat([
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 0.5, -0.5, 3.0, -3.0, 5.5, -5.5, 9.0, -9.0, 20.0, -20.0, 100.0, -100.0, 1e4, -1e4, 3e38, -3e38]),
        torch.linspace(-12, 12, 4001),
    ])
    rows = values.numel()
    p = Packed.from_qtensor(make_qt(rows, 16, 3))
    y = linear(torch.zeros(1, 16), p, residual=values[None], act="gelu", isa=isa)[0]
    want = torch.nn.functional.gelu(values.double()).float()
    err = (y.double() - want.double()).abs() / want.double().abs().clamp(min=1.0)
    assert err.max().item() <= 1e-6, values[err.argmax()].item()
    assert torch.isfinite(y).all()


@needs_gemm
def test_reused_output_is_never_shared_with_a_live_tensor():
    p = Packed.from_qtensor(make_qt(48, 32, 3, seed=2))
    x1, x2 = torch.randn(4, 32), torch.randn(4, 32)
    y1 = linear(x1, p, reuse_output=True)
    want1 = y1.clone()
    y2 = linear(x2, p, reuse_output=True)  # y1 is alive: a new buffer
    assert y2.data_ptr() != y1.data_ptr()
    assert torch.equal(y1, want1) and torch.equal(y2, linear(x2, p))
    view = y2[1:]
    del y2
    y3 = linear(x1, p, reuse_output=True)  # a view of y2 is alive: still not y2's memory
    assert y3.data_ptr() != view.data_ptr() - view.stride(0) * 4 and torch.equal(y3, want1)
    ptr = y3.data_ptr()
    del y3
    y4 = linear(x2, p, reuse_output=True)  # nothing alive: the buffer comes back
    assert y4.data_ptr() == ptr and torch.equal(y4, linear(x2, p))


def test_epilogue_arguments_are_checked():
    p = Packed.from_qtensor(make_qt(8, 16, 3))
    with pytest.raises(ValueError, match="activation"):
        linear(torch.randn(2, 16), p, act="relu")
    with pytest.raises(ValueError, match="residual"):
        linear(torch.randn(2, 16), p, residual=torch.randn(2, 7))
    with pytest.raises(ValueError, match="kernel"):
        linear(torch.randn(2, 16), p, isa="sse")


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_fused_layer_norm_matches_reference(isa):
    # LayerNorm over each output row after the residual and GELU, by the GEMM's own threads
    # once every column is summed: F.layer_norm's result to float32 rounding, on 1 and 2
    # threads and on both sets of threads, with and without its affine parameters
    rng = torch.Generator().manual_seed(9)
    before = torch.get_num_threads()
    try:
        for rows, cols in RAGGED + [(768, 64)]:
            p = Packed.from_qtensor(make_qt(rows, cols, 3, seed=rows + 1, outlier_frac=0.02))
            b, w, beta = torch.randn(rows, generator=rng), 1 + torch.randn(rows, generator=rng), torch.randn(rows, generator=rng)
            for m in (1, 3, 13, 40):
                x = torch.randn(m, cols, generator=rng)
                res = 10 * torch.randn(m, rows, generator=rng)  # offsets of the order of MPNet's residual stream
                for ln in ((w, beta, 1e-5), (None, None, 1e-12), (w, None, 1e-3)):
                    for kw in ({}, {"residual": res}, {"residual": res, "act": "gelu"}):
                        ref = linear_reference(x, p, b, layer_norm=ln, **kw)
                        outs = []
                        for threads, openmp in ((1, True), (2, True), (2, False)):
                            torch.set_num_threads(threads)
                            kernels.gemm_threads(openmp)
                            outs.append(linear(x, p, b, layer_norm=ln, isa=isa, **kw))
                        scale = max(ref.abs().max().item(), 1.0)
                        assert (outs[0] - ref).abs().max().item() <= 2e-5 * scale, (rows, cols, m, kw)
                        # each row is normalised by one thread with the same code: same bits
                        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2]), (rows, cols, m)
    finally:
        torch.set_num_threads(before)
        kernels.gemm_threads(True)


@needs_gemm
def test_layer_norm_arguments_are_checked():
    p = Packed.from_qtensor(make_qt(8, 16, 3))
    x = torch.randn(2, 16)
    with pytest.raises(ValueError, match="weight"):
        linear(x, p, layer_norm=(torch.ones(7), None, 1e-5))
    with pytest.raises(ValueError, match="bias"):
        linear(x, p, layer_norm=(None, torch.ones(9), 1e-5))
    with pytest.raises(ValueError, match="eps"):
        linear(x, p, layer_norm=(None, None, 0.0))
    with pytest.raises(ValueError, match="layer_norm"):
        linear(x, p, layer_norm=torch.nn.LayerNorm(8))


@needs_gemm
def test_fused_gemm_rejects_a_matrix_whose_codes_do_not_fit_its_shape():
    # the GEMM reads whole rows of codes: a stream shorter than rows x cols x bits is refused
    p = Packed.from_qtensor(make_qt(16, 16, 3))
    q = kernels._qmat(p)
    q.nbytes -= 1
    with pytest.raises(ValueError, match="rejected"):
        linear(torch.randn(2, 16), p, q=q)


# ---------------------------------------------------------------------------- attention

#: (batch, heads, queries, keys, features): MPNet's own, ragged against the 6/8-row strips and
#: 16/32-wide panels, one key, one feature
ATTN_SHAPES = [(1, 12, 128, 128, 64), (2, 3, 7, 13, 5), (1, 1, 1, 1, 1), (3, 2, 33, 65, 40), (2, 4, 9, 9, 64), (1, 2, 50, 17, 96)]


def _attn_inputs(b, h, sq, sk, d, seed):
    g = torch.Generator().manual_seed(seed)
    # q and v as the (B, S, H, D) projections viewed per head, k contiguous
    q = torch.randn(b, sq, h, d, generator=g).transpose(1, 2)
    k = torch.randn(b, h, sk, d, generator=g)
    v = torch.randn(b, sk, h, d, generator=g).transpose(1, 2)
    bias = torch.randn(1, h, sq, sk, generator=g)  # a position bias shared by the batch
    pad = torch.zeros(b, 1, 1, sk)
    pad[-1, ..., (sk + 1) // 2 :] = torch.finfo(torch.float32).min  # the last sequence is padded
    return q, k, v, bias + pad


@needs_gemm
@pytest.mark.parametrize("isa", ISAS_HERE)
def test_attention_matches_sdpa(isa):
    for i, shape in enumerate(ATTN_SHAPES):
        q, k, v, mask = _attn_inputs(*shape, seed=i)
        for m in (mask, None, mask[..., :1, :], torch.randn(1, shape[3])):  # full, none, broadcast over queries, over all but keys
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m)
            got = kernels.attention(q, k, v, m, isa=isa)
            assert got.shape == ref.shape
            assert (got - ref).abs().max().item() <= 2e-6, (shape, None if m is None else tuple(m.shape))
        scaled = kernels.attention(q, k, v, mask, scale=0.3, isa=isa)
        assert torch.allclose(scaled, torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3), atol=2e-6)
    # the result views a (B, S, H, D) tensor: merging the heads is free
    out = kernels.attention(*_attn_inputs(2, 3, 5, 6, 8, seed=0))
    assert out.transpose(1, 2).is_contiguous()


@needs_gemm
def test_attention_gives_the_same_bits_on_any_threads_and_kernel(gemm_threads):
    # each (batch, head) is computed by one thread with the same code, and both inner kernels
    # sum in the same order: the same bits whichever thread takes it
    before = torch.get_num_threads()
    try:
        for i, shape in enumerate(ATTN_SHAPES):
            q, k, v, mask = _attn_inputs(*shape, seed=10 + i)
            outs = []
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                outs += [kernels.attention(q, k, v, mask, isa=isa) for isa in ISAS_HERE]
            assert all(torch.equal(outs[0], o) for o in outs[1:]), shape
    finally:
        torch.set_num_threads(before)


@needs_gemm
def test_attention_edge_cases_and_arguments():
    q, k, v, _ = _attn_inputs(1, 2, 4, 5, 8, seed=3)
    # a query that may attend to nothing gets zeros; the others are unaffected
    mask = torch.zeros(1, 2, 4, 5)
    mask[0, 1, 2] = -float("inf")
    out = kernels.attention(q, k, v, mask)
    assert torch.equal(out[0, 1, 2], torch.zeros(8))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    keep = torch.ones(1, 2, 4, dtype=torch.bool)
    keep[0, 1, 2] = False
    assert (out[keep] - ref[keep]).abs().max().item() <= 2e-6
    # autograd goes to PyTorch's attention, with the same values
    qg = q.clone().requires_grad_(True)
    y = kernels.attention(qg, k, v, mask)
    assert y.grad_fn is not None
    assert torch.allclose(y.detach()[keep], out[keep], atol=2e-6)
    with pytest.raises(ValueError, match="additive"):
        kernels.attention(q, k, v, torch.ones(1, 2, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        kernels.attention(q, k, v, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="k and v"):
        kernels.attention(q, k, v[..., :7])
    with pytest.raises(ValueError, match="batch, heads"):
        kernels.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="kernel"):
        kernels.attention(q, k, v, isa="sse")


@pytest.fixture(params=["openmp", "pool"])
def gemm_threads(request):
    """Each GEMM test runs on torch's OpenMP team and on gobo's own thread pool."""
    mode = kernels.gemm_threads(request.param == "openmp")
    if mode != request.param:
        kernels.gemm_threads(True)
        pytest.skip("torch does not run on an OpenMP runtime gobo can find here")
    yield mode
    kernels.gemm_threads(True)  # back to the default


def test_gemm_runs_on_torchs_openmp_team_where_there_is_one():
    import sys

    if sys.platform == "linux" and kernels.simd_enabled() and "OpenMP" in torch.__config__.parallel_info().split("backend:")[-1]:
        assert kernels.gemm_threads() == "openmp"
    else:
        assert kernels.gemm_threads() in ("openmp", "pool")


@needs_gemm
def test_fused_gemm_is_the_same_on_either_set_of_threads():
    qt = make_qt(301, 250, 3, seed=11, outlier_frac=0.01)
    p = Packed.from_qtensor(qt)
    x, b = torch.randn(37, 250), torch.randn(301)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        outs = []
        for openmp in (True, False, True):
            kernels.gemm_threads(openmp)
            outs.append(linear(x, p, b))
    finally:
        torch.set_num_threads(before)
        kernels.gemm_threads(True)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.allclose(outs[0], linear_reference(x, p, b), rtol=0, atol=1e-4)


@needs_gemm
def test_fused_gemm_is_independent_of_threads_and_batch(gemm_threads):
    # one summation order per output: the same bits whatever the thread count or batch split
    qt = make_qt(300, 200, 3, seed=7, outlier_frac=0.01)
    p = Packed.from_qtensor(qt)
    x, b = torch.randn(23, 200), torch.randn(300)
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(linear(x, p, b))
        rows_alone = torch.cat([linear(x[i : i + 1], p, b) for i in range(x.shape[0])])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert torch.equal(outs[0], rows_alone)


@needs_gemm
def test_fused_gemm_from_several_python_threads(gemm_threads):
    # ctypes releases the GIL: calls from other threads share the worker pool one at a time
    from concurrent.futures import ThreadPoolExecutor

    ps = [Packed.from_qtensor(make_qt(70 + 9 * i, 40, 3, seed=i, outlier_frac=0.01)) for i in range(4)]
    xs = [torch.randn(11, 40) for _ in ps]
    want = [linear(x, p) for x, p in zip(xs, ps)]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with ThreadPoolExecutor(4) as ex:
            got = list(ex.map(lambda i: [linear(xs[i], ps[i]) for _ in range(20)], range(4)))
    finally:
        torch.set_num_threads(before)
    for i, outs in enumerate(got):
        assert all(torch.equal(o, want[i]) for o in outs), i


@needs_gemm
def test_fused_gemm_in_a_forked_child(gemm_threads):
    # the worker threads do not survive fork(): the child must start its own
    import multiprocessing as mp

    qt = make_qt(64, 48, 3, seed=3)
    p = Packed.from_qtensor(qt)
    x = torch.randn(9, 48)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        parent = linear(x, p)  # starts the pool here
        with mp.get_context("fork").Pool(1) as pool:
            child, child_threads = pool.apply(_fork_linear, (x, p))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(parent, child)
    assert child_threads == "pool"  # OpenMP's threads do not survive fork(); the pool starts afresh


def _fork_linear(x, p):
    torch.set_num_threads(2)
    return linear(x, p), kernels.gemm_threads()


def test_tile_rows_for():
    assert kernels.tile_rows_for(384, 1 << 20) == 680
    assert kernels.tile_rows_for(10**9) == 8
    assert kernels.tile_rows_for(384, 64 * 1024) % 8 == 0

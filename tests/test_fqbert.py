"""FQ-BERT: integer kernels against float references, the integer path against its float
simulation, the architectures against transformers, compression from real byte counts.

Bounds are the measured values (written next to each) with a small margin.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gobo.fqbert import FQBertConfig, FQBertModel, extract_encoder, float_forward, quantize_rows
from gobo.intops import (
    Dyadic,
    IntLayerNorm,
    dyadic,
    i_exp,
    i_gelu,
    i_layernorm,
    i_softmax,
    int_matmul,
    int_matmul_reference,
    isqrt,
    mul_floor,
    requantize,
)

N_TEXTS = 300  # real test texts for the agreement checks
N_CALIB = 128  # calibration texts (the CLI default is 256)
N_TRAIN = 500  # probe training texts for the agreement check (the benchmark uses all 9,222)


@pytest.fixture(scope="module")
def corpus():
    """(train, test) splits of the benchmark corpus."""
    from gobo.data import load_rotten_tomatoes

    return load_rotten_tomatoes()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------- kernels


def _exact_round(x: int, m: int, e: int) -> int:
    """round(x * m / 2**e), ties up, in Python integers."""
    return (x * m + (1 << (e - 1))) >> e if e >= 1 else x * m


def test_dyadic_is_exact_for_float32_times_power_of_two():
    g = torch.Generator().manual_seed(0)
    mult = torch.rand(1000, generator=g).float().double() * torch.pow(2.0, torch.randint(-30, 20, (1000,), generator=g).double())
    d = dyadic(mult)
    assert torch.equal(d.value(), mult)
    assert int(d.m.abs().max()) < 1 << 31 and int(d.m.abs().min()) >= 1 << 30


def test_requantize_and_mul_floor_match_python_integers():
    rnd = random.Random(0)
    xs = [rnd.randint(-(1 << 61), 1 << 61) for _ in range(300)] + [rnd.randint(-(1 << 30), 1 << 30) for _ in range(300)]
    x = torch.tensor(xs)
    for m, e in [(2**31 - 1, 93), (-(2**30) - 12345, 40), (1234567890, 31), (2**30 + 7, 10)]:
        d = Dyadic(torch.tensor(m), torch.tensor(e))
        for frac in (0, 1, 7):
            got = mul_floor(x, d, frac).tolist()
            want = [(v * m) >> (e - frac) for v in xs]
            assert all(g == w for g, w, v in zip(got, want, xs) if abs(w) < 1 << 62)
        got = requantize(x, d, -(1 << 40), 1 << 40).tolist()
        assert got == [min(max(_exact_round(v, m, e), -(1 << 40)), 1 << 40) for v in xs]
    # per-channel multipliers broadcast over the last dimension
    acc = torch.randint(-(1 << 30), 1 << 30, (5, 7), dtype=torch.int32)
    d = dyadic(torch.rand(7, dtype=torch.float64) * 1e-3)
    out = requantize(acc, d, -127, 127)
    assert out.dtype == torch.int8
    want = [[min(max(_exact_round(int(acc[i, j]), int(d.m[j]), int(d.e[j])), -127), 127) for j in range(7)] for i in range(5)]
    assert out.tolist() == want


def test_isqrt_is_exact():
    g = torch.Generator().manual_seed(1)
    n = torch.cat([torch.randint(0, 1 << 62, (20000,), generator=g), torch.arange(0, 5000),
                   torch.tensor([(1 << 62) - 1, (2**31 - 1) ** 2, (2**31 - 1) ** 2 - 1, 1 << 60])])
    r = isqrt(n)
    assert r.dtype == torch.int64
    assert all(int(a) == math.isqrt(int(b)) for a, b in zip(r, n))


def test_int_matmul_fast_paths_are_bit_exact():
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-127, 128, (64, 1536), dtype=torch.int8, generator=g)
    w = torch.randint(-7, 8, (1536, 384), dtype=torch.int8, generator=g)
    p = torch.randint(0, 256, (4, 3, 40, 40), dtype=torch.uint8, generator=g)
    v = torch.randint(-127, 128, (4, 3, 40, 16), dtype=torch.int8, generator=g)
    big = torch.randint(-127, 128, (8, 4096), dtype=torch.int8, generator=g)  # K * 127 * 127 > 2**24: float64
    wide = torch.tensor([[1 << 30, -(1 << 30), 5]], dtype=torch.int32)  # bound 2**55 > 2**53: integer matmul
    for x, y in [(a, w), (p, v), (big, big.t()), (wide, torch.tensor([[1 << 24], [1 << 24], [3]], dtype=torch.int32))]:
        out = int_matmul(x, y)
        assert out.dtype == torch.int32 and torch.equal(out, int_matmul_reference(x, y))
    with pytest.raises(TypeError):
        int_matmul(a.float(), w)
    with pytest.raises(OverflowError):
        int_matmul(wide, torch.tensor([[1 << 24], [0], [0]], dtype=torch.int32))


@pytest.mark.parametrize("scale", [2**-7, 1e-3, 2**-14])
def test_i_exp_error(scale):
    """I-BERT's exp polynomial: measured max |error| 0.00213 (2**-7), 0.00193 (1e-3), 0.00192 (2**-14)."""
    x = -torch.randint(0, int(12 / scale), (200000,), generator=torch.Generator().manual_seed(3))
    e, s = i_exp(x, scale)
    assert e.dtype == torch.int64
    assert float((e.double() * s - torch.exp(x.double() * scale)).abs().max()) < 0.0025


@pytest.mark.parametrize("scale", [2**-7, 2**-10, 2**-13])
def test_i_softmax_error_and_mask(scale):
    """Measured max |p - softmax| 0.0036 (2**-7), 0.0026 (2**-10), 0.0027 (2**-13), 8-bit output included."""
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-int(8 / scale), int(8 / scale), (8, 4, 40, 40), generator=g)
    mask = torch.rand(8, 1, 1, 40, generator=g) > 0.2
    mask[..., 0] = True
    p = i_softmax(x, scale, mask)
    ref = torch.softmax((x.double() * scale).masked_fill(~mask, float("-inf")), dim=-1)
    assert p.dtype == torch.uint8
    assert float((p.double() / 256 - ref).abs().max()) < 0.004
    assert int(p.masked_select(~mask.expand_as(p)).max()) == 0


@pytest.mark.parametrize("scale", [2**-8, 2**-11])
def test_i_gelu_error(scale):
    """I-BERT's erf polynomial: measured max |error| 0.0180 (2**-8), 0.0181 (2**-11); the product is exact."""
    hi = min(int(10 / scale), 32767)
    x = torch.randint(-hi, hi + 1, (200000,), generator=torch.Generator().manual_seed(5))
    y, s = i_gelu(x, scale)
    assert y.dtype == torch.int64 and int(y.abs().max()) < 1 << 62
    assert float((y.double() * s - F.gelu(x.double() * scale)).abs().max()) < 0.019


def test_i_layernorm_matches_float_layernorm_code_for_code():
    """Integer LayerNorm (exact mean, Newton isqrt, two-step division) gives the codes of the
    float64 reference rounded to nearest: no mismatch measured on 400 rows."""
    g = torch.Generator().manual_seed(6)
    h = 384
    x = torch.randn(400, h, generator=g) * 3000
    x[:, 5] *= 8  # an outlier channel, as in BERT residual streams
    x[0] = 1234.0  # constant row: variance 0, only eps remains
    x = x.clamp(-32767, 32767).round().to(torch.int32)
    gamma, beta = torch.rand(h, generator=g) + 0.5, torch.randn(h, generator=g) * 0.1
    in_scale, out_scale, eps = 2**-12, 2**-5, 1e-5
    out = i_layernorm(x, IntLayerNorm.build(gamma, beta, eps, in_scale, out_scale, 8))
    ref = F.layer_norm(x.double() * in_scale, (h,), gamma.double(), beta.double(), eps) / out_scale
    assert out.dtype == torch.int8
    assert torch.equal(out.double(), torch.floor(ref + 0.5).clamp(-127, 127))


# ---------------------------------------------------------------------------- architectures

TINY = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=140)


def _tiny(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    if kind == "roberta":
        return transformers.RobertaModel(transformers.RobertaConfig(**TINY, pad_token_id=1)).eval()
    if kind == "mpnet":
        return transformers.MPNetModel(transformers.MPNetConfig(**TINY)).eval()
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bert", "roberta", "mpnet"])
def test_float_forward_matches_transformers(kind, tokenizer, real_sentences):
    model = _tiny(kind)
    spec = extract_encoder(model)
    w = dict(spec.tensors)
    w.update({f"l{i}.rel": w["rel_bias"] for i in range(spec.layers)} if spec.rel_buckets else {})
    b = tokenizer(list(real_sentences[:8]), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        ref = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        out = float_forward(spec, w, b["input_ids"], b["attention_mask"])
    valid = b["attention_mask"].bool()
    assert float((ref - out)[valid].abs().max()) < 1e-4


def test_minilm_float_forward_matches_transformers(minilm_fp32, tokenizer, real_sentences):
    spec = extract_encoder(minilm_fp32)
    b = tokenizer(list(real_sentences[:16]), padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.inference_mode():
        ref = minilm_fp32(**b).last_hidden_state
        out = float_forward(spec, spec.tensors, b["input_ids"], b["attention_mask"], b["token_type_ids"])
    assert float((ref - out)[b["attention_mask"].bool()].abs().max()) < 1e-4  # measured 2e-6


def test_unsupported_architectures_are_named():
    import transformers

    distil = transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    with pytest.raises(ValueError, match="supports bert, roberta, mpnet encoders; got DistilBertModel"):
        extract_encoder(distil)
    relu = transformers.BertModel(transformers.BertConfig(**{**TINY, "vocab_size": 100}, hidden_act="relu"))
    with pytest.raises(ValueError, match="erf GELU"):
        extract_encoder(relu)


@pytest.mark.parametrize("field,value", [("w_bits", 1), ("a_bits", 9), ("wide_bits", 20), ("w_method", "awq"),
                                         ("a_calib", "kl"), ("smooth", 9), ("smooth", True), ("w_bits", 4.0)])
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        FQBertConfig(**{field: value})


@pytest.mark.parametrize("kind", ["bert", "mpnet"])
def test_tiny_integer_path_equals_simulation(kind, tokenizer, corpus):
    """Code for code: the float simulation rounds at the same points with the same scales."""
    model = _tiny(kind)
    train, test = corpus
    fq = FQBertModel.from_pretrained_fp32(model, train.stride(24).texts, tokenizer, FQBertConfig(smooth=8))
    b = tokenizer(list(test.stride(32).texts), padding=True, truncation=True, max_length=128, return_tensors="pt")
    codes = fq.hidden_codes(b["input_ids"], b["attention_mask"])
    sim = fq.hidden_simulated(b["input_ids"], b["attention_mask"]) / fq.encoder.out_scale
    valid = b["attention_mask"].bool()
    assert codes.dtype == torch.int8
    assert torch.equal(codes[valid].double(), sim[valid])


# ---------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def fq_minilm(minilm_fp32, tokenizer, corpus):
    return FQBertModel.from_pretrained_fp32(minilm_fp32, corpus[0].stride(N_CALIB).texts, tokenizer)


def test_integer_path_has_only_integer_tensors(fq_minilm, tokenizer, real_sentences, monkeypatch):
    b = tokenizer(list(real_sentences[:16]), padding=True, truncation=True, max_length=128, return_tensors="pt")
    fq_minilm.debug = True
    try:
        codes = fq_minilm.hidden_codes(b["input_ids"], b["attention_mask"], b["token_type_ids"])
        trace = list(fq_minilm.trace)
    finally:
        fq_minilm.debug = False
    assert {str(t[1]) for t in trace} <= {"torch.int8", "torch.uint8", "torch.int32", "torch.int64"}
    points = {name.split(".", 1)[1] for name, *_ in trace}
    assert {"sum", "ln", "q", "k", "v", "scores", "p", "ctx", "res1", "h1", "gelu_in", "gelu", "gelu_out",
            "res2", "h2", "fc1.acc", "fc2.acc", "o.acc"} <= points
    assert len(trace) == 2 + 20 * fq_minilm.spec.layers
    # the GEMMs' float fast path is bit-identical to integer matmuls
    import gobo.fqbert_forward as forward

    monkeypatch.setattr(forward, "int_matmul", lambda a, b, *bounds: int_matmul_reference(a, b))
    assert torch.equal(fq_minilm.hidden_codes(b["input_ids"], b["attention_mask"], b["token_type_ids"]), codes)


def test_agreement_on_real_test_texts(fq_minilm, minilm_fp32, tokenizer):
    """300 test texts, probe trained on 1,000 FP32 train embeddings (not cached).

    Measured: integer path vs simulation 100.0% same predictions, 300/300 embeddings identical;
    FP32 accuracy 77.33%, integer path 76.33% (agreement with FP32 92.3%, mean cosine 0.91).
    """
    from gobo.evaluate import encode, prepare_benchmark

    bench = prepare_benchmark(minilm_fp32, tokenizer, n_train=N_TRAIN, n_test=N_TEXTS, use_cache=False)
    texts, y = bench.test_texts, np.asarray(bench.test_labels)
    e32 = encode(minilm_fp32, tokenizer, texts)
    eint = fq_minilm.embed(texts)
    esim = fq_minilm.embed(texts, simulate=True)
    p32, pint, psim = (bench.probe.predict(e) for e in (e32, eint, esim))
    assert np.mean(pint == psim) >= 0.995  # the bound FQ-BERT's integer path must meet
    assert np.mean(np.all(eint == esim, axis=1)) >= 0.95
    assert np.mean(pint == p32) >= 0.88
    assert np.mean(pint == y) >= np.mean(p32 == y) - 0.05
    assert float(np.mean(np.sum(e32.astype(np.float64) * eint, axis=1))) > 0.85


def test_compression_from_real_byte_counts(fq_minilm, minilm_fp32):
    """Measured on all-MiniLM-L6-v2: 7.78x (4.12 bits per weight), the paper reports 7.94x for BERT-base."""
    from gobo.packing import packed_nbytes, unpack_codes

    stored = fq_minilm.stored_tensors()
    size = fq_minilm.size()
    assert size.stored_bytes == sum(t.numel() * t.element_size() for t in stored.values())
    encoder_params = sum(p.numel() for n, p in minilm_fp32.named_parameters() if not n.startswith("pooler."))
    assert size.fp32_bytes == 4 * encoder_params
    n_codes = sum(c.numel() for c in fq_minilm.codes.values())
    assert size.n_weights == n_codes
    assert size.by_kind["codes"] == sum(packed_nbytes(c.numel(), 4) for c in fq_minilm.codes.values())
    assert stored["l0.q.bias"].dtype == torch.int32 and stored["emb.word.scale"].dtype == torch.float32
    word = fq_minilm.codes["emb.word"]
    back = unpack_codes(stored["emb.word.codes"].numpy(), 4, word.numel()).astype(np.int16) - 8
    assert np.array_equal(back.reshape(word.shape), word.numpy())
    assert 7.6 < size.ratio < 8.0 and 4.0 < size.bits_per_weight < 4.2


def test_quantize_rows_is_symmetric_per_row():
    w = torch.randn(50, 64, generator=torch.Generator().manual_seed(7))
    for clip in ("max", "mse"):
        codes, scales = quantize_rows(w, 4, clip)
        assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7 and scales.shape == (50,)
        err = (codes.float() * scales[:, None] - w).pow(2).sum()
        sqnr = 10 * math.log10(float(w.pow(2).sum() / err))
        assert sqnr > (19.5 if clip == "mse" else 18.5)  # measured 19.3 dB (max), 19.9 dB (mse)


# ---------------------------------------------------------------------------- command line


def test_cli_json(tmp_path):
    """The command end to end on a few texts; the probe is cached in a temporary gobo cache."""
    from gobo.assets import dataset_path

    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / dataset_path().name).symlink_to(dataset_path())
    env = dict(os.environ, GOBO_CACHE=str(cache), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    args = ["fqbert", "minilm-l6", "--limit", "16", "--train-limit", "60", "--calib", "8", "--w-method", "rtn", "--json"]
    proc = subprocess.run([sys.executable, "-m", "gobo", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["n_test"] == 16 and r["n_train"] == 60 and r["n_calib"] == 8 and r["model_type"] == "bert"
    assert r["int_sim_agreement"] >= 0.95 and 7.6 < r["size"]["ratio"] < 8.0
    bad = subprocess.run([sys.executable, "-m", "gobo", "fqbert", "minilm-l6", "--a-bits", "9"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.splitlines() == ["gobo: error: --a-bits must be an integer from 4 to 8, got 9"]

"""gobo.dataflow: GOBO's sum-then-multiply dataflow, counted exactly and checked against matmul.

Bound on the real model: the dataflow (float64, exact sums) equals the dense float64
product of the dequantized float32 weights up to the float32 rounding of
``centroid * scale + offset`` in those weights: relative error <= 1e-5 of each layer's output
scale (observed ~1e-7).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import gobo  # noqa: E402
from gobo.dataflow import count_ops, dataflow_linear, trace_model  # noqa: E402
from gobo.qtensor import QuantizedTensor  # noqa: E402

from test_kernels import make_qt  # noqa: E402


def hand_case(stats: bool = False) -> QuantizedTensor:
    """2 x 4 weight, 1 bit: row 0 codes [0, 0, 1, 1]; row 1 codes [0, 0, 0, 1] with (1, 3) an outlier."""
    codes = np.array([[0, 0, 1, 1], [0, 0, 0, 1]])
    return QuantizedTensor.from_codes(
        codes, shape=(2, 4), bits=1, codebook=np.array([[0.5, -2.0]], np.float32), group_rows=2,
        row_scale=np.array([2.0, 0.5], np.float32) if stats else None,
        row_offset=np.array([0.25, -1.0], np.float32) if stats else None,
        outlier_index=np.array([7]), outlier_value=np.array([10.0], np.float32),
    )


def test_counts_by_hand():
    c = count_ops(hand_case(), tokens=3)
    # row 0: buckets {0: 2 inputs, 1: 2 inputs} -> 2 bucket adds, 2 mults, 1 combine add
    # row 1: bucket {0: 3 inputs} (column 3 is the outlier) -> 2 adds, 1 mult, 0 combine, 1 outlier MAC
    assert (c.bucket_adds, c.centroid_mults, c.combine_adds, c.outlier_macs) == (4 * 3, 3 * 3, 1 * 3, 1 * 3)
    assert (c.stat_mults, c.stat_adds) == (0, 0)
    assert c.dense_macs == 8 * 3
    assert c.additions == 5 * 3 and c.multiplications == 3 * 3
    assert c.mult_ratio == pytest.approx((3 + 1) / 8)


def test_counts_by_hand_with_row_stats():
    c = count_ops(hand_case(stats=True), tokens=1)
    # scale: 1 mult per row; offset: (B - 1) adds to sum the buckets + 1 mult + 1 add per row
    assert c.stat_mults == 2 + 2
    assert c.stat_adds == (1 + 1) + (0 + 1)
    assert c.additions == 4 + 1 + 3


def test_counts_empty_buckets_and_all_outlier_row():
    # row 0 uses one centroid only; row 1 is all outliers (no bucket, no stats work)
    codes = np.array([[2, 2, 2], [0, 1, 3]])
    qt = QuantizedTensor.from_codes(
        codes, shape=(2, 3), bits=2, codebook=np.zeros((1, 4), np.float32), group_rows=2,
        row_scale=np.ones(2, np.float16), outlier_index=np.array([3, 4, 5]), outlier_value=np.ones(3, np.float32),
    )
    c = count_ops(qt, tokens=2)
    assert (c.bucket_adds, c.centroid_mults, c.combine_adds, c.outlier_macs, c.stat_mults) == (2 * 2, 1 * 2, 0, 3 * 2, 1 * 2)


@pytest.mark.parametrize("stats", [False, True])
def test_dataflow_values_by_hand(stats):
    qt = hand_case(stats)
    x = np.array([[1.0, 2.0, 3.0, 4.0], [0.0, -1.0, 0.5, 2.0]])
    y, _ = dataflow_linear(x, qt)
    assert np.allclose(y, x @ qt.dequantize().astype(np.float64).T, rtol=1e-12, atol=1e-12)
    if not stats:  # row 0: 0.5 * (1 + 2) - 2 * (3 + 4); row 1: 0.5 * (1 + 2 + 3) + 10 * 4
        assert y[0].tolist() == [0.5 * 3 - 2.0 * 7, 0.5 * 6 + 40.0]


@pytest.mark.parametrize("bits", [1, 3, 6, 8])
def test_dataflow_matches_matmul_random(bits):
    qt = make_qt(37, 50, bits, stats=np.float16, outlier_frac=0.03, group_rows=10)
    x = np.random.default_rng(bits).standard_normal((5, 50))
    y, c = dataflow_linear(torch.from_numpy(x), qt)
    dense = x @ qt.dequantize().astype(np.float64).T
    assert np.abs(y - dense).max() <= 1e-5 * np.abs(dense).max()
    assert c.dense_macs == 37 * 50 * 5
    # every non-outlier weight is an addition into a bucket or a bucket's first input
    assert c.bucket_adds + c.centroid_mults + c.outlier_macs == c.dense_macs


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory):
    cm = gobo.quantize("minilm-l6", gobo.GoboConfig.paper(bits=3))
    out = tmp_path_factory.mktemp("dataflow") / "minilm-paper3"
    gobo.save(cm, out)
    return out


def test_every_layer_of_a_real_model(paper_dir):
    from transformers import AutoTokenizer

    from gobo.data import load_rotten_tomatoes

    _, test = load_rotten_tomatoes()
    tok = AutoTokenizer.from_pretrained(str(paper_dir))
    batch = tok(list(test.stride(3).texts), padding=True, return_tensors="pt")
    model = gobo.load(paper_dir, packed=True)
    report = trace_model(model, batch)
    names = [lr.name for lr in report.layers]
    # q, k, v, attention output, intermediate, output in each of 6 layers, and the pooler
    assert len(names) == 6 * 6 + 1 and names[-1] == "pooler.dense"
    assert report.max_relative_error <= 1e-5
    tokens, sentences = batch["input_ids"].numel(), batch["input_ids"].shape[0]
    assert all(lr.counts.tokens == tokens for lr in report.layers[:-1])
    assert report.layers[-1].counts.tokens == sentences  # the pooler sees the first token only
    total = report.total
    assert total.dense_macs == tokens * 6 * (4 * 384 * 384 + 2 * 384 * 1536) + sentences * 384 * 384
    # 3 bits: at most 8 centroid multiplies per output value
    outputs = tokens * 6 * (5 * 384 + 1536) + sentences * 384
    assert total.multiplications <= 8 * outputs
    assert total.bucket_adds + total.centroid_mults + total.outlier_macs == total.dense_macs

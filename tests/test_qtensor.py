"""QuantizedTensor as a container: the dequantization recipe, serialisation, validation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gobo.packing import pack_codes
from gobo.qtensor import FIELDS, QuantizedTensor


def reference_dequantize(
    shape, codes2d, codebook, group_rows, row_scale=None, row_offset=None, outlier_index=(), outlier_value=()
) -> np.ndarray:
    """The module docstring's recipe, element by element in float32 scalars."""
    rows, cols = codes2d.shape
    v = np.empty((rows, cols), dtype=np.float32)
    for r in range(rows):
        for c in range(cols):
            x = np.float32(codebook[r // group_rows, codes2d[r, c]])
            if row_scale is not None:
                x = np.float32(x * np.float32(row_scale[r]))
            if row_offset is not None:
                x = np.float32(x + np.float32(row_offset[r]))
            v[r, c] = x
    flat = v.reshape(-1)
    for i, val in zip(outlier_index, outlier_value):
        flat[int(i)] = np.float32(val)
    return flat.reshape(shape)


def make_case(
    shape=(5, 7), bits=3, group_rows=2, scale=False, offset=False, n_outliers=4, seed=0, integer_levels=False
) -> tuple[QuantizedTensor, dict]:
    """A hand-built tensor plus the unpacked inputs it was made from."""
    rng = np.random.default_rng(seed)
    rows = shape[0] if shape else 1
    cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
    numel = rows * cols
    k = 1 << bits
    groups = -(-rows // group_rows)
    codes2d = rng.integers(0, k, size=(rows, cols), dtype=np.uint8)
    if integer_levels:  # DirectQ style: levels 0..k-1, scaled and shifted per row
        codebook = np.tile(np.arange(k, dtype=np.float32), (groups, 1))
    else:  # values whose float32 products and sums round, so the order of operations matters
        codebook = np.sort(rng.standard_normal((groups, k)).astype(np.float32) / np.float32(3.0), axis=1)
    row_scale = (rng.random(rows).astype(np.float32) * np.float32(0.1) + np.float32(1e-3)) if scale else None
    row_offset = (rng.standard_normal(rows).astype(np.float32) * np.float32(0.7)) if offset else None
    idx = np.sort(rng.choice(numel, size=min(n_outliers, numel), replace=False)).astype(np.int64)
    val = (rng.standard_normal(idx.size) * 5.0).astype(np.float32)
    qt = QuantizedTensor(
        shape=shape,
        bits=bits,
        codes=pack_codes(codes2d, bits),
        codebook=codebook,
        group_rows=group_rows,
        row_scale=row_scale,
        row_offset=row_offset,
        outlier_index=idx,
        outlier_value=val,
        method="uniform" if integer_levels else "gobo",
    )
    parts = dict(
        codes2d=codes2d,
        codebook=codebook,
        group_rows=group_rows,
        row_scale=row_scale,
        row_offset=row_offset,
        outlier_index=idx,
        outlier_value=val,
    )
    return qt, parts


CASES = {
    "gobo-one-group": dict(shape=(6, 9), bits=3, group_rows=6),
    "gobo-ragged-groups": dict(shape=(5, 7), bits=3, group_rows=2),
    "gobo-3d": dict(shape=(4, 2, 3), bits=2, group_rows=3, n_outliers=3),
    "gobo-1d": dict(shape=(11,), bits=4, group_rows=4, n_outliers=2),
    "scale-only": dict(shape=(3, 8), bits=4, group_rows=1, scale=True),
    "offset-only": dict(shape=(3, 8), bits=1, group_rows=2, offset=True),
    "uniform": dict(shape=(4, 10), bits=4, group_rows=1, scale=True, offset=True, integer_levels=True),
    "uniform-8bit": dict(shape=(3, 5), bits=8, group_rows=3, scale=True, offset=True, integer_levels=True),
    "no-outliers": dict(shape=(4, 6), bits=5, group_rows=2, scale=True, n_outliers=0),
    "every-element-an-outlier": dict(shape=(2, 3), bits=2, group_rows=1, n_outliers=6),
}


# ---------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("name", CASES)
def test_dequantize_follows_the_recipe_bit_exactly(name: str) -> None:
    qt, p = make_case(**CASES[name], seed=list(CASES).index(name))
    got = qt.dequantize()
    want = reference_dequantize(qt.shape, **p)
    assert got.dtype == np.float32
    assert got.shape == qt.shape
    assert np.array_equal(got, want)


def _one_row(code: int, centroid: float, scale: float, offset: float) -> QuantizedTensor:
    return QuantizedTensor(
        shape=(1, 1),
        bits=1,
        codes=pack_codes(np.array([code]), 1),
        codebook=np.array([[0.0, centroid]], dtype=np.float32),
        group_rows=1,
        row_scale=np.array([scale], dtype=np.float32),
        row_offset=np.array([offset], dtype=np.float32),
    )


def test_recipe_scales_before_it_shifts() -> None:
    assert _one_row(1, 1.0, 3.0, 2.0).dequantize().item() == 5.0  # not (1 + 2) * 3
    assert _one_row(0, 1.0, 3.0, 2.0).dequantize().item() == 2.0


def test_recipe_rounds_to_float32_after_each_step() -> None:
    # (1 + 2**-23)**2 rounds to 1 + 2**-22 in float32; adding 2**-24 is then a tie that
    # rounds to even. One float64 multiply-add rounded once would give 1 + 3 * 2**-23.
    got = _one_row(1, 1 + 2**-23, 1 + 2**-23, 2**-24).dequantize().item()
    assert got == 1 + 2**-22


def test_outliers_overwrite_flat_positions() -> None:
    qt = QuantizedTensor(
        shape=(2, 2, 2),
        bits=1,
        codes=pack_codes(np.zeros(8, dtype=np.uint8), 1),
        codebook=np.array([[0.5, -0.5]], dtype=np.float32),
        group_rows=2,
        outlier_index=np.array([0, 5, 7]),
        outlier_value=np.array([10.0, 20.0, 30.0], dtype=np.float32),
    )
    w = qt.dequantize()
    assert w[0, 0, 0] == 10.0 and w[1, 0, 1] == 20.0 and w[1, 1, 1] == 30.0
    assert np.count_nonzero(w == 0.5) == 5


def test_dequantize_leaves_the_fields_alone() -> None:
    qt, _ = make_case(**CASES["uniform"])
    before = {k: v.copy() for k, v in qt.to_tensors().items()}
    qt.dequantize()
    qt.dequantize()[...] = 0.0
    for k, v in qt.to_tensors().items():
        assert np.array_equal(v, before[k]), k


def test_unpacked_codes_and_sizes() -> None:
    qt, p = make_case(**CASES["gobo-3d"])
    assert (qt.rows, qt.cols, qt.numel) == (4, 6, 24)
    assert np.array_equal(qt.unpacked_codes(), p["codes2d"])
    # 6 bytes of 2-bit codes, 2 groups x 4 centroids float32, 3 outliers (int32 + float32)
    assert qt.nbytes() == 6 + 2 * 4 * 4 + 3 * (4 + 4)
    assert qt.bits_per_weight() == pytest.approx(8.0 * qt.nbytes() / 24)


# ---------------------------------------------------------------------- serialisation
def through_a_file(qt: QuantizedTensor) -> tuple[dict, dict[str, np.ndarray]]:
    """What a writer and a reader would exchange: JSON metadata and fresh array copies."""
    meta = json.loads(json.dumps(qt.meta()))
    tensors = {k: np.array(v, copy=True) for k, v in qt.to_tensors().items()}
    return meta, tensors


@pytest.mark.parametrize("name", CASES)
def test_round_trip_through_tensors(name: str) -> None:
    qt, _ = make_case(**CASES[name], seed=7)
    meta, tensors = through_a_file(qt)
    assert list(tensors) == [f for f in FIELDS if f in tensors]  # file order
    back = QuantizedTensor.from_tensors(meta, tensors)
    assert np.array_equal(back.dequantize(), qt.dequantize())
    assert (back.shape, back.bits, back.group_rows, back.method) == (qt.shape, qt.bits, qt.group_rows, qt.method)
    assert back.outlier_index.dtype == np.int64
    assert np.array_equal(back.outlier_index, qt.outlier_index)


def test_to_tensors_leaves_out_absent_fields() -> None:
    qt, _ = make_case(shape=(3, 4), bits=2, group_rows=3, n_outliers=0)
    assert set(qt.to_tensors()) == {"codes", "codebook"}
    qt, _ = make_case(shape=(3, 4), bits=2, group_rows=3, scale=True, offset=True, n_outliers=2)
    t = qt.to_tensors()
    assert set(t) == set(FIELDS) - {"col_scale", "code_freq"}  # those two are a grid tensor's (test_grid.py)
    assert t["outlier_index"].dtype == np.int32  # small tensors store int32 positions


# ---------------------------------------------------------------------- validation
def good_parts() -> tuple[dict, dict[str, np.ndarray]]:
    qt, _ = make_case(shape=(5, 7), bits=3, group_rows=2, scale=True, offset=True, n_outliers=4)
    return through_a_file(qt)


def _replace(key, value):
    def edit(meta, tensors):
        tensors[key] = value(tensors[key]) if callable(value) else value

    return edit


BAD = {
    "codes one byte short": _replace("codes", lambda a: a[:-1]),
    "codes one byte long": _replace("codes", lambda a: np.concatenate([a, a[:1]])),
    "codes not uint8": _replace("codes", lambda a: a.astype(np.int16)),
    "codes 2-D": _replace("codes", lambda a: a.reshape(1, -1)),
    "codebook too few centroids": _replace("codebook", lambda a: a[:, :-1]),
    "codebook one group short": _replace("codebook", lambda a: a[:-1]),
    "codebook one group too many": _replace("codebook", lambda a: np.concatenate([a, a[:1]])),
    "codebook float64": _replace("codebook", lambda a: a.astype(np.float64)),
    "codebook 1-D": _replace("codebook", lambda a: a.reshape(-1)),
    "row_scale wrong length": _replace("row_scale", lambda a: a[:-1]),
    "row_offset float64": _replace("row_offset", lambda a: a.astype(np.float64)),
    "outliers unsorted": _replace("outlier_index", lambda a: a[::-1].copy()),
    "outliers repeated": _replace("outlier_index", lambda a: np.array([a[0], a[0], a[2], a[3]], a.dtype)),
    "outlier past the end": _replace("outlier_index", lambda a: np.array([1, 2, 3, 35], a.dtype)),
    "outlier negative": _replace("outlier_index", lambda a: np.array([-1, 2, 3, 4], a.dtype)),
    "outlier values short": _replace("outlier_value", lambda a: a[:-1]),
    "outlier values float64": _replace("outlier_value", lambda a: a.astype(np.float64)),
    "outlier values without positions": lambda meta, tensors: tensors.pop("outlier_index"),
    "outlier positions without values": lambda meta, tensors: tensors.pop("outlier_value"),
    "missing codebook": lambda meta, tensors: tensors.pop("codebook"),
    "missing codes": lambda meta, tensors: tensors.pop("codes"),
    "unexpected field": _replace("zero_point", np.zeros(5, np.float32)),
    "bits 0": lambda meta, tensors: meta.update(bits=0),
    "bits 9": lambda meta, tensors: meta.update(bits=9),
    "bits disagree with codes": lambda meta, tensors: meta.update(bits=4),
    "shape disagrees with codes": lambda meta, tensors: meta.update(shape=[5, 8]),
    "group_rows 0": lambda meta, tensors: meta.update(group_rows=0),
    "group_rows disagrees with codebook": lambda meta, tensors: meta.update(group_rows=5),
}


def test_good_parts_load() -> None:
    meta, tensors = good_parts()
    QuantizedTensor.from_tensors(meta, tensors).validate()


@pytest.mark.parametrize("what", BAD)
def test_from_tensors_rejects(what: str) -> None:
    meta, tensors = good_parts()
    BAD[what](meta, tensors)
    with pytest.raises(ValueError):
        QuantizedTensor.from_tensors(meta, tensors)


@pytest.mark.parametrize(
    "field, value",
    [
        ("codes", np.zeros(3, np.uint8)),
        ("codebook", np.zeros((3, 4), np.float32)),
        ("outlier_index", np.array([3, 1, 2, 0], np.int64)),
        ("outlier_index", np.array([0, 1, 2, 35], np.int64)),
        ("row_scale", np.ones(4, np.float32)),
        ("bits", 2),
    ],
)
def test_validate_catches_a_field_changed_after_construction(field: str, value) -> None:
    qt, _ = make_case(shape=(5, 7), bits=3, group_rows=2, scale=True, n_outliers=4)
    setattr(qt, field, value)
    with pytest.raises(ValueError):
        qt.validate()


def test_constructor_validates() -> None:
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor(
            shape=(2, 4), bits=2, codes=np.zeros(3, np.uint8), codebook=np.zeros((1, 4), np.float32), group_rows=2
        )

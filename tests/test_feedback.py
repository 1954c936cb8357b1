"""Per-row codebooks and error feedback (``codebook="row"``, ``feedback=...``), on real MiniLM
weights and real critic snippets."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import gobo
from gobo import feedback
from gobo.config import GoboConfig, config_from_json, config_to_json
from gobo.io import WEIGHTS_FILE
from gobo.methods.gobo import Prepared, assign, assign_rows, cluster_rows, cluster_sorted, gaussian_outlier_mask

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
    return feedback.input_moments(minilm_fp32, ids, mask, [name])[name]


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


def test_config_fields_round_trip_and_refuse_bad_values():
    cfg = GoboConfig(allocate="uniform", codebook="row", feedback="texts", feedback_texts=64, feedback_sha256="ab" * 32)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    assert "codebook" not in config_to_json(GoboConfig())["data"]  # files without these fields keep their bytes
    for bad in [dict(codebook="row"), dict(codebook="col", allocate="uniform"), dict(feedback="real"),
                dict(feedback="texts", normalize_rows=True), dict(feedback="texts", feedback_texts=0)]:
        with pytest.raises(ValueError):
            GoboConfig(**bad)


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
    (tmp_path / "empty.txt").write_text("\n \n")
    for extra, msg in [(["--calibration-texts", str(texts)], "need --feedback"),
                       (["--feedback", "synthetic", "--calibration-texts", str(texts)], "needs --feedback texts"),
                       (["--feedback", "texts", "--calibration-texts", str(tmp_path / "empty.txt")], "holds no text"),
                       (["--feedback", "texts", "--calibration-texts", str(tmp_path / "nope.txt")], "cannot read"),
                       (["--codebook", "row", "--method", "directq"], "apply to --method gobo"),
                       (["--codebook", "row", "--allocate", "size"], "codebook='row' needs allocate='uniform'")]:
        assert main(["quantize", "minilm-l6", "-o", str(tmp_path / "x"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("gobo: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()

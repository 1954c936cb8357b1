"""gobo compare: rows made and measured in one run, stored, reused, and printed as a table."""

from __future__ import annotations

import json

import pytest

import gobo
from gobo.compare import COMPARE_JSON, COMPARE_MD, default_rows, markdown, run_compare, select_rows
from gobo.io import WEIGHTS_FILE

from test_cli import assert_user_error, run_gobo

N_TEST, N_TRAIN = 150, 400


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    rows = select_rows(default_rows(qat=False), ["directq-3", "qbert-3", "gobo-3", "gobo-mp-2.5"])
    return out, rows, run_compare("minilm-l6", out, rows, limit=N_TEST, train_limit=N_TRAIN)


def test_default_rows_are_the_papers_table():
    keys = [r.key for r in default_rows()]
    assert keys[0] == "fp32"
    for k in ["directq-8", "directq-4", "directq-3", "directq-2", "qbert-8", "qbert-4", "qbert-3", "qbert-2", "qbert-2-3mp",
              "qbert-2-4mp", "qbert-3-qat", "qbert-2-3mp-qat", "qbert-2-4mp-qat", "fqbert-w4a8", "gobo-paper-3", "gobo-4", "gobo-3",
              "gobo-2", "gobo-mp-2.5"]:
        assert k in keys
    assert len(set(keys)) == len(keys)
    assert not any(r.kind == "qat" for r in default_rows(qat=False))
    by = {r.key: r for r in default_rows()}
    assert not by["gobo-3"].data and not by["gobo-3"].finetune and by["qbert-3-qat"].finetune and by["qbert-2-3mp"].data


def test_select_rows_keeps_fp32_and_rejects_unknown_patterns():
    assert [r.key for r in select_rows(default_rows(), ["gobo-3"])] == ["fp32", "gobo-3"]
    with pytest.raises(ValueError, match="no row matches 'nope'"):
        select_rows(default_rows(), ["nope"])


def test_table_rows_sizes_and_ranking(table):
    out, rows, doc = table
    got = {r["key"]: r for r in doc["rows"]}
    assert list(got) == [r.key for r in rows]
    assert doc["n_test"] == N_TEST and doc["n_train"] == N_TRAIN
    fp = got["fp32"]
    assert fp["agreement"] == 1.0 and fp["ratio"] == 1.0 and fp["size_total"] > 9e7  # 90.85 MB
    for key in ["directq-3", "qbert-3", "gobo-3", "gobo-mp-2.5"]:
        r = got[key]
        assert r["size_total"] == (out / key / WEIGHTS_FILE).stat().st_size  # the file itself
        assert 0 < r["size_without_embeddings"] < r["size_total"]
        assert r["ratio"] == pytest.approx(fp["size_total"] / r["size_total"], rel=0.01)
        assert not r["finetune"] and not r["data"]
    assert got["qbert-3"]["embedding_bits"] == "8" and got["qbert-3"]["weight_bits"] == "3"
    assert got["directq-3"]["embedding_bits"] == "3"
    # data-free GOBO at 3 bits against the uniform methods at 3 bits (measured on 150 texts:
    # agreement 92.7 vs 68.0 and 66.0)
    assert got["gobo-3"]["agreement"] >= got["qbert-3"]["agreement"] + 0.1
    assert got["gobo-3"]["agreement"] >= got["directq-3"]["agreement"] + 0.1
    assert got["gobo-3"]["size_total"] < got["qbert-3"]["size_total"]
    assert got["gobo-mp-2.5"]["size_total"] < got["gobo-3"]["size_total"]


def test_outputs_written_and_rows_reused(table):
    out, rows, doc = table
    assert json.loads((out / COMPARE_JSON).read_text()) == doc
    md = (out / COMPARE_MD).read_text()
    assert md == markdown(doc)
    for r in doc["rows"]:
        assert f"| {r['label']} |" in md
    assert (out / "compare.png").stat().st_size > 10_000
    before = {k: (out / k / WEIGHTS_FILE).stat().st_mtime_ns for k in ["directq-3", "gobo-3"]}
    again = run_compare("minilm-l6", out, rows, limit=N_TEST, train_limit=N_TRAIN)
    assert again == doc
    assert before == {k: (out / k / WEIGHTS_FILE).stat().st_mtime_ns for k in before}  # nothing made twice


def test_cli_unknown_row_is_one_line(tmp_path):
    proc = run_gobo("compare", "minilm-l6", "--rows", "qbert-9", "-o", tmp_path / "c", cwd=tmp_path)
    assert_user_error(proc, r"no row matches 'qbert-9'")
    assert not (tmp_path / "c").exists()


def test_hessian_settings_reach_the_mixed_rows(tmp_path, monkeypatch):
    import numpy as np

    import gobo.hessian as hessian
    from gobo.hessian import Sensitivity, SensitivitySettings

    seen = []
    omega = np.array([[1.0, 2.0, 9.0, 3.0, 8.0, 7.0]])  # layers 2, 4, 5 rank highest

    def fake(model_dir, model=None, settings=SensitivitySettings(), progress=None, use_cache=True):
        seen.append(settings)
        return Sensitivity(layers=tuple(f"encoder.layer.{i}" for i in range(6)), eigenvalues=omega, iterations=np.ones((1, 6), int))

    monkeypatch.setattr(hessian, "measure_sensitivity", fake)
    small = SensitivitySettings(subsets=2, subset_size=8)
    rows = select_rows(default_rows(qat=False), ["qbert-2-3mp"])
    doc = run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, hessian=small)
    assert seen == [small]
    cfg = gobo.load_compressed(tmp_path / "qbert-2-3mp").config
    assert cfg.layer_bits == (2, 2, 3, 2, 3, 3)
    stored = json.loads((tmp_path / "rows" / "qbert-2-3mp.json").read_text())
    assert stored["fingerprint"]["hessian"]["subset_size"] == 8
    # the same settings reuse the row; other settings make it again
    assert run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, hessian=small) == doc and len(seen) == 1
    run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, hessian=SensitivitySettings(subsets=2, subset_size=9))
    assert len(seen) == 2


def test_cli_bad_hessian_sample_is_one_line(tmp_path):
    proc = run_gobo("compare", "minilm-l6", "--rows", "qbert-2-3mp", "--hessian-texts", "0", "-o", tmp_path / "c", cwd=tmp_path)
    assert_user_error(proc, r"subset_size must be a positive integer")
    assert not (tmp_path / "c").exists()


def test_qat_schedule_reaches_the_fine_tuned_rows(tmp_path):
    from gobo.qat import QatSettings

    tiny = QatSettings(texts=32, monitor_texts=8)  # one step of the real fine-tuning
    rows = select_rows(default_rows(), ["qbert-8-qat"])
    doc = run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, qat_settings=tiny)
    stored = json.loads((tmp_path / "rows" / "qbert-8-qat.json").read_text())
    assert stored["fingerprint"]["qat"]["texts"] == 32
    row = next(r for r in doc["rows"] if r["key"] == "qbert-8-qat")
    assert row["finetune"] and row["agreement"] > 0.8  # 8 bits and one small step stay close to FP32
    # the same schedule reuses the row
    assert run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, qat_settings=tiny) == doc


def test_cli_bad_qat_texts_is_one_line(tmp_path):
    proc = run_gobo("compare", "minilm-l6", "--rows", "qbert-8-qat", "--qat-texts", "0", "-o", tmp_path / "c", cwd=tmp_path)
    assert_user_error(proc, r"--qat-texts: texts must be a positive integer")
    assert not (tmp_path / "c").exists()

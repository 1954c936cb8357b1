"""GOBO mixed precision weighted by Q-BERT's per-layer Hessian sensitivity (``allocate="hessian"``).

Real MiniLM weights for the allocation (session fixtures in conftest.py); the Hessian
measurement itself is tested in test_qbert.py, here it is replaced by a fixed one where the
model runs end to end (a real one on MiniLM takes minutes on a busy 2-core machine).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import gobo
from gobo.config import GoboConfig, QBertConfig, config_from_json, config_to_json
from gobo.hessian import Sensitivity, SensitivitySettings, layer_prefixes, needs_plan, resolve_gobo, rounded_omega
from gobo.quantizer import layer_gains, quantize_state, select

#: a layer slice of MiniLM and one tensor outside every layer (cheap to quantize, ~1 s)
SLICE = (["encoder.layer.[012].*", "embeddings.position_embeddings.weight"], ["*bias", "*LayerNorm*"])
OMEGA = np.array([[16.17534, 23.23111, 30.98349, 56.60712, 98.90234, 79.72389]])  # 6 MiniLM layers, noisy digits


def _fake_measure(seen: list):
    def fake(model_dir, model=None, settings=SensitivitySettings(), progress=None, use_cache=True):
        seen.append(settings)
        return Sensitivity(layers=tuple(f"encoder.layer.{i}" for i in range(6)), eigenvalues=OMEGA, iterations=np.ones((1, 6), int))

    return fake


def _mean_bits(cm, prefix: str) -> float:
    qs = [q for n, q in cm.quantized.items() if n.startswith(prefix)]
    return sum(q.bits * q.numel for q in qs) / sum(q.numel for q in qs)


# ---------------------------------------------------------------------------- config


def test_layer_omega_round_trips_and_old_files_keep_their_bytes():
    cfg = GoboConfig(average=2.5, allocate="hessian", layer_omega=[16.2, 23, 31.0, 56.6, 98.9, 79.7])
    assert cfg.layer_omega == (16.2, 23.0, 31.0, 56.6, 98.9, 79.7) and isinstance(cfg.layer_omega, tuple)
    doc = json.loads(json.dumps(config_to_json(cfg)))
    assert doc["data"]["layer_omega"] == [16.2, 23.0, 31.0, 56.6, 98.9, 79.7]
    assert config_from_json(doc) == cfg
    assert "layer_omega" not in config_to_json(GoboConfig())["data"]  # files made before it keep their bytes
    assert "layer_omega" not in config_to_json(GoboConfig(allocate="hessian"))["data"]
    old = config_to_json(GoboConfig(average=2.5))
    del old["data"]["average"]
    assert config_from_json(old).layer_omega == ()


@pytest.mark.parametrize("kw, match", [
    ({"allocate": "hessian", "layer_omega": (1.0, -2.0)}, "finite positive"),
    ({"allocate": "hessian", "layer_omega": (1.0, 0.0)}, "finite positive"),
    ({"allocate": "hessian", "layer_omega": (math.nan,)}, "finite positive"),
    ({"allocate": "hessian", "layer_omega": (math.inf,)}, "finite positive"),
    ({"allocate": "hessian", "layer_omega": (True,)}, "finite positive"),
    ({"allocate": "hessian", "layer_omega": "1.0"}, "finite positive"),
    ({"layer_omega": (1.0, 2.0)}, "only applies with allocate='hessian'"),
    ({"allocate": "fisher"}, "'sensitivity' or 'hessian'"),
])
def test_bad_layer_omega_or_allocate_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        GoboConfig(**kw)


def test_needs_plan_and_rounding():
    assert needs_plan(GoboConfig(allocate="hessian"))
    assert not needs_plan(GoboConfig(allocate="hessian", layer_omega=(1.0, 2.0)))
    assert not needs_plan(GoboConfig()) and not needs_plan(GoboConfig(allocate="sensitivity"))
    assert needs_plan(QBertConfig(mixed="2/3")) and not needs_plan(QBertConfig())
    assert rounded_omega(OMEGA[0]) == (16.2, 23.2, 31.0, 56.6, 98.9, 79.7)
    assert rounded_omega(OMEGA[0] * (1 + 1e-9)) == rounded_omega(OMEGA[0])  # float noise cannot change the plan
    assert rounded_omega([0.0]) == (1e-12,)  # still a valid layer_omega
    cfg = GoboConfig(allocate="size")
    assert resolve_gobo(cfg, None, "unused") is cfg  # nothing to measure


# ---------------------------------------------------------------------------- allocation


def test_layer_gains_follow_the_model_layer_prefixes(minilm_state):
    assert layer_prefixes(minilm_state) == [f"encoder.layer.{i}" for i in range(6)]
    names = select(minilm_state, *SLICE)
    gains = layer_gains(minilm_state.keys(), names, (1.0, 2.0, 3.0, 4.0, 5.0, 15.0))  # mean 5
    assert gains["embeddings.position_embeddings.weight"] == 1.0
    assert gains["encoder.layer.0.attention.self.query.weight"] == pytest.approx(0.2)
    assert gains["encoder.layer.2.output.dense.weight"] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="layer_omega has 2 entries but the model has 6 encoder layers"):
        layer_gains(minilm_state.keys(), names, (1.0, 2.0))


def test_hessian_allocation_gives_the_sensitive_layer_the_bits_within_budget(minilm_state):
    names = select(minilm_state, *SLICE)
    omega = (1.0, 20.0, 1.0, 1.0, 1.0, 1.0)  # layer 1 far more sensitive than the others
    cm = quantize_state(minilm_state, names, GoboConfig(average=2.5, allocate="hessian", layer_omega=omega))
    size = quantize_state(minilm_state, names, GoboConfig(average=2.5))
    numel = sum(q.numel for q in cm.quantized.values())
    all_in = 8 * sum(q.nbytes() for q in cm.quantized.values()) / numel
    assert 2.4 <= all_in <= 2.5  # the all-in budget holds (measured 2.474)
    hot = _mean_bits(cm, "encoder.layer.1.")
    for other in ("encoder.layer.0.", "encoder.layer.2.", "embeddings."):
        assert hot >= _mean_bits(cm, other)
    assert hot > _mean_bits(size, "encoder.layer.1.")  # measured 2.83 against 2.33 with the size rule
    assert config_from_json(json.loads(json.dumps(config_to_json(cm.config)))) == cm.config


def test_hessian_allocation_without_layer_omega_raises(minilm_state):
    names = select(minilm_state, *SLICE)
    with pytest.raises(ValueError, match="allocate='hessian' needs layer_omega"):
        quantize_state(minilm_state, names, GoboConfig(average=2.5, allocate="hessian"))
    with pytest.raises(ValueError, match="layer_omega has 3 entries but the model has 6"):
        quantize_state(minilm_state, names, GoboConfig(average=2.5, allocate="hessian", layer_omega=(1.0, 2.0, 3.0)))


# ---------------------------------------------------------------------------- API, CLI, compare


def test_quantize_measures_and_records_layer_omega(tmp_path, monkeypatch):
    import gobo.hessian as hessian

    seen: list = []
    monkeypatch.setattr(hessian, "measure_sensitivity", _fake_measure(seen))
    tiny = SensitivitySettings(subsets=1, subset_size=4, max_tokens=16, iters=2)
    cm = gobo.quantize("minilm-l6", GoboConfig(average=2.5, allocate="hessian"), hessian_settings=tiny,
                       include=SLICE[0], exclude=SLICE[1])
    assert seen == [tiny]
    assert cm.config == GoboConfig(average=2.5, allocate="hessian", layer_omega=(16.2, 23.2, 31.0, 56.6, 98.9, 79.7))
    gobo.save(cm, tmp_path / "m")
    assert gobo.load_compressed(tmp_path / "m").config == cm.config  # the plan can be rebuilt from the file
    again = gobo.quantize("minilm-l6", cm.config, include=SLICE[0], exclude=SLICE[1])  # layer_omega given: no measuring
    assert len(seen) == 1 and {n: q.bits for n, q in again.quantized.items()} == {n: q.bits for n, q in cm.quantized.items()}


def test_cli_allocate(tmp_path, monkeypatch, capsys):
    import gobo.hessian as hessian
    from gobo.cli import main

    monkeypatch.setattr(hessian, "measure_sensitivity", _fake_measure([]))
    args = ["quantize", "minilm-l6", "-o", str(tmp_path / "h"), "--avg-bits", "2.5", "--allocate", "hessian", "--include",
            "encoder.layer.0.*", "--exclude", "*bias", "--exclude", "*LayerNorm*", "--json", "-q"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)["config"]["data"]
    assert data["allocate"] == "hessian" and data["layer_omega"] == [16.2, 23.2, 31.0, 56.6, 98.9, 79.7]
    for extra, msg in [(["--allocate", "fisher"], "invalid choice: 'fisher'"),
                       (["--allocate", "hessian", "--method", "directq"], "--allocate applies to --method gobo, gobo-grid or gobo-grid-fast only"),
                       (["--allocate", "uniform", "--avg-bits", "2.5"], "average needs a mixed allocation")]:
        try:
            rc = main(["quantize", "minilm-l6", "-o", str(tmp_path / "x"), *extra])
        except SystemExit as exc:  # argparse's own errors exit from the parser
            rc = exc.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("gobo: error: ") and msg in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_compare_hessian_row_gets_the_hessian_settings(tmp_path, monkeypatch):
    import gobo.hessian as hessian
    from gobo.compare import default_rows, run_compare, select_rows

    by = {r.key: r for r in default_rows()}
    keys = list(by)
    assert keys[keys.index("gobo-mp-2.5") + 1] == "gobo-mp-2.5-hessian"
    row = by["gobo-mp-2.5-hessian"]
    assert row.label == "GOBO MP 2.5 (Hessian)" and row.data and not row.finetune
    assert row.config == GoboConfig(average=2.5, allocate="hessian") and not by["gobo-mp-2.5"].data

    seen: list = []
    monkeypatch.setattr(hessian, "measure_sensitivity", _fake_measure(seen))
    small = SensitivitySettings(subsets=2, subset_size=8)
    rows = select_rows(default_rows(qat=False), ["gobo-mp-2.5-hessian"])
    doc = run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, hessian=small)
    assert seen == [small]
    assert gobo.load_compressed(tmp_path / "gobo-mp-2.5-hessian").config.layer_omega == (16.2, 23.2, 31.0, 56.6, 98.9, 79.7)
    stored = json.loads((tmp_path / "rows" / "gobo-mp-2.5-hessian.json").read_text())
    assert stored["fingerprint"]["hessian"]["subset_size"] == 8 and stored["result"]["data"]
    assert run_compare("minilm-l6", tmp_path, rows, limit=40, train_limit=200, hessian=small) == doc and len(seen) == 1

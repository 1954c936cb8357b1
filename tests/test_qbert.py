"""Q-BERT: group-wise uniform quantization, Hessian sensitivity, mixed precision, QAT.

Real MiniLM weights for the quantizer (session fixtures in conftest.py); tiny BERTs built
from a transformers config for everything that runs the network (Hessians, fine-tuning).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import gobo
from gobo.config import DirectQConfig, QBertConfig, config_from_json, config_to_json
from gobo.evaluate import Probe
from gobo.hessian import Sensitivity, SensitivitySettings, layer_weights, probe_loss, sensitivity, top_eigenvalue
from gobo.io import read_compressed, write_compressed
from gobo.methods.groupwise import fit, group_rows_for, mixed_plan, plan, row_levels
from gobo.quantizer import quantize_state

LAYER = "encoder.layer.{}.{}.weight"
MATRICES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense", "intermediate.dense", "output.dense")
HEAD = 32  # all-MiniLM-L6-v2: 12 heads of 32 rows


def _tiny_bert(**kw):
    import transformers

    cfg = dict(vocab_size=60, hidden_size=4, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8, max_position_embeddings=32)
    cfg.update(kw)
    torch.manual_seed(0)
    return transformers.BertModel(transformers.BertConfig(**cfg), add_pooling_layer=False).eval()


@pytest.fixture
def one_thread():
    """Tiny networks run on one thread: on a busy machine, thread hand-offs cost more than the maths."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, minilm_dir):
    """A tiny BERT directory (hidden 32, 2 layers, 4 heads) with MiniLM's tokenizer."""
    d = tmp_path_factory.mktemp("qbert-tiny") / "bert"
    _tiny_bert(vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64, max_position_embeddings=128).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copyfile(minilm_dir / f, d / f)
    return d


# ---------------------------------------------------------------------------- group-wise quantizer


def test_groupwise_beats_single_range_directq_on_minilm(minilm_state):
    """Q-BERT's point: one range per matrix (DirectQ) wastes the levels on a few outliers."""
    names = [LAYER.format(i, m) for i in (0, 3, 5) for m in MATRICES]
    dq = quantize_state(minilm_state, names, DirectQConfig(3, granularity="tensor"))
    qb = quantize_state(minilm_state, names, QBertConfig(3, head_size=HEAD))
    gain = {n: qb.stats[n].sqnr_db - dq.stats[n].sqnr_db for n in names}
    # measured: +1.1 dB at least (layer 5 intermediate), +27.8 dB on layer 0's output matrix,
    # whose few huge weights leave DirectQ at -22 dB
    assert min(gain.values()) > 1.0, gain
    assert qb.stats[LAYER.format(0, "output.dense")].sqnr_db > 5.0
    assert np.mean([qb.stats[n].sqnr_db for n in names]) > np.mean([dq.stats[n].sqnr_db for n in names]) + 5.0


def test_groups_land_on_head_boundaries(minilm_state):
    name = LAYER.format(2, "attention.self.query")
    w = minilm_state[name]  # (384, 384): 12 heads of 32 rows
    for groups, rows in ((128, 2), (12, 32), (5, 64), (384, 1), (1000, 1)):
        assert group_rows_for(384, groups, HEAD) == rows
        assert HEAD % rows == 0 or rows % HEAD == 0
    assert group_rows_for(384, 128) == 3  # without heads: plain buckets of 3 rows
    # a head scaled up changes the levels of its own rows and nothing else
    louder = w.copy()
    louder[3 * HEAD : 4 * HEAD] *= 50.0
    a, b = fit(w, 3, 2), fit(louder, 3, 2)
    changed = np.flatnonzero(np.any(row_levels(a) != row_levels(b), axis=1))
    assert changed.tolist() == list(range(3 * HEAD, 4 * HEAD))
    # the rows of a group share its levels; its symmetric range is its own max |w|
    levels = row_levels(a)  # (384, 8)
    assert np.array_equal(levels[0::2], levels[1::2]) and len(np.unique(levels[:, -1])) == 192
    np.testing.assert_allclose(levels[0::2, -1], np.abs(w).reshape(192, 2 * 384).max(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(levels[:, 4], 0.0)  # zero is a level


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_level_storage_does_not_change_values(minilm_state, bits):
    """Levels as group codebooks or as per-row step and offset: the same float32 values, the smaller file."""
    w = minilm_state[LAYER.format(1, "intermediate.dense")]  # (1536, 384), 12-row groups
    groups, rows = fit(w, bits, 12, storage="groups"), fit(w, bits, 12, storage="rows")
    assert groups.codebook.shape == (128, 2**bits) and rows.row_scale.dtype == np.float32
    assert np.array_equal(groups.dequantize(), rows.dequantize())
    auto = fit(w, bits, 12)
    assert auto.nbytes() == min(groups.nbytes(), rows.nbytes())


def test_plan_per_tensor(minilm_state):
    names = ["embeddings.word_embeddings.weight", LAYER.format(0, "attention.self.key"), LAYER.format(0, "attention.output.dense"),
             LAYER.format(5, "intermediate.dense"), "pooler.dense.weight"]
    shapes = {n: minilm_state[n].shape for n in names}
    got = plan(shapes, QBertConfig(bits=3, layer_bits=(2, 2, 2, 2, 2, 4), head_size=HEAD))
    assert got == {
        "embeddings.word_embeddings.weight": (8, 238),  # 30522 rows, >= 128 groups
        LAYER.format(0, "attention.self.key"): (2, 2),  # per head, 16 buckets of 2 rows
        LAYER.format(0, "attention.output.dense"): (2, 3),  # heads are its columns: row buckets
        LAYER.format(5, "intermediate.dense"): (4, 12),
        "pooler.dense.weight": (3, 3),  # outside the layers: `bits`
    }
    with pytest.raises(ValueError, match="layer_bits gives 2 layers but the model has 6"):
        plan(shapes, QBertConfig(layer_bits=(3, 3)))
    with pytest.raises(ValueError, match="needs its per-layer plan"):
        plan(shapes, QBertConfig(mixed="2/3"))


def test_directq_tensor_granularity_is_one_range(minilm_state):
    w = minilm_state[LAYER.format(1, "attention.self.value")]
    qt = quantize_state({"w": w}, ["w"], DirectQConfig(4, granularity="tensor")).quantized["w"]
    assert qt.codebook.shape == (1, 16) and qt.row_scale is None and qt.method == "directq"
    np.testing.assert_allclose(qt.codebook[0, [0, -1]], [w.min(), w.max()], rtol=1e-6)
    assert np.max(np.abs(qt.dequantize() - w)) <= (w.max() - w.min()) / 15 / 2 * (1 + 1e-5)


def test_configs_validate_and_round_trip():
    cfg = QBertConfig(bits=2, layer_bits=[2, 3, 3, 2], mixed="2/3", average=2.5, groups=64, symmetric=False, head_size=64)
    assert cfg.layer_bits == (2, 3, 3, 2)
    assert config_from_json(json.loads(json.dumps(config_to_json(cfg)))) == cfg
    assert gobo.method_config("qbert", 4) == QBertConfig(bits=4)
    old = {"type": "directq", "version": 1, "data": {"bits": 3}}  # written before granularity existed
    assert config_from_json(old) == DirectQConfig(3, granularity="row")
    assert config_to_json(DirectQConfig(3)) == old  # the default still writes the same header
    assert config_from_json(config_to_json(DirectQConfig(3, granularity="tensor"))).granularity == "tensor"
    bad = [
        (dict(bits=9), "bits must be an integer from 1 to 8"),
        (dict(layer_bits=(3, 0)), "every entry of layer_bits"),
        (dict(groups=0), "groups must be a positive integer"),
        (dict(mixed="3"), "mixed must look like '2/3'"),
        (dict(mixed="4/2"), "LOW < HIGH"),
        (dict(mixed="2/3", average=3.5), r"average \(3.5\) must lie between 2 and 3"),
        (dict(mixed="2/3", layer_bits=(2, 4)), "may only hold 2 or 3"),
        (dict(average=2.5), "average only applies with mixed"),
        (dict(head_size=-1), "head_size must be a non-negative integer"),
    ]
    for kw, msg in bad:
        with pytest.raises(ValueError, match=msg):
            QBertConfig(**kw)
    with pytest.raises(ValueError, match="granularity must be 'row' or 'tensor'"):
        DirectQConfig(3, granularity="group")


def test_save_load_round_trip_bit_exact(minilm_state, tmp_path):
    names = [n for n in minilm_state if n.endswith(".weight") and (".layer." in n or "word_embeddings" in n) and minilm_state[n].ndim == 2]
    cfg = QBertConfig(layer_bits=(2, 3, 4, 2, 3, 4), mixed="", head_size=HEAD)
    cm = quantize_state(minilm_state, names, cfg)
    write_compressed(cm, tmp_path / "m")
    back = read_compressed(tmp_path / "m")
    assert back.config == cfg and set(back.quantized) == set(names)
    for n in names:
        a, b = cm.quantized[n], back.quantized[n]
        assert a.meta() == b.meta() and a.bits == (cfg.layer_bits[int(n.split(".")[2])] if n.startswith("encoder") else 8)
        for field, arr in a.to_tensors().items():
            assert arr.tobytes() == b.to_tensors()[field].tobytes(), (n, field)


def test_api_and_cli_on_a_model_directory(tiny_dir, tmp_path, capsys, one_thread):
    from gobo.cli import main

    cm = gobo.quantize(tiny_dir, method="qbert", bits=3)
    assert cm.config == QBertConfig(bits=3, head_size=8)  # 32 hidden / 4 heads, read from the model
    gobo.save(cm, tmp_path / "api")
    model = gobo.load(tmp_path / "api")
    want = cm.state_dict()
    for k, v in model.state_dict().items():
        assert np.array_equal(v.numpy(), want[k]), k
    assert main(["quantize", str(tiny_dir), "-o", str(tmp_path / "cli"), "--method", "qbert", "--bits", "2", "--json", "-q"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "qbert" and out["config"]["data"]["bits"] == 2
    assert main(["quantize", str(tiny_dir), "-o", str(tmp_path / "x"), "--mixed", "2/3", "-q"]) == 2
    assert "--mixed applies to --method qbert only" in capsys.readouterr().err


# ---------------------------------------------------------------------------- Hessian


def _exact_top(model, names, ids, mask, y, coef, intercept):
    """Largest-magnitude eigenvalue, and the spectrum, of the exact Hessian block of ``names``."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    class Swapped:  # the model with the block's weights taken from ``flat``
        def __init__(self, flat):
            self.parts = {n: p.reshape(s) for n, p, s in zip(names, torch.split(flat, sizes), shapes)}

        def __call__(self, **kw):
            return functional_call(model, self.parts, kwargs=kw)

    def f(flat):
        return probe_loss(Swapped(flat), ids, mask, y, coef, intercept)

    with sdpa_kernel(SDPBackend.MATH):
        h = torch.autograd.functional.hessian(f, torch.cat([params[n].detach().reshape(-1) for n in names]), vectorize=True)
    ev = torch.linalg.eigvalsh((h + h.T) / 2)
    return float(ev[ev.abs().argmax()]), ev


@pytest.mark.parametrize("block", ["layer", "weight"])
def test_power_iteration_matches_exact_eigendecomposition(block, one_thread):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _tiny_bert().double()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 60, (6, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[3:, 7:] = 0  # padding is masked out of the pooled embedding
    coef = torch.randn(4, generator=gen, dtype=torch.float64) * 3
    if block == "layer":
        # all six matrices of layer 1 (128 weights) at a stationary point (soft labels = the
        # probe's own predictions): a positive semi-definite block with a clear top eigenvalue
        names = [n for n, _ in layer_weights(model)[1][1]]
        with torch.no_grad():
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            m = mask.unsqueeze(-1).double()
            y = torch.sigmoid(torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1) @ coef + 0.2)
    else:  # one matrix with hard labels: an indefinite block
        names = ["encoder.layer.0.output.dense.weight"]
        y = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.float64)
    params = dict(model.named_parameters())
    exact, ev = _exact_top(model, names, ids, mask, y, coef, 0.2)
    assert ev.numel() == sum(params[n].numel() for n in names)
    with sdpa_kernel(SDPBackend.MATH):
        loss = probe_loss(model, ids, mask, y, coef, 0.2)
        ws = [params[n] for n in names]
        grads = torch.autograd.grad(loss, ws, create_graph=True)
        got, iters = top_eigenvalue(grads, ws, iters=3000, tol=1e-13, generator=torch.Generator().manual_seed(0))
    assert got == pytest.approx(exact, rel=1e-7), (got, exact, iters)


def test_sensitivity_summary_and_model_untouched(tokenizer, one_thread):
    model = _tiny_bert(vocab_size=30522, hidden_size=8)
    flags = [p.requires_grad for p in model.parameters()]
    texts = [f"a film number {i} that is {'good' if i % 2 else 'dull'}" for i in range(24)]
    labels = [i % 2 for i in range(24)]
    probe = Probe(coef=np.linspace(-1, 1, 8), intercept=0.1)
    s = sensitivity(model, tokenizer, texts, labels, probe, SensitivitySettings(subsets=3, subset_size=6, iters=5))
    assert s.layers == ("encoder.layer.0", "encoder.layer.1") and s.eigenvalues.shape == (3, 2)
    np.testing.assert_allclose(s.omega, np.abs(s.eigenvalues.mean(0)) + s.eigenvalues.std(0))
    assert [p.requires_grad for p in model.parameters()] == flags and not model.training
    assert Sensitivity.from_dict(json.loads(json.dumps(s.to_dict()))).omega == pytest.approx(s.omega)
    with pytest.raises(ValueError, match="need 100 texts"):
        sensitivity(model, tokenizer, texts, labels, probe, SensitivitySettings(subsets=4, subset_size=25))


# ---------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize("low, high, average, n_high", [(2, 3, 0.0, 3), (2, 4, 0.0, 3), (2, 3, 2.4, 2), (2, 4, 2.5, 1), (2, 3, 3.0, 6), (2, 3, 2.0, 0)])
def test_mixed_plan_meets_the_average_and_follows_omega(low, high, average, n_high):
    omega = [5.0, 80.0, 12.0, 80.0, 0.5, 33.0]
    bits = mixed_plan(omega, low, high, average)
    target = average or (low + high) / 2
    assert np.mean(bits) <= target + 1e-12 and target - np.mean(bits) < (high - low) / len(omega)
    assert bits.count(high) == n_high
    rank = sorted(range(6), key=lambda i: (-omega[i], i))  # ties: the earlier layer first
    assert [bits[i] for i in rank] == sorted(bits, reverse=True)


def test_quantize_with_mixed_precision_records_the_plan(tiny_dir, tmp_path, monkeypatch, one_thread):
    import gobo.hessian as hessian

    fake = Sensitivity(layers=("encoder.layer.0", "encoder.layer.1"), eigenvalues=np.array([[1.0, 9.0], [3.0, 7.0]]), iterations=np.ones((2, 2), int))
    monkeypatch.setattr(hessian, "measure_sensitivity", lambda *a, **k: fake)
    cm = gobo.quantize(tiny_dir, QBertConfig(mixed="2/4"))
    assert cm.config.layer_bits == (2, 4)  # layer 1 has the larger Omega
    assert {n: q.bits for n, q in cm.quantized.items() if ".layer." in n} == {
        n: 2 if ".layer.0." in n else 4 for n in cm.quantized if ".layer." in n
    }
    gobo.save(cm, tmp_path / "mp")
    assert gobo.load_compressed(tmp_path / "mp").config == cm.config


def test_sensitivity_command(tiny_dir, monkeypatch, capsys):
    import gobo.hessian as hessian
    from gobo.cli import main

    fake = Sensitivity(layers=("encoder.layer.0", "encoder.layer.1"), eigenvalues=np.array([[1.0, 9.0], [3.0, 7.0]]), iterations=np.ones((2, 2), int))
    monkeypatch.setattr(hessian, "measure_sensitivity", lambda *a, **k: fake)
    assert main(["sensitivity", str(tiny_dir), "--json", "-q"]) == 0
    rows = json.loads(capsys.readouterr().out)["layers"]
    assert [(r["omega"], r["rank"], r["plan"]["2/3"], r["plan"]["2/4"]) for r in rows] == [(3.0, 2, 2, 2), (9.0, 1, 3, 4)]
    assert main(["sensitivity", str(tiny_dir), "-q"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split() == ["layer", "name", "mean", "std", "Omega", "rank", "2/3", "MP", "2/4", "MP"]
    assert table[3].split() == ["0", "encoder.layer.0", "2", "1", "3", "2", "2", "2"]
    assert main(["sensitivity", str(tiny_dir), "--subsets", "0"]) == 2
    assert "subsets must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------- fine-tuning


def test_fake_quantize_matches_the_file_quantizer(minilm_state):
    from gobo.qat import fake_quantize

    w = minilm_state[LAYER.format(4, "attention.self.value")]
    for bits in (2, 3, 8):
        t = torch.from_numpy(w.copy()).requires_grad_(True)
        q = fake_quantize(t, bits, 2)
        np.testing.assert_array_equal(q.detach().numpy(), fit(w, bits, 2).dequantize())
        q.sum().backward()
        assert torch.equal(t.grad, torch.ones_like(t))  # straight through


def test_qat_smoke_loss_decreases(tiny_dir, tmp_path, one_thread):
    from gobo.qat import QatSettings, finetune, load_head, save

    settings = QatSettings(texts=64, epochs=3, batch_size=16, lr=1e-3, head_lr=3e-2, monitor_texts=64)
    r = finetune(tiny_dir, QBertConfig(bits=3), settings, probe=Probe(coef=np.zeros(32), intercept=0.0))
    assert len(r.losses) == 12 and r.loss_start == pytest.approx(np.log(2), abs=1e-6)
    assert r.loss_end < r.loss_start - 0.01
    assert np.mean(r.losses[-4:]) < np.mean(r.losses[:4])
    plain = gobo.quantize(tiny_dir, QBertConfig(bits=3))
    moved = [n for n in plain.quantized if not np.array_equal(plain.quantized[n].codes, r.compressed.quantized[n].codes)]
    assert moved  # the encoder itself was trained, not only the head
    out = save(r, tmp_path / "qat")
    head = load_head(out)
    np.testing.assert_array_equal(head.coef, r.head.coef)
    assert gobo.load_compressed(out).config == r.compressed.config
    assert r.compressed.source["finetuned"]["steps"] == 12

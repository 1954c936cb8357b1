"""gobo.hw: workloads, memory compression on baselines, the GOBO engine, the FQ-BERT FPGA model.

Checked on a tiny hand-made model (numbers computed by hand in the comments) and on the real
all-MiniLM-L6-v2 compressed with the paper's 3-bit recipe (the ``gobo_paper3`` fixture):

* traffic falls by exactly the weight compression ratio when only weights move;
* a product that is compute-bound with FP32 weights gains nothing from compression alone;
* energy is the sum of its parts, at every level;
* doubling the off-chip bandwidth never makes any layer slower;
* the engine's addition / multiplication / outlier counts are gobo.dataflow's.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from gobo.dataflow import dataflow_linear
from gobo.hw import FORMATS, build_workload, load_arch, load_workload, simulate, simulate_engine, simulate_fqbert, simulate_processor
from gobo.hw.accel import ARCHS, Accelerator, read_arch_json
from gobo.hw.workload import read_config
from gobo.io import read_compressed
from gobo.qtensor import QuantizedTensor

H, I, HEADS = 8, 16, 2


def _qt(rows: int, cols: int, seed: int, n_out: int = 2, stats: bool = False) -> QuantizedTensor:
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(rows * cols, size=n_out, replace=False)) if n_out else np.zeros(0, np.int64)
    return QuantizedTensor.from_codes(
        rng.integers(0, 8, size=(rows, cols)), shape=(rows, cols), bits=3, group_rows=rows,
        codebook=np.sort(rng.normal(size=(1, 8))).astype(np.float32),
        row_scale=rng.uniform(0.5, 2, rows).astype(np.float32) if stats else None,
        row_offset=rng.normal(size=rows).astype(np.float32) if stats else None,
        outlier_index=idx, outlier_value=rng.normal(size=n_out).astype(np.float32),
    )


def tiny(style: str = "bert", stats: bool = False):
    """A one-block encoder, hidden 8, FFN 16, 2 heads, vocabulary 10, BERT or MPNet names."""
    if style == "bert":
        att = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense"}
        norms = ["attention.output.LayerNorm", "output.LayerNorm"]
    else:
        att = {"q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v", "o": "attention.attn.o"}
        norms = ["attention.LayerNorm", "output.LayerNorm"]
    mats = {f"encoder.layer.0.{m}": (H, H) for m in att.values()}
    mats["encoder.layer.0.intermediate.dense"] = (I, H)
    mats["encoder.layer.0.output.dense"] = (H, I)
    mats["pooler.dense"] = (H, H)
    quantized = {f"{m}.weight": _qt(*shape, seed=i, stats=stats) for i, (m, shape) in enumerate(sorted(mats.items()))}
    quantized["embeddings.word_embeddings.weight"] = _qt(10, H, seed=99)
    if style == "mpnet":
        quantized["encoder.relative_attention_bias.weight"] = _qt(4, HEADS, seed=98, n_out=0)
    dense = {f"{m}.bias": np.ones(shape[0], np.float32) for m, shape in mats.items()}
    for n in [f"encoder.layer.0.{x}" for x in norms] + ["embeddings.LayerNorm"]:
        dense[f"{n}.weight"] = np.ones(H, np.float32)
        dense[f"{n}.bias"] = np.zeros(H, np.float32)
    dense["embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    config = {"hidden_size": H, "num_attention_heads": HEADS, "num_hidden_layers": 1, "model_type": style}
    return quantized, dense, config


def toy_arch(bandwidth_gbs: float = 0.001, act_kib: float = 1e6) -> Accelerator:
    """4x4 systolic array at 1 MHz; 0.001 GB/s is 1 byte per cycle; energies 1 pJ each."""
    return Accelerator(name="toy", title="toy", dataflow="systolic", pe_rows=4, pe_cols=4, clock_mhz=1, bandwidth_gbs=bandwidth_gbs,
                       act_buffer_kib=act_kib, weight_buffer_kib=1e6, datapath_bits=32, e_dram_pj_per_bit=1, e_sram_pj_per_64b=1,
                       e_mult_pj=1, e_add_pj=1, e_decode_pj_per_weight=1)


def _energy_parts(e) -> float:
    return e.dram + e.sram + e.compute + e.decode


# ---------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("style", ["bert", "mpnet"])
def test_tiny_workload_by_hand(style):
    q, d, cfg = tiny(style)
    w = build_workload(q, d, cfg, seq=4, batch=1)
    assert [layer.name for layer in w.layers] == ["embeddings", "layer.0", "pooler"]
    block = {o.name: o for o in w.layers[1].ops}
    assert list(block) == ["q", "k", "v", "qk", "av", "o", "ffn_in", "ffn_out", "params"]
    assert (block["q"].m, block["q"].k, block["q"].n) == (4, 8, 8)
    assert (block["qk"].m, block["qk"].k, block["qk"].n, block["qk"].count) == (4, 4, 4, 2)  # head dim 8 / 2
    assert (block["av"].m, block["av"].k, block["av"].n) == (4, 4, 4)
    assert (block["ffn_in"].k, block["ffn_in"].n, block["ffn_out"].k, block["ffn_out"].n) == (8, 16, 16, 8)
    # 4 projections x 4*8*8 + 2 attention products x 2 heads x 4*4*4 + 2 FFN x 4*8*16
    assert w.layers[1].macs == 4 * 256 + 2 * 128 + 2 * 512
    assert w.layers[2].ops[0].m == 1  # the pooler runs on one vector per sequence
    # bytes of a 3-bit 8x8 matrix with 2 outliers and an FP32 bias: 24 code bytes, 8 centroids,
    # 2 x (value + int32 position), 8 x 4 bias bytes
    wb = block["q"].weights
    assert (wb.codes, wb.centroids, wb.outliers, wb.dense, wb.numel) == (24, 32, 16, 32, 72)
    assert wb.gobo == 104 and wb.fp32 == 288 and wb.fp16 == 144
    assert block["params"].weights.numel == 4 * H  # two LayerNorms
    emb = {o.name: o for o in w.layers[0].ops}
    assert emb["word_embeddings"].m == 4  # 4 of the 10 rows move
    if style == "mpnet":
        assert emb["relative_attention_bias"].m == 4  # a table of 4 rows: all of it


def test_tiny_cycles_and_energy_by_hand():
    q, d, cfg = tiny()
    w = build_workload(q, d, cfg, seq=4, batch=1)
    r = simulate(w, toy_arch(), "fp32")
    qop = r.layer("layer.0").ops[0]
    # ceil(8/4) * ceil(8/4) tiles x max(m=4, R=4) rows + fill 4 + 4 = 24; 288 bytes at 1 byte per cycle
    assert (qop.compute_cycles, qop.memory_cycles, qop.cycles, qop.bound) == (24, 288, 288, "memory")
    assert qop.energy.dram == 288 * 8 and qop.energy.compute == 256 * 2 and qop.energy.decode == 0
    # buffer words: inputs 4*8*2 + weights 2*64 + outputs 4*8*(2*2-1) = 288, half a 64-bit access each
    assert qop.energy.sram == 288 * 0.5
    g = simulate(w, toy_arch(), "gobo").layer("layer.0").ops[0]
    assert g.memory_cycles == 104 and g.energy.decode == 64  # one decode per matrix weight


# ---------------------------------------------------------------------------- required properties


def _block_stored_ratio(cm, prefix: str) -> float:
    fp32 = stored = 0
    for n, qt in cm.quantized.items():
        if n.startswith(prefix):
            fp32 += qt.numel * 4
            stored += qt.nbytes()
    for n, a in cm.dense.items():
        if n.startswith(prefix) and a.dtype.kind == "f":
            fp32 += a.size * 4
            stored += a.nbytes
    return fp32 / stored


def test_traffic_falls_by_the_compression_ratio_when_only_weights_move(gobo_paper3):
    cm = read_compressed(gobo_paper3.outdir)
    big = load_arch("tpu").with_(act_buffer_kib=1e9)  # activations never leave the chip
    w = load_workload(gobo_paper3.outdir, seq=128, batch=1)
    f32, gb = simulate(w, big, "fp32"), simulate(w, big, "gobo")
    assert f32.act_bytes == gb.act_bytes == 0
    for a, b in zip(f32.layers, gb.layers):
        if a.name.startswith("layer."):
            assert a.traffic / b.traffic == pytest.approx(_block_stored_ratio(cm, f"encoder.{a.name}."), rel=1e-12)
    # with at least as many tokens as embedding rows every stored byte moves once: the file's ratio
    wall = build_workload(cm.quantized, cm.dense, read_config(gobo_paper3.outdir), seq=512, batch=60)
    ratio = _block_stored_ratio(cm, "")
    assert simulate(wall, big, "fp32").traffic / simulate(wall, big, "gobo").traffic == pytest.approx(ratio, rel=1e-12)
    assert 9.5 < ratio < 10.5  # measured 10.06 for the paper's recipe at 3 bits


def test_tiny_traffic_ratio():
    q, d, cfg = tiny()
    w = build_workload(q, d, cfg, seq=4, batch=1)
    a = toy_arch()
    op32 = simulate(w, a, "fp32").layer("layer.0").ops[0]
    opg = simulate(w, a, "gobo").layer("layer.0").ops[0]
    assert op32.traffic / opg.traffic == 288 / 104


def test_compute_bound_products_gain_nothing_from_compression(gobo_paper3):
    w = load_workload(gobo_paper3.outdir, seq=128, batch=32)  # 4096 tokens: the projections turn compute-bound on the TPU
    tpu = load_arch("tpu")
    f32, gb, f16 = (simulate(w, tpu, f) for f in ("fp32", "gobo", "fp16"))
    n_linear = 0
    for la, lb, lc in zip(f32.layers, gb.layers, f16.layers):
        for a, b, c in zip(la.ops, lb.ops, lc.ops):
            if a.bound == "compute":
                assert b.cycles == a.cycles == c.cycles
                n_linear += a.kind == "linear"
        if la.bound == "compute":
            assert lb.seconds == la.seconds
    assert n_linear >= 24  # q, k, v, o of every block
    # by hand: a compute-bound toy product
    q, d, cfg = tiny()
    tw = build_workload(q, d, cfg, seq=4, batch=1)
    fast = toy_arch(bandwidth_gbs=1.0)
    a, b = simulate(tw, fast, "fp32").layer("layer.0"), simulate(tw, fast, "gobo").layer("layer.0")
    assert a.bound == "compute" and a.seconds == b.seconds


def _all_runs(w):
    for name in ("tpu", "eyeriss", "tensorcore"):
        arch = load_arch(name)
        for fmt in FORMATS:
            yield simulate(w, arch, fmt)
    yield simulate_engine(w, load_arch("gobo"))


def test_energy_sums_to_its_parts(gobo_paper3):
    w = load_workload(gobo_paper3.outdir, seq=128, batch=1)
    for r in _all_runs(w):
        total = 0.0
        for layer in r.layers:
            for op in layer.ops:
                assert op.energy.total == pytest.approx(_energy_parts(op.energy), rel=1e-12)
            assert layer.energy.total == pytest.approx(sum(o.energy.total for o in layer.ops), rel=1e-12)
            total += layer.energy.total
        assert r.energy.total == pytest.approx(total, rel=1e-12)
        assert r.energy.total == pytest.approx(_energy_parts(r.energy), rel=1e-12)
        d = r.to_dict()["energy"]
        assert d["total_pj"] == pytest.approx(d["dram_pj"] + d["sram_pj"] + d["compute_pj"] + d["decode_pj"], rel=1e-12)
    fq = load_arch("fqbert")
    for board in fq.boards:
        f = simulate_fqbert(w, fq, board)
        assert sum(f.energy_per_frame_j.values()) == pytest.approx(f.power_w / f.fps, rel=1e-12)


def test_doubling_bandwidth_never_slows_a_layer(gobo_paper3):
    for seq, batch in ((128, 1), (64, 8)):
        w = load_workload(gobo_paper3.outdir, seq=seq, batch=batch)
        for name in ("tpu", "eyeriss", "tensorcore"):
            arch = load_arch(name)
            fast = arch.with_(bandwidth_gbs=2 * arch.bandwidth_gbs)
            for fmt in FORMATS:
                slow_r, fast_r = simulate(w, arch, fmt), simulate(w, fast, fmt)
                for a, b in zip(slow_r.layers, fast_r.layers):
                    assert b.cycles <= a.cycles, (name, fmt, a.name)
                    assert all(ob.cycles <= oa.cycles for oa, ob in zip(a.ops, b.ops))
                assert fast_r.seconds <= slow_r.seconds
        eng = load_arch("gobo")
        eng2 = replace(eng, baseline=eng.baseline.with_(bandwidth_gbs=2 * eng.baseline.bandwidth_gbs))
        for a, b in zip(simulate_engine(w, eng).layers, simulate_engine(w, eng2).layers):
            assert b.cycles <= a.cycles
        fq = load_arch("fqbert")
        fq2 = replace(fq, boards={k: replace(b, bandwidth_gbs=2 * b.bandwidth_gbs) for k, b in fq.boards.items()})
        for board in fq.boards:
            for a, b in zip(simulate_fqbert(w, fq, board).run.layers, simulate_fqbert(w, fq2, board).run.layers):
                assert b.cycles <= a.cycles


@pytest.mark.parametrize("stats", [False, True])
def test_engine_counts_are_the_dataflow_counts(stats):
    q, d, cfg = tiny(stats=stats)
    tokens = 5
    w = build_workload(q, d, cfg, seq=tokens, batch=1)
    eng = simulate_engine(w, load_arch("gobo"))
    x = torch.randn(tokens, H, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xi = torch.randn(tokens, I, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    checked = 0
    for layer, res in zip(w.layers, eng.layers):
        for op, r in zip(layer.ops, res.ops):
            if op.kind != "linear":
                continue
            qt = q[op.weight]
            _, c = dataflow_linear((x if qt.cols == H else xi)[: op.m], qt)
            assert (r.detail["additions"], r.detail["multiplications"], r.detail["outlier_macs"]) == (c.additions, c.multiplications, c.outlier_macs)
            assert r.detail["dense_macs"] == 0
            checked += 1
    assert checked == 7  # q, k, v, o, ffn_in, ffn_out, pooler


def test_engine_counts_on_a_real_layer(gobo_paper3):
    cm = gobo_paper3.cm
    w = load_workload(gobo_paper3.outdir, seq=16, batch=1)
    op = next(o for o in w.layers[1].ops if o.name == "ffn_in")
    _, c = dataflow_linear(np.random.default_rng(0).normal(size=(16, op.k)), cm.quantized[op.weight])
    r = next(o for o in simulate_engine(w, load_arch("gobo")).layers[1].ops if o.name == "ffn_in")
    assert (r.detail["additions"], r.detail["multiplications"], r.detail["outlier_macs"]) == (c.additions, c.multiplications, c.outlier_macs)
    assert r.macs == c.dense_macs


# ---------------------------------------------------------------------------- models of the papers


def test_real_minilm_structure_and_estimates(gobo_paper3):
    w = load_workload(gobo_paper3.outdir, seq=128, batch=1)
    assert [layer.name for layer in w.layers] == ["embeddings"] + [f"layer.{i}" for i in range(6)] + ["pooler"]
    assert (w.hidden, w.heads) == (384, 12)
    per_block = 128 * (4 * 384 * 384 + 2 * 384 * 1536) + 2 * 12 * 128 * 128 * 32
    assert w.macs == 6 * per_block + 384 * 384
    tpu = {f: simulate(w, load_arch("tpu"), f) for f in FORMATS}
    assert tpu["fp32"].seconds > tpu["fp16"].seconds > tpu["gobo"].seconds  # the TPU-like array is memory-bound at batch 1
    eng = simulate_engine(w, load_arch("gobo"))
    tc = simulate(w, load_arch("tensorcore"), "fp16")
    assert eng.seconds < tc.seconds and eng.energy.total < tc.energy.total
    fq = load_arch("fqbert")
    for name, board in fq.boards.items():
        f = simulate_fqbert(w, fq, name)
        assert f.dsp_used <= board.dsp and f.bram_used <= board.bram36 and f.fits
        assert f.fps_per_w > simulate_processor(w, fq.processors["cpu"]).fps_per_w


def test_area_model():
    g = load_arch("gobo")
    # 4184 adder + 8 x 32 x 4.52 registers + 7700 / 4 multiplier + (7700 + 4184) / 64 outlier MAC
    assert g.pe_area_um2 == pytest.approx(4184 + 8 * 32 * 4.52 + 7700 / 4 + (7700 + 4184) / 64)
    assert g.n_pe == int(512 * (1640 + 4184) // g.pe_area_um2)


def test_every_arch_file_names_a_source_for_every_parameter():
    for name in ARCHS:
        doc = read_arch_json(name)
        entries = list(doc["params"].values())
        for group in ("boards", "processors"):
            for sub in doc.get(group, {}).values():
                entries += list(sub.values())
        assert entries and all(isinstance(e, dict) and e.get("source") for e in entries), name
        load_arch(name)


def test_arch_files_are_checked(tmp_path):
    doc = read_arch_json("tpu")
    bad = tmp_path / "bad.json"
    doc["params"]["pe_depth"] = {"value": 3, "source": "x"}
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="unknown parameters pe_depth"):
        load_arch(bad)
    del doc["params"]["pe_depth"], doc["params"]["clock_mhz"]
    bad.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="missing parameters clock_mhz"):
        load_arch(bad)
    with pytest.raises(ValueError, match="unknown architecture"):
        load_arch("vax")


def test_import_gobo_does_not_import_hw():
    code = "import sys, gobo; print(any(m.startswith('gobo.hw') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


# ---------------------------------------------------------------------------- command line


def _main(capsys, *args):
    from gobo.cli import main

    rc = main(["hw", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("arch", ARCHS)
def test_cli_json(arch, gobo_paper3, capsys):
    rc, out, err = _main(capsys, gobo_paper3.outdir, "--arch", arch, "--json", "--quiet")
    assert rc == 0, err
    d = json.loads(out)
    if arch in ("tpu", "eyeriss", "tensorcore"):
        assert set(d["formats"]) == set(FORMATS)
        assert d["speedup_vs_fp32"]["fp32"] == 1.0 and d["speedup_vs_fp32"]["gobo"] > 1.0
    elif arch == "gobo":
        assert d["area"]["n_pe"] > 0 and d["speedup_vs_baseline_fp16"] > 1.0
    else:
        assert set(d["boards"]) == {"zcu102", "zcu111"} and set(d["processors"]) == {"cpu", "gpu"}


def test_cli_text_prints_paper_figures_beside_estimates(gobo_paper3, capsys):
    rc, out, _ = _main(capsys, gobo_paper3.outdir, "--arch", "fqbert", "--board", "zcu102")
    assert rc == 0 and "3.18 (BERT-base)" in out and "28.91x" in out and "12.72x" in out and "7.94x" in out
    rc, out, _ = _main(capsys, gobo_paper3.outdir, "--arch", "gobo", "-v")
    assert rc == 0 and "7x speedup and 3x energy efficiency" in out and "  ffn_in" in out
    rc, out, _ = _main(capsys, gobo_paper3.outdir, "--arch", "tensorcore", "--seq", "64")
    assert rc == 0 and "seq 64" in out and "not known" in out and out.count("layer.") == 6
    rc, out, _ = _main(capsys, gobo_paper3.outdir, "--arch", "eyeriss", "--sources")
    assert rc == 0 and "Chen et al." in out


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["{missing}"], "is not a directory"),
        (["{dir}", "--arch", "vax"], "unknown architecture 'vax'"),
        (["{dir}", "--seq", "0"], "must be positive"),
        (["{dir}", "--seq", "4096"], "longer than the model's 512 positions"),
        (["{dir}", "--arch", "fqbert", "--board", "zcu999"], "unknown board"),
        (["{dir}", "--arch", "tpu", "--board", "zcu102"], "only used with --arch fqbert"),
        (["{dir}", "--sweep"], "pass the output directory with -o"),
        (["{empty}"], "not a gobo model directory"),
    ],
)
def test_cli_user_errors(args, pattern, gobo_paper3, tmp_path, capsys):
    import re

    (tmp_path / "empty").mkdir()
    subs = {"{dir}": str(gobo_paper3.outdir), "{missing}": str(tmp_path / "nope"), "{empty}": str(tmp_path / "empty")}
    rc, out, err = _main(capsys, *[subs.get(a, a) for a in args])
    lines = err.splitlines()
    assert rc == 2 and out == "" and len(lines) == 1 and lines[0].startswith("gobo: error: ")
    assert re.search(pattern, lines[0]), lines[0]


def test_cli_sweep_writes_figures(gobo_paper3, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "hw"
    rc, stdout, err = _main(capsys, gobo_paper3.outdir, "--sweep", "-o", out, "--quiet")
    assert rc == 0, err
    for f in ("speedup.png", "energy.png", "traffic.png", "seq.png"):
        assert (out / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    d = json.loads((out / "hw_sweep.json").read_text())
    assert [m["seq"] for m in d["seq_sweep"]] == [32, 64, 128, 256, 512]
    m = d["models"][0]
    assert math.isclose(m["archs"]["tpu"]["fp32"]["speedup_vs_fp32"], 1.0)
    assert "written:" in stdout


@pytest.mark.parametrize("compact", [False, True])
def test_weight_bytes_are_the_bytes_the_file_stores(compact):
    """The memory model moves what the file holds: float16 centroids and row-by-row outlier
    positions for a compact tensor."""
    from gobo.hw.workload import _qt_bytes
    from gobo.qtensor import QuantizedTensor

    rng = np.random.default_rng(0)
    qt = QuantizedTensor.from_codes(
        rng.integers(0, 8, (16, 40)).astype(np.uint8), shape=(16, 40), bits=3,
        codebook=(np.arange(128, dtype=np.float32).reshape(16, 8) / 16), group_rows=1,
        outlier_index=np.sort(rng.choice(640, 40, replace=False)).astype(np.int64),
        outlier_value=rng.standard_normal(40).astype(np.float32), compact=compact)
    wb = _qt_bytes(qt)
    assert wb.gobo == qt.nbytes() == sum(a.nbytes for a in qt.to_tensors().values())
    assert wb.centroids == 128 * (2 if compact else 4) and wb.outliers == 40 * 4 + (2 * (40 + 16) if compact else 40 * 4)

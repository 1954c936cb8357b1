"""The ``gobo`` command, run for real in a subprocess (``python -m gobo``), its output reloaded.

User errors must end in exit status 2 and exactly one line on stderr, ``gobo: error: ...``,
with no traceback and no output directory left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gobo
from gobo.io import WEIGHTS_FILE, read_compressed

from conftest import TINY

SUBCOMMANDS = ["quantize", "inspect", "eval", "demo", "models", "data", "report", "sweep", "compare", "hw", "sensitivity", "qat", "fqbert"]


def run_gobo(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m gobo ARGS`` offline, in ``cwd`` (a temporary directory: nothing lands in the checkout)."""
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "gobo", *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> str:
    """Exit 2, one stderr line 'gobo: error: ...' matching ``pattern``, nothing else."""
    import re

    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("gobo: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert proc.stdout == ""
    return lines[0]


@pytest.fixture(scope="module")
def cli_quantized(tmp_path_factory):
    """``gobo quantize minilm-l6 -o OUT --json``, run once for the module."""
    work = tmp_path_factory.mktemp("cli")
    proc = run_gobo("quantize", "minilm-l6", "-o", "out", "--json", cwd=work)
    return proc, work / "out"


# ---------------------------------------------------------------------------- the happy path


def test_quantize_json(cli_quantized, gobo_default):
    proc, out = cli_quantized
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bars when stderr is not a terminal
    result = json.loads(proc.stdout)
    assert result["method"] == "gobo" and result["config"]["data"]["bits"] == 3
    assert result["ratio"] >= 10.0  # measured 10.49
    assert result["n_quantized"] == 40 and len(result["tensors"]) == 40
    assert result["file_bytes"] == (out / WEIGHTS_FILE).stat().st_size
    assert result["bits_per_weight"] <= 3.01
    assert Path(result["output"]) == Path("out")
    # the command writes what the API writes
    cm = read_compressed(out)
    assert cm.config == gobo_default.cm.config and cm.source == gobo_default.cm.source
    want = gobo_default.cm.state_dict()
    got = cm.state_dict()
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_quantize_text_output(tmp_path, tiny_model_dirs):
    """Plain-text summary, --exclude, on a tiny model directory saved by transformers."""
    proc = run_gobo("quantize", tiny_model_dirs["tiny"], "-o", "q", "--method", "directq", "--bits", "4", "--exclude", "embeddings.*", "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "directq, 13 tensors quantized" in proc.stdout and "compression ratio" in proc.stdout
    assert "encoder.layer.1.output.dense.weight" in proc.stdout  # -v: the per-tensor table
    cm = gobo.load_compressed(tmp_path / "q")
    assert len(cm.quantized) == 13 and {q.bits for q in cm.quantized.values()} == {4}
    assert "embeddings.word_embeddings.weight" in cm.dense
    assert (tmp_path / "q" / "config.json").is_file()
    model = gobo.load(tmp_path / "q")
    assert type(model).__name__ == "BertModel"


def test_inspect_table(cli_quantized):
    proc, out = cli_quantized
    assert proc.returncode == 0
    insp = run_gobo("inspect", out, cwd=out.parent)
    assert insp.returncode == 0, insp.stderr
    lines = insp.stdout.splitlines()
    assert lines[0].split() == ["tensor", "shape", "bits", "outl", "%", "SQNR", "dB", "bits/w", "bytes", "ratio"]
    assert set(lines[1]) <= {"-", " "}
    rows = [line.split() for line in lines[2:42]]
    assert sorted(r[0] for r in rows) == sorted(read_compressed(out).quantized)
    word = next(r for r in rows if r[0] == "embeddings.word_embeddings.weight")
    assert word[1] == "30522x384"
    assert lines[42] == ""
    assert any(line.strip().startswith("compression ratio") for line in lines[43:])
    assert any("sha256" in line for line in lines[43:])


def test_inspect_json(cli_quantized):
    proc, out = cli_quantized
    q = json.loads(proc.stdout)
    insp = run_gobo("inspect", out, "--json", cwd=out.parent)
    assert insp.returncode == 0, insp.stderr
    r = json.loads(insp.stdout)
    assert r["n_quantized"] == 40 and r["method"] == "gobo"
    assert r["ratio"] == pytest.approx(q["ratio"]) and r["file_bytes"] == q["file_bytes"]
    assert r["source"]["name"] == "minilm-l6" and len(r["source"]["weights_sha256"]) == 64
    assert {t["name"]: t["bits"] for t in r["tensors"]} == {t["name"]: t["bits"] for t in q["tensors"]}


def test_eval_small(tmp_path, gobo_paper3):
    """The eval command end to end on a few texts; the probe is cached in a temporary gobo cache."""
    from gobo.assets import dataset_path

    cache = tmp_path / "cache"
    (cache / "data").mkdir(parents=True)
    (cache / "data" / dataset_path().name).symlink_to(dataset_path())  # read the user's corpus, write nothing there
    proc = run_gobo("eval", gobo_paper3.outdir, "--limit", "40", "--train-limit", "120", "--json", cwd=tmp_path, env={"GOBO_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["fp32"]["n_test"] == 40 and r["fp32"]["n_train"] == 120 and 0.5 <= r["fp32"]["accuracy"] <= 1.0
    (row,) = r["results"]
    assert row["method"] == "gobo-paper" and 0.5 <= row["agreement"] <= 1.0 and 0.5 < row["mean_cosine"] < 1.0
    assert len(list((cache / "probes").glob("*.npz"))) == 1


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_has_an_example(command, tmp_path):
    proc = run_gobo(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "example:" in proc.stdout and f"gobo {command}" in proc.stdout


def test_every_registered_command_is_covered():
    from gobo.cli import _parser

    sub = next(a for a in _parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    assert sorted(sub.choices) == sorted(SUBCOMMANDS)
    for name, parser in sub.choices.items():  # --json and --quiet on every command
        flags = {o for a in parser._actions for o in a.option_strings}
        assert {"--json", "--quiet"} <= flags, name


def test_top_level_help_lists_every_command(tmp_path):
    proc = run_gobo("--help", cwd=tmp_path)
    assert proc.returncode == 0
    for command in SUBCOMMANDS:
        assert command in proc.stdout


# ---------------------------------------------------------------------------- user errors


@pytest.fixture(scope="module")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Two tiny BERT directories (save_pretrained): one clean, one whose weights file holds a NaN."""
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    transformers.BertModel(transformers.BertConfig(**TINY)).save_pretrained(root / "bert")
    shutil.copytree(root / "bert", root / "bert-nan")
    f = root / "bert-nan" / "model.safetensors"
    state = load_file(str(f))
    key = next(k for k in state if k.endswith("attention.self.query.weight"))
    state[key][1, 2] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    return {"tiny": root / "bert", "nan": root / "bert-nan"}


def _tampered(saved, where: Path) -> Path:
    d = where / "tampered"
    shutil.copytree(saved.outdir, d)
    f = d / WEIGHTS_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    return d


ERRORS = {
    # case: (argument builder, pattern the one stderr line must match)
    "missing-model": (lambda t, fx: ["quantize", t / "no-such-model", "-o", "out"], r"no-such-model.*neither a model directory nor a bundled model"),
    "no-config": (lambda t, fx: ["quantize", fx["noconfig"], "-o", "out"], r"not a model directory \(no config\.json"),
    "bits-0": (lambda t, fx: ["quantize", "minilm-l6", "-o", "out", "--bits", "0"], r"--bits must be from 1 to 8, got 0"),
    "bits-9": (lambda t, fx: ["quantize", "minilm-l6", "-o", "out", "--bits", "9"], r"--bits must be from 1 to 8, got 9"),
    "unknown-method": (lambda t, fx: ["quantize", "minilm-l6", "-o", "out", "--method", "fancy"], r"fancy.*(gobo-paper|choose)"),
    "output-exists": (lambda t, fx: ["quantize", "minilm-l6", "-o", fx["full"]], r"already exists and is not empty.*--force"),
    "inspect-tampered": (lambda t, fx: ["inspect", fx["tampered"]], r"checksum"),
    "eval-not-gobo": (lambda t, fx: ["eval", fx["minilm"]], r"not a gobo model directory.*gobo quantize"),
    "nan-weights": (lambda t, fx: ["quantize", fx["nan"], "-o", "out"], r"query\.weight.*NaN"),
    "avg-bits-not-gobo": (lambda t, fx: ["quantize", "minilm-l6", "-o", "out", "--method", "directq", "--avg-bits", "2.5"], r"--avg-bits applies to --method gobo, gobo-grid or gobo-grid-fast only"),
    "size-too-small": (lambda t, fx: ["quantize", "minilm-l6", "-o", "out", "--size-mb", "3"], r"3 MB file means 1\.\d\d bits per weight; choose a size from"),
    "no-matching-weights": (lambda t, fx: ["quantize", fx["tiny"], "-o", "out", "--include", "nothing*"], r"no weights to quantize"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_user_errors(case, tmp_path, tiny_model_dirs, minilm_dir, gobo_paper3):
    build, pattern = ERRORS[case]
    noconfig = tmp_path / "noconfig"
    noconfig.mkdir()
    (noconfig / "weights.txt").write_text("not a model")
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    fixtures = {"noconfig": noconfig, "full": full, "minilm": minilm_dir, **tiny_model_dirs}
    if case == "inspect-tampered":
        fixtures["tampered"] = _tampered(gobo_paper3, tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_gobo(*build(tmp_path, fixtures), cwd=tmp_path)
    assert_user_error(proc, pattern)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no 'out', no '.partial' left
    assert [p.name for p in full.iterdir()] == ["keep.txt"] and (full / "keep.txt").read_text() == "precious"

"""``gobo report`` (one self-contained HTML page) and ``gobo sweep`` (accuracy against size).

The page is opened in a real headless browser (Debian's chromium, installed by ``make
setup``); where there is none, those checks skip and say so. Every command runs for real in
a subprocess, on the real MiniLM quantized once per session (conftest), with the frozen
probe trained on a small subset in a temporary gobo cache.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from gobo.io import WEIGHTS_FILE, read_compressed

N_TEST, N_TRAIN = 48, 96  # texts: enough for a probe and a number, small enough to be quick
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (make browser installs it with apt-get)")


def run_gobo(*args, cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **(env or {}))
    return subprocess.run([sys.executable, "-m", "gobo", *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gobo: error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert proc.stdout == "" and "Traceback" not in proc.stderr


class _Page(HTMLParser):
    """The parts of the report the tests look at: figures, table rows, images, links."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self.rows: list[dict] = []
        self.imgs: list[str] = []
        self.urls: list[str] = []
        self._in_tbody = False
        self._row: dict | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if key in a:
                self.urls.append(a[key])
        if tag == "figure" and "hist" in (a.get("class") or ""):
            self.figures.append(a)
        elif tag == "img":
            self.imgs.append(a.get("src", ""))
        elif tag == "tbody":
            self._in_tbody = True
        elif tag == "tr" and self._in_tbody:
            self._row = {"tensor": a.get("data-tensor"), "cells": []}
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row["cells"].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None
        elif tag == "tbody":
            self._in_tbody = False


def parse(text: str) -> _Page:
    p = _Page()
    p.feed(text)
    return p


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A gobo cache that reads the user's corpus and keeps the probes it trains to itself."""
    from gobo.assets import dataset_path

    c = tmp_path_factory.mktemp("cache")
    (c / "data").mkdir()
    (c / "data" / dataset_path().name).symlink_to(dataset_path())
    return c


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, gobo_paper3, cache):
    """A copy of the 3-bit MiniLM (the paper's recipe), evaluated with ``gobo eval``, then reported on."""
    work = tmp_path_factory.mktemp("report")
    model = work / "minilm-3b"
    shutil.copytree(gobo_paper3.outdir, model)
    ev = run_gobo("eval", model, "--limit", N_TEST, "--train-limit", N_TRAIN, "--json", "--quiet", cwd=work, env={"GOBO_CACHE": str(cache)})
    assert ev.returncode == 0, ev.stderr
    rep = run_gobo("report", model, "-o", work / "page" / "report.html", "--json", "--quiet", cwd=work)
    assert rep.returncode == 0, rep.stderr
    info = json.loads(rep.stdout)
    page = Path(info["report"])
    return {"model": model, "eval": json.loads(ev.stdout), "info": info, "page": page, "html": page.read_text(), "cm": read_compressed(model)}


# ---------------------------------------------------------------------------- the page


def test_eval_stores_its_results_beside_the_model(evaluated):
    doc = json.loads((evaluated["model"] / "eval.json").read_text())
    (row,) = evaluated["eval"]["results"]
    assert doc["result"]["accuracy"] == pytest.approx(row["accuracy"]) and doc["fp32"]["n_test"] == N_TEST
    assert not [p.name for p in evaluated["model"].iterdir() if p.name.endswith(".partial")]


def test_report_cli_output(evaluated):
    info = evaluated["info"]
    assert info["tensors"] == len(evaluated["cm"].quantized) == 40
    assert info["weights_from"] == "source" and info["evaluated"] is True
    assert info["bytes"] == evaluated["page"].stat().st_size
    assert not list(evaluated["page"].parent.glob(".*partial"))  # written through a temporary file


def test_report_is_self_contained(evaluated):
    text = evaluated["html"]
    page = parse(text)
    assert "http://" not in text and "https://" not in text
    assert all(u.startswith(("data:image/png;base64,", "#")) for u in page.urls), [u[:40] for u in page.urls if not u.startswith(("data:", "#"))]
    assert "<link" not in text and "@import" not in text and "<script src" not in text


def test_one_histogram_per_quantized_tensor(evaluated):
    cm = evaluated["cm"]
    figs = parse(evaluated["html"]).figures
    assert sorted(f["data-tensor"] for f in figs) == sorted(cm.quantized)
    for f in figs:
        qt = cm.quantized[f["data-tensor"]]
        assert int(f["data-bits"]) == qt.bits and int(f["data-outliers"]) == qt.n_outliers


def test_table_has_one_row_per_tensor_with_its_bits(evaluated):
    cm = evaluated["cm"]
    rows = parse(evaluated["html"]).rows
    assert len(rows) == len(cm.quantized)
    for r in rows:
        qt = cm.quantized[r["tensor"]]
        name, shape, _, bits, outliers = r["cells"][:5]
        assert name == r["tensor"] and shape == "x".join(map(str, qt.shape))
        assert int(bits) == qt.bits == 3 and int(outliers.replace(",", "")) == qt.n_outliers


def test_report_shows_the_stored_accuracy(evaluated):
    (row,) = evaluated["eval"]["results"]
    text = evaluated["html"]
    section = text[text.index('<section id="accuracy">') : text.index('<section id="layers">')]
    assert f"{100 * row['accuracy']:.2f} %" in section and f"{100 * row['agreement']:.2f} %" in section
    assert f"{100 * row['fp32_accuracy']:.2f} %" in section and f"{N_TEST} test texts" in section
    assert "Not evaluated" not in section


# ---------------------------------------------------------------------------- in a browser


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@needs_browser
def test_page_renders_in_a_browser_without_errors(evaluated, tmp_path):
    cm = evaluated["cm"]
    url = evaluated["page"].as_uri()
    proc = _chromium(tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", url + "#sort=-sqnr")
    assert proc.returncode == 0, proc.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", proc.stdout).group(1)
    attrs = dict(re.findall(r'(data-[\w-]+)="([^"]*)"', body))
    assert attrs.get("data-ready") == "1", "the page's script did not finish"
    assert attrs["data-errors"] == "0", attrs["data-error-list"]
    assert not re.search(r"CONSOLE.*(Uncaught|Error)", proc.stderr), proc.stderr
    n = len(cm.quantized)
    assert int(attrs["data-images"]) == int(attrs["data-images-ok"]) == n + 1  # every PNG decoded: histograms + bits per layer
    dom = parse(proc.stdout)
    assert len(dom.rows) == n and 'id="tensor-table"' in proc.stdout and 'id="bits-per-layer"' in proc.stdout
    # '#sort=-sqnr' sorted the table in the browser: SQNR falls down the rows
    sq = [math.inf if r["cells"][6] == "inf" else float(r["cells"][6]) for r in dom.rows]
    assert sq == sorted(sq, reverse=True) and [r["tensor"] for r in dom.rows] != [r["tensor"] for r in parse(evaluated["html"]).rows]


@needs_browser
def test_page_screenshot_is_not_blank(evaluated, tmp_path):
    from PIL import Image

    shot = tmp_path / "shot.png"
    proc = _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2000", evaluated["page"].as_uri())
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 2000)
        px = np.asarray(im.convert("RGB"), dtype=np.float32)
    assert px.std() > 20  # text, tables and plots, not one colour
    assert len(np.unique(px.reshape(-1, 3)[::7], axis=0)) > 100  # the plots' colours and anti-aliasing


# ---------------------------------------------------------------------------- library


def test_without_the_source_the_histograms_show_dequantized_values(tmp_path):
    """A file that records no FP32 source still gets its page, and says what it shows."""
    import gobo
    from gobo.htmlreport import build_report, outlier_bounds
    from gobo.io import write_compressed
    from gobo.methods.gobo import gaussian_outlier_mask
    from gobo.quantizer import quantize_state

    rng = np.random.default_rng(0)
    state = {"enc.0.w.weight": rng.standard_normal((24, 40)).astype(np.float32) * 0.05, "enc.1.w.weight": rng.laplace(size=(16, 24)).astype(np.float32) * 0.02}
    cm = quantize_state(state, list(state), gobo.GoboConfig.paper(3))
    write_compressed(cm, tmp_path / "m")
    text = build_report(tmp_path / "m")
    page = parse(text)
    assert sorted(f["data-tensor"] for f in page.figures) == sorted(state) and len(page.rows) == 2
    assert "dequantized" in text and "records no source model" in text
    # the bounds drawn are GOBO's outlier test
    w = state["enc.1.w.weight"].reshape(-1)
    lo, hi = outlier_bounds(float(w.mean(dtype=np.float64)), float(w.std(dtype=np.float64)), -4.0)
    assert np.array_equal((w < lo) | (w > hi), gaussian_outlier_mask(w, -4.0))


def test_import_gobo_does_not_import_matplotlib(tmp_path):
    code = "import sys, gobo, gobo.cli, gobo.cli_report, gobo.htmlreport, gobo.sweep, gobo.evalstore; gobo.cli._parser(); print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


# ---------------------------------------------------------------------------- sweep


def test_sweep_writes_json_plot_and_models(tmp_path, cache):
    out = tmp_path / "sweep"
    proc = run_gobo("sweep", "minilm-l6", "--bits", "3", "--methods", "gobo-paper", "directq", "--limit", N_TEST, "--train-limit", N_TRAIN,
                    "-o", out, "--json", "--quiet", cwd=tmp_path, env={"GOBO_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr
    printed = json.loads(proc.stdout)
    doc = json.loads((out / "sweep.json").read_text())
    assert doc["results"] == printed["results"] and doc["fp32"]["n_test"] == N_TEST and doc["fp32"]["n_train"] == N_TRAIN
    assert [(r["method"], r["bits"]) for r in doc["results"]] == [("gobo-paper", 3), ("directq", 3)]
    for r in doc["results"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["agreement"] <= 1.0 and 9 < r["ratio"] < 11
        assert r["accuracy_delta"] == pytest.approx(r["accuracy"] - doc["fp32"]["accuracy"])
        d = Path(r["model"])
        assert (d / WEIGHTS_FILE).is_file() and json.loads((d / "eval.json").read_text())["result"]["agreement"] == r["agreement"]
    # GOBO keeps the embeddings, round-to-nearest at the same size does not (cosine 0.866 vs 0.073 measured here)
    assert doc["results"][0]["mean_cosine"] > 0.8 and doc["results"][1]["mean_cosine"] < 0.2
    png = (out / "sweep.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# ---------------------------------------------------------------------------- bad input


def _not_a_model(tmp: Path) -> Path:
    d = tmp / "notes"
    d.mkdir()
    (d / "readme.txt").write_text("not a model")
    return d


@pytest.mark.parametrize(
    "case, args, pattern",
    [
        ("missing", lambda t: ["report", t / "nope"], r"nope is not a directory"),
        ("not-gobo", lambda t: ["report", _not_a_model(t)], r"not a gobo model directory.*gobo quantize"),
        ("bad-source", lambda t: ["report", "MODEL", "--source", t / "nope"], r"nope"),
        ("sweep-bits", lambda t: ["sweep", "minilm-l6", "--bits", "3", "9", "-o", t / "sw"], r"--bits must be from 1 to 8, got 9"),
        ("sweep-model", lambda t: ["sweep", t / "nope", "--bits", "3", "-o", t / "sw"], r"nope"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(case, args, pattern, tmp_path, gobo_paper3):
    argv = [gobo_paper3.outdir if a == "MODEL" else a for a in args(tmp_path)]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    outdir_before = sorted(p.name for p in gobo_paper3.outdir.iterdir())
    assert_user_error(run_gobo(*argv, cwd=tmp_path), pattern)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # no report.html, no sweep directory
    assert sorted(p.name for p in gobo_paper3.outdir.iterdir()) == outdir_before


def test_demo_ends_with_the_report_path(tmp_path):
    """What `make demo` runs, on a small subset: the table, then the report of the gobo model."""
    from test_cli import run_gobo

    proc = run_gobo("demo", "--out", tmp_path / "demo", "--methods", "gobo", "directq", "--limit", "60", "--train-limit", "200",
                    "--quiet", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("report: "), proc.stdout
    page = Path(last[len("report: "):])
    assert page == tmp_path / "demo" / "minilm-l6-gobo-3b" / "report.html"
    html = page.read_text()
    assert "<img" in html and "agreement" in html.lower()  # the evaluation made the page

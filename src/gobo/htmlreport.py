"""A one-file HTML report of a compressed model: what GOBO did to each tensor, and what it cost.

The page shows the summary (sizes, bits, and the frozen-probe accuracy when
``OUTDIR/eval.json`` exists, see :mod:`gobo.evalstore`), a figure of the bits spent per
layer, a sortable per-tensor table, and per tensor a histogram of its FP32 weights on a
log-count scale with the Gaussian that GOBO fits (mean and std of the whole tensor), the
outlier bounds (where the log-density equals the threshold, -4 by default), the centroids
and the number of outliers kept exact.

Everything is embedded (PNG as base64, CSS and a few lines of JavaScript inline), so the
file opens offline and can be mailed around. Plots are drawn with matplotlib's object API
(Agg, no pyplot state), imported only here and only when a report is built.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .runs import atomic_write, fmt_bytes

__all__ = ["REPORT_FILE", "ReportInfo", "build_report", "outlier_bounds", "write_report"]

REPORT_FILE = "report.html"
_BINS = 120
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# one palette for the figures and the page's legend
_C_HIST = "#4c72b0"
_C_GAUSS = "#222222"
_C_BOUND = "#c44e52"
_C_CENT = "#55a868"
_C_OUTL = "#dd8452"


@dataclass(frozen=True)
class ReportInfo:
    """What :func:`write_report` wrote."""

    path: Path
    n_tensors: int  # quantized tensors shown (one histogram each)
    weights_from: str  # "source" (FP32 weights of the source model) or "dequantized"
    source_dir: str | None  # the FP32 model the histograms were read from
    evaluated: bool  # the page shows stored frozen-probe results
    nbytes: int  # size of the HTML file


# ---------------------------------------------------------------------------- helpers


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _group_of(name: str) -> tuple[str, str]:
    """(key, label) of the layer a tensor belongs to: the name up to its first number
    ('encoder.layer.3' -> 'layer 3'), else its first component ('embeddings')."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1]), (f"{parts[i - 1]} {p}" if i else p)
    head = parts[0] if len(parts) > 1 else name
    return head, head


def _fmt_db(x: float) -> str:
    return "inf" if math.isinf(x) else ("-" if math.isnan(x) else f"{x:.1f}")


def _sort_value(x: float) -> str:
    if math.isnan(x):
        return "-1e308"
    if math.isinf(x):
        return "1e308" if x > 0 else "-1e308"
    return repr(float(x))


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode("ascii")


def outlier_bounds(mu: float, sigma: float, threshold: float) -> tuple[float, float] | None:
    """The interval where N(mu, sigma) has log-density >= ``threshold`` (GOBO's inliers),
    or None where no weight can be an inlier or sigma is 0 (the same rule as
    :func:`gobo.methods.gobo.gaussian_outlier_mask`)."""
    if not sigma > 0.0:
        return None
    rhs = 2.0 * (-threshold - math.log(sigma) - _LOG_SQRT_2PI)
    if rhs <= 0.0:
        return None
    half = math.sqrt(rhs) * sigma
    return mu - half, mu + half


def _levels(qt) -> tuple[np.ndarray, str]:
    """The values the codes stand for: the centroids themselves, or, where rows are scaled
    and shifted, the levels of a row with the median scale and offset."""
    cb = qt.codebook.astype(np.float64)
    if qt.row_scale is None and qt.row_offset is None:
        return np.unique(cb.reshape(-1)), "centroids"
    scale = float(np.median(qt.row_scale.astype(np.float64))) if qt.row_scale is not None else 1.0
    offset = float(np.median(qt.row_offset.astype(np.float64))) if qt.row_offset is not None else 0.0
    return np.unique(cb[0] * scale + offset), "levels of the median row"


# ---------------------------------------------------------------------------- FP32 source


def _resolve_source(cm, source: str | os.PathLike | None) -> tuple[Path | None, str]:
    """The FP32 source model directory and a note for the page (why it is absent)."""
    from .assets import resolve_model
    from .hf import weights_sha256

    want = cm.source.get("weights_sha256")
    if source is not None:
        d = resolve_model(source)  # FileNotFoundError for a bad path: the caller's mistake
        if want and weights_sha256(d) != want:
            raise ValueError(f"{d} holds other weights than the ones this model was quantized from; pass the right source model")
        return d, ""
    candidates = []
    if cm.source.get("dir"):
        candidates.append(Path(cm.source["dir"]))
    if cm.source.get("name"):
        try:
            candidates.append(resolve_model(cm.source["name"]))
        except (FileNotFoundError, ValueError, RuntimeError):
            pass
    for d in candidates:
        if d.is_dir() and (not want or weights_sha256(d) == want):
            return d, ""
    if not candidates:
        return None, "the file records no source model"
    return None, f"the FP32 source model ({cm.source.get('name') or candidates[0]}) is not available here or holds other weights"


class _SourceWeights:
    """Reads single FP32 tensors from a model directory (safetensors, else a torch .bin)."""

    def __init__(self, model_dir: Path) -> None:
        self.files: dict[str, Path] = {}
        self.state: dict[str, np.ndarray] | None = None
        for p in sorted(model_dir.glob("*.safetensors")):
            from safetensors import safe_open

            with safe_open(str(p), "np") as f:
                for k in f.keys():
                    self.files.setdefault(k, p)
        if not self.files:
            bins = sorted(model_dir.glob("*.bin"))
            if bins:
                import torch

                self.state = {}
                for p in bins:
                    sd = torch.load(str(p), map_location="cpu", weights_only=True)
                    self.state.update({k: v for k, v in sd.items() if hasattr(v, "float")})
        self.keys = list(self.files) if self.state is None else list(self.state)

    def _key(self, name: str) -> str | None:
        if name in self.files or (self.state is not None and name in self.state):
            return name
        hits = [k for k in self.keys if k.endswith("." + name) or name.endswith("." + k)]
        return hits[0] if len(hits) == 1 else None

    def get(self, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        key = self._key(name)
        if key is None:
            return None
        if self.state is not None:
            w = self.state[key].float().numpy()
        else:
            from safetensors import safe_open

            try:
                with safe_open(str(self.files[key]), "np") as f:
                    w = f.get_tensor(key)
            except Exception:  # dtypes numpy lacks (bfloat16): read through torch
                with safe_open(str(self.files[key]), "pt") as f:
                    w = f.get_tensor(key).float().numpy()
        w = np.asarray(w, dtype=np.float32)
        return w if tuple(w.shape) == tuple(shape) else None


# ---------------------------------------------------------------------------- figures


def _count_label(v: float, _pos=None) -> str:
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:g}{suffix}"
    return f"{v:g}"


class _HistogramPlotter:
    """One small figure whose artists are updated for every tensor: drawing a fresh axes
    (ticks, labels, layout) costs ten times more than moving the data of an existing one."""

    def __init__(self) -> None:
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullLocator

        self.fig = Figure(figsize=(4.3, 2.2), dpi=90)
        ax = self.ax = self.fig.add_axes((0.12, 0.17, 0.85, 0.79))
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10.0, numticks=6))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(_count_label))  # plain text: mathtext costs
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.tick_params(labelsize=6.5, length=2, pad=1.5)
        ax.set_xlabel("weight", fontsize=6.5, labelpad=1)
        ax.set_ylabel("count", fontsize=6.5, labelpad=1)
        self.bars = ax.stairs(np.ones(_BINS), np.arange(_BINS + 1.0), fill=True, color=_C_HIST, alpha=0.75, lw=0)
        self.levels = ax.vlines([0.0], 0.5, 1.0, colors=_C_CENT, lw=0.7, alpha=0.8)
        (self.gauss,) = ax.plot([0.0], [1.0], color=_C_GAUSS, lw=1.0)
        self.bounds = [ax.axvline(0.0, color=_C_BOUND, ls="--", lw=1.0) for _ in range(2)]
        (self.outliers,) = ax.plot([], [], "|", color=_C_OUTL, ms=6, mew=0.6)

    def __call__(self, w: np.ndarray, qt, threshold: float | None) -> tuple[str, dict]:
        flat = w.reshape(-1)
        lo, hi = float(flat.min()), float(flat.max())
        if not hi > lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(flat, bins=_BINS, range=(lo, hi))
        mu = float(flat.mean(dtype=np.float64))
        sigma = float(flat.std(dtype=np.float64))
        ymax = max(float(counts.max()), 1.0) * 3.0
        ybot = 0.5
        self.bars.set_data(np.maximum(counts, 1e-3).astype(np.float64), edges)
        levels, _ = _levels(qt)
        self.levels.set_segments([[(v, ybot), (v, ymax)] for v in levels])
        self.levels.set_alpha(0.8 if levels.size <= 64 else 0.35)
        if sigma > 0:
            x = np.linspace(lo, hi, 300)
            pdf = np.exp(-0.5 * ((x - mu) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
            self.gauss.set_data(x, np.maximum(flat.size * (edges[1] - edges[0]) * pdf, 1e-3))
        self.gauss.set_visible(sigma > 0)
        bounds = outlier_bounds(mu, sigma, threshold) if threshold is not None else None
        for line, b in zip(self.bounds, bounds or (None, None)):
            line.set_visible(b is not None)
            if b is not None:
                line.set_xdata([b, b])
        vals = qt.outlier_value
        self.outliers.set_data(vals, np.full(vals.size, ybot * 1.35))
        self.ax.set_ylim(ybot, ymax)
        self.ax.set_xlim(lo - 0.02 * (hi - lo), hi + 0.02 * (hi - lo))
        info = {"mu": mu, "sigma": sigma, "bounds": bounds, "levels": int(levels.size)}
        return _png(self.fig), info


def _bits_figure(groups: list[dict]) -> str:
    """Stored megabytes per layer (codes / tables / outliers) and bits per weight."""
    from matplotlib.figure import Figure

    labels = [g["label"] for g in groups]
    y = np.arange(len(groups))[::-1]
    fig = Figure(figsize=(9.0, 1.0 + 0.24 * len(groups)), dpi=90)
    a1, a2 = fig.subplots(1, 2, sharey=True, gridspec_kw={"width_ratios": [1.25, 1.0]})
    left = np.zeros(len(groups))
    for key, colour, label in (("codes", _C_HIST, "codes"), ("tables", _C_CENT, "centroids + row stats"), ("outliers", _C_OUTL, "outliers (FP32 + index)")):
        v = np.array([g[key] for g in groups], dtype=np.float64) / 1e6
        a1.barh(y, v, left=left, color=colour, label=label, height=0.7)
        left += v
    a1.set_yticks(y, labels, fontsize=7)
    a1.set_xlabel("stored MB", fontsize=7)
    a1.legend(fontsize=6.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    bpw = np.array([8.0 * g["bytes"] / max(g["weights"], 1) for g in groups])
    code = np.array([g["code_bits"] / max(g["weights"], 1) for g in groups])
    a2.barh(y, bpw, color="#8c8c8c", height=0.7, label="bits/weight, all included")
    a2.plot(code, y, "D", color=_C_HIST, ms=3.5, label="average code bits")
    for yi, v in zip(y, bpw):
        a2.text(v, yi, f" {v:.2f}", va="center", fontsize=6)
    a2.set_xlim(0, max(float(bpw.max()), 1.0) * 1.18)
    a2.set_xlabel("bits per weight", fontsize=7)
    a2.legend(fontsize=6.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, frameon=False)
    for a in (a1, a2):
        a.tick_params(labelsize=6.5, length=2)
        a.grid(axis="x", lw=0.3, alpha=0.5)
    fig.tight_layout(pad=0.4)
    return _png(fig)


# ---------------------------------------------------------------------------- the page


_CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1240px;margin:0 auto;padding:18px 20px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.sub{color:#666;margin:0 0 14px}.note{color:#8a5a00;background:#fff6e0;border:1px solid #f0d9a0;padding:6px 10px;border-radius:4px}
.cards{display:flex;flex-wrap:wrap;gap:10px}.card{background:#fff;border:1px solid #e2e2e2;border-radius:6px;padding:8px 12px;min-width:130px}
.card b{display:block;font-size:19px}.card span{color:#666;font-size:12px}
table{border-collapse:collapse;background:#fff;font-size:12.5px}th,td{border:1px solid #e2e2e2;padding:3px 8px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}td:first-child,th:first-child{text-align:left}
table.sortable th{cursor:pointer;user-select:none}table.sortable th[data-dir=asc]::after{content:' \\25B2'}table.sortable th[data-dir=desc]::after{content:' \\25BC'}
tbody tr:hover{background:#f3f7ff}.tablewrap{max-height:620px;overflow:auto;border:1px solid #e2e2e2;display:inline-block;max-width:100%}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure.hist{margin:0;background:#fff;border:1px solid #e2e2e2;border-radius:4px;padding:4px}
figure.hist figcaption{font-size:11.5px;color:#444;max-width:387px}figure.hist:target{outline:2px solid #c44e52}
.legend span{display:inline-block;margin-right:14px;font-size:12.5px}.legend i{display:inline-block;width:18px;height:3px;vertical-align:middle;margin-right:5px}
details{margin-top:8px}pre{background:#fff;border:1px solid #e2e2e2;padding:8px;font-size:12px;overflow:auto}
.good{color:#2a7d2a}.bad{color:#b03030}
"""

# Errors are collected from the first moment (the head), then a marker tells a headless
# browser the page finished: data-ready, data-errors, data-images / data-images-ok.
_JS_HEAD = """
window.__goboErrors=[];
window.addEventListener('error',function(e){window.__goboErrors.push(String(e.message||e));});
"""

_JS_BODY = """
(function(){
  function value(row,i,num){var c=row.cells[i];var v=c.getAttribute('data-v');if(v===null)v=c.textContent;
    if(num){var f=parseFloat(v);return isNaN(f)?-Infinity:f;}return v.toLowerCase();}
  function sortBy(table,th,dir){
    var i=th.cellIndex,num=th.getAttribute('data-type')==='num',body=table.tBodies[0];
    var rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){var x=value(a,i,num),y=value(b,i,num);var r=x<y?-1:(x>y?1:0);
      if(r===0)r=parseInt(a.getAttribute('data-i'),10)-parseInt(b.getAttribute('data-i'),10);else if(dir==='desc')r=-r;return r;});
    rows.forEach(function(r){body.appendChild(r);});
    Array.prototype.forEach.call(th.parentNode.cells,function(h){h.removeAttribute('data-dir');});
    th.setAttribute('data-dir',dir);
  }
  var tables=document.querySelectorAll('table.sortable');
  Array.prototype.forEach.call(tables,function(t){
    Array.prototype.forEach.call(t.tHead.rows[0].cells,function(th){
      th.addEventListener('click',function(){sortBy(t,th,th.getAttribute('data-dir')==='asc'?'desc':'asc');});
    });
  });
  // '#sort=KEY' or '#sort=-KEY' opens the page with the tensor table sorted
  var m=/^#sort=(-?)([\\w-]+)$/.exec(window.location.hash);
  if(m){var th=document.querySelector('#tensor-table th[data-key="'+m[2]+'"]');
    if(th)sortBy(document.getElementById('tensor-table'),th,m[1]?'desc':'asc');}
  function ready(){
    var imgs=document.images,ok=0;
    for(var k=0;k<imgs.length;k++){if(imgs[k].complete&&imgs[k].naturalWidth>0)ok++;}
    var b=document.body;
    b.setAttribute('data-images',String(imgs.length));
    b.setAttribute('data-images-ok',String(ok));
    b.setAttribute('data-errors',String(window.__goboErrors.length));
    b.setAttribute('data-error-list',window.__goboErrors.join(' | '));
    b.setAttribute('data-ready','1');
  }
  if(document.readyState==='complete')ready();else window.addEventListener('load',ready);
})();
"""


def _card(value: str, label: str, cls: str = "") -> str:
    c = f' class="{cls}"' if cls else ""
    return f'<div class="card"><b{c}>{html.escape(value)}</b><span>{html.escape(label)}</span></div>'


def _eval_html(ev: dict | None, outdir: Path) -> str:
    if ev is None:
        return (
            '<p class="note" id="eval-missing">Not evaluated yet: <code>gobo eval '
            f"{html.escape(str(outdir))}</code> measures accuracy on the Rotten Tomatoes frozen-probe benchmark and stores it for this page.</p>"
        )
    fp, r = ev["fp32"], ev["result"]

    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}"

    delta = r.get("accuracy_delta")
    cls = "good" if delta is not None and delta >= -0.01 else "bad"
    cards = [
        _card(f"{pct(r.get('accuracy'))} %", "accuracy (compressed)"),
        _card(f"{pct(fp.get('accuracy'))} %", "accuracy (FP32)"),
        _card("-" if delta is None else f"{100 * delta:+.2f}", "accuracy change, points", cls),
        _card(f"{pct(r.get('agreement'))} %", "agreement with FP32"),
        _card("-" if r.get("mean_cosine") is None else f"{r['mean_cosine']:.4f}", "embedding cosine to FP32"),
    ]
    head = (
        f"Rotten Tomatoes, frozen probe: {r.get('n_test', '?')} test texts, probe trained on "
        f"{fp.get('n_train', '?')} FP32 train embeddings; measured {html.escape(str(ev.get('created', '?')))}."
    )
    return f'<div class="cards" id="eval">{"".join(cards)}</div><p class="sub">{head}</p>'


def _build(outdir: Path, source, progress: Callable[[int, int], None] | None) -> tuple[str, dict]:
    from . import __version__
    from .config import GoboConfig, config_to_json
    from .evalstore import load_eval
    from .io import WEIGHTS_FILE, read_compressed
    from .report import summarize

    cm = read_compressed(outdir)
    s = summarize(cm, outdir / WEIGHTS_FILE)
    names = sorted(cm.quantized, key=_natural_key)
    src_dir, why = _resolve_source(cm, source)
    weights = _SourceWeights(src_dir) if src_dir is not None else None
    threshold = cm.config.outlier_threshold if isinstance(cm.config, GoboConfig) else None
    ev = load_eval(outdir)
    rows_by_name = {t.name: t for t in s.tensors}

    plot = _HistogramPlotter()
    figures, table_rows = [], []
    groups: dict[str, dict] = {}
    n_fallback = 0
    for i, name in enumerate(names):
        qt = cm.quantized[name]
        t = rows_by_name[name]
        w = weights.get(name, qt.shape) if weights is not None else None
        exact = w is not None
        if not exact:
            w = qt.dequantize()
            n_fallback += 1
        png, info = plot(w, qt, threshold)
        _, level_label = _levels(qt)
        pct = 100.0 * qt.n_outliers / max(qt.numel, 1)
        bnd = info["bounds"]
        cap = [f"<b>{html.escape(name)}</b> {'x'.join(map(str, qt.shape))}, {qt.bits} bits, SQNR {_fmt_db(t.sqnr_db)} dB.",
               f"Outliers kept FP32: <b>{qt.n_outliers:,}</b> ({pct:.3f}%).",
               f"Gaussian fit mean {info['mu']:.4g}, std {info['sigma']:.4g}"]
        cap[-1] += f"; inliers within [{bnd[0]:.4g}, {bnd[1]:.4g}]." if bnd else "."
        cap.append(f"{info['levels']} {level_label} marked.")
        if not exact:
            cap.append('<i>FP32 weights unavailable: histogram of the dequantized values.</i>')
        figures.append(
            f'<figure class="hist" id="t{i}" data-tensor="{html.escape(name)}" data-bits="{qt.bits}" data-outliers="{qt.n_outliers}">'
            f'<img alt="histogram of {html.escape(name)}" width="387" height="198" src="data:image/png;base64,{png}">'
            f'<figcaption>{" ".join(cap)}</figcaption></figure>'
        )
        cells = [
            (f'<a href="#t{i}">{html.escape(name)}</a>', None),
            ("x".join(map(str, qt.shape)), str(qt.numel)),
            (f"{qt.numel:,}", str(qt.numel)),
            (str(qt.bits), str(qt.bits)),
            (f"{qt.n_outliers:,}", str(qt.n_outliers)),
            (f"{pct:.3f}", repr(pct)),
            (_fmt_db(t.sqnr_db), _sort_value(t.sqnr_db)),
            (f"{t.bits_per_weight:.2f}", repr(t.bits_per_weight)),
            (fmt_bytes(t.nbytes), str(t.nbytes)),
            (f"{t.ratio:.1f}", repr(t.ratio)),
        ]
        tds = "".join(f"<td>{c}</td>" if v is None else f'<td data-v="{v}">{c}</td>' for c, v in cells)
        table_rows.append(f'<tr data-i="{i}" data-tensor="{html.escape(name)}">{tds}</tr>')

        key, label = _group_of(name)
        g = groups.setdefault(key, {"label": label, "codes": 0, "tables": 0, "outliers": 0, "bytes": 0, "weights": 0, "code_bits": 0})
        stats = sum(a.nbytes for a in (qt.row_scale, qt.row_offset) if a is not None)
        g["codes"] += qt.codes.nbytes
        g["tables"] += qt.codebook.nbytes + stats
        g["outliers"] += qt.nbytes() - qt.codes.nbytes - qt.codebook.nbytes - stats
        g["bytes"] += qt.nbytes()
        g["weights"] += qt.numel
        g["code_bits"] += qt.numel * qt.bits
        if progress is not None:
            progress(i + 1, len(names))
    bits_png = _bits_figure(list(groups.values())) if groups else ""

    if weights is None:
        weights_note = f'<p class="note" id="weights-note">Histograms show the <b>dequantized</b> values: {html.escape(why)}. Pass the FP32 model with <code>--source</code> to see the original weights.</p>'
    elif n_fallback:
        weights_note = f'<p class="note" id="weights-note">{n_fallback} tensor(s) were not found in the FP32 model {html.escape(str(src_dir))}; their histograms show dequantized values.</p>'
    else:
        weights_note = f'<p class="sub" id="weights-note">Histograms of the FP32 weights of {html.escape(str(src_dir))}.</p>'

    model_name = cm.source.get("name") or outdir.name
    method = s.method
    cfg = config_to_json(cm.config)
    cards = [
        _card(f"{s.ratio:.2f}x", "smaller than FP32"),
        _card(fmt_bytes(s.file_bytes or s.stored_bytes), f"file (FP32 {fmt_bytes(s.fp32_bytes)})"),
        _card(f"{s.avg_code_bits:.2f}", "code bits per weight (average)"),
        _card(f"{s.bits_per_weight:.2f}", "bits per weight, all included"),
        _card(f"{100 * s.outlier_fraction:.3f} %", "outliers kept FP32"),
        _card(f"{_fmt_db(s.min_sqnr_db)} / {_fmt_db(s.mean_sqnr_db)}", "SQNR dB, min / mean"),
        _card(f"{s.n_quantized} / {s.n_dense}", "tensors quantized / kept"),
    ]
    thr = f"log-density threshold {threshold:g}" if threshold is not None else "no outliers (uniform per-row method)"
    heads = [("tensor", "name", "str"), ("shape", "shape", "num"), ("weights", "weights", "num"), ("bits", "bits", "num"),
             ("outliers", "outliers", "num"), ("outlier %", "outlier-pct", "num"), ("SQNR dB", "sqnr", "num"),
             ("bits/w", "bpw", "num"), ("bytes", "bytes", "num"), ("ratio", "ratio", "num")]
    thead = "".join(f'<th data-key="{k}" data-type="{ty}">{html.escape(h)}</th>' for h, k, ty in heads)
    scaled = any(q.row_scale is not None or q.row_offset is not None for q in cm.quantized.values())
    legend = (
        '<p class="legend">'
        f'<span><i style="background:{_C_HIST}"></i>weights (log count)</span>'
        f'<span><i style="background:{_C_GAUSS}"></i>fitted Gaussian</span>'
        + (f'<span><i style="background:{_C_BOUND}"></i>outlier bounds ({html.escape(thr)})</span>' if threshold is not None else "")
        + f'<span><i style="background:{_C_CENT}"></i>{"centroids (scaled rows: the levels of the median row)" if scaled else "centroids"}</span>'
        f'<span><i style="background:{_C_OUTL}"></i>outliers kept FP32</span></p>'
    )
    title = f"gobo report: {model_name}, {method}, {s.avg_code_bits:.2f} bits"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<meta name="generator" content="gobo {__version__}"><title>{html.escape(title)}</title>
<style>{_CSS}</style><script>{_JS_HEAD}</script></head>
<body><main>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(str(outdir))} &middot; source {html.escape(str(model_name))} ({html.escape(str(cm.source.get('model_type', '?')))}) &middot; {s.n_quantized} tensors, {s.quantized_weights:,} weights quantized &middot; {html.escape(thr)} &middot; made {time.strftime('%Y-%m-%d %H:%M')} by gobo {__version__}</p>
<section id="summary"><h2>Summary</h2><div class="cards">{"".join(cards)}</div>
<details><summary>method config</summary><pre>{html.escape(json.dumps(cfg, indent=2))}</pre></details></section>
<section id="accuracy"><h2>Accuracy</h2>{_eval_html(ev, outdir)}</section>
<section id="layers"><h2>Bits spent per layer</h2>
<img id="bits-per-layer" alt="bits spent per layer" src="data:image/png;base64,{bits_png}"></section>
<section id="tensors"><h2>Tensors</h2><p class="sub">Click a column to sort; click a name for its histogram. Biases, LayerNorms and other kept tensors are not listed.</p>
<div class="tablewrap"><table id="tensor-table" class="sortable"><thead><tr>{thead}</tr></thead>
<tbody>{"".join(table_rows)}</tbody></table></div></section>
<section id="histograms"><h2>Weight histograms</h2>{weights_note}{legend}
<div class="grid">{"".join(figures)}</div></section>
</main><script>{_JS_BODY}</script></body></html>
"""
    meta = {"n_tensors": len(names), "weights_from": "dequantized" if weights is None else "source",
            "source_dir": None if src_dir is None else str(src_dir), "evaluated": ev is not None}
    return page, meta


def build_report(outdir: str | os.PathLike, source: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None) -> str:
    """The report of compressed model ``outdir`` as one self-contained HTML string.

    ``source``: the FP32 model (directory or bundled name) whose weights the histograms
    show; by default the one recorded in the file, and the dequantized values when that
    is unavailable. ``progress(done, total)`` is called after each tensor.
    """
    return _build(Path(outdir), source, progress)[0]


def write_report(outdir: str | os.PathLike, output: str | os.PathLike | None = None,
                 source: str | os.PathLike | None = None,
                 progress: Callable[[int, int], None] | None = None) -> ReportInfo:
    """Build the report and write it atomically (a temporary file renamed into place) to
    ``output``, by default ``OUTDIR/report.html``. Nothing is written if building fails."""
    outdir = Path(outdir)
    page, meta = _build(outdir, source, progress)
    path = Path(output) if output is not None else outdir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    data = page.encode("utf-8")
    atomic_write(path, data)
    return ReportInfo(path=path, nbytes=len(data), **meta)

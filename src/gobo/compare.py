"""The methods side by side on one model: a table shaped like Q-BERT's.

Every row is made and measured in the same run against the same FP32 model, test texts and
frozen probe (:mod:`gobo.evaluate`): FP32; DirectQ (one range per matrix, Q-BERT's naive
baseline) at 8/4/3/2 bits; Q-BERT group-wise at 8/4/3/2 bits and its Hessian-ranked 2/3 and
2/4 mixed precision, each also with quantization-aware fine-tuning; FQ-BERT (4-bit weights,
8-bit activations, integer pipeline); GOBO as the paper gives it (3 bits) and gobo's default
at 4/3/2 bits and at 2.5 bits per weight (mixed precision, data-free, and weighted by the
layers' Hessian sensitivity).

Each finished row is stored in ``OUT/rows/KEY.json`` together with what it depends on (the
row's config, the source weights' hash, the test and train subsets); a run that is stopped
resumes from the rows already measured. ``OUT/compare.json``, ``OUT/compare.md`` and
``OUT/compare.png`` (accuracy against total size) are rewritten as rows arrive. The compressed
models stay in ``OUT/KEY`` (``gobo report``, ``gobo eval`` and ``gobo hw`` read them).
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .runs import Stage, atomic_write, json_clean, save_png, setup_run

__all__ = ["COMPARE_JSON", "COMPARE_MD", "COMPARE_PNG", "Row", "RowResult", "default_rows", "markdown", "run_compare", "select_rows"]

COMPARE_JSON = "compare.json"
COMPARE_MD = "compare.md"
COMPARE_PNG = "compare.png"
_VERSION = 1


@dataclass(frozen=True)
class Row:
    """One line of the table: how it is made."""

    key: str  # file-name-safe id, e.g. "qbert-2-3mp-qat"
    label: str  # as printed
    kind: str  # "fp32", "quantize" (gobo.quantize), "qat" (gobo.qat.finetune), "fqbert"
    config: object = None  # the method config (GoboConfig, DirectQConfig, QBertConfig, FQBertConfig)
    finetune: bool = False  # the method trains the model
    data: bool = False  # the method reads training data (Hessian, calibration, fine-tuning)


def default_rows(qat: bool = True) -> list[Row]:
    """The rows of Q-BERT's table and GOBO's, in print order."""
    from .config import DirectQConfig, GoboConfig, QBertConfig
    from .fqbert import FQBertConfig
    from .sweep import sweep_config

    rows = [Row("fp32", "FP32", "fp32")]
    rows += [Row(f"directq-{b}", f"DirectQ {b}", "quantize", DirectQConfig(b, granularity="tensor")) for b in (8, 4, 3, 2)]
    qb = [(f"qbert-{b}", f"Q-BERT {b}", QBertConfig(bits=b), False) for b in (8, 4, 3, 2)]
    qb += [(f"qbert-{m.replace('/', '-')}mp", f"Q-BERT {m} MP", QBertConfig(mixed=m), True) for m in ("2/3", "2/4")]
    rows += [Row(k, lab, "quantize", c, data=d) for k, lab, c, d in qb]
    if qat:
        rows += [Row(f"{k}-qat", f"{lab} + QAT", "qat", c, finetune=True, data=True) for k, lab, c, _ in qb]
    rows.append(Row("fqbert-w4a8", "FQ-BERT w4a8", "fqbert", FQBertConfig(), data=True))
    rows.append(Row("gobo-paper-3", "GOBO 3 (paper recipe)", "quantize", GoboConfig.paper(3)))
    rows += [Row(f"gobo-{b}", f"GOBO {b}", "quantize", sweep_config("gobo", b)) for b in (4, 3, 2)]
    rows.append(Row("gobo-grid-3", "GOBO grid 3 (entropy coded)", "quantize", GoboConfig.grid(3)))
    rows.append(Row("gobo-grid-fast-3", "GOBO grid 3, fast (entropy coded)", "quantize", GoboConfig.grid_fast(3)))
    rows.append(Row("gobo-mp-2.5", "GOBO MP 2.5", "quantize", GoboConfig(average=2.5)))
    rows.append(Row("gobo-mp-2.5-hessian", "GOBO MP 2.5 (Hessian)", "quantize", GoboConfig(average=2.5, allocate="hessian"), data=True))
    return rows


def select_rows(rows: Sequence[Row], patterns: Sequence[str] | None) -> list[Row]:
    """The rows whose key matches one of the glob ``patterns`` (all when None); FP32 always."""
    if not patterns:
        return list(rows)
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(r.key, p) for r in rows)]
    if unknown:
        raise ValueError(f"no row matches {unknown[0]!r}; rows are: {', '.join(r.key for r in rows)}")
    return [r for r in rows if r.kind == "fp32" or any(fnmatch.fnmatchcase(r.key, p) for p in patterns)]


@dataclass(frozen=True)
class RowResult:
    """One measured line of the table."""

    key: str
    label: str
    weight_bits: str  # encoder weights: "3", "2-6", "2,2,2,3,3,3" (per layer)
    embedding_bits: str
    activation_bits: str  # "32" = float
    accuracy: float
    agreement: float  # fraction of test predictions equal to FP32's
    mean_cosine: float
    size_without_embeddings: int  # bytes of everything stored but the embedding tables (and their LayerNorm)
    size_total: int  # bytes of the whole compressed model (the file, or FQ-BERT's stored tensors)
    ratio: float  # FP32 bytes / size_total
    finetune: bool
    data: bool
    quantize_seconds: float  # nan for FP32; with a cached Hessian measurement, without it
    model_dir: str  # the compressed model directory ("" for FP32 and FQ-BERT)


def _is_embedding(name: str) -> bool:
    return "embeddings." in name or name.startswith("emb.")


def _bits_text(values: Sequence[int]) -> str:
    s = sorted(set(values))
    return "-" if not s else str(s[0]) if len(s) == 1 else f"{s[0]}-{s[-1]}"


def _describe_compressed(cm, file_bytes: int) -> dict:
    """Bits and sizes of a compressed model, from its tensors."""
    from .config import QBertConfig

    enc = {n: q for n, q in cm.quantized.items() if not _is_embedding(n)}
    emb = {n: q for n, q in cm.quantized.items() if _is_embedding(n)}
    wb = _bits_text([q.bits for q in enc.values()])
    if isinstance(cm.config, QBertConfig) and cm.config.layer_bits:
        wb = ",".join(str(b) for b in cm.config.layer_bits)
    emb_bytes = sum(q.nbytes() for q in emb.values()) + sum(a.nbytes for n, a in cm.dense.items() if _is_embedding(n))
    return {
        "weight_bits": wb,
        "embedding_bits": _bits_text([q.bits for q in emb.values()]) if emb else "32",
        "size_without_embeddings": int(cm.nbytes() - emb_bytes),
        "size_total": int(file_bytes),
        "ratio": cm.fp32_bytes() / file_bytes,
    }


def _fingerprint(row: Row, sha: str, n_test: int, n_train: int) -> dict:
    from .config import config_to_json

    cfg = row.config
    if cfg is None:
        c = None
    elif hasattr(cfg, "to_dict"):
        c = {"type": type(cfg).__name__, "data": cfg.to_dict()}
    else:
        c = config_to_json(cfg)
    doc = {"row": row.key, "kind": row.kind, "config": c, "source_sha256": sha, "n_test": n_test, "n_train": n_train}
    return json.loads(json.dumps(doc))  # as stored: tuples become lists


def run_compare(
    model: str | os.PathLike,
    out: str | os.PathLike,
    rows: Sequence[Row] | None = None,
    *,
    limit: int | None = None,
    train_limit: int | None = None,
    stage: Stage | None = None,
    hessian=None,
    qat_settings=None,
) -> dict:
    """Make and measure every row on ``model``; write and return the table document.

    ``limit``/``train_limit``: test texts and probe training texts (evenly spread subsets;
    None: the full splits). Rows already measured in ``out`` with the same fingerprint are
    reused. ``hessian`` (a :class:`gobo.hessian.SensitivitySettings`) samples the Hessian of
    the Q-BERT MP rows and the GOBO Hessian row differently from the default (e.g. fewer texts
    for a large model on a CPU); their fingerprint then records it. ``qat_settings`` (a
    :class:`gobo.qat.QatSettings`) replaces the fine-tuning schedule of the ``+ QAT`` rows, and
    is recorded in their fingerprint likewise.
    """
    import numpy as np

    import gobo

    from .evaluate import compare, encode
    from .hessian import needs_plan, resolve_plan
    from .io import WEIGHTS_FILE

    rows = list(rows) if rows is not None else default_rows()
    run = setup_run(model, out, limit, train_limit, stage)
    src_dir, sha, tok, fp32, bench, bar = run.src_dir, run.sha, run.tokenizer, run.fp32, run.bench, run.bar
    n_test, n_train = run.n_test, run.n_train
    out = Path(out)
    labels = np.asarray(bench.test_labels)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    e32 = None
    fp32_bytes = sum(p.numel() * 4 for p in fp32.state_dict().values() if p.is_floating_point())
    fp32_emb = sum(p.numel() * 4 for n, p in fp32.state_dict().items() if p.is_floating_point() and _is_embedding(n))

    def fp32_embeddings():
        nonlocal e32
        if e32 is None:
            with bar("FP32 test", n_test, "text") as pb:
                e32 = encode(fp32, tok, bench.test_texts, progress=pb.update)
        return e32

    results: list[RowResult] = []
    for k, row in enumerate(rows, 1):
        tag = f"[{k}/{len(rows)}] {row.label}"
        fp = _fingerprint(row, sha, n_test, n_train)
        config = row.config
        if hessian is not None and needs_plan(config):
            fp["hessian"] = asdict(hessian)
        if qat_settings is not None and row.kind == "qat":
            fp["qat"] = asdict(qat_settings)
        stored = out / "rows" / f"{row.key}.json"
        if stored.is_file():
            try:
                doc = json.loads(stored.read_text())
            except ValueError:
                doc = {}
            if doc.get("fingerprint") == fp:
                results.append(RowResult(**{f: (float("nan") if v is None else v) for f, v in doc["result"].items()}))
                continue
        d = out / row.key
        t = time.perf_counter()
        if "hessian" in fp:  # measured here with these settings; gobo.quantize would use the default
            with bar(f"{tag}: Hessian (layer x subset)", None, "layer") as pb:
                config = resolve_plan(config, fp32, src_dir, progress=pb.update, settings=hessian)
        if row.kind == "fp32":
            p32 = bench.probe.predict(fp32_embeddings())
            res = RowResult(row.key, row.label, "32", "32", "32", float(np.mean(p32 == labels)), 1.0, 1.0,
                            fp32_bytes - fp32_emb, fp32_bytes, 1.0, False, False, float("nan"), "")
        elif row.kind in ("quantize", "qat"):
            with bar(f"{tag}: {'fine-tuning' if row.kind == 'qat' else 'quantizing'}", None,
                     "step" if row.kind == "qat" else "tensor") as pb:
                if row.kind == "qat":
                    from . import qat

                    sched = qat_settings if qat_settings is not None else qat.QatSettings()
                    r = qat.finetune(src_dir, config, sched, probe=bench.probe, progress=lambda step, loss: pb.update())
                    secs = time.perf_counter() - t
                    qat.save(r, d, overwrite=True)
                    cm = r.compressed
                else:
                    cm = gobo.quantize(src_dir, config, progress=lambda name, total: pb.update())
                    secs = time.perf_counter() - t
                    cm.source["name"] = str(model)
                    gobo.save(cm, d, overwrite=True)
            with bar(f"{tag}: test", n_test, "text") as pb:
                eq = encode(gobo.load(d), tok, bench.test_texts, progress=pb.update)
            ev = compare(bench.probe, fp32_embeddings(), eq, bench.test_labels)
            info = _describe_compressed(cm, (d / WEIGHTS_FILE).stat().st_size)
            res = RowResult(row.key, row.label, activation_bits="32", accuracy=ev.accuracy, agreement=ev.agreement,
                            mean_cosine=ev.mean_cosine, finetune=row.finetune, data=row.data, quantize_seconds=secs,
                            model_dir=str(d), **info)
        elif row.kind == "fqbert":
            from .data import load_rotten_tomatoes
            from .fqbert import FQBertModel

            calib = load_rotten_tomatoes()[0].stride(256).texts
            with bar(f"{tag}: calibrating", len(calib), "text") as pb:
                fq = FQBertModel.from_pretrained_fp32(fp32, calib, tok, row.config, progress=pb.update)
            secs = time.perf_counter() - t
            with bar(f"{tag}: test (integer path)", n_test, "text") as pb:
                eq = fq.embed(bench.test_texts, progress=pb.update)
            ev = compare(bench.probe, fp32_embeddings(), eq, bench.test_labels)
            stored_t = fq.stored_tensors()
            total = sum(v.numel() * v.element_size() for v in stored_t.values())
            emb = sum(v.numel() * v.element_size() for n, v in stored_t.items() if _is_embedding(n))
            c = row.config
            res = RowResult(row.key, row.label, str(c.w_bits), str(c.emb_bits), str(c.a_bits), ev.accuracy, ev.agreement,
                            ev.mean_cosine, total - emb, total, fp32_bytes / total, row.finetune, row.data, secs, "")
        else:
            raise ValueError(f"unknown row kind {row.kind!r}")
        atomic_write(stored, (json.dumps(json_clean({"fingerprint": fp, "result": asdict(res)}), indent=1) + "\n").encode())
        results.append(res)
        doc = _document(model, src_dir, sha, n_test, n_train, results)
        _write_outputs(out, doc)
    doc = _document(model, src_dir, sha, n_test, n_train, results)
    _write_outputs(out, doc, plot=True)
    return doc


def _document(model, src_dir, sha, n_test, n_train, results) -> dict:
    return json_clean({
        "version": _VERSION,
        "benchmark": "rotten-tomatoes-frozen-probe",
        "model": str(model),
        "source": str(src_dir),
        "source_sha256": sha,
        "n_test": n_test,
        "n_train": n_train,
        "rows": [asdict(r) for r in results],
    })


def _write_outputs(out: Path, doc: dict, plot: bool = False) -> None:
    atomic_write(out / COMPARE_JSON, (json.dumps(doc, indent=2) + "\n").encode())
    atomic_write(out / COMPARE_MD, markdown(doc).encode())
    if plot:
        try:
            plot_compare(doc, out / COMPARE_PNG)
        except ImportError:  # matplotlib missing: the table is the result
            pass


def _mb(n) -> str:
    return f"{n / 1e6:.2f}"


def markdown(doc: dict) -> str:
    """The table as markdown, FP32 first, accuracy deltas against it."""
    rows = doc["rows"]
    fp = next((r for r in rows if r["key"] == "fp32"), None)
    head = ["method", "w-bits", "e-bits", "a-bits", "acc %", "Δ acc", "agree %", "cosine", "size w/o emb. (MB)",
            "size (MB)", "ratio", "fine-tuning", "data", "quantize (s)"]
    lines = [f"{Path(doc['model']).name}: Rotten Tomatoes frozen probe, {doc['n_test']} test texts, "
             f"probe trained on {doc['n_train']} FP32 train embeddings", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "" if fp is None or r["key"] == "fp32" else f"{100 * (r['accuracy'] - fp['accuracy']):+.2f}"
        q = r["quantize_seconds"]
        lines.append("| " + " | ".join([
            r["label"], r["weight_bits"], r["embedding_bits"], r["activation_bits"], f"{100 * r['accuracy']:.2f}", delta,
            f"{100 * r['agreement']:.2f}", f"{r['mean_cosine']:.4f}", _mb(r["size_without_embeddings"]), _mb(r["size_total"]),
            f"{r['ratio']:.2f}x", "yes" if r["finetune"] else "no", "yes" if r["data"] else "no",
            "-" if q is None else f"{q:.1f}",
        ]) + " |")
    lines += ["", "Sizes count every stored byte (codes, codebooks or ranges, outliers, the tensors kept in FP32); "
              "*w/o emb.* leaves out the embedding tables and their LayerNorm. *quantize (s)*: wall time to make the row "
              "(fine-tuning and FQ-BERT's calibration included; a Q-BERT MP or GOBO Hessian row measures the Hessian sensitivity first "
              "unless an earlier run cached it)."]
    return "\n".join(lines) + "\n"


def plot_compare(doc: dict, path: str | os.PathLike) -> Path:
    """Accuracy against total size, one marker per row, FP32 as the reference line."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8.0, 4.2), dpi=100)
    ax = fig.subplots()
    families = {"FP32": "k", "DirectQ": "tab:gray", "Q-BERT": "tab:orange", "FQ-BERT": "tab:purple", "GOBO": "tab:blue"}
    fp = next((r for r in doc["rows"] if r["key"] == "fp32"), None)
    seen = set()
    for r in doc["rows"]:
        fam = next((f for f in families if r["label"].startswith(f)), "other")
        qat = "QAT" in r["label"]
        label = fam + (" + QAT" if qat else "")
        ax.plot([r["size_total"] / 1e6], [100 * r["accuracy"]], "s" if qat else "o", ms=5,
                color=families.get(fam, "tab:red"), mfc="none" if qat else None, label=None if label in seen else label)
        seen.add(label)
        ax.annotate(r["label"].replace(" (paper recipe)", "p").split(" ", 1)[-1] if fam != "FP32" else "", (r["size_total"] / 1e6, 100 * r["accuracy"]),
                    textcoords="offset points", xytext=(3, 3), fontsize=6)
    if fp is not None:
        ax.axhline(100 * fp["accuracy"], color="k", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("model size, MB (log scale)", fontsize=8)
    ax.set_ylabel("test accuracy %", fontsize=8)
    ax.tick_params(labelsize=7)
    ax.grid(lw=0.3, alpha=0.6, which="both")
    ax.legend(fontsize=7, frameon=False)
    ax.set_title(f"{Path(doc['model']).name}: frozen probe, {doc['n_test']} test texts", fontsize=9)
    fig.tight_layout(pad=0.5)
    return save_png(fig, path)

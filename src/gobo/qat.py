"""Quantization-aware fine-tuning for Q-BERT (Shen et al., AAAI 2020, section 3).

Q-BERT fine-tunes the quantized model on the task. Here the task is the benchmark's
(Rotten Tomatoes, fresh vs rotten): the encoder and a linear head on its L2-normalised
mean-pooled embedding are trained together on the training split, starting from FP32
weights and the frozen probe of :mod:`gobo.evaluate`. Every forward pass uses the
group-wise quantized weights of :mod:`gobo.methods.groupwise`; gradients pass the rounding
unchanged (straight-through estimator) to FP32 shadow weights, which AdamW updates. At the
end the shadow weights are quantized once more, exactly as :func:`gobo.quantize` would,
and the result is an ordinary compressed model.

The fine-tuned head is written beside it as ``OUTDIR/head.json`` (plain JSON, see
:func:`save`). ``gobo eval OUTDIR`` still scores with the frozen FP32 probe, which the
fine-tuned encoder has moved away from; :func:`evaluate` reports both that and the accuracy
with the stored head, which is the number the fine-tuning is for.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import QBertConfig
from .evaluate import EvalResult, Probe
from .quantizer import CompressedModel

__all__ = ["HEAD_FILE", "QatEval", "QatResult", "QatSettings", "evaluate", "fake_quantize", "finetune", "load_head", "save"]

HEAD_FILE = "head.json"
HEAD_FORMAT = "gobo-probe-head"


@dataclass(frozen=True)
class QatSettings:
    """Fine-tuning schedule (defaults: 94 steps, about 9 minutes for MiniLM-L6 on a busy 2-core CPU)."""

    texts: int = 3000  # training texts, spread evenly over the train split
    epochs: int = 1
    batch_size: int = 32
    max_tokens: int = 64
    lr: float = 2e-5  # encoder (AdamW)
    head_lr: float = 1e-3  # linear head (AdamW)
    weight_decay: float = 0.01  # encoder weights only
    seed: int = 0  # text order and dropout
    monitor_texts: int = 256  # eval-mode loss on this many training texts, before and after

    def __post_init__(self) -> None:
        for name in ("texts", "epochs", "batch_size", "max_tokens", "monitor_texts"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        for name in ("lr", "head_lr"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{name} must be a positive number, got {v!r}")


@dataclass
class QatResult:
    """The re-quantized model, the fine-tuned head, and how training went."""

    compressed: CompressedModel
    head: Probe
    losses: tuple[float, ...]  # training loss of every step (dropout on)
    loss_start: float  # eval-mode loss of the quantized model on monitor_texts, before
    loss_end: float  # the same after fine-tuning
    seconds: float


@dataclass(frozen=True)
class QatEval:
    """A fine-tuned model on the test split: with the frozen FP32 probe and with its own head."""

    frozen: EvalResult  # what 'gobo eval' reports
    head_accuracy: float  # accuracy with the fine-tuned head stored beside the model

    def to_dict(self) -> dict:
        return {**self.frozen.to_dict(), "head_accuracy": self.head_accuracy}


# ---------------------------------------------------------------------------- quantizer


def fake_quantize(w, bits: int, group_rows: int, symmetric: bool = True):
    """``w`` rounded as :func:`gobo.methods.groupwise.fit` rounds it; gradient passes straight through."""
    import torch

    with torch.no_grad():
        rows = w.shape[0] if w.dim() > 1 else 1
        w2 = w.detach().reshape(rows, -1)  # (rows, cols)
        g = torch.arange(rows, device=w.device) // max(1, min(group_rows, rows))
        n = int(g[-1]) + 1
        top = (1 << bits) - 1

        def per_group(x, how):
            return torch.full((n,), float("-inf") if how == "amax" else float("inf"), dtype=x.dtype, device=x.device).scatter_reduce(0, g, x, how)

        if symmetric:
            m = per_group(w2.abs().amax(1), "amax").double()
            if bits == 1:
                step, lo, k_lo, k_hi = 2.0 * m, -m, 0, 1
            else:
                half = 1 << (bits - 1)
                step = m / (half - 1)
                step = torch.where(step > 0, step, torch.ones_like(step))
                lo, k_lo, k_hi = -half * step, 1, top
        else:
            lo = per_group(w2.amin(1), "amin").double()
            step = (per_group(w2.amax(1), "amax").double() - lo) / top
            k_lo, k_hi = 0, top
        step = torch.where(step > 0, step, torch.ones_like(step)).float()[g][:, None]
        lo = lo.float()[g][:, None]
        q = (lo + torch.clamp(torch.round((w2 - lo) / step), k_lo, k_hi) * step).reshape(w.shape)
    return w + (q - w).detach()


# ---------------------------------------------------------------------------- training


def _pool_logits(model, params: dict, batch, coef, intercept):
    import torch
    from torch.func import functional_call

    hidden = functional_call(model, params, kwargs={"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), p=2, dim=1)  # (B, H)
    return emb @ coef + intercept


def finetune(
    model: str | os.PathLike,
    config: QBertConfig | None = None,
    settings: QatSettings = QatSettings(),
    probe: Probe | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> QatResult:
    """Fine-tune a model directory (or bundled name) with quantized forward passes, then quantize it.

    ``probe`` initialises the head (default: the benchmark's frozen probe, trained or read
    from the cache). ``progress(step, loss)`` is called after every step.
    """
    import torch
    from transformers import AutoTokenizer

    from .assets import resolve_model
    from .data import load_rotten_tomatoes
    from .hessian import resolve_qbert
    from .hf import load_source, quantizable_names, state_numpy, weights_sha256
    from .methods.groupwise import plan
    from .quantizer import quantize_state

    t0 = time.perf_counter()
    s = settings
    config = config or QBertConfig()
    if not isinstance(config, QBertConfig):
        raise ValueError(f"quantization-aware fine-tuning needs a QBertConfig, got {type(config).__name__}")
    model_dir = resolve_model(model)
    net = load_source(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sha = weights_sha256(Path(model_dir))
    config = resolve_qbert(config, net, model_dir)
    if probe is None:
        from .evaluate import prepare_benchmark

        probe = prepare_benchmark(net, tok, source_sha=sha).probe
    names = quantizable_names(net)
    params = dict(net.named_parameters())
    how = plan({n: tuple(params[n].shape) for n in names}, config)
    train, _ = load_rotten_tomatoes()
    train = train.stride(s.texts)
    torch.manual_seed(s.seed)
    coef = torch.nn.Parameter(torch.as_tensor(np.asarray(probe.coef), dtype=torch.float32).clone())
    intercept = torch.nn.Parameter(torch.tensor(float(probe.intercept)))
    decay = [p for n, p in params.items() if p.dim() > 1]
    no_decay = [p for n, p in params.items() if p.dim() <= 1]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "lr": s.lr, "weight_decay": s.weight_decay},
            {"params": no_decay, "lr": s.lr, "weight_decay": 0.0},
            {"params": [coef, intercept], "lr": s.head_lr, "weight_decay": 0.0},
        ]
    )

    def quantized_params() -> dict:
        return {n: fake_quantize(params[n], *how[n], symmetric=config.symmetric) for n in names}

    def batches(idx):
        for start in range(0, len(idx), s.batch_size):
            part = idx[start : start + s.batch_size]
            b = tok([train.texts[i] for i in part], padding=True, truncation=True, max_length=s.max_tokens, return_tensors="pt")
            yield b, torch.tensor([float(train.labels[i]) for i in part])

    monitor = np.arange(min(s.monitor_texts, len(train)))

    def monitor_loss() -> float:
        net.eval()
        total = 0.0
        with torch.no_grad():
            qp = quantized_params()
            for b, y in batches(monitor):
                logits = _pool_logits(net, qp, b, coef, intercept)
                total += float(torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum"))
        return total / len(monitor)

    loss_start = monitor_loss()
    rng = np.random.default_rng(s.seed)
    losses = []
    net.train()  # dropout on, as in fine-tuning
    for _ in range(s.epochs):
        for b, y in batches(rng.permutation(len(train))):
            logits = _pool_logits(net, quantized_params(), b, coef, intercept)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(len(losses), losses[-1])
    loss_end = monitor_loss()
    net.eval()
    cm = quantize_state(state_numpy(net), names, config)
    cm.source = {
        "name": str(model),
        "model_type": getattr(net.config, "model_type", "unknown"),
        "weights_sha256": sha,
        "dir": str(Path(model_dir).resolve()),
        "finetuned": {**asdict(s), "steps": len(losses), "objective": "probe head, binary cross-entropy, straight-through estimator"},
    }
    head = Probe(coef=coef.detach().double().numpy(), intercept=float(intercept.detach()))
    return QatResult(cm, head, tuple(losses), loss_start, loss_end, time.perf_counter() - t0)


# ---------------------------------------------------------------------------- files


def save(result: QatResult, outdir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the compressed model (like :func:`gobo.save`) and ``head.json`` beside it.

    ``head.json`` is ``{"format": "gobo-probe-head", "version": 1, "coef": [...],
    "intercept": x}``: ``p(fresh) = sigmoid(e . coef + intercept)`` on the model's
    L2-normalised mean-pooled embedding ``e``.
    """
    from .api import save as save_model

    out = save_model(result.compressed, outdir, overwrite=overwrite)
    try:
        doc = {"format": HEAD_FORMAT, "version": 1, "coef": [float(x) for x in result.head.coef], "intercept": float(result.head.intercept)}
        tmp = out / f".{HEAD_FILE}.partial"
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, out / HEAD_FILE)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no model without its head
        raise
    return out


def load_head(outdir: str | os.PathLike) -> Probe:
    """The fine-tuned head stored by :func:`save` (ValueError if absent or malformed)."""
    path = Path(outdir) / HEAD_FILE
    if not path.is_file():
        raise ValueError(f"{outdir} has no {HEAD_FILE}; it was not written by quantization-aware fine-tuning")
    try:
        doc = json.loads(path.read_text())
        if doc.get("format") != HEAD_FORMAT or doc.get("version") != 1:
            raise ValueError
        coef = np.asarray(doc["coef"], dtype=np.float64)
        intercept = float(doc["intercept"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path} is not a gobo head file (format {HEAD_FORMAT!r}, version 1)") from None
    if coef.ndim != 1 or not np.isfinite(coef).all():
        raise ValueError(f"{path} holds an invalid coefficient vector")
    return Probe(coef=coef, intercept=intercept)


def evaluate(outdir: str | os.PathLike, n_test: int | None = None, progress: Callable[[int], None] | None = None) -> QatEval:
    """Test-split accuracy of a fine-tuned model: frozen FP32 probe (as ``gobo eval``) and its own head."""
    import gobo
    from transformers import AutoTokenizer

    from .evaluate import compare, encode, prepare_benchmark
    from .hf import load_source, weights_sha256
    from .io import read_header

    head = load_head(outdir)
    header, _ = read_header(outdir)
    src = Path(header.get("source", {}).get("dir", ""))
    if not src.is_dir():
        from .assets import resolve_model

        src = resolve_model(header.get("source", {}).get("name", "minilm-l6"))
    tok = AutoTokenizer.from_pretrained(str(src))
    fp32 = load_source(src)
    bench = prepare_benchmark(fp32, tok, source_sha=weights_sha256(src), n_test=n_test)
    e32 = encode(fp32, tok, bench.test_texts, progress=progress)
    eq = encode(gobo.load(outdir), tok, bench.test_texts, progress=progress)
    frozen = compare(bench.probe, e32, eq, bench.test_labels)
    acc = float(np.mean(head.predict(eq) == np.asarray(bench.test_labels)))
    return QatEval(frozen=frozen, head_accuracy=acc)

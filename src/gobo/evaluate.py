"""Task evaluation with a frozen probe: the GOBO setting without a fine-tuned head.

A sentence embedding is the attention-masked mean of the encoder's last hidden state,
L2-normalised (the sentence-transformers recipe), with at most 128 tokens. A logistic
regression is trained once on FP32 train embeddings and then kept fixed; a quantized
encoder is judged by the probe's accuracy on the test split, its agreement with the FP32
predictions, and the cosine between its embeddings and the FP32 ones.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import numpy as np

__all__ = ["EvalResult", "Probe", "encode", "compare", "train_probe"]

log = logging.getLogger(__name__)
MAX_TOKENS = 128


def encode(
    model,
    tokenizer,
    texts: Sequence[str],
    batch_size: int = 64,
    max_tokens: int = MAX_TOKENS,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sentence embeddings ``(N, H)`` float32, in the order of ``texts``.

    Texts are batched by length (less padding); the result does not depend on that order
    beyond float rounding of padded positions, which the attention mask excludes.
    """
    import torch

    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    out = None
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            batch = tokenizer(
                [texts[i] for i in idx], padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
            )
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
            emb = torch.nn.functional.normalize(emb, p=2, dim=1)
            if out is None:
                out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
            out[idx] = emb.float().numpy()
            if progress is not None:
                progress(len(idx))
    if out is None:
        raise ValueError("no texts to encode")
    return out


@dataclass(frozen=True)
class Probe:
    """A frozen linear classifier: ``p(fresh) = sigmoid(x @ coef + intercept)``."""

    coef: np.ndarray  # (H,)
    intercept: float

    def predict(self, emb: np.ndarray) -> np.ndarray:
        return (emb.astype(np.float64) @ self.coef + self.intercept > 0).astype(np.int64)


def train_probe(emb: np.ndarray, labels: Sequence[int], c: float = 10.0) -> Probe:
    """Logistic regression on FP32 embeddings (deterministic L-BFGS)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=c, max_iter=2000)
    clf.fit(emb.astype(np.float64), np.asarray(labels))
    return Probe(coef=clf.coef_[0].astype(np.float64), intercept=float(clf.intercept_[0]))


@dataclass(frozen=True)
class EvalResult:
    """Quantized vs FP32 on the same test texts, measured in one run."""

    n_test: int
    fp32_accuracy: float
    accuracy: float
    agreement: float  # fraction of test predictions equal to FP32's
    mean_cosine: float  # mean cosine of quantized vs FP32 embeddings
    seconds_fp32: float = float("nan")
    seconds_quant: float = float("nan")

    @property
    def accuracy_delta(self) -> float:
        return self.accuracy - self.fp32_accuracy

    def to_dict(self) -> dict:
        d = asdict(self)
        d["accuracy_delta"] = self.accuracy_delta
        return d


def compare(
    probe: Probe,
    fp32_emb: np.ndarray,
    quant_emb: np.ndarray,
    labels: Sequence[int],
    seconds_fp32: float = float("nan"),
    seconds_quant: float = float("nan"),
) -> EvalResult:
    """Score quantized embeddings against FP32 ones with the frozen probe."""
    y = np.asarray(labels)
    p32 = probe.predict(fp32_emb)
    pq = probe.predict(quant_emb)
    cos = np.sum(fp32_emb.astype(np.float64) * quant_emb, axis=1)  # both L2-normalised
    return EvalResult(
        n_test=len(y),
        fp32_accuracy=float(np.mean(p32 == y)),
        accuracy=float(np.mean(pq == y)),
        agreement=float(np.mean(pq == p32)),
        mean_cosine=float(np.mean(cos)),
        seconds_fp32=seconds_fp32,
        seconds_quant=seconds_quant,
    )


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


# ---------------------------------------------------------------------------- the benchmark


@dataclass(frozen=True)
class Benchmark:
    """The frozen-probe benchmark for one source model: data subset and trained probe."""

    train_texts: tuple[str, ...]
    train_labels: tuple[int, ...]
    test_texts: tuple[str, ...]
    test_labels: tuple[int, ...]
    probe: Probe


def _probe_cache_key(source_sha: str, n_train: int, c: float) -> str:
    import hashlib

    text = f"probe-v1|{source_sha}|{n_train}|{c}|{MAX_TOKENS}|mean-pool-l2"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def prepare_benchmark(
    fp32_model,
    tokenizer,
    source_sha: str = "",
    n_train: int | None = None,
    n_test: int | None = None,
    c: float = 1.0,
    progress: Callable[[int], None] | None = None,
    use_cache: bool = True,
) -> Benchmark:
    """Load the corpus, train (or reuse) the probe on FP32 train embeddings.

    The probe depends only on the FP32 model, the train subset and ``c``; it is cached under
    the gobo cache keyed by the source weights' hash, so repeated evaluations share one
    frozen head. ``n_train``/``n_test`` take evenly spread subsets (None: everything).
    """
    from .assets import cache_dir
    from .data import load_rotten_tomatoes

    train, test = load_rotten_tomatoes()
    if n_train is not None:
        train = train.stride(n_train)
    if n_test is not None:
        test = test.stride(n_test)
    probe = None
    path = cache_dir() / "probes" / f"{_probe_cache_key(source_sha, len(train), c)}.npz"
    if use_cache and source_sha and path.is_file():
        with np.load(path) as z:
            probe = Probe(coef=z["coef"], intercept=float(z["intercept"]))
    if probe is None:
        emb = encode(fp32_model, tokenizer, train.texts, progress=progress)
        probe = train_probe(emb, train.labels, c=c)
        if use_cache and source_sha:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.npz")
            np.savez(tmp, coef=probe.coef, intercept=np.float64(probe.intercept))
            import os

            os.replace(tmp, path)
    return Benchmark(train.texts, train.labels, test.texts, test.labels, probe)

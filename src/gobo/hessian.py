"""Hessian sensitivity of each encoder layer, as in Q-BERT (Shen et al., AAAI 2020, section 3.1).

For layer ``i`` the block ``H_i`` of the task loss's Hessian with respect to the layer's
weight matrices (every nn.Linear weight of that transformer layer, flattened into one
vector: the tensors that get quantized) has a top eigenvalue ``lambda_i``, found by power
iteration on Hessian-vector products (double backward, never forming ``H_i``)::

    v <- H_i v / |H_i v|,   lambda ~ v . H_i v   (Rayleigh quotient, until it settles)

``lambda_i`` is measured on several disjoint random subsets of the training split (the
paper: 10% of the data each; here ``subsets`` x ``subset_size`` texts so that it runs on a
CPU) and summarised as ``Omega_i = |mean(lambda_i)| + std(lambda_i)``. Layers with larger
Omega are more sensitive and get more bits in mixed precision.

The task loss is the frozen probe's binary cross-entropy on the training split:
``p = sigmoid(e . coef + intercept)`` where ``e`` is the L2-normalised, attention-masked
mean of the last hidden state (the embedding :mod:`gobo.evaluate` scores).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

__all__ = [
    "Sensitivity",
    "SensitivitySettings",
    "layer_prefixes",
    "layer_weights",
    "measure_sensitivity",
    "needs_plan",
    "probe_loss",
    "resolve_gobo",
    "resolve_plan",
    "resolve_qbert",
    "sensitivity",
    "top_eigenvalue",
]


@dataclass(frozen=True)
class SensitivitySettings:
    """How the Hessian spectrum is sampled (defaults sized for a 2-core CPU and MiniLM)."""

    subsets: int = 4  # disjoint random subsets of the training split
    subset_size: int = 64  # texts per subset (the paper: 10% of the training data)
    max_tokens: int = 64  # truncation of each text
    iters: int = 20  # power iterations at most
    tol: float = 1e-3  # stop when the eigenvalue changes by less than this, relatively
    seed: int = 0  # subsets and start vectors

    def __post_init__(self) -> None:
        for name in ("subsets", "subset_size", "max_tokens", "iters"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise ValueError(f"tol must be a positive number, got {self.tol!r}")


@dataclass(frozen=True)
class Sensitivity:
    """Top Hessian eigenvalue of every layer on every subset, and the Omega summary."""

    layers: tuple[str, ...]  # module prefix of each layer, e.g. "encoder.layer.0"
    eigenvalues: np.ndarray  # (subsets, layers) float64
    iterations: np.ndarray  # (subsets, layers) power iterations used
    settings: SensitivitySettings = field(default_factory=SensitivitySettings)

    @property
    def mean(self) -> np.ndarray:
        return self.eigenvalues.mean(axis=0)

    @property
    def std(self) -> np.ndarray:
        return self.eigenvalues.std(axis=0)  # population std over subsets

    @property
    def omega(self) -> np.ndarray:
        """``|mean| + std`` of each layer's top eigenvalue over the subsets."""
        return np.abs(self.mean) + self.std

    def to_dict(self) -> dict:
        return {
            "layers": [
                {"layer": i, "name": n, "mean": float(m), "std": float(s), "omega": float(o), "eigenvalues": [float(x) for x in e]}
                for i, (n, m, s, o, e) in enumerate(zip(self.layers, self.mean, self.std, self.omega, self.eigenvalues.T))
            ],
            "settings": asdict(self.settings),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        rows = d["layers"]
        eig = np.array([r["eigenvalues"] for r in rows], dtype=np.float64).T
        return cls(
            layers=tuple(r["name"] for r in rows),
            eigenvalues=eig,
            iterations=np.zeros_like(eig, dtype=np.int64),
            settings=SensitivitySettings(**d["settings"]),
        )


# ---------------------------------------------------------------------------- pieces


def layer_weights(model) -> list[tuple[str, list[tuple[str, "torch.nn.Parameter"]]]]:
    """``[(layer prefix, [(name, weight), ...]), ...]``: the nn.Linear weights of each encoder layer."""
    import torch

    from .methods.groupwise import LAYER_PATTERN

    blocks: dict[int, tuple[str, list]] = {}
    for mod_name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        name = f"{mod_name}.weight"
        m = LAYER_PATTERN.search(name)
        if m is None:
            continue
        blocks.setdefault(int(m.group(1)), (name[: m.end() - 1], []))[1].append((name, mod.weight))
    return [blocks[i] for i in sorted(blocks)]


def layer_prefixes(names) -> list[str]:
    """The encoder layer prefixes among tensor ``names``, layer 0 first, as :func:`layer_weights` finds them.

    ``["encoder.layer.0.attention.self.query.weight", ...]`` -> ``["encoder.layer.0", ...]``;
    the first prefix seen for each layer index counts (the order of :attr:`Sensitivity.layers`).
    """
    from .methods.groupwise import LAYER_PATTERN

    found: dict[int, str] = {}
    for name in names:
        m = LAYER_PATTERN.search(name)
        if m is not None:
            found.setdefault(int(m.group(1)), name[: m.end() - 1])
    return [found[i] for i in sorted(found)]


def probe_loss(model, input_ids, attention_mask, labels, coef, intercept):
    """Mean binary cross-entropy of the probe on the L2-normalised mean-pooled embedding."""
    import torch

    hidden = model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
    emb = torch.nn.functional.normalize(emb, p=2, dim=1)
    logits = emb @ coef.to(emb.dtype) + intercept
    return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels.to(emb.dtype))


def top_eigenvalue(grads: Sequence, params: Sequence, iters: int = 20, tol: float = 1e-3, generator=None) -> tuple[float, int]:
    """Largest-magnitude eigenvalue of the Hessian block of ``params`` by power iteration.

    ``grads`` are the loss's gradients with respect to ``params``, computed with
    ``create_graph=True``; the graph is kept, so the caller can reuse it for other blocks.
    Returns ``(eigenvalue, iterations used)``.
    """
    import torch

    v = [torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device) for p in params]
    norm = torch.sqrt(sum((x * x).sum() for x in v))
    v = [x / norm for x in v]
    eig = None
    for it in range(1, iters + 1):
        hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
        new = float(sum((h * x).sum() for h, x in zip(hv, v)))  # Rayleigh quotient, |v| = 1
        norm = torch.sqrt(sum((h * h).sum() for h in hv))
        if float(norm) == 0.0:
            return 0.0, it
        v = [h.detach() / norm for h in hv]
        if eig is not None and abs(new - eig) <= tol * max(abs(eig), 1e-30):
            return new, it
        eig = new
    return float(eig), iters


# ---------------------------------------------------------------------------- measurement


def sensitivity(
    model,
    tokenizer,
    texts: Sequence[str],
    labels: Sequence[int],
    probe,
    settings: SensitivitySettings = SensitivitySettings(),
    progress: Callable[[int], None] | None = None,
) -> Sensitivity:
    """Top Hessian eigenvalue of every encoder layer on ``settings.subsets`` random subsets.

    ``probe`` is a :class:`gobo.evaluate.Probe`; ``model`` is left as it was (its
    ``requires_grad`` flags are restored). ``progress(1)`` is called after each layer.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    s = settings
    if s.subsets * s.subset_size > len(texts):
        raise ValueError(f"{s.subsets} subsets of {s.subset_size} texts need {s.subsets * s.subset_size} texts, the split has {len(texts)}")
    blocks = layer_weights(model)
    if not blocks:
        raise ValueError("the model has no encoder layers (no '...layer.N...' nn.Linear weights)")
    rng = np.random.default_rng(s.seed)
    perm = rng.permutation(len(texts))
    gen = torch.Generator().manual_seed(s.seed)
    dtype = next(model.parameters()).dtype
    coef = torch.as_tensor(np.asarray(probe.coef), dtype=dtype)
    intercept = float(probe.intercept)
    flags = {p: p.requires_grad for p in model.parameters()}
    eig = np.zeros((s.subsets, len(blocks)))
    its = np.zeros((s.subsets, len(blocks)), dtype=np.int64)
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        params = [[w for _, w in ws] for _, ws in blocks]
        for group in params:
            for w in group:
                w.requires_grad_(True)
        for k in range(s.subsets):
            idx = perm[k * s.subset_size : (k + 1) * s.subset_size]
            batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=s.max_tokens, return_tensors="pt")
            y = torch.tensor([labels[i] for i in idx], dtype=dtype)
            with sdpa_kernel(SDPBackend.MATH):  # the fused kernels have no double backward
                loss = probe_loss(model, batch["input_ids"], batch["attention_mask"], y, coef, intercept)
                flat = [w for group in params for w in group]
                grads = torch.autograd.grad(loss, flat, create_graph=True)
                start = 0
                for j, group in enumerate(params):
                    g = grads[start : start + len(group)]
                    start += len(group)
                    eig[k, j], its[k, j] = top_eigenvalue(g, group, s.iters, s.tol, gen)
                    if progress is not None:
                        progress(1)
            del loss, grads
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return Sensitivity(layers=tuple(n for n, _ in blocks), eigenvalues=eig, iterations=its, settings=s)


def _cache_path(source_sha: str, settings: SensitivitySettings, probe) -> Path:
    from .assets import cache_dir

    h = hashlib.sha256()
    h.update(f"sensitivity-v1|{source_sha}|{json.dumps(asdict(settings), sort_keys=True)}|".encode())
    h.update(np.asarray(probe.coef, dtype=np.float64).tobytes())
    h.update(repr(float(probe.intercept)).encode())
    return cache_dir() / "sensitivity" / f"{h.hexdigest()[:24]}.json"


def measure_sensitivity(
    model_dir: str | os.PathLike,
    model=None,
    settings: SensitivitySettings = SensitivitySettings(),
    progress: Callable[[int], None] | None = None,
    use_cache: bool = True,
) -> Sensitivity:
    """:func:`sensitivity` of a model directory on the benchmark's training split and probe.

    The probe is the one :func:`gobo.evaluate.prepare_benchmark` trains (and caches) on the
    FP32 train embeddings. Results are cached by the source weights' hash and the settings.
    """
    from transformers import AutoTokenizer

    from .evaluate import prepare_benchmark
    from .hf import load_source, weights_sha256

    model_dir = Path(model_dir)
    if model is None:
        model = load_source(model_dir)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sha = weights_sha256(model_dir)
    bench = prepare_benchmark(model, tok, source_sha=sha)
    path = _cache_path(sha, settings, bench.probe)
    if use_cache and path.is_file():
        try:
            return Sensitivity.from_dict(json.loads(path.read_text()))
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache entry is measured again
    result = sensitivity(model, tok, bench.train_texts, bench.train_labels, bench.probe, settings, progress)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result.to_dict()))
        os.replace(tmp, path)
    return result


def needs_plan(config) -> bool:
    """Whether ``config`` still needs the Hessian sensitivity measured: a Q-BERT mixed-precision
    config without its per-layer plan, or a GOBO ``allocate="hessian"`` config without ``layer_omega``."""
    from .config import GoboConfig, QBertConfig

    if isinstance(config, GoboConfig):
        return config.allocate == "hessian" and not config.layer_omega
    return isinstance(config, QBertConfig) and bool(config.mixed) and not config.layer_bits


def rounded_omega(omega, digits: int = 3) -> tuple[float, ...]:
    """Omega per layer rounded to ``digits`` significant digits (float noise cannot change a
    plan), and at least 1e-12 (a layer the loss does not see still weighs something)."""
    return tuple(max(float(f"{float(o):.{digits}g}"), 1e-12) for o in omega)


def resolve_gobo(config, model, model_dir: str | os.PathLike, progress: Callable[[int], None] | None = None,
                 settings: SensitivitySettings = SensitivitySettings()):
    """A GOBO ``allocate="hessian"`` config with ``layer_omega`` filled in (measured with
    ``settings``, rounded to 3 significant digits); any other config unchanged."""
    if not needs_plan(config) or not hasattr(config, "layer_omega"):
        return config
    sens = measure_sensitivity(model_dir, model, settings=settings, progress=progress)
    return replace(config, layer_omega=rounded_omega(sens.omega))


def resolve_plan(config, model, model_dir: str | os.PathLike, progress: Callable[[int], None] | None = None,
                 settings: SensitivitySettings = SensitivitySettings()):
    """:func:`resolve_gobo` for a GOBO config, :func:`resolve_qbert` for a Q-BERT one; others unchanged."""
    from .config import GoboConfig, QBertConfig

    if isinstance(config, GoboConfig):
        return resolve_gobo(config, model, model_dir, progress, settings)
    if isinstance(config, QBertConfig):
        return resolve_qbert(config, model, model_dir, progress, settings)
    return config


def resolve_qbert(config, model, model_dir: str | os.PathLike, progress: Callable[[int], None] | None = None,
                  settings: SensitivitySettings = SensitivitySettings()):
    """The config with what it leaves to the model filled in: the head size and the mixed plan.

    ``head_size`` 0 becomes ``hidden_size / num_attention_heads``; ``mixed`` without
    ``layer_bits`` measures the Hessian sensitivity (sampled by ``settings``) and records the
    Omega-ranked plan.
    """
    from .methods.groupwise import mixed_plan

    changes = {}
    cfg = getattr(model, "config", None)
    heads = getattr(cfg, "num_attention_heads", 0) or getattr(cfg, "n_heads", 0)
    hidden = getattr(cfg, "hidden_size", 0) or getattr(cfg, "dim", 0)
    if config.head_size == 0 and heads and hidden and hidden % heads == 0:
        changes["head_size"] = hidden // heads
    if needs_plan(config):
        sens = measure_sensitivity(model_dir, model, settings=settings, progress=progress)
        low, high = config.mixed_bits
        changes["layer_bits"] = mixed_plan(sens.omega, low, high, config.average)
    return replace(config, **changes) if changes else config

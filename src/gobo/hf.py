"""transformers glue: read a source encoder, list its quantizable weights, rebuild a model.

transformers is imported lazily so that ``import gobo`` stays light.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

__all__ = ["build_model", "check_fit", "load_source", "model_config", "quantizable_names", "state_numpy", "weights_sha256"]


def weights_sha256(model_dir: Path) -> str:
    """SHA-256 over the source's weight files (name + bytes, in name order)."""
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def load_source(model_dir: str | os.PathLike):
    """The encoder as a transformers model in eval mode (no task head)."""
    import transformers
    from transformers import AutoModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    model_dir = Path(model_dir)
    try:
        model = AutoModel.from_pretrained(str(model_dir))
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"transformers could not load a model from {model_dir}: {first}") from None
    return model.eval()


def quantizable_names(model) -> list[str]:
    """Weights of every nn.Linear and nn.Embedding, by state-dict name, in module order.

    Works on any module tree (BERT, RoBERTa, DistilBERT, ALBERT, ELECTRA, MPNet, ...):
    nothing here knows an architecture's layer names.
    """
    import torch

    names = []
    seen = set()
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            w = mod.weight
            if id(w) in seen:  # tied weights: quantize the first occurrence only
                continue
            seen.add(id(w))
            names.append(f"{mod_name}.weight" if mod_name else "weight")
    return names


def state_numpy(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def model_config(outdir: str | os.PathLike):
    """The transformers config stored in ``outdir`` (ValueError if it is unusable)."""
    import transformers
    from transformers import AutoConfig

    transformers.logging.set_verbosity_error()
    try:
        return AutoConfig.from_pretrained(str(outdir))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{outdir} has no usable config.json ({exc})") from None


def check_fit(missing, unexpected) -> None:
    """Raise ValueError naming the state-dict keys the model lacks or does not expect."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}")
        raise ValueError(f"the compressed weights do not fit the model config: {'; '.join(parts)}")


def build_model(outdir: str | os.PathLike, state: dict[str, np.ndarray]):
    """A transformers model from ``outdir``'s config with exactly ``state`` as weights."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_config(model_config(outdir))
    expected = set(model.state_dict())
    check_fit(expected - set(state), set(state) - expected)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}, strict=True)
    return model.eval()

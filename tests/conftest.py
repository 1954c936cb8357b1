"""Shared, expensive fixtures: the real MiniLM quantized once per method, in temporary dirs.

Quantizing MiniLM takes seconds (the size-aware default about 15 s on 2 cores), so every
test that needs a quantized model borrows one of the session fixtures below instead of
making its own. Everything is written under pytest's temporary directories, never into
the working directory; the corpus is read from the user's gobo cache and left alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# Tests never touch the network; transformers must not try the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gobo  # noqa: E402
from gobo.io import WEIGHTS_FILE  # noqa: E402
from gobo.quantizer import CompressedModel  # noqa: E402

#: a tiny encoder config, small enough to build in milliseconds (hidden 32, 2 layers, vocab 100)
TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)


@dataclass(frozen=True)
class Saved:
    """A quantized model and the directory :func:`gobo.save` wrote it to."""

    cm: CompressedModel
    outdir: Path
    seconds: float  # time gobo.quantize took

    @property
    def file(self) -> Path:
        return self.outdir / WEIGHTS_FILE


def _quantize_and_save(tmp_path_factory, name: str, config) -> Saved:
    t = time.perf_counter()
    cm = gobo.quantize("minilm-l6", config)
    seconds = time.perf_counter() - t
    outdir = tmp_path_factory.mktemp(name) / "model"
    gobo.save(cm, outdir)
    return Saved(cm, outdir, seconds)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The bundled all-MiniLM-L6-v2 directory (config, tokenizer, model.safetensors)."""
    from gobo.assets import resolve_model

    return resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def minilm_fp32(minilm_dir):
    """The FP32 source encoder (eval mode). Do not modify it."""
    from gobo.hf import load_source

    return load_source(minilm_dir)


@pytest.fixture(scope="session")
def minilm_state(minilm_fp32) -> dict[str, np.ndarray]:
    """The FP32 state dict as numpy arrays. Do not modify it."""
    from gobo.hf import state_numpy

    return state_numpy(minilm_fp32)


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(minilm_dir))


@pytest.fixture(scope="session")
def gobo_default(tmp_path_factory) -> Saved:
    """``gobo.quantize('minilm-l6')``: the size-aware default at 3 bits."""
    return _quantize_and_save(tmp_path_factory, "gobo-default", None)


@pytest.fixture(scope="session")
def gobo_paper3(tmp_path_factory) -> Saved:
    """The MICRO 2020 recipe at 3 bits."""
    return _quantize_and_save(tmp_path_factory, "gobo-paper3", gobo.GoboConfig.paper(3))


@pytest.fixture(scope="session")
def directq3(tmp_path_factory) -> Saved:
    """Uniform round-to-nearest per row at 3 bits."""
    return _quantize_and_save(tmp_path_factory, "directq3", gobo.DirectQConfig(bits=3))


@pytest.fixture(scope="session")
def real_sentences() -> list[str]:
    """A few real critic snippets from the corpus' test split (lengths vary, so padding is exercised)."""
    from gobo.data import load_rotten_tomatoes

    _, test = load_rotten_tomatoes()
    return list(test.stride(6).texts)

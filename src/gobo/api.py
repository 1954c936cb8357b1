"""The public verbs: quantize, save, load, evaluate."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from .config import DirectQConfig, GoboConfig, QBertConfig, method_config
from .quantizer import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, CompressedModel, quantize_state, select

__all__ = ["quantize", "save", "load", "load_compressed"]


def quantize(
    model: str | os.PathLike,
    config: GoboConfig | DirectQConfig | QBertConfig | None = None,
    *,
    method: str = "gobo",
    bits: int = 3,
    include: Iterable[str] = DEFAULT_INCLUDE,
    exclude: Iterable[str] = DEFAULT_EXCLUDE,
    progress: Callable[[str, int], None] | None = None,
    size_mb: float | None = None,
    hessian_settings=None,
    calibration_texts: Iterable[str] | None = None,
) -> CompressedModel:
    """Quantize a local model directory or a bundled model (``minilm-l6``, ``mpnet-base``).

    Every nn.Linear and nn.Embedding weight whose name matches ``include`` and not
    ``exclude`` is quantized; biases, LayerNorms and the rest stay as they are.
    A :class:`QBertConfig` with ``mixed`` and no ``layer_bits`` first measures each layer's
    Hessian sensitivity on the benchmark's training split (:mod:`gobo.hessian`, cached), and
    the file records the resulting plan; so does a :class:`GoboConfig` with
    ``allocate="hessian"`` and no ``layer_omega`` (the file records the Omega of each layer).
    ``hessian_settings`` (a :class:`gobo.hessian.SensitivitySettings`; None: the default)
    samples that measurement.
    ``progress(name, total)`` is called after each tensor and, with ``feedback``, after each
    batch of calibration sentences and each Linear fed back; ``total`` counts all of them.
    A GOBO config with ``feedback`` re-codes every Linear by error feedback
    (:mod:`gobo.feedback`) on synthetic sentences (``"synthetic"``) or on
    ``calibration_texts`` (``"texts"``; None: the benchmark's training split, evenly
    spread); the file records the texts' hash.
    ``size_mb`` (GOBO with a mixed allocation) sets the budget as a file size instead of
    bits per weight: the bits left once the tensors kept as they are and the metadata are
    paid for are spread over the quantized weights (``config.average``).
    """
    from .assets import resolve_model
    from .hf import load_source, quantizable_names, state_numpy, weights_sha256

    if config is None:
        config = method_config(method, bits)
    model_dir = resolve_model(model)
    # the source's hash is read in the background (hashlib lets other threads run meanwhile)
    hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gobo-hash")
    digest = hasher.submit(weights_sha256, Path(model_dir))
    hasher.shutdown(wait=False)
    src = load_source(model_dir)
    if isinstance(config, QBertConfig) or (isinstance(config, GoboConfig) and config.allocate == "hessian"):
        # Q-BERT: head size from the model, mixed precision's Hessian-ranked plan; GOBO: the layers' Omega
        from .hessian import SensitivitySettings, resolve_plan

        config = resolve_plan(config, src, model_dir, settings=hessian_settings or SensitivitySettings())
    names = select(quantizable_names(src), include, exclude)
    state = state_numpy(src)
    if size_mb is not None:
        config = _with_size_budget(config, state, names, size_mb)
    calibrated = isinstance(config, GoboConfig) and (config.allocate == "sensitivity" or config.correct_bias)
    fed_back = isinstance(config, GoboConfig) and bool(config.feedback)
    act = isinstance(config, GoboConfig) and config.act_outliers > 0
    if fed_back and config.feedback == "texts":
        calibration_texts, config = _calibration_texts(config, calibration_texts)
    if (fed_back or act) and config.calibration_dtype == "auto":  # the file records the precision used
        import dataclasses

        from .feedback import fast_dtype

        config = dataclasses.replace(config, calibration_dtype=fast_dtype())
    refed: set[str] = set()  # Linears that feedback re-codes
    if fed_back:
        from .feedback import linear_weights
        from .quantizer import unmatched

        linears = linear_weights(src, names)
        refed = {n for n in linears if config.fed_back(n)}
        glob = unmatched(config.feedback_exclude, linears)  # said before the passes over the sentences
        if glob is not None:
            raise ValueError(f"feedback_exclude pattern {glob!r} matches none of the Linear weights to quantize")
    total = len(names) + (_feedback_steps(config, src, names, calibration_texts) if fed_back else 0)
    cb = None if progress is None else (lambda name: progress(name, total))
    if calibrated or fed_back or act:  # model passes over sentences: synthetic ones come from the model's own tokenizer
        from transformers import AutoTokenizer

        from .calibrate import JacobianSensitivity, OutputSensitivity, match_output_means

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    sens = recorder = None
    if calibrated and config.allocate == "sensitivity":
        from .methods.grid import SENSITIVITY_BATCH, SENSITIVITY_SENTENCES

        if config.codebook == "grid":  # grids weigh their steps by first-order gains on more, punctuated sentences
            if config.shared_pass:  # whose forward passes give the feedback's moments on them too
                from .feedback import MomentsRecorder

                recorder = MomentsRecorder(src, sorted(refed), group=config.feedback_group)
            try:
                sens = JacobianSensitivity(src, tokenizer, n_seqs=SENSITIVITY_SENTENCES, seed=config.synthetic_seed,
                                           punctuation=True, probes=config.sensitivity_probes, names=names,
                                           batch=SENSITIVITY_BATCH if config.shared_pass else 0, moments=recorder,
                                           rows=config.expected_gains,  # expected gains read the rows' sums alone
                                           table_moments=config.feedback_embeddings)
            except BaseException:
                if recorder is not None:
                    recorder.close()
                raise
        else:
            sens = OutputSensitivity(src, tokenizer, n_seqs=8, seed=config.synthetic_seed)
    moments = _shared_moments(config, src, tokenizer, names, calibration_texts, cb) if fed_back and act else None
    if moments is not None:  # the outliers' energies are the diagonal of the feedback's moments
        from .feedback import diagonal

        energy = {n: diagonal(h) for n, h in moments[0].items()}
    else:
        energy = _input_energy(config, src, tokenizer, names, calibration_texts) if act else None
    # codes that feedback will choose again are not chosen first where the pass has shown which
    # Linears it reaches (a pooler's 2-D input is not fed back and keeps its codes)
    recoded = {n for n in refed if n in moments[0]} if moments is not None else set()
    if isinstance(config, GoboConfig) and config.codebook == "grid":
        cm = _grid(config, src, tokenizer if fed_back else None, state, names, refed, calibration_texts, cb, sens,
                   recorder)
    else:
        cm = quantize_state(state, names, config, progress=cb, sensitivity=sens, input_energy=energy, recoded=recoded)
    if fed_back and config.codebook != "grid":
        cm = _with_feedback(cm, config, src, tokenizer, state, calibration_texts, moments, cb, recoded)
    if calibrated and config.correct_bias:
        deq = {n: q.dequantize() for n, q in cm.quantized.items()}
        cm.dense.update(match_output_means(src, tokenizer, deq, cm.dense, seed=config.synthetic_seed))
    cm.source = {
        "name": str(model),
        "model_type": getattr(src.config, "model_type", "unknown"),
        "weights_sha256": digest.result(),
        "dir": str(Path(model_dir).resolve()),
    }
    return cm


def _grid(config: GoboConfig, src, tokenizer, state: dict, names: list[str], refed: set[str], texts, progress=None,
          sensitivity=None, recorder=None):
    """A grid config's model (:mod:`gobo.methods.grid`): with feedback, the Linears' input
    moments first (their column scales), then the codes chosen by error feedback;
    ``recorder``: the moments of the gains' passes (``shared_pass``), to which those of the
    rest of the feedback's sentences are added."""
    from . import feedback
    from .methods import grid
    from .quantizer import check_names, measure_all

    check_names(state, names, config)
    moments, feed = None, None
    if config.feedback:
        ids, mask = feedback.calibration_batch(tokenizer, texts if config.feedback == "texts" else None,
                                               _own_texts(config), seed=config.synthetic_seed,
                                               punctuation=config.synthetic == "punct")
        shared: dict = {}
        step = None if progress is None else (lambda: progress(feedback.CALIBRATION_STEP))
        h = feedback.input_moments(src, ids, mask, sorted(refed), batch=_moments_batch(config),
                                   shared=shared, progress=step, dtype=config.calibration_dtype,
                                   group=config.feedback_group, recorder=recorder)
        if config.feedback_embeddings:  # the tables, under their output gradients' moments (the gains' passes)
            table_moments = {n: g for n, g in sensitivity.output_moments.items() if n in names}
            h.update(table_moments)
            refed = refed | set(table_moments)
            if progress is not None:  # tables looked up once for a whole batch (BERT's positions) keep their codes
                for n in feedback.embedding_tables(src, names):
                    if n not in table_moments:
                        progress(n)
        moments = (h, shared)

        def feed(coding: dict) -> dict:
            fed = feedback.apply(src, tokenizer, coding, state, None, config.feedback_texts, damp=config.feedback_damp,
                                 moments=moments, progress=progress, dtype=config.calibration_dtype)
            _check_reached(coding, fed)
            return fed
    factors = (grid.step_factors(state, names, sensitivity, expected=config.expected_gains)
               if config.allocate == "sensitivity" else None)
    tables = feedback.embedding_tables(src, names) if config.feedback_embeddings else []
    quantized, _ = grid.quantize(state, names, config, moments, sorted(refed), feed, progress=progress, factors=factors,
                                 measured=tables)
    if progress is not None and moments is not None:  # Linears the sentences did not reach (a pooler): not fed back
        for n in sorted(refed - set(moments[0])):
            progress(n)
    stats = measure_all(state, quantized)
    dense = {k: np.ascontiguousarray(v) for k, v in state.items() if k not in quantized}
    return CompressedModel(quantized=quantized, dense=dense, config=config, stats=stats)


def _calibration_texts(config: GoboConfig, texts) -> tuple[list[str], GoboConfig]:
    """feedback="texts": the calibration texts (None: the benchmark's training split, evenly
    spread) and the config with their hash."""
    import dataclasses

    from . import feedback

    if texts is None:
        from .data import load_rotten_tomatoes

        texts = load_rotten_tomatoes()[0].stride(config.feedback_texts).texts
    texts = [t for t in texts if isinstance(t, str) and t.strip()][: config.feedback_texts]
    if not texts:
        raise ValueError("feedback='texts' needs at least one non-empty calibration text")
    return texts, dataclasses.replace(config, feedback_sha256=feedback.texts_sha256(texts))


def _input_energy(config: GoboConfig, src, tokenizer, names: list[str], texts) -> dict[str, np.ndarray]:
    """act_outliers: the mean square of every Linear input feature, over ``config.act_texts``
    synthetic sentences (the calibration texts with feedback="texts")."""
    from .feedback import input_energy

    return input_energy(src, tokenizer, names, config.act_texts, texts if config.feedback == "texts" else None,
                        punctuation=config.synthetic == "punct", seed=config.synthetic_seed, dtype=config.calibration_dtype)


def _feedback_steps(config: GoboConfig, src, names: list[str], texts) -> int:
    """What error feedback adds to the progress count: its batches of sentences and one step
    per nn.Linear weight."""
    from .feedback import embedding_tables, linear_weights

    n = len(texts) if config.feedback == "texts" else _own_texts(config)
    tables = len(embedding_tables(src, names)) if config.feedback_embeddings else 0
    return -(-n // _moments_batch(config)) + len(linear_weights(src, names)) + tables


def _moments_batch(config: GoboConfig) -> int:
    """Sentences per forward pass of the feedback's moments: what the passes run with and
    what the progress count counts."""
    from .feedback import BATCH

    return config.moments_batch or BATCH


def _own_texts(config: GoboConfig) -> int:
    """The feedback's sentences that pass through the model for its moments alone: all of
    them, but those of the gains' passes with ``shared_pass``."""
    from .methods.grid import SENSITIVITY_SENTENCES

    return config.feedback_texts - (SENSITIVITY_SENTENCES if config.shared_pass else 0)


def _shared_moments(config: GoboConfig, src, tokenizer, names: list[str], texts, progress=None):
    """act_outliers with feedback on the same sentences (as many, drawn alike): one pass
    gives the feedback's moments, whose diagonal is the outliers' energy. ``(moments,
    shared)`` as :func:`gobo.feedback.apply` takes them, or None when the two differ."""
    from . import feedback

    if config.act_texts != config.feedback_texts:
        return None
    ids, mask = feedback.calibration_batch(tokenizer, texts if config.feedback == "texts" else None, config.act_texts,
                                           seed=config.synthetic_seed, punctuation=config.synthetic == "punct")
    shared: dict = {}
    step = None if progress is None else (lambda: progress(feedback.CALIBRATION_STEP))
    return feedback.input_moments(src, ids, mask, names, diagonal=[n for n in names if not config.fed_back(n)],
                                  shared=shared, progress=step, dtype=config.calibration_dtype,
                                  group=config.feedback_group), shared


def _with_feedback(cm: CompressedModel, config: GoboConfig, src, tokenizer, state: dict, texts,
                   moments=None, progress=None, recoded: set[str] = frozenset()) -> CompressedModel:
    """``cm`` with its Linears re-coded by error feedback; ``recoded``: those whose codes were
    left for the feedback to choose, every one of which it must reach."""
    from . import feedback
    from .quantizer import measure_all

    if config.feedback != "texts":
        texts = None
    fed = feedback.apply(src, tokenizer, cm.quantized, state, texts, config.feedback_texts,
                         damp=config.feedback_damp, punctuation=config.synthetic == "punct",
                         seed=config.synthetic_seed, moments=moments, progress=progress,
                         dtype=config.calibration_dtype, skip={n for n in cm.quantized if not config.fed_back(n)},
                         group=config.feedback_group)
    _check_reached(recoded, fed)
    for name, qt in fed.items():
        cm.quantized[name] = qt
        cm.stats.pop(name, None)  # measured again, as fed back
    cm.stats.update(measure_all(state, {n: qt for n, qt in cm.quantized.items() if n not in cm.stats}))
    cm.config = config
    return cm


def _check_reached(recoded, fed: dict) -> None:
    """RuntimeError unless error feedback returned every Linear of ``recoded``: codes it was
    to choose are never written unchosen."""
    lost = sorted(set(recoded) - set(fed))
    if lost:
        raise RuntimeError(f"error feedback did not reach {lost[0]}, whose codes it was to choose")


#: metadata of the compressed file, at most: a fixed part plus this much per tensor (the
#: JSON header measured 140-210 bytes per tensor on MiniLM and MPNet)
_HEADER_FIXED, _HEADER_PER_TENSOR = 8192, 400


def _with_size_budget(config, state: dict, names: list[str], size_mb: float):
    import dataclasses
    import math

    if not isinstance(config, GoboConfig) or config.allocate == "uniform":
        raise ValueError("a size budget needs GOBO with a mixed allocation (allocate='size', 'sensitivity' or 'hessian')")
    if not size_mb > 0:
        raise ValueError(f"the size budget must be a positive number of MB, got {size_mb!r}")
    chosen = set(names)
    rest = sum(v.nbytes for k, v in state.items() if k not in chosen)
    numel = sum(state[n].size for n in names)
    left = size_mb * 1e6 - rest - _HEADER_FIXED - _HEADER_PER_TENSOR * len(state)
    average = 8.0 * left / numel
    if not config.min_bits <= average <= config.max_bits:
        lo = (rest + _HEADER_FIXED + _HEADER_PER_TENSOR * len(state) + config.min_bits * numel / 8.0) / 1e6
        hi = (rest + _HEADER_FIXED + _HEADER_PER_TENSOR * len(state) + config.max_bits * numel / 8.0) / 1e6
        raise ValueError(f"a {size_mb:g} MB file means {average:.2f} bits per weight; choose a size from {lo:.2f} to {hi:.2f} MB "
                         f"({config.min_bits}-{config.max_bits} bits)")
    return dataclasses.replace(config, average=math.floor(average * 1e4) / 1e4)  # never above the budget


def save(cm: CompressedModel, outdir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write the compressed model and its source's config/tokenizer files to ``outdir``."""
    from .io import write_compressed

    src = cm.source.get("dir")
    return write_compressed(cm, outdir, source_dir=src if src and Path(src).is_dir() else None, overwrite=overwrite)


def load_compressed(outdir: str | os.PathLike) -> CompressedModel:
    """The compressed tensors of ``outdir``, validated, without building a model."""
    from .io import read_compressed

    return read_compressed(outdir)


def load(outdir: str | os.PathLike, *, packed: bool = False, fuse: bool = True):
    """A transformers model in eval mode whose weights are the dequantized values.

    With ``packed=True`` the quantized weights stay packed in memory: every quantized
    nn.Linear / nn.Embedding is replaced by :class:`gobo.nn.QuantLinear` /
    :class:`gobo.nn.QuantEmbedding`, which decode on the fly (CPU kernels in
    :mod:`gobo.kernels`); outputs match the dequantized model's. There ``fuse`` (default)
    also folds the feed-forward's GELU and the residual adds before LayerNorms into the
    packed GEMMs and runs the attention on gobo's kernel (:func:`gobo.nn.fuse_epilogues`),
    which matches to float32 rounding;
    ``fuse=False`` keeps every operation of the original model.
    """
    cm = load_compressed(outdir)
    if packed:
        from .nn import build_packed_model

        return build_packed_model(outdir, cm, fuse=fuse)
    from .hf import build_model

    return build_model(outdir, cm.state_dict())

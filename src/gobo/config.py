"""Method configurations: one frozen dataclass per method, JSON round trip by allow-list.

On disk a config is ``{"type": NAME, "version": N, "data": {...}}``; :func:`config_from_json`
only builds the classes registered in :data:`CONFIGS` (never ``eval``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import ClassVar

__all__ = ["CONFIGS", "DirectQConfig", "GoboConfig", "QBertConfig", "config_from_json", "config_to_json", "method_config"]


def _check_bits(name: str, value: int, lo: int = 1, hi: int = 8) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")


@dataclass(frozen=True)
class GoboConfig:
    """GOBO: Gaussian outliers kept exact, the other weights clustered to 2**bits centroids.

    The paper's recipe is ``GoboConfig.paper(bits)``: one codebook per tensor, every tensor
    at ``bits``, L1-stopped refinement. The default adds a data-free mixed-precision
    allocation: the file spends the bytes of ``bits`` per weight, all included (codes,
    codebooks, outliers), but each tensor gets from ``min_bits`` to ``max_bits`` by greedy
    rate-distortion, moving bits from large tensors (the word embeddings) to small ones.
    ``allocate="sensitivity"`` weighs each tensor's error instead by how much of it reaches
    the model's output on synthetic sentences (:mod:`gobo.calibrate`; slower, needs the model).
    ``allocate="hessian"`` multiplies the size weight by the Q-BERT Hessian sensitivity (Omega)
    of the tensor's encoder layer over the mean Omega (:mod:`gobo.hessian`; reads training
    data); :func:`gobo.quantize` measures it and records it in ``layer_omega``.
    ``normalize_rows`` (per-row standardisation before clustering) is an option.
    """

    bits: int = 3  # code bits per weight; with a mixed allocation, the all-in average
    outlier_threshold: float = -4.0  # log-density below which a weight is an outlier (kept FP32)
    clustering: str = "l1"  # "l1" (paper: stop when the L1 error stops falling), "lloyd", "exact"
    normalize_rows: bool = False  # cluster (w - row mean) / row std; stores 2 float16 per row
    allocate: str = "size"  # mixed bits, same total: "size" (errors weighed by size**size_exponent),
    # "sensitivity" (weighed by their data-free output gain, gobo.calibrate), "hessian" (size weight
    # times the layer's Hessian Omega / mean Omega, gobo.hessian), "uniform": all at `bits`
    min_bits: int = 2  # bounds for the size-aware allocation
    max_bits: int = 6
    max_iter: int = 200  # refinement iterations at most
    size_exponent: float = 0.5  # allocation: a tensor's relative error weighs (its weights)**size_exponent
    average: float = 0.0  # mixed allocation: all-in bits per weight to spend, e.g. 2.5; 0 = `bits`
    correct_bias: bool = False  # Linear biases re-fitted so mean outputs match FP32 on synthetic sentences
    layer_omega: tuple[float, ...] = ()  # allocate="hessian": Omega of each encoder layer, layer 0 first; () = to measure
    version: int = 1
    codebook: str = "tensor"  # "tensor": one codebook per tensor (paper); "row": one per row (needs allocate="uniform");
    # "grid": a uniform grid of levels, one step per row (and per input column when fed back), the codes entropy
    # coded, every tensor at one step relative to its rows' spread, chosen so the file spends `average` (or
    # `bits`) bits per weight all in (gobo.methods.grid; needs allocate="uniform")
    feedback: str = ""  # "": codes by nearest centroid; "synthetic" or "texts": error feedback (gobo.feedback)
    feedback_texts: int = 256  # calibration sentences for the error feedback
    feedback_sha256: str = ""  # feedback="texts": hash of the calibration texts used (gobo.quantize records it)
    act_outliers: float = 0.0  # extra fraction of each Linear's weights kept exact: the largest errors
    # times their input's mean square on the calibration sentences (gobo.quantize measures it)
    act_texts: int = 64  # act_outliers: sentences measured (synthetic; the calibration texts with feedback="texts")
    synthetic: str = "punct"  # synthetic sentences of act_outliers and feedback="synthetic": "punct" (Zipf-drawn
    # words with punctuation, gobo.calibrate.synthetic_batch) or "words" (the words alone, as files before it)
    feedback_damp: float = 0.1  # error feedback: damping added to H's diagonal, as a fraction of its mean (0.01 before it)
    synthetic_seed: int = 0  # seed of every synthetic draw (:meth:`draws_synthetic`): the sentences of act_outliers'
    # energies and of feedback="synthetic", and those of allocate="sensitivity"'s gains with their gradient directions
    # and of correct_bias (seed 0 for the gains and correct_bias before it: files at seed 0 keep their bytes)
    compact: bool = False  # float16 centroids and row-by-row outlier positions (format version 2): fewer bytes
    bits_for: tuple[tuple[str, int], ...] = ()  # allocate="uniform": (glob, bits) pairs; a tensor whose name
    # matches a glob (the first that does) gets its bits instead of `bits`, e.g. (("*intermediate.dense*", 4),)
    calibration_dtype: str = "auto"  # act_outliers / feedback: precision of the pass over the calibration sentences,
    # "float32" or "bfloat16" (gobo.feedback.input_moments); "auto": bfloat16 where the processor multiplies it
    # natively, else float32 (gobo.quantize records the one it used)
    feedback_exclude: tuple[str, ...] = ()  # feedback: Linear weights whose names match one of these globs keep
    # their nearest-centroid codes, and their inputs' full moments are never formed (only their diagonal, for
    # act_outliers), e.g. ("*[0-9].output.dense*",): the feed-forward outputs, whose 3072-wide inputs (BERT-base size)
    # cost most of the feedback's time
    feedback_group: int = 0  # feedback: inputs wider than this many features (0: none) are fed back in groups of
    # about this many, ranked by E[x_j^2], each under its own block of the moments (gobo.feedback.GroupedMoments):
    # 768 cuts a BERT-base feed-forward output's 3072-wide input into four, a quarter of its products
    feedback_embeddings: bool = False  # codebook="grid" with allocate="sensitivity" and feedback: the embedding
    # tables' codes chosen by error feedback too, under the moments of the gradient at their output (what an error
    # in each of their columns costs at the last hidden state, from the gains' backward passes), with column scales
    sensitivity_probes: int = 2  # codebook="grid" with allocate="sensitivity": random output directions of the
    # first-order gains (gobo.calibrate.JacobianSensitivity), one backward pass each. More buy little: on
    # all-mpnet-base-v2 the tensors' steps from 2 directions differ from those from 8 by 2.3% (rms; 1 direction:
    # 3.4%), less than another seed of the sentences moves them (4.7%); 1 in gobo-grid-fast
    expected_gains: bool = False  # codebook="grid" with allocate="sensitivity": each tensor's gain under the error
    # rounding is expected to make (in proportion to each row's spread) rather than under an actual rounding at
    # relative step 0.5: one pass over the squared gradients (gobo.methods.grid.step_factors); on in gobo-grid-fast
    shared_pass: bool = False  # codebook="grid", allocate="sensitivity", feedback="synthetic": the gains' sentences go
    # through 8 at a time, shortest first, and their forward passes give the feedback's moments too: they are the first
    # of the feedback_texts, the others drawn as before (a forward pass over them fewer)
    moments_batch: int = 0  # codebook="grid" with feedback: sentences per forward pass of the feedback's moments,
    # shortest first, each pass cut to the positions its own sentences fill (a padded position costs as much as a
    # token); 0: 32 at a time (gobo.feedback.BATCH); 8 in gobo-grid-fast
    #: fields added after version 1, with the value a file written before them implies: left
    #: out of the JSON at that value (old files keep their bytes) and assumed when absent
    _OPTIONAL_FIELDS: ClassVar[dict[str, object]] = {"average": 0.0, "correct_bias": False, "layer_omega": (), "codebook": "tensor",
                                                     "feedback": "", "feedback_texts": 256, "feedback_sha256": "",
                                                     "act_outliers": 0.0, "act_texts": 64,
                                                     "synthetic": "words", "feedback_damp": 0.01, "synthetic_seed": 0,
                                                     "compact": False, "bits_for": (), "calibration_dtype": "float32",
                                                     "feedback_exclude": (), "feedback_group": 0,
                                                     "feedback_embeddings": False, "sensitivity_probes": 2,
                                                     "expected_gains": False, "shared_pass": False, "moments_batch": 0}

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("min_bits", self.min_bits)
        _check_bits("max_bits", self.max_bits)
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must not exceed max_bits ({self.max_bits})")
        if self.allocate != "uniform" and self.codebook != "grid" and not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"bits ({self.bits}) must lie between min_bits and max_bits")
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)) or self.average < 0:
            raise ValueError(f"average must be a non-negative number of bits per weight, got {self.average!r}")
        if not isinstance(self.correct_bias, bool):
            raise ValueError(f"correct_bias must be True or False, got {self.correct_bias!r}")
        if not isinstance(self.layer_omega, (tuple, list)) or not all(
            not isinstance(o, bool) and isinstance(o, (int, float)) and math.isfinite(o) and o > 0 for o in self.layer_omega
        ):
            raise ValueError(f"layer_omega must be a sequence of finite positive numbers, got {self.layer_omega!r}")
        object.__setattr__(self, "layer_omega", tuple(float(o) for o in self.layer_omega))
        if self.codebook not in ("tensor", "row", "grid"):
            raise ValueError(f"codebook must be 'tensor', 'row' or 'grid', got {self.codebook!r}")
        if self.codebook == "row" and (self.allocate != "uniform" or self.normalize_rows):
            raise ValueError("codebook='row' needs allocate='uniform' and normalize_rows=False")
        if self.codebook == "grid" and (self.allocate not in ("uniform", "sensitivity") or self.normalize_rows):
            raise ValueError("codebook='grid' needs allocate='uniform' (one relative step for all tensors) or "
                             "'sensitivity' (steps weighed by their output gain), and normalize_rows=False")
        if self.codebook == "grid":
            if self.act_outliers or self.bits_for or self.correct_bias:
                raise ValueError("codebook='grid' spends its bits by one step size for all tensors: it does not combine "
                                 "with act_outliers, bits_for or correct_bias")
            object.__setattr__(self, "compact", True)  # grid tensors are compact (float16 steps and levels)
        if self.feedback not in ("", "synthetic", "texts"):
            raise ValueError(f"feedback must be '', 'synthetic' or 'texts', got {self.feedback!r}")
        if self.feedback and self.normalize_rows:
            raise ValueError("feedback does not combine with normalize_rows")
        if isinstance(self.feedback_texts, bool) or not isinstance(self.feedback_texts, int) or self.feedback_texts < 1:
            raise ValueError(f"feedback_texts must be a positive integer, got {self.feedback_texts!r}")
        if isinstance(self.act_outliers, bool) or not isinstance(self.act_outliers, (int, float)) or not 0 <= self.act_outliers < 0.5:
            raise ValueError(f"act_outliers must be a fraction from 0 to 0.5, got {self.act_outliers!r}")
        if isinstance(self.act_texts, bool) or not isinstance(self.act_texts, int) or self.act_texts < 1:
            raise ValueError(f"act_texts must be a positive integer, got {self.act_texts!r}")
        if self.synthetic not in ("punct", "words"):
            raise ValueError(f"synthetic must be 'punct' or 'words', got {self.synthetic!r}")
        if isinstance(self.feedback_damp, bool) or not isinstance(self.feedback_damp, (int, float)) \
                or not (0 < self.feedback_damp < math.inf):
            raise ValueError(f"feedback_damp must be a positive number, got {self.feedback_damp!r}")
        if isinstance(self.synthetic_seed, bool) or not isinstance(self.synthetic_seed, int) or not 0 <= self.synthetic_seed < 2**32:
            raise ValueError(f"synthetic_seed must be an integer from 0 to 2**32 - 1, got {self.synthetic_seed!r}")
        # where no synthetic sentence is read, or no feedback made, these settle at the value
        # files before them imply, so such configs (the default among them) keep their bytes
        if not (self.act_outliers and self.feedback != "texts") and self.feedback != "synthetic":
            object.__setattr__(self, "synthetic", self._OPTIONAL_FIELDS["synthetic"])
        if not self.draws_synthetic():
            object.__setattr__(self, "synthetic_seed", self._OPTIONAL_FIELDS["synthetic_seed"])
        if not self.feedback:
            object.__setattr__(self, "feedback_damp", self._OPTIONAL_FIELDS["feedback_damp"])
        if self.calibration_dtype not in ("auto", "float32", "bfloat16"):
            raise ValueError(f"calibration_dtype must be 'auto', 'float32' or 'bfloat16', got {self.calibration_dtype!r}")
        if not (self.act_outliers or self.feedback):  # no pass over calibration sentences
            object.__setattr__(self, "calibration_dtype", self._OPTIONAL_FIELDS["calibration_dtype"])
        object.__setattr__(self, "feedback_damp", float(self.feedback_damp))
        if self.act_outliers and self.normalize_rows:
            raise ValueError("act_outliers does not combine with normalize_rows")
        if not isinstance(self.compact, bool):
            raise ValueError(f"compact must be True or False, got {self.compact!r}")
        object.__setattr__(self, "bits_for", _bits_for(self.bits_for))
        object.__setattr__(self, "feedback_exclude", _globs("feedback_exclude", self.feedback_exclude))
        if self.feedback_exclude and not self.feedback:
            raise ValueError("feedback_exclude names Linears to leave out of error feedback, which needs feedback")
        if isinstance(self.feedback_group, bool) or not isinstance(self.feedback_group, int) or self.feedback_group < 0:
            raise ValueError(f"feedback_group must be a non-negative integer (0: no groups), got {self.feedback_group!r}")
        if self.feedback_group and not self.feedback:
            raise ValueError("feedback_group sets how error feedback groups wide inputs, which needs feedback")
        if not isinstance(self.feedback_embeddings, bool):
            raise ValueError(f"feedback_embeddings must be True or False, got {self.feedback_embeddings!r}")
        if self.feedback_embeddings and not (self.codebook == "grid" and self.allocate == "sensitivity" and self.feedback):
            raise ValueError("feedback_embeddings feeds back the embedding tables under the gradients of the gains' pass, "
                             "which needs codebook='grid', allocate='sensitivity' and feedback")
        if isinstance(self.sensitivity_probes, bool) or not isinstance(self.sensitivity_probes, int) \
                or not 1 <= self.sensitivity_probes <= 64:
            raise ValueError(f"sensitivity_probes must be an integer from 1 to 64, got {self.sensitivity_probes!r}")
        if not isinstance(self.expected_gains, bool):
            raise ValueError(f"expected_gains must be True or False, got {self.expected_gains!r}")
        if not isinstance(self.shared_pass, bool):
            raise ValueError(f"shared_pass must be True or False, got {self.shared_pass!r}")
        if self.shared_pass:
            from .methods.grid import SENSITIVITY_SENTENCES

            if not (self.codebook == "grid" and self.allocate == "sensitivity" and self.feedback == "synthetic"):
                raise ValueError("shared_pass takes the feedback's moments in the gains' passes, which needs codebook='grid', "
                                 "allocate='sensitivity' and feedback='synthetic'")
            if self.feedback_texts <= SENSITIVITY_SENTENCES:
                raise ValueError(f"shared_pass counts the gains' {SENSITIVITY_SENTENCES} sentences among the feedback's: "
                                 f"feedback_texts must exceed {SENSITIVITY_SENTENCES}, got {self.feedback_texts}")
        if isinstance(self.moments_batch, bool) or not isinstance(self.moments_batch, int) or self.moments_batch < 0:
            raise ValueError(f"moments_batch must be a non-negative integer, got {self.moments_batch!r}")
        if self.moments_batch and not (self.codebook == "grid" and self.feedback):
            raise ValueError("moments_batch sets the sentences per pass of a grid's feedback: it needs codebook='grid' "
                             "and feedback")
        if not (self.codebook == "grid" and self.allocate == "sensitivity"):  # no gains measured: settle, as above
            object.__setattr__(self, "sensitivity_probes", self._OPTIONAL_FIELDS["sensitivity_probes"])
            object.__setattr__(self, "expected_gains", self._OPTIONAL_FIELDS["expected_gains"])
        if self.bits_for and self.allocate != "uniform":
            raise ValueError("bits_for sets bits by name, which needs allocate='uniform' (a mixed allocation chooses them itself)")
        if self.layer_omega and self.allocate != "hessian":
            raise ValueError(f"layer_omega only applies with allocate='hessian', not {self.allocate!r}")
        if self.average and self.codebook == "grid":
            if not 0.5 <= self.average <= 8:
                raise ValueError(f"average ({self.average}) must lie between 0.5 and 8 bits per weight")
        elif self.average:
            if self.allocate == "uniform":
                raise ValueError("average needs a mixed allocation (allocate='size', 'sensitivity' or 'hessian'), not 'uniform'")
            if not self.min_bits <= self.average <= self.max_bits:
                raise ValueError(f"average ({self.average}) must lie between min_bits ({self.min_bits}) and max_bits ({self.max_bits})")
        if not isinstance(self.outlier_threshold, (int, float)) or self.outlier_threshold != self.outlier_threshold:
            raise ValueError(f"outlier_threshold must be a number, got {self.outlier_threshold!r}")
        if self.clustering not in ("l1", "lloyd", "exact"):
            raise ValueError(f"clustering must be 'l1', 'lloyd' or 'exact', got {self.clustering!r}")
        if self.allocate not in ("uniform", "size", "sensitivity", "hessian"):
            raise ValueError(f"allocate must be 'uniform', 'size', 'sensitivity' or 'hessian', got {self.allocate!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")

    def fed_back(self, name: str) -> bool:
        """Whether error feedback re-codes Linear weight ``name``: ``feedback`` is on and no
        ``feedback_exclude`` glob matches it."""
        from fnmatch import fnmatchcase

        return bool(self.feedback) and not any(fnmatchcase(name, glob) for glob in self.feedback_exclude)

    def bits_of(self, name: str) -> int:
        """The bits of tensor ``name`` under a uniform allocation: those of the first
        ``bits_for`` glob it matches, else ``bits``."""
        from fnmatch import fnmatchcase

        return next((b for glob, b in self.bits_for if fnmatchcase(name, glob)), self.bits)

    def draws_synthetic(self) -> bool:
        """Whether quantizing with this config draws synthetic sentences, which
        ``synthetic_seed`` seeds: act_outliers' energies (unless feedback="texts" gives the
        sentences), feedback="synthetic", allocate="sensitivity"'s gains, correct_bias."""
        return bool((self.act_outliers and self.feedback != "texts") or self.feedback == "synthetic"
                    or self.allocate == "sensitivity" or self.correct_bias)

    @classmethod
    def paper(cls, bits: int = 3, **kw) -> "GoboConfig":
        """The recipe of the MICRO 2020 paper, unchanged."""
        return cls(**{"bits": bits, "clustering": "l1", "normalize_rows": False, "allocate": "uniform", "correct_bias": False, **kw})

    @classmethod
    def grid(cls, bits: int = 3, **kw) -> "GoboConfig":
        """The most accurate data-free setting at a given size (method ``gobo-grid``): grid
        tensors, entropy coded, their steps weighed by their output gain, the Linears' codes
        chosen by error feedback on 64 synthetic sentences (damping 1), the embedding tables'
        under the gradients at their output, the file spending ``bits`` (or ``average``) per
        weight all in."""
        kw = {"allocate": "sensitivity", "feedback": "synthetic", **kw}
        kw.setdefault("feedback_embeddings", kw["allocate"] == "sensitivity" and bool(kw["feedback"]))  # where it applies
        return cls(**{"bits": bits, "codebook": "grid", "feedback_texts": 64, "feedback_damp": 1.0, **kw})

    @classmethod
    def grid_fast(cls, bits: int = 3, **kw) -> "GoboConfig":
        """:meth:`grid` in about half the time (method ``gobo-grid-fast``): the gains from one
        gradient direction, under the error rounding is expected to make, the feedback on 32
        sentences (8 at a time through the model, shortest first) with inputs wider than 768
        features in groups of 768, the embedding tables rounded (not fed back).
        ``shared_pass=True`` saves the feedback's forward pass over 16 of them (measured less
        accurate on all-mpnet-base-v2: README)."""
        kw = {"sensitivity_probes": 1, "expected_gains": True, "feedback_texts": 32, "feedback_embeddings": False, **kw}
        if kw.get("feedback", "synthetic"):  # where it applies
            kw.setdefault("feedback_group", 768)
            kw.setdefault("moments_batch", 8)
        return cls.grid(bits, **kw)


@dataclass(frozen=True)
class DirectQConfig:
    """Round-to-nearest uniform quantization, one [min, max] range per row ("DirectQ").

    ``granularity="tensor"`` uses one range for the whole matrix: Q-BERT's DirectQ baseline.
    """

    bits: int = 3
    granularity: str = "row"  # "row": one range per row; "tensor": one range per matrix
    version: int = 1
    _OPTIONAL_FIELDS: ClassVar[dict[str, object]] = {"granularity": "row"}  # see GoboConfig

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        if self.granularity not in ("row", "tensor"):
            raise ValueError(f"granularity must be 'row' or 'tensor', got {self.granularity!r}")


@dataclass(frozen=True)
class QBertConfig:
    """Q-BERT (Shen et al., AAAI 2020): group-wise uniform quantization, Hessian-ranked mixed precision.

    Every matrix is split into at least ``groups`` row groups (query/key/value per attention
    head), each with its own uniform ``2**b``-level range; see :mod:`gobo.methods.groupwise`.
    ``mixed="2/3"`` gives each encoder layer 2 or 3 bits by the rank of its Hessian
    sensitivity; :func:`gobo.quantize` measures it and records the plan in ``layer_bits``.
    """

    bits: int = 3  # encoder-layer width without a plan; also weights outside the layers (pooler)
    layer_bits: tuple[int, ...] = ()  # explicit per-layer widths, layer 0 first; () = every layer at `bits`
    mixed: str = ""  # "LOW/HIGH", e.g. "2/3" or "2/4": Hessian-ranked mixed precision; "" = off
    average: float = 0.0  # mixed: average layer width to reach (never exceeded); 0 = halfway
    embedding_bits: int = 8  # word/position/type embeddings (8 in the paper's tables)
    groups: int = 128  # at least this many range groups per matrix (128 in the paper)
    symmetric: bool = True  # group range [-max|w|, max|w|]; False: [min w, max w]
    head_size: int = 0  # rows per attention head in query/key/value; 0 = no head alignment (gobo.quantize fills it)
    version: int = 1

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("embedding_bits", self.embedding_bits)
        if not isinstance(self.layer_bits, (tuple, list)):
            raise ValueError(f"layer_bits must be a sequence of integers from 1 to 8, got {self.layer_bits!r}")
        object.__setattr__(self, "layer_bits", tuple(self.layer_bits))
        for b in self.layer_bits:
            _check_bits("every entry of layer_bits", b)
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be a positive integer, got {self.groups!r}")
        if isinstance(self.head_size, bool) or not isinstance(self.head_size, int) or self.head_size < 0:
            raise ValueError(f"head_size must be a non-negative integer, got {self.head_size!r}")
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric must be True or False, got {self.symmetric!r}")
        if isinstance(self.average, bool) or not isinstance(self.average, (int, float)) or self.average < 0:
            raise ValueError(f"average must be a non-negative number, got {self.average!r}")
        if self.mixed:
            low, high = self.mixed_bits
            if self.average and not low <= self.average <= high:
                raise ValueError(f"average ({self.average}) must lie between {low} and {high}")
            if any(b not in (low, high) for b in self.layer_bits):
                raise ValueError(f"layer_bits {list(self.layer_bits)} may only hold {low} or {high} with mixed={self.mixed!r}")
        elif self.average:
            raise ValueError("average only applies with mixed, e.g. mixed='2/3'")

    @property
    def mixed_bits(self) -> tuple[int, int]:
        """``(LOW, HIGH)`` of ``mixed``; ValueError if it is not of that form."""
        parts = self.mixed.split("/") if isinstance(self.mixed, str) else []
        try:
            low, high = (int(p) for p in parts)
        except ValueError:
            raise ValueError(f"mixed must look like '2/3' (LOW/HIGH bits), got {self.mixed!r}") from None
        if not 1 <= low < high <= 8:
            raise ValueError(f"mixed needs 1 <= LOW < HIGH <= 8, got {self.mixed!r}")
        return low, high


#: the methods as the CLI names them (:func:`method_config`); those of gobo's own config first
METHODS = ("gobo", "gobo-paper", "gobo-grid", "gobo-grid-fast", "directq", "qbert")
GOBO_METHODS = METHODS[:4]
#: the methods whose tensors are entropy-coded grids
GRID_METHODS = ("gobo-grid", "gobo-grid-fast")

CONFIGS = {"gobo": GoboConfig, "directq": DirectQConfig, "qbert": QBertConfig}


def _bits_for(value) -> tuple[tuple[str, int], ...]:
    """``bits_for`` as a tuple of ``(glob, bits)`` pairs (a JSON file gives lists)."""
    try:
        pairs = tuple((glob, b) for glob, b in value)
    except (TypeError, ValueError):
        raise ValueError(f"bits_for must be a sequence of (glob, bits) pairs, got {value!r}") from None
    for glob, b in pairs:
        if not isinstance(glob, str) or not glob:
            raise ValueError(f"bits_for needs a non-empty name pattern, got {glob!r}")
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8:
            raise ValueError(f"bits_for: bits for {glob!r} must be from 1 to 8, got {b!r}")
    return pairs


def _globs(field: str, value) -> tuple[str, ...]:
    """A sequence of non-empty name patterns as a tuple (a JSON file gives a list)."""
    if isinstance(value, str) or not isinstance(value, (tuple, list)) or \
            not all(isinstance(g, str) and g for g in value):
        raise ValueError(f"{field} must be a sequence of non-empty name patterns, got {value!r}")
    return tuple(value)


def method_config(method: str, bits: int = 3, **overrides) -> GoboConfig | DirectQConfig | QBertConfig:
    """Config for a method name as the CLI spells it: one of :data:`METHODS`."""
    if method == "gobo":
        return GoboConfig(bits=bits, **overrides)
    if method == "gobo-paper":
        return GoboConfig.paper(bits=bits, **overrides)
    if method == "gobo-grid":
        return GoboConfig.grid(bits=bits, **overrides)
    if method == "gobo-grid-fast":
        return GoboConfig.grid_fast(bits=bits, **overrides)
    if method == "directq":
        return DirectQConfig(bits=bits, **overrides)
    if method == "qbert":
        return QBertConfig(bits=bits, **overrides)
    raise ValueError(f"unknown method {method!r}; choose {', '.join(METHODS[:-1])} or {METHODS[-1]}")


def config_to_json(cfg) -> dict:
    for name, cls in CONFIGS.items():
        if type(cfg) is cls:
            data = asdict(cfg)
            version = data.pop("version")
            for name_, implied in getattr(cls, "_OPTIONAL_FIELDS", {}).items():  # fields added later
                if data[name_] == implied:
                    del data[name_]
            return {"type": name, "version": version, "data": data}
    raise TypeError(f"not a gobo method config: {type(cfg).__name__}")


def config_from_json(obj: dict):
    """Rebuild a config; unknown types, versions or fields raise ValueError."""
    try:
        cls = CONFIGS[obj["type"]]
    except (KeyError, TypeError):
        raise ValueError(f"unknown method config {obj!r}") from None
    known = {f.name for f in fields(cls)} - {"version"}
    data = dict(obj.get("data", {}))
    extra = set(data) - known
    if extra:
        raise ValueError(f"unknown fields {sorted(extra)} in {obj['type']} config")
    version = obj.get("version")
    if version != 1:
        raise ValueError(f"{obj['type']} config version {version} is not supported by this gobo")
    for name_, implied in getattr(cls, "_OPTIONAL_FIELDS", {}).items():
        data.setdefault(name_, implied)
    return cls(**data)

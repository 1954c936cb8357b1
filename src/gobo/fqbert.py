"""FQ-BERT: a fully quantized encoder that runs in integer arithmetic end to end.

After Liu et al., "FQ-BERT: Fully Quantized BERT for Efficient Natural Language Processing on
FPGA" (2021): 4-bit weights, 8-bit activations, 32-bit integer biases, and softmax, GELU and
LayerNorm computed in integers with the I-BERT approximations (:mod:`gobo.intops`). FQ-BERT
trains with quantization in the loop; here the same number formats are applied after training:
GPTQ for the Linear weights and static activation scales, both from a few hundred texts.

Number formats (symmetric, zero point 0):

* weights: every Linear matrix and the embedding tables (as in the paper, whose 7.94x ratio
  needs the tables at 4 bits too): ``w_bits`` codes in ``[-7, 7]``, one float32 scale per output
  row (per token for the tables) clipped to the least squared error; Linear codes by GPTQ
  (Frantar et al., 2023) on the calibration inputs, table codes rounded to nearest;
* biases: int32 at their accumulator's scale (input scale times row scale);
* activations: every matmul input (hidden states, Q, K, V, attention context, GELU output)
  ``a_bits`` codes with one static per-tensor power-of-two scale (least squared error over
  the calibration texts); the softmax output unsigned at ``2**-8``; the inputs of the
  non-linear units (the residual sums that feed LayerNorm, the GELU input) ``wide_bits``
  (16) codes; the softmax input is the int32 accumulator of ``Q K^T`` itself;
* optionally (``smooth=K``), outlier channels of LayerNorm and GELU outputs get per-channel
  factors ``2**k`` (k <= K) folded into the columns of the Linear that reads them;
* LayerNorm gamma/beta, MPNet's relative-bias table and the activation scales stay float32
  and become integer multipliers and offsets when the model is built.

Two ways to run the same quantized model:

* the integer path (:meth:`FQBertModel.hidden_codes`): int8/uint8/int32/int64 tensors only,
  I-BERT kernels, rescaling by dyadic numbers ``m / 2**e``;
* the float simulation (:meth:`FQBertModel.hidden_simulated`, float64): fake quantization at the
  same points with the same scales and rounding; softmax and GELU evaluate the same I-BERT
  polynomials with the same grid-quantized coefficients; LayerNorm, divisions and rescaling
  are exact. Their agreement checks what the integer path adds: dyadic requantization,
  integer LayerNorm (Newton isqrt), shift-based exp, integer division, integer GEMMs.

Activation scales are powers of two so that every rescaling into a 16-bit point is an exact
dyadic number (a float32 row scale times a power of two) and both paths round the same values.
That matters: the quantized network is chaotic with respect to rounding. Nudging a single
point by 1e-4 of its value changes rounding decisions downstream until the rounding noise is
independent, which flips about 3% of the probe's predictions on all-MiniLM-L6-v2; a simulation
with exact ``exp``/``erf`` or real-valued rescaling differs from the integer path that much.

Supported encoders: BERT (``BertModel``), RoBERTa (``RobertaModel``) and MPNet
(``MPNetModel``, relative position bias); post-LayerNorm, erf GELU.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from . import intops
from .fqbert_forward import (
    ACT_POINTS,
    LINEARS,
    PROB_BITS,
    SUPPORTED_MODEL_TYPES,
    WIDE_POINTS,
    EncoderSpec,
    FloatOps,
    IntEncoder,
    IntLayer,
    IntLinear,
    SimOps,
    extract_encoder,
    float_forward,
    input_point,
    int_forward,
    point_kind,
)
from .intops import Dyadic, IntLayerNorm, dyadic, qmax

__all__ = [
    "EncoderSpec",
    "FQBertConfig",
    "FQBertModel",
    "FQBertReport",
    "FQBertSize",
    "FloatOps",
    "SimOps",
    "SUPPORTED_MODEL_TYPES",
    "evaluate_fqbert",
    "extract_encoder",
    "float_forward",
    "gptq_rows",
    "quantize_rows",
]

MAX_TOKENS = 128


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class FQBertConfig:
    """Number formats of the fully quantized encoder (defaults: the FQ-BERT paper's)."""

    w_bits: int = 4  # bits of every weight matrix, symmetric, one scale per output row
    emb_bits: int = 4  # bits of the embedding tables, one scale per row (token)
    a_bits: int = 8  # bits of matmul inputs, LayerNorm and GELU outputs, softmax output
    wide_bits: int = 16  # bits of LayerNorm inputs (residual sums) and the GELU input
    w_clip: str = "mse"  # per-row weight clipping: "max" (absmax) or "mse" (least squared error)
    w_method: str = "gptq"  # Linear weights: "rtn" (round to nearest) or "gptq" (error feedback, calibration data)
    gptq_damp: float = 0.01  # GPTQ: added to the Hessian diagonal, as a fraction of its mean
    smooth: int = 0  # largest k of per-channel factors 2**k on outlier channels of LayerNorm/GELU outputs (0: off)
    a_calib: str = "mse"  # activation scales: "max", "percentile" or "mse" over the calibration texts
    percentile: float = 99.99  # for a_calib="percentile": the |x| percentile mapped to the largest code
    version: int = 1

    def __post_init__(self) -> None:
        for name, lo, hi in (("w_bits", 2, 8), ("emb_bits", 2, 8), ("a_bits", 4, 8), ("wide_bits", 8, 16)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {v!r}")
        if self.wide_bits < self.a_bits:
            raise ValueError(f"wide_bits ({self.wide_bits}) must be at least a_bits ({self.a_bits})")
        if isinstance(self.smooth, bool) or not isinstance(self.smooth, int) or not 0 <= self.smooth <= 8:
            raise ValueError(f"smooth must be an integer from 0 to 8, got {self.smooth!r}")
        if self.w_clip not in ("max", "mse"):
            raise ValueError(f"w_clip must be 'max' or 'mse', got {self.w_clip!r}")
        if self.w_method not in ("rtn", "gptq"):
            raise ValueError(f"w_method must be 'rtn' or 'gptq', got {self.w_method!r}")
        if not isinstance(self.gptq_damp, (int, float)) or not 0.0 < self.gptq_damp <= 1.0:
            raise ValueError(f"gptq_damp must be a number in (0, 1], got {self.gptq_damp!r}")
        if self.a_calib not in ("max", "percentile", "mse"):
            raise ValueError(f"a_calib must be 'max', 'percentile' or 'mse', got {self.a_calib!r}")
        if not isinstance(self.percentile, (int, float)) or not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be a number in (50, 100], got {self.percentile!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------------------- weights


def quantize_rows(w: torch.Tensor, bits: int, clip: str = "mse") -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row quantization of a 2-D float tensor: ``(codes int8, scales float32)``.

    ``w[r] ~ codes[r] * scales[r]`` with codes in ``[-qmax, qmax]``. ``clip="mse"`` tries clipping
    thresholds from 0.5 to 1.0 of the row's absmax and keeps the one with the least squared
    error per row; ``"max"`` uses the absmax.
    """
    if w.ndim != 2:
        raise ValueError(f"quantize_rows takes a 2-D tensor, got shape {tuple(w.shape)}")
    w = w.detach().float()
    q = qmax(bits)
    amax = w.abs().amax(dim=1).clamp(min=1e-12)  # (R,)
    ratios = torch.linspace(0.5, 1.0, 11) if clip == "mse" else torch.ones(1)
    best_err = torch.full_like(amax, float("inf"))
    best = amax / q
    for r in ratios.tolist():
        s = amax * r / q
        err = ((torch.clamp(torch.round(w / s[:, None]), -q, q) * s[:, None] - w) ** 2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    codes = torch.clamp(torch.round(w / best[:, None]), -q, q).to(torch.int8)
    return codes, best.float()


def gptq_rows(w: torch.Tensor, hessian: torch.Tensor, bits: int, scales: torch.Tensor, damp: float = 0.01,
              block: int = 128) -> torch.Tensor:
    """GPTQ (Frantar et al., ICLR 2023) codes for ``w`` (out, in) on fixed per-row ``scales``.

    Columns are rounded one at a time, largest Hessian diagonal first; each rounding error is
    spread over the columns not yet rounded through the inverse of ``hessian`` (``X^T X`` of the
    layer's calibration inputs), which minimises ``||X w^T - X q^T||`` rather than ``||w - q||``.
    """
    from .feedback import error_feedback

    q = qmax(bits)
    s = scales.double()

    def rounded(col, j):
        c = torch.clamp(torch.round(col / s), -q, q)
        return c * s, c.to(torch.int64)

    codes, _ = error_feedback(w, hessian, rounded, damp, block)
    return codes.to(torch.int8)


class _Observer:
    """Per quantization point, over non-padding tokens: the absmax per channel, a sample of rows
    and, for the points in ``hessians``, the sum of ``x^T x`` (float64)."""

    def __init__(self, per_call: int = 1 << 16, seed: int = 0, hessians: set[str] = frozenset()) -> None:
        self.amax: dict[str, torch.Tensor] = {}  # point -> (H,) float32
        self.samples: dict[str, list[torch.Tensor]] = {}  # point -> [(rows, H) float32]
        self.hessian: dict[str, torch.Tensor] = {}
        self.hessians = hessians
        self.per_call = per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.valid: torch.Tensor | None = None  # (B, T) bool

    def __call__(self, name: str, x: torch.Tensor) -> None:
        rows = (x[self.valid] if self.valid is not None else x.reshape(-1, x.shape[-1])).detach()  # (N, H)
        if name in self.hessians:
            v = rows.double()
            self.hessian[name] = self.hessian.get(name, 0) + v.T @ v
        rows = rows.float()
        a = rows.abs().amax(dim=0)
        self.amax[name] = torch.maximum(self.amax[name], a) if name in self.amax else a
        keep = max(1, self.per_call // x.shape[-1])
        if rows.shape[0] > keep:
            rows = rows[torch.randint(rows.shape[0], (keep,), generator=self.gen)]
        self.samples.setdefault(name, []).append(rows)

    def smooth_exponents(self, name: str, max_exp: int = 8) -> torch.Tensor:
        """Per channel ``k >= 0`` with ``amax / 2**k`` at most twice the median channel's absmax."""
        a = self.amax[name].double().clamp(min=1e-12)
        k = torch.ceil(torch.log2(a / (2.0 * a.median())))
        return k.clamp(0, max_exp).to(torch.int64)

    def scale(self, name: str, bits: int, method: str, percentile: float,
              factor: torch.Tensor | None = None) -> float:
        """A power-of-two scale ``S`` for codes ``x / (S * factor)`` (``factor``: per channel, or 1):
        the smallest that holds the absmax (wide points, "max"), the one with the least squared
        error in ``x`` ("mse"), or the smallest that holds the percentile of ``|x| / factor``."""
        q = qmax(bits)
        f = torch.ones(1) if factor is None else factor.float()
        amax = max(float((self.amax[name] / f).max()), 1e-8)
        top = math.ceil(math.log2(amax / q))
        if method == "max" or bits > 8:
            return 2.0**top
        a = torch.cat(self.samples[name]).abs()  # (S, H)
        if method == "percentile":
            r = (a / f).reshape(-1)
            k = max(1, min(r.numel(), int(math.ceil(r.numel() * percentile / 100.0))))
            return 2.0 ** math.ceil(math.log2(max(float(torch.kthvalue(r, k).values), 1e-8) / q))
        errs = {}
        for e in range(top - 6, top + 1):
            step = 2.0**e * f
            errs[e] = float(((torch.clamp(torch.floor(a / step + 0.5), max=q) * step - a) ** 2).mean())
        return 2.0 ** min(errs, key=lambda e: (errs[e], -e))


# ---------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class FQBertSize:
    """Bytes of the FP32 encoder and of what the fully quantized one stores."""

    fp32_bytes: int  # FP32 tensors the encoder uses (the pooler is not used by the embedding, nor counted)
    stored_bytes: int  # packed codes + row scales + int32 biases + float32 LayerNorm/relative bias + act scales
    by_kind: dict  # kind -> bytes: "codes", "row_scales", "biases", "layernorm", "other"
    n_weights: int  # quantized weights (matrices and embedding tables)

    @property
    def ratio(self) -> float:
        return self.fp32_bytes / self.stored_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.stored_bytes / self.n_weights

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ratio"] = self.ratio
        d["bits_per_weight"] = self.bits_per_weight
        return d


@dataclass
class FQBertModel:
    """A fully quantized encoder: integer inference and its float simulation.

    Build one with :meth:`from_pretrained_fp32`; :meth:`embed` returns sentence embeddings.
    The stored state is the codes, row scales, float tensors and activation scales; the
    integer constants and the simulation's float64 weights are derived from them.
    """

    config: FQBertConfig
    spec: EncoderSpec  # architecture (its FP32 tensors are not kept)
    codes: dict[str, torch.Tensor]  # matrix name -> int8 codes (rows, cols)
    row_scales: dict[str, torch.Tensor]  # matrix name -> float32 (rows,)
    float_tensors: dict[str, torch.Tensor]  # FP32 biases, LayerNorm gamma/beta, relative bias table
    act_scales: dict[str, float]  # quantization point -> power-of-two scale
    smooth: dict[str, torch.Tensor] = field(default_factory=dict)  # point -> int64 (H,) exponents k: codes x / (S 2**k)
    tokenizer: object = None
    fp32_bytes: int = 0
    debug: bool = False  # check every integer intermediate (dtype and range) and keep a trace
    trace: list = field(default_factory=list)  # debug: (point, dtype, min, max) of the last batch
    sim_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # derived
    encoder: IntEncoder | None = None  # derived

    # ------------------------------------------------------------------ building

    @classmethod
    def from_pretrained_fp32(cls, model, calib_texts: Sequence[str], tokenizer, config: FQBertConfig | None = None,
                             batch_size: int = 64, progress: Callable[[int], None] | None = None) -> "FQBertModel":
        """Quantize a transformers encoder: weights per row, activation scales from ``calib_texts``.

        One FP32 pass over the calibration texts records, over their non-padding tokens, every
        quantization point (for the activation scales) and the input Hessian ``X^T X`` of every
        Linear (for GPTQ). Embedding tables are rounded to nearest; the Linear weights use
        ``config.w_method``.
        """
        config = config or FQBertConfig()
        if not calib_texts:
            raise ValueError("calibration needs at least one text")
        spec = extract_encoder(model)
        fp32_bytes = sum(v.numel() * 4 for v in spec.tensors.values())
        w32 = dict(spec.tensors)
        if spec.rel_buckets:
            w32.update({f"l{i}.rel": spec.tensors["rel_bias"] for i in range(spec.layers)})
        inputs = {(i, n): input_point(i, n) for i in range(spec.layers) for n in LINEARS}
        obs = _Observer(hessians=set(inputs.values()) if config.w_method == "gptq" else set())
        with torch.inference_mode():
            for batch in _batches(tokenizer, calib_texts, batch_size):
                obs.valid = batch["attention_mask"].bool()
                float_forward(spec, w32, batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                              FloatOps(obs))
                if progress is not None:
                    progress(batch["input_ids"].shape[0])
        smooth = {}
        if config.smooth:  # every Linear input that a LayerNorm or the GELU produces
            for name in sorted(set(inputs.values()) - {f"l{i}.ctx" for i in range(spec.layers)}):
                k = obs.smooth_exponents(name, config.smooth)
                if bool((k > 0).any()):
                    smooth[name] = k
        scales = {}
        for name in obs.amax:
            bits = config.wide_bits if point_kind(name) in WIDE_POINTS else config.a_bits
            f = 2.0 ** smooth[name].double() if name in smooth else None
            scales[name] = obs.scale(name, bits, config.a_calib, config.percentile, f)
        codes, row_scales = {}, {}
        for name, t in spec.tensors.items():
            if name in ("emb.word", "emb.pos", "emb.type"):
                codes[name], row_scales[name] = quantize_rows(t, config.emb_bits, config.w_clip)
            elif name.endswith(".w") and name.split(".")[1] in LINEARS:
                src = inputs[int(name.split(".")[0][1:]), name.split(".")[1]]
                f = 2.0 ** smooth[src].double() if src in smooth else torch.ones(t.shape[1], dtype=torch.float64)
                t = (t.double() * f[None, :]).float()  # exact: powers of two
                codes[name], row_scales[name] = quantize_rows(t, config.w_bits, config.w_clip)
                if config.w_method == "gptq":
                    h = obs.hessian[src] / (f[:, None] * f[None, :])  # of the inputs divided by f
                    codes[name] = gptq_rows(t, h, config.w_bits, row_scales[name], config.gptq_damp)
        kept = {k: v for k, v in spec.tensors.items() if k not in codes}
        spec = EncoderSpec(**{**spec.__dict__, "tensors": {}})
        fq = cls(config=config, spec=spec, codes=codes, row_scales=row_scales, float_tensors=kept,
                 act_scales=scales, smooth=smooth, tokenizer=tokenizer, fp32_bytes=fp32_bytes)
        fq._build()
        return fq

    def factor(self, point: str) -> torch.Tensor:
        """Per-channel smoothing factors ``2**k`` of a point (float64; ones when not smoothed)."""
        k = self.smooth.get(point)
        return torch.ones(1, dtype=torch.float64) if k is None else 2.0 ** k.double()

    def _int_ln(self, name: str, in_scale: float, out: str) -> IntLayerNorm:
        f = self.factor(out)  # codes of the output point are value / (S 2**k): gamma and beta shrink by 2**k
        g, b = self.float_tensors[name + ".w"].double(), self.float_tensors[name + ".b"].double()
        return IntLayerNorm.build(g / f, b / f, self.spec.eps, in_scale, self.act_scales[out], self.config.a_bits)

    def score_scale(self, layer: int) -> float:
        """Scale of layer ``layer``'s ``Q K^T / sqrt(d)`` accumulator."""
        s = self.act_scales
        return s[f"l{layer}.q"] * s[f"l{layer}.k"] / math.sqrt(self.spec.head_dim)

    def _build(self) -> None:
        """Derive the simulation's float64 weights and the integer constants from the stored state."""
        cfg, spec, s, ft = self.config, self.spec, self.act_scales, self.float_tensors
        f = self.factor
        sim = {k: v.double() for k, v in ft.items()}
        layers = []
        for i in range(spec.layers):
            p = f"l{i}."
            lin = {}
            for name in LINEARS:
                wname, src = p + name + ".w", input_point(i, name)
                acc_scale = s[src] * self.row_scales[wname].double()  # (out,)
                bias = torch.round(ft[p + name + ".b"].double() / acc_scale)
                if float(bias.abs().max()) >= 2**31:
                    raise ValueError(f"the bias of {p}{name} does not fit in int32 at its accumulator scale")
                # the codes hold w * f (f: the input's smoothing factors); the simulation's input is x, not x / f
                sim[wname] = self.codes[wname].double() * self.row_scales[wname].double()[:, None] / f(src)
                sim[p + name + ".b"] = bias * acc_scale
                target = {"o": "res1", "fc1": "gelu_in", "fc2": "res2"}.get(name, name)
                lin[name] = IntLinear(w_t=self.codes[wname].t().contiguous(), bias=bias.to(torch.int32),
                                       out=dyadic(acc_scale / s[p + target]), x_max=qmax(cfg.a_bits),
                                       w_max=qmax(cfg.w_bits))
            rel = None
            if spec.rel_buckets:
                rel_codes = torch.round(ft["rel_bias"].double() / self.score_scale(i))
                sim[p + "rel"] = rel_codes * self.score_scale(i)
                rel = rel_codes.to(torch.int32)
            _, _, _, gelu_raw = intops.gelu_constants(s[p + "gelu_in"])

            def ln(name, src, out):
                return self._int_ln(p + name, s[p + src], p + out)

            h_in = input_point(i, "q")
            layers.append(IntLayer(
                q=lin["q"], k=lin["k"], v=lin["v"], score_scale=self.score_scale(i), rel=rel,
                ctx=dyadic(2.0**-PROB_BITS * s[p + "v"] / s[p + "ctx"]),
                o=lin["o"], res1_skip=dyadic(s[h_in] * f(h_in) / s[p + "res1"]), ln1=ln("ln1", "res1", "h1"),
                fc1=lin["fc1"], gelu_scale=s[p + "gelu_in"],
                gelu_out=dyadic(gelu_raw / (s[p + "gelu_out"] * f(p + "gelu_out"))),
                fc2=lin["fc2"], res2_skip=dyadic(s[p + "h1"] * f(p + "h1") / s[p + "res2"]), ln2=ln("ln2", "res2", "h2"),
            ))
        se = s["emb.sum"]
        tables = {}
        for name in ("emb.word", "emb.pos", "emb.type"):
            if name in self.codes:
                sim[name] = self.codes[name].double() * self.row_scales[name].double()[:, None]
                d = dyadic(self.row_scales[name].double() / se)
                tables[name] = (self.codes[name], Dyadic(d.m[:, None], d.e[:, None]))
        typ = tables.get("emb.type", (None, None))
        self.encoder = IntEncoder(
            word=tables["emb.word"][0], word_d=tables["emb.word"][1], pos=tables["emb.pos"][0],
            pos_d=tables["emb.pos"][1], typ=typ[0], typ_d=typ[1],
            ln=self._int_ln("emb.ln", se, "emb.ln"),
            layers=layers, aq=qmax(cfg.a_bits), wq=qmax(cfg.wide_bits), out_scale=s[f"l{spec.layers - 1}.h2"],
        )
        self.sim_weights = sim

    # ------------------------------------------------------------------ running

    def _check(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if not intops.is_int(x):
            raise AssertionError(f"{name}: the integer path produced a {x.dtype} tensor")
        lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 0)
        kind = name.split(".", 1)[1]
        bound = {**{k: qmax(self.config.a_bits) for k in ACT_POINTS},
                 **{k: qmax(self.config.wide_bits) for k in WIDE_POINTS}, "p": 255}.get(kind)
        if bound is not None and (lo < -bound or hi > bound):
            raise AssertionError(f"{name}: codes in [{lo}, {hi}] leave [-{bound}, {bound}]")
        self.trace.append((name, x.dtype, lo, hi))
        return x

    def hidden_codes(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Integer path: int8 codes ``(B, T, H)`` of the last hidden state (scale ``encoder.out_scale``)."""
        if self.debug:
            self.trace = []
        with torch.inference_mode():
            return int_forward(self.spec, self.encoder, input_ids, attention_mask, token_type_ids,
                               self._check if self.debug else None)

    def hidden_simulated(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Float simulation: the last hidden state ``(B, T, H)``, float64."""
        with torch.inference_mode():
            return float_forward(self.spec, self.sim_weights, input_ids, attention_mask, token_type_ids, SimOps(self))

    def embed(self, texts: Sequence[str], simulate: bool = False, batch_size: int = 64,
              progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Sentence embeddings ``(N, H)`` float32: masked mean of the last hidden state, L2-normalised.

        The integer path sums the int8 codes over tokens in int64 and dequantizes once, at the
        end; ``simulate=True`` runs the float simulation instead.
        """
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer; pass one to from_pretrained_fp32")
        out = np.empty((len(texts), self.spec.hidden), dtype=np.float32)
        for idx, batch in _batches(self.tokenizer, texts, batch_size, with_index=True):
            mask = batch["attention_mask"]
            count = mask.sum(1, keepdim=True).clamp(min=1).double()
            if simulate:
                hid = self.hidden_simulated(batch["input_ids"], mask, batch.get("token_type_ids"))
                emb = (hid * mask.unsqueeze(-1).double()).sum(1) / count
            else:
                codes = self.hidden_codes(batch["input_ids"], mask, batch.get("token_type_ids"))
                total = (codes.to(torch.int64) * mask.unsqueeze(-1).to(torch.int64)).sum(1)  # (B, H) int64
                emb = total.double() * self.encoder.out_scale / count
            out[idx] = F.normalize(emb, p=2, dim=1).float().numpy()
            if progress is not None:
                progress(len(idx))
        return out

    # ------------------------------------------------------------------ storage

    def stored_tensors(self) -> dict[str, torch.Tensor]:
        """What a deployment stores, as tensors; everything else is derived from these.

        ``<matrix>.codes``: codes offset to unsigned and packed LSB-first (:mod:`gobo.packing`);
        ``<matrix>.scale``: float32 per row; ``<linear>.bias``: int32; LayerNorm gamma/beta and the
        relative bias table: float32; ``act_scales``: one float32 per quantization point;
        ``<point>.smooth``: int8 exponents per channel.
        """
        from .packing import pack_codes

        out: dict[str, torch.Tensor] = {}
        for name, c in self.codes.items():
            bits = self.config.emb_bits if name.startswith("emb.") else self.config.w_bits
            unsigned = (c.to(torch.int16) + (1 << (bits - 1))).numpy().astype(np.uint8)
            stem = name[:-2] if name.endswith(".w") else name
            out[stem + ".codes"] = torch.from_numpy(pack_codes(unsigned, bits))
            out[stem + ".scale"] = self.row_scales[name]
        for i, L in enumerate(self.encoder.layers):
            for name in LINEARS:
                out[f"l{i}.{name}.bias"] = getattr(L, name).bias
        for name, t in self.float_tensors.items():
            if not (name.endswith(".b") and name.split(".")[1] in LINEARS):  # biases: int32 above
                out[name] = t.float()
        out["act_scales"] = torch.tensor(list(self.act_scales.values()), dtype=torch.float32)
        for name, k in self.smooth.items():
            out[name + ".smooth"] = k.to(torch.int8)
        return out

    def size(self) -> FQBertSize:
        """Compression from the byte counts of :meth:`stored_tensors`."""
        by = {"codes": 0, "row_scales": 0, "biases": 0, "layernorm": 0, "other": 0}
        for name, t in self.stored_tensors().items():
            n = t.numel() * t.element_size()
            kind = ("codes" if name.endswith(".codes") else "row_scales" if name.endswith(".scale")
                    else "biases" if name.endswith(".bias") else "other" if name.endswith(".smooth")
                    else "layernorm" if ".ln" in name else "other")
            by[kind] += n
        n_weights = sum(c.numel() for c in self.codes.values())
        return FQBertSize(fp32_bytes=self.fp32_bytes, stored_bytes=sum(by.values()), by_kind=by, n_weights=n_weights)


def _batches(tokenizer, texts: Sequence[str], batch_size: int, with_index: bool = False):
    """Tokenized batches in length order (less padding), at most MAX_TOKENS tokens per text."""
    order = sorted(range(len(texts)), key=lambda i: (len(texts[i]), i))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=MAX_TOKENS,
                          return_tensors="pt")
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        yield (idx, batch) if with_index else batch


# ---------------------------------------------------------------------------- benchmark


@dataclass(frozen=True)
class FQBertReport:
    """FP32, integer path and float simulation on the same test texts, with the frozen probe."""

    model: str
    model_type: str
    config: dict
    n_test: int
    n_train: int  # texts the probe was trained on
    n_calib: int
    fp32_accuracy: float
    accuracy: float  # integer path
    sim_accuracy: float  # float simulation
    agreement: float  # integer path vs FP32 predictions
    sim_agreement: float  # simulation vs FP32 predictions
    int_sim_agreement: float  # integer path vs simulation predictions
    int_sim_identical: float  # fraction of texts whose two embeddings are bit for bit the same
    mean_cosine: float  # integer path vs FP32 embeddings
    int_sim_cosine: float  # integer path vs simulation embeddings
    size: dict
    seconds: dict

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_fqbert(model: str = "minilm-l6", config: FQBertConfig | None = None, n_test: int | None = None,
                    n_calib: int = 256, n_train: int | None = None,
                    progress: Callable[[str, int, int], None] | None = None) -> FQBertReport:
    """Build the fully quantized model and score it on the Rotten Tomatoes frozen-probe benchmark.

    Calibration uses ``n_calib`` training texts spread over the split; the probe is the
    benchmark's (trained on ``n_train`` FP32 train embeddings, default all; cached).
    ``progress(stage, n, total)`` reports texts done per stage: calibrate, probe, fp32, int, sim.
    """
    from transformers import AutoTokenizer

    from .assets import resolve_model
    from .data import load_rotten_tomatoes
    from .evaluate import encode, prepare_benchmark
    from .hf import load_source, weights_sha256

    config = config or FQBertConfig()
    src = resolve_model(model)
    tok = AutoTokenizer.from_pretrained(str(src))
    fp32 = load_source(src)
    extract_encoder(fp32)  # fail early on an unsupported architecture

    def stage(name, total):
        return (lambda n: progress(name, n, total)) if progress else None

    train, _ = load_rotten_tomatoes()
    calib = train.stride(n_calib).texts
    seconds = {}
    t = time.perf_counter()
    fq = FQBertModel.from_pretrained_fp32(fp32, calib, tok, config, progress=stage("calibrate", len(calib)))
    seconds["build"] = time.perf_counter() - t
    bench = prepare_benchmark(fp32, tok, source_sha=weights_sha256(src), n_train=n_train, n_test=n_test,
                              progress=stage("probe", 0))
    texts = bench.test_texts
    t = time.perf_counter()
    e32 = encode(fp32, tok, texts, progress=stage("fp32", len(texts)))
    seconds["fp32"] = time.perf_counter() - t
    t = time.perf_counter()
    eint = fq.embed(texts, progress=stage("int", len(texts)))
    seconds["int"] = time.perf_counter() - t
    t = time.perf_counter()
    esim = fq.embed(texts, simulate=True, progress=stage("sim", len(texts)))
    seconds["sim"] = time.perf_counter() - t
    y = np.asarray(bench.test_labels)
    p32, pint, psim = (bench.probe.predict(e) for e in (e32, eint, esim))
    return FQBertReport(
        model=str(model), model_type=fq.spec.model_type, config=config.to_dict(), n_test=len(texts),
        n_train=len(bench.train_texts), n_calib=len(calib),
        fp32_accuracy=float(np.mean(p32 == y)), accuracy=float(np.mean(pint == y)), sim_accuracy=float(np.mean(psim == y)),
        agreement=float(np.mean(pint == p32)), sim_agreement=float(np.mean(psim == p32)),
        int_sim_agreement=float(np.mean(pint == psim)), int_sim_identical=float(np.mean(np.all(eint == esim, axis=1))),
        mean_cosine=float(np.mean(np.sum(e32.astype(np.float64) * eint, axis=1))),
        int_sim_cosine=float(np.mean(np.sum(esim.astype(np.float64) * eint, axis=1))),
        size=fq.size().to_dict(), seconds=seconds,
    )

"""GOBO as memory compression: weights cross the off-chip interface compressed, are expanded on chip.

For each operation of a :class:`~gobo.hw.workload.Workload` on an
:class:`~gobo.hw.accel.Accelerator`, in one weight format (``fp32``, ``fp16`` or ``gobo``):

* **traffic**: the weight bytes of the format (each weight crosses the interface once), plus
  activations: none while a product's input and output fit the activation buffer together;
  else the output is written once and the input read once if it fits alone (it stays while
  the weights stream past), or once per weight-buffer load if it does not (it is streamed
  again for each part of the weight matrix the weight buffer holds). Weights are expanded
  to the datapath width as they arrive, so the on-chip side is the same in every format.
* **cycles**: the roofline ``max(compute, memory)``, memory = traffic / bytes per cycle.
  Compute, for ``count`` products ``(m x k) @ (k x n)`` on an ``R x C`` array:

  - ``systolic`` (weight-stationary, weights double-buffered):
    ``count * ceil(k/R) * ceil(n/C) * max(m, R) + R + C`` (a weight tile takes R cycles to
    load, hidden behind the previous tile's m rows; one fill and drain);
  - ``spatial``: ``count * ceil(k/R) * ceil(n/C) * m``;
  - ``tensorcore`` (``T = mma_tile``): ``ceil(count * ceil(m/T) ceil(n/T) ceil(k/T) / R) * T^3 / C``.

* **energy** (pJ), itemised and summed: ``dram`` = traffic x 8 x pJ/bit; ``sram`` = on-chip
  buffer words (datapath width) x pJ per 64 bits scaled to the width; ``compute`` = MACs x
  (multiply + add); ``decode`` = GOBO weights expanded x pJ per weight (``gobo`` only).
  Buffer words: inputs ``m k ceil(n/C)`` per product, weights written and read once, outputs
  ``m n (2 ceil(k/R) - 1)`` (partial sums read back while k spans several array rows); on
  the tensor core four ``T x T`` fragments per MMA.

Decoding is assumed to keep pace with the interface, so it adds energy but no cycles.
Softmax, LayerNorm and GELU run beside the array and are not counted here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .accel import Accelerator
from .workload import FORMATS, Op, Workload

__all__ = ["Energy", "LayerResult", "OpResult", "RunResult", "compare_formats", "simulate"]


@dataclass(frozen=True)
class Energy:
    """Energy in picojoules, by where it is spent; ``total`` is the sum of the parts."""

    dram: float = 0.0
    sram: float = 0.0
    compute: float = 0.0
    decode: float = 0.0

    @property
    def total(self) -> float:
        return self.dram + self.sram + self.compute + self.decode

    def __add__(self, other: "Energy") -> "Energy":
        return Energy(self.dram + other.dram, self.sram + other.sram, self.compute + other.compute, self.decode + other.decode)

    def to_dict(self) -> dict:
        return {"dram_pj": self.dram, "sram_pj": self.sram, "compute_pj": self.compute, "decode_pj": self.decode, "total_pj": self.total}


@dataclass(frozen=True)
class OpResult:
    name: str
    kind: str
    macs: int
    weight_bytes: float  # off chip
    act_bytes: float  # off chip
    compute_cycles: float
    memory_cycles: float
    energy: Energy
    clock_hz: float
    detail: dict = field(default_factory=dict)  # engine: additions, multiplications, outlier MACs

    @property
    def traffic(self) -> float:
        return self.weight_bytes + self.act_bytes

    @property
    def cycles(self) -> float:
        return max(self.compute_cycles, self.memory_cycles)

    @property
    def bound(self) -> str:
        if self.cycles == 0:
            return "-"
        return "compute" if self.compute_cycles >= self.memory_cycles else "memory"

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "macs": self.macs,
            "weight_bytes": self.weight_bytes,
            "act_bytes": self.act_bytes,
            "traffic_bytes": self.traffic,
            "compute_cycles": self.compute_cycles,
            "memory_cycles": self.memory_cycles,
            "cycles": self.cycles,
            "bound": self.bound,
            "seconds": self.seconds,
            "energy": self.energy.to_dict(),
            **self.detail,
        }


@dataclass(frozen=True)
class LayerResult:
    name: str
    ops: tuple[OpResult, ...]
    extra_cycles: float = 0.0  # serial work outside the products (FQ-BERT's softmax/LayerNorm units)
    clock_hz: float = 1.0

    @property
    def cycles(self) -> float:
        return sum(o.cycles for o in self.ops) + self.extra_cycles

    @property
    def compute_cycles(self) -> float:
        return sum(o.compute_cycles for o in self.ops)

    @property
    def memory_cycles(self) -> float:
        return sum(o.memory_cycles for o in self.ops)

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    @property
    def traffic(self) -> float:
        return sum(o.traffic for o in self.ops)

    @property
    def weight_bytes(self) -> float:
        return sum(o.weight_bytes for o in self.ops)

    @property
    def act_bytes(self) -> float:
        return sum(o.act_bytes for o in self.ops)

    @property
    def macs(self) -> int:
        return sum(o.macs for o in self.ops)

    @property
    def energy(self) -> Energy:
        e = Energy()
        for o in self.ops:
            e = e + o.energy
        return e

    @property
    def bound(self) -> str:
        """``compute`` or ``memory`` when every product of the layer is; ``mixed`` otherwise.

        Operations without arithmetic (table rows, LayerNorm vectors) only count in layers
        that have no products.
        """
        products = [o for o in self.ops if o.macs > 0]
        kinds = {o.bound for o in (products or self.ops) if o.cycles > 0}
        return kinds.pop() if len(kinds) == 1 else ("-" if not kinds else "mixed")

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "macs": self.macs,
            "cycles": self.cycles,
            "extra_cycles": self.extra_cycles,
            "seconds": self.seconds,
            "bound": self.bound,
            "weight_bytes": self.weight_bytes,
            "act_bytes": self.act_bytes,
            "traffic_bytes": self.traffic,
            "energy": self.energy.to_dict(),
            "ops": [o.to_dict() for o in self.ops],
        }


@dataclass(frozen=True)
class RunResult:
    """One workload on one architecture in one weight format."""

    arch: str
    fmt: str
    workload: Workload
    layers: tuple[LayerResult, ...]
    clock_hz: float

    @property
    def cycles(self) -> float:
        return sum(layer.cycles for layer in self.layers)

    @property
    def seconds(self) -> float:
        return self.cycles / self.clock_hz

    @property
    def traffic(self) -> float:
        return sum(layer.traffic for layer in self.layers)

    @property
    def weight_bytes(self) -> float:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def act_bytes(self) -> float:
        return sum(layer.act_bytes for layer in self.layers)

    @property
    def energy(self) -> Energy:
        e = Energy()
        for layer in self.layers:
            e = e + layer.energy
        return e

    def layer(self, name: str) -> LayerResult:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def to_dict(self) -> dict:
        w = self.workload
        return {
            "arch": self.arch,
            "format": self.fmt,
            "model": w.model,
            "seq": w.seq,
            "batch": w.batch,
            "macs": w.macs,
            "cycles": self.cycles,
            "seconds": self.seconds,
            "weight_bytes": self.weight_bytes,
            "act_bytes": self.act_bytes,
            "traffic_bytes": self.traffic,
            "energy": self.energy.to_dict(),
            "layers": [layer.to_dict() for layer in self.layers],
        }


# ---------------------------------------------------------------------------- the model


def _compute_cycles(op: Op, a: Accelerator) -> float:
    if op.kind not in ("linear", "matmul"):
        return 0.0
    r, c = a.pe_rows, a.pe_cols
    m, k, n = op.m, op.k, op.n
    if a.dataflow == "systolic":
        return float(op.count * math.ceil(k / r) * math.ceil(n / c) * max(m, r) + r + c)
    if a.dataflow == "spatial":
        return float(op.count * math.ceil(k / r) * math.ceil(n / c) * m)
    t = a.mma_tile
    mmas = op.count * math.ceil(m / t) * math.ceil(n / t) * math.ceil(k / t)
    return float(math.ceil(mmas / r) * (t**3 / c))


def _sram_words(op: Op, a: Accelerator) -> float:
    """Buffer accesses in datapath-width words (see the module docstring)."""
    if op.kind == "gather":
        return float(op.out_elems)
    if op.kind not in ("linear", "matmul"):
        return 0.0
    m, k, n = op.m, op.k, op.n
    if a.dataflow == "tensorcore":
        t = a.mma_tile
        mmas = op.count * math.ceil(m / t) * math.ceil(n / t) * math.ceil(k / t)
        return float(4 * t * t * mmas + (2 * k * n if op.kind == "linear" else 0))
    r, c = a.pe_rows, a.pe_cols
    inputs = m * k * math.ceil(n / c) * op.count
    weights = (2 * k * n) if op.kind == "linear" else k * n * op.count
    outputs = m * n * (2 * math.ceil(k / r) - 1) * op.count
    return float(inputs + weights + outputs)


def act_traffic(op: Op, elem_bytes: float, act_buffer_bytes: float, weight_buffer_bytes: float, onchip_weight_bytes: float) -> float:
    """Off-chip activation bytes of one operation (see the module docstring)."""
    in_b = op.in_elems * elem_bytes
    out_b = op.out_elems * elem_bytes
    if in_b + out_b <= act_buffer_bytes:
        return 0.0
    passes = 1
    if in_b > act_buffer_bytes and weight_buffer_bytes > 0 and onchip_weight_bytes > 0:
        passes = max(1, math.ceil(onchip_weight_bytes / weight_buffer_bytes))
    return in_b * passes + out_b


def simulate_op(op: Op, a: Accelerator, fmt: str) -> OpResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")
    eb = a.datapath_bits / 8
    wbytes = op.weights.bytes(fmt)
    abytes = act_traffic(op, eb, a.act_buffer_kib * 1024, a.weight_buffer_kib * 1024, op.weight_numel * eb)
    compute = _compute_cycles(op, a)
    memory = (wbytes + abytes) / a.bytes_per_cycle
    decoded = op.weight_numel if (fmt == "gobo" and op.code_bits is not None) else 0.0
    energy = Energy(
        dram=(wbytes + abytes) * 8 * a.e_dram_pj_per_bit,
        sram=_sram_words(op, a) * a.e_sram_pj_per_64b * a.datapath_bits / 64,
        compute=op.macs * (a.e_mult_pj + a.e_add_pj),
        decode=decoded * a.e_decode_pj_per_weight,
    )
    return OpResult(op.name, op.kind, op.macs, wbytes, abytes, compute, memory, energy, a.clock_hz)


def simulate(workload: Workload, arch: Accelerator, fmt: str = "fp32") -> RunResult:
    """``workload`` on ``arch`` with weights stored off chip in ``fmt`` (fp32, fp16, gobo)."""
    if not isinstance(arch, Accelerator):
        raise TypeError(f"simulate needs an Accelerator, got {type(arch).__name__}")
    layers = tuple(
        LayerResult(layer.name, tuple(simulate_op(op, arch, fmt) for op in layer.ops), clock_hz=arch.clock_hz)
        for layer in workload.layers
    )
    return RunResult(arch.name, fmt, workload, layers, arch.clock_hz)


def compare_formats(workload: Workload, arch: Accelerator) -> dict[str, RunResult]:
    """The workload in every weight format on one accelerator."""
    return {fmt: simulate(workload, arch, fmt) for fmt in FORMATS}

"""The FQ-BERT FPGA engine (Liu et al., DATE 2021) and CPU/GPU rooflines to compare it with.

FQ-BERT quantizes BERT fully: 4-bit weights (one scale per output row), 8-bit activations,
integer softmax and LayerNorm. The engine modelled here, on a board's DSP and BRAM budget:

* **MAC array**: ``floor(mac_dsp_fraction x DSPs)`` DSP48E2 slices, each packing
  ``macs_per_dsp`` 4-bit x 8-bit multiply-accumulates per cycle; a product takes
  ``ceil(MACs / MAC units)`` cycles, or its weight (and spilled activation) traffic over the
  board's memory interface if that is longer (roofline);
* **weight buffer**: double-buffers ``weight_tile_cycles`` cycles of MAC-array operands;
  the rest of the BRAM holds activations (a product whose input and output do not fit
  spills them off chip, as in :mod:`gobo.hw.roofline`);
* **softmax / LayerNorm / GELU units**: ``lanes`` elements per cycle each (one DSP per
  softmax and LayerNorm lane), run between the products, so their cycles add up;
* **power**: static + DSPs x dynamic + BRAM36 x dynamic + logic, plus DRAM energy per
  frame. Energy per frame is power x latency (itemised), frames per second per watt its
  inverse.

A frame is one sequence (``batch`` frames per workload). Embedding rows are read like any
other 4-bit weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .accel import Board, FqBertEngine, Processor
from .roofline import Energy, LayerResult, OpResult, RunResult, act_traffic
from .workload import Op, Workload

__all__ = ["FpgaResult", "ProcessorResult", "fqbert_weight_bytes", "simulate_fqbert", "simulate_processor"]


@dataclass(frozen=True)
class FpgaResult:
    board: Board
    dsp_used: int
    bram_used: int
    fits: bool  # every product's activations stay in BRAM
    run: RunResult
    power: dict  # watts: static, dsp, bram, logic, dram

    @property
    def latency_s(self) -> float:
        return self.run.seconds

    @property
    def fps(self) -> float:
        return self.run.workload.batch / self.latency_s

    @property
    def power_w(self) -> float:
        return sum(self.power.values())

    @property
    def fps_per_w(self) -> float:
        return self.fps / self.power_w

    @property
    def energy_per_frame_j(self) -> dict:
        """Joules per frame by where they go; the values sum to ``power_w / fps``."""
        return {k: w / self.fps for k, w in self.power.items()}

    def to_dict(self) -> dict:
        return {
            "board": self.board.name,
            "dsp": self.board.dsp,
            "dsp_used": self.dsp_used,
            "bram36": self.board.bram36,
            "bram36_used": self.bram_used,
            "activations_fit": self.fits,
            "clock_mhz": self.board.clock_mhz,
            "latency_s": self.latency_s,
            "fps": self.fps,
            "power_w": self.power_w,
            "power": self.power,
            "fps_per_w": self.fps_per_w,
            "energy_per_frame_j": self.energy_per_frame_j,
            "traffic_bytes": self.run.traffic,
            "layers": [layer.to_dict() for layer in self.run.layers],
        }


@dataclass(frozen=True)
class ProcessorResult:
    processor: Processor
    run: RunResult

    @property
    def latency_s(self) -> float:
        return self.run.seconds

    @property
    def fps(self) -> float:
        return self.run.workload.batch / self.latency_s

    @property
    def fps_per_w(self) -> float:
        return self.fps / self.processor.power_w

    def to_dict(self) -> dict:
        return {
            "name": self.processor.name,
            "title": self.processor.title,
            "latency_s": self.latency_s,
            "fps": self.fps,
            "power_w": self.processor.power_w,
            "fps_per_w": self.fps_per_w,
        }


def _matrix_numel(op: Op) -> float:
    if op.kind == "linear":
        return float(op.k * op.n)
    if op.kind == "gather":
        return float(op.m * op.n)
    return 0.0


def fqbert_weight_bytes(op: Op, weight_bits: int, scale_bytes_per_row: float) -> float:
    """Off-chip bytes of an operation's weights in FQ-BERT's format.

    Matrices at ``weight_bits`` with one scale per output row (per table row for
    embeddings); vectors (biases, LayerNorm) at 32 bits.
    """
    mat = _matrix_numel(op)
    rows = op.n if op.kind == "linear" else (op.m if op.kind == "gather" else 0)
    return mat * weight_bits / 8 + rows * scale_bytes_per_row + max(op.weights.numel - mat, 0.0) * 4


def simulate_fqbert(workload: Workload, engine: FqBertEngine, board: str = "zcu102") -> FpgaResult:
    """``workload`` on the FQ-BERT engine built on ``board`` (a key of ``engine.boards``)."""
    if board not in engine.boards:
        raise ValueError(f"unknown board {board!r}; choose one of {', '.join(engine.boards)}")
    b = engine.boards[board]
    mac_dsps = int(b.dsp * engine.mac_dsp_fraction)
    dsp_used = mac_dsps + engine.softmax_lanes + engine.layernorm_lanes
    if dsp_used > b.dsp:
        raise ValueError(f"{board}: the engine needs {dsp_used} DSPs, the board has {b.dsp}")
    n_mac = mac_dsps * engine.macs_per_dsp
    clock = b.clock_mhz * 1e6
    per_cycle = b.bandwidth_gbs * 1e9 / clock
    wbuf = 2 * n_mac * engine.weight_tile_cycles * engine.weight_bits / 8
    wbuf_bram = math.ceil(wbuf / engine.bram36_bytes)
    act_bytes_avail = max(0, b.bram36 - wbuf_bram) * engine.bram36_bytes
    eb = engine.act_bits / 8
    need = max((op.in_elems + op.out_elems) * eb for op in workload.ops())
    fits = need <= act_bytes_avail
    bram_used = wbuf_bram + min(math.ceil(need / engine.bram36_bytes), b.bram36 - wbuf_bram)

    layers = []
    for layer in workload.layers:
        ops = []
        for op in layer.ops:
            wbytes = fqbert_weight_bytes(op, engine.weight_bits, engine.scale_bytes_per_row)
            abytes = act_traffic(op, eb, act_bytes_avail, wbuf, _matrix_numel(op) * engine.weight_bits / 8)
            compute = float(math.ceil(op.macs / n_mac))
            memory = (wbytes + abytes) / per_cycle
            ops.append(OpResult(op.name, op.kind, op.macs, wbytes, abytes, compute, memory,
                                Energy(dram=(wbytes + abytes) * 8 * engine.e_dram_pj_per_bit), clock))
        extra = (layer.softmax_elems / engine.softmax_lanes + layer.layernorm_elems / engine.layernorm_lanes
                 + layer.gelu_elems / engine.gelu_lanes)
        layers.append(LayerResult(layer.name, tuple(ops), extra_cycles=float(extra), clock_hz=clock))
    run = RunResult(f"fqbert-{board}", "fqbert", workload, tuple(layers), clock)
    dram_w = run.energy.dram * 1e-12 / run.seconds
    power = {
        "static": b.static_w,
        "dsp": dsp_used * engine.dsp_mw / 1000,
        "bram": bram_used * engine.bram_mw / 1000,
        "logic": engine.logic_w,
        "dram": dram_w,
    }
    return FpgaResult(b, dsp_used, bram_used, fits, run, power)


def simulate_processor(workload: Workload, proc: Processor) -> ProcessorResult:
    """Roofline of a CPU or GPU at its peak: each product takes ``max(MACs / peak, weights / bandwidth)``.

    Activations are taken to stay in cache and the peak to be reached, so this is the
    processor's best case.
    """
    clock = proc.clock_mhz * 1e6
    per_cycle = proc.bandwidth_gbs * 1e9 / clock
    layers = []
    for layer in workload.layers:
        ops = []
        for op in layer.ops:
            wbytes = op.weights.numel * proc.weight_bits / 8
            ops.append(OpResult(op.name, op.kind, op.macs, wbytes, 0.0, op.macs / proc.macs_per_cycle, wbytes / per_cycle, Energy(), clock))
        layers.append(LayerResult(layer.name, tuple(ops), clock_hz=clock))
    return ProcessorResult(proc, RunResult(proc.name, f"fp{proc.weight_bits}", workload, tuple(layers), clock))

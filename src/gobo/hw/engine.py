"""The GOBO accelerator (Zadeh et al., MICRO 2020, Section V) as a cycle and energy model.

Each PE keeps the 3-bit indices of one output row. For every input it adds the input into
the accumulator of that weight's index (one of ``2**code_bits`` registers), so a row costs
about one addition per weight; then each non-empty accumulator is multiplied once by its
centroid and the products summed, and the few outliers go through a separate FP32
multiply-accumulate lane. The operation counts are exactly those of
:func:`gobo.dataflow.count_ops` (which the workload carries per weight matrix):

* ``additions`` (bucket adds + combining adds + row-statistics adds) on the adders,
* ``multiplications`` (one per non-empty bucket, row statistics) on the shared multipliers,
* ``outlier_macs`` on the outlier lanes;

the three run concurrently, so a product takes ``max(adds / adders, mults / multipliers,
outliers / lanes)`` cycles. Products without weights (attention scores and context) and
weights the file keeps unquantized are dense multiply-accumulates on the multipliers.

The engine has as many PEs as fit in the area of its baseline's MAC units
(:class:`~gobo.hw.accel.GoboEngine`), and shares the baseline's clock, off-chip interface
and buffers. Weights stay compressed all the way to the PEs: the off-chip traffic and the
weight-buffer footprint are the file's bytes, and no decoder is needed. A matrix with wider
codes than the PE's registers is processed in ``2**(bits - code_bits)`` passes over the
input (more buffer reads, the same additions).
Energy: DRAM and SRAM as in :mod:`gobo.hw.roofline` (the baseline's per-bit costs, the
engine's activation width), compute = additions x add + multiplications x multiply +
outlier MACs x (multiply + add).
"""

from __future__ import annotations

import math

from .accel import GoboEngine
from .roofline import Energy, LayerResult, OpResult, RunResult, act_traffic
from .workload import Op, Workload

__all__ = ["engine_op", "simulate_engine"]


def engine_op(op: Op, e: GoboEngine) -> OpResult:
    """One operation on the GOBO engine."""
    base = e.baseline
    eb = e.act_bits / 8
    wbytes = op.weights.gobo
    abytes = act_traffic(op, eb, base.act_buffer_kib * 1024, base.weight_buffer_kib * 1024, wbytes)
    memory = (wbytes + abytes) / base.bytes_per_cycle
    adds = mults = outl = dense = 0
    passes = 1
    if op.kind == "linear" and op.gobo_ops is not None:
        g = op.gobo_ops
        adds, mults, outl = g.additions, g.multiplications, g.outlier_macs
        passes = 1 << max(0, (op.code_bits or 0) - e.code_bits)
        compute = max(adds / e.adds_per_cycle, mults / e.mults_per_cycle, outl / e.outlier_macs_per_cycle)
    elif op.kind in ("linear", "matmul"):
        dense = op.macs
        compute = dense / e.mults_per_cycle
    else:
        compute = 0.0
    # buffer traffic in bits: inputs broadcast to the PEs (one output row per PE), codes read once, outputs written once
    sram_bits = 0.0
    if op.kind in ("linear", "matmul"):
        sram_bits += op.m * op.k * math.ceil(op.n / e.n_pe) * op.count * passes * e.act_bits
        sram_bits += (2 * wbytes * 8) if op.kind == "linear" else op.k * op.n * op.count * e.act_bits
        sram_bits += op.out_elems * e.act_bits
    elif op.kind == "gather":
        sram_bits += op.out_elems * e.act_bits
    energy = Energy(
        dram=(wbytes + abytes) * 8 * base.e_dram_pj_per_bit,
        sram=sram_bits / 64 * base.e_sram_pj_per_64b,
        compute=adds * e.e_add_pj + mults * e.e_mult_pj + (outl + dense) * (e.e_add_pj + e.e_mult_pj),
    )
    detail = {"additions": adds, "multiplications": mults, "outlier_macs": outl, "dense_macs": dense}
    return OpResult(op.name, op.kind, op.macs, wbytes, abytes, compute, memory, energy, base.clock_hz, detail)


def simulate_engine(workload: Workload, engine: GoboEngine) -> RunResult:
    """``workload`` on the GOBO engine (weights as stored in the file)."""
    if not isinstance(engine, GoboEngine):
        raise TypeError(f"simulate_engine needs a GoboEngine, got {type(engine).__name__}")
    clock = engine.baseline.clock_hz
    layers = tuple(LayerResult(layer.name, tuple(engine_op(op, engine) for op in layer.ops), clock_hz=clock) for layer in workload.layers)
    return RunResult(engine.name, "gobo", workload, layers, clock)

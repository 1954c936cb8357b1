"""Hardware models: what a compressed encoder costs on accelerators, memory and FPGA engines.

* :mod:`gobo.hw.workload`: per layer, the matrix products of one inference and the bytes
  their weights take off chip in FP32, FP16 and as stored by GOBO;
* :mod:`gobo.hw.accel`: the architectures, one JSON file each under ``gobo/hw/arch/``,
  every parameter with its source, and the area model;
* :mod:`gobo.hw.roofline`: GOBO as memory compression on TPU-, Eyeriss- and
  Tensor-Core-like accelerators (traffic, cycles, latency, itemised energy);
* :mod:`gobo.hw.engine`: the GOBO accelerator (Zadeh et al., MICRO 2020), at the area of the
  Tensor-Core-like baseline, counting operations as :mod:`gobo.dataflow` does;
* :mod:`gobo.hw.fpga`: the FQ-BERT FPGA engine (Liu et al., DATE 2021) and CPU/GPU rooflines;
* :mod:`gobo.hw.papers`: the papers' published figures, for comparison.

``import gobo`` does not import this package; the library returns dataclasses and never
prints (``gobo hw`` renders them).
"""

from .accel import ARCHS, Accelerator, FqBertEngine, GoboEngine, load_arch
from .engine import simulate_engine
from .fpga import simulate_fqbert, simulate_processor
from .roofline import Energy, RunResult, simulate
from .workload import FORMATS, Workload, build_workload, load_workload

__all__ = [
    "ARCHS",
    "Accelerator",
    "Energy",
    "FORMATS",
    "FqBertEngine",
    "GoboEngine",
    "RunResult",
    "Workload",
    "build_workload",
    "load_arch",
    "load_workload",
    "simulate",
    "simulate_engine",
    "simulate_fqbert",
    "simulate_processor",
]

"""Hardware descriptions: one JSON file per architecture, every parameter with its source.

``src/gobo/hw/arch/NAME.json`` is ``{"name", "title", "version", "params": {KEY: {"value",
"source"}}}`` (FQ-BERT adds ``boards`` and ``processors`` of the same form). The loaders
below check every key against the dataclass it fills (unknown or missing keys raise a
ValueError that names them) and keep the sources for the command line to show.

Area model (used to size the GOBO engine at the area of the Tensor-Core-like baseline),
45 nm, arithmetic from Horowitz (ISSCC 2014), registers from the NanGate 45 nm library:

* a Tensor-Core multiply-accumulate: FP16 multiplier + FP32 adder = 1640 + 4184 um^2;
* a GOBO PE: one FP32 adder (4184), ``2**code_bits`` FP32 bucket accumulators
  (8 x 32 x 4.52 um^2), a quarter of an FP32 multiplier (7700 / 4) and a 64th of an FP32
  outlier multiply-accumulate ((7700 + 4184) / 64);
* on-chip buffers and the memory interface are the baseline's, so they are left out of
  both sides.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Mapping

__all__ = [
    "ARCHS",
    "Accelerator",
    "Board",
    "FqBertEngine",
    "GoboEngine",
    "Processor",
    "arch_names",
    "load_arch",
    "read_arch_json",
]

#: the bundled architectures, in the order the command line lists them
ARCHS = ("tpu", "eyeriss", "tensorcore", "gobo", "fqbert")
DATAFLOWS = ("systolic", "spatial", "tensorcore")
VERSION = 1


def _positive(obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{obj.name}: {n} must be a positive number, got {v!r}")


def _non_negative(obj, names) -> None:
    for n in names:
        v = getattr(obj, n)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{obj.name}: {n} must be a number >= 0, got {v!r}")


@dataclass(frozen=True)
class Accelerator:
    """A baseline accelerator: a MAC array, two on-chip buffers, one off-chip interface."""

    name: str
    title: str
    dataflow: str  # systolic (weight-stationary), spatial (row-stationary), tensorcore
    pe_rows: int  # systolic/spatial: array rows; tensorcore: tensor cores
    pe_cols: int  # systolic/spatial: array columns; tensorcore: FMA per tensor core per cycle
    clock_mhz: float
    bandwidth_gbs: float  # off-chip, 1e9 bytes per second
    act_buffer_kib: float  # activations stay on chip while a product's input and output fit
    weight_buffer_kib: float  # decoded weights held while they are used
    datapath_bits: int  # width of activations and decoded weights in the array and buffers
    e_dram_pj_per_bit: float
    e_sram_pj_per_64b: float
    e_mult_pj: float
    e_add_pj: float
    e_decode_pj_per_weight: float  # expanding one GOBO index to its centroid
    mma_tile: int = 1  # tensorcore: products are padded to multiples of this
    mult_area_um2: float | None = None
    add_area_um2: float | None = None
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.dataflow not in DATAFLOWS:
            raise ValueError(f"{self.name}: dataflow must be one of {', '.join(DATAFLOWS)}, got {self.dataflow!r}")
        _positive(self, ("pe_rows", "pe_cols", "clock_mhz", "bandwidth_gbs", "datapath_bits", "mma_tile"))
        _non_negative(self, ("act_buffer_kib", "weight_buffer_kib", "e_dram_pj_per_bit", "e_sram_pj_per_64b", "e_mult_pj", "e_add_pj", "e_decode_pj_per_weight"))

    @property
    def macs_per_cycle(self) -> int:
        return self.pe_rows * self.pe_cols

    @property
    def clock_hz(self) -> float:
        return self.clock_mhz * 1e6

    @property
    def bytes_per_cycle(self) -> float:
        return self.bandwidth_gbs * 1e9 / self.clock_hz

    @property
    def mac_area_um2(self) -> float | None:
        if self.mult_area_um2 is None or self.add_area_um2 is None:
            return None
        return self.mult_area_um2 + self.add_area_um2

    def with_(self, **changes) -> "Accelerator":
        """A copy with some parameters changed (sources kept)."""
        return replace(self, **changes)

    def describe(self) -> str:
        if self.dataflow == "tensorcore":
            shape = f"{self.pe_rows} tensor cores x {self.pe_cols} FMA"
        else:
            shape = f"{self.pe_rows}x{self.pe_cols} PEs"
        return f"{self.title}: {shape}, {self.clock_mhz:g} MHz, {self.bandwidth_gbs:g} GB/s, {self.datapath_bits}-bit datapath"


@dataclass(frozen=True)
class GoboEngine:
    """The GOBO accelerator, sized to the compute area of its baseline (see the module docstring)."""

    name: str
    title: str
    baseline: Accelerator
    code_bits: int
    adders_per_pe: int
    pes_per_multiplier: float
    pes_per_outlier_mac: float
    accumulator_bits: int
    act_bits: int
    e_add_pj: float
    e_mult_pj: float
    add_area_um2: float
    mult_area_um2: float
    register_bit_area_um2: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive(self, ("code_bits", "adders_per_pe", "pes_per_multiplier", "pes_per_outlier_mac", "accumulator_bits", "act_bits",
                         "add_area_um2", "mult_area_um2", "register_bit_area_um2"))
        _non_negative(self, ("e_add_pj", "e_mult_pj"))
        if self.baseline.mac_area_um2 is None:
            raise ValueError(f"{self.name}: the baseline {self.baseline.name} has no MAC area (mult_area_um2, add_area_um2)")

    @property
    def pe_area_um2(self) -> float:
        regs = (1 << self.code_bits) * self.accumulator_bits * self.register_bit_area_um2
        return (
            self.adders_per_pe * self.add_area_um2
            + regs
            + self.mult_area_um2 / self.pes_per_multiplier
            + (self.mult_area_um2 + self.add_area_um2) / self.pes_per_outlier_mac
        )

    @property
    def baseline_area_um2(self) -> float:
        return self.baseline.macs_per_cycle * self.baseline.mac_area_um2

    @property
    def n_pe(self) -> int:
        """PEs that fit in the area of the baseline's MAC units."""
        return max(1, int(self.baseline_area_um2 // self.pe_area_um2))

    @property
    def adds_per_cycle(self) -> float:
        return self.n_pe * self.adders_per_pe

    @property
    def mults_per_cycle(self) -> float:
        return self.n_pe / self.pes_per_multiplier

    @property
    def outlier_macs_per_cycle(self) -> float:
        return self.n_pe / self.pes_per_outlier_mac

    def area_dict(self) -> dict:
        return {
            "baseline": self.baseline.name,
            "baseline_mac_area_um2": self.baseline.mac_area_um2,
            "baseline_macs": self.baseline.macs_per_cycle,
            "baseline_area_um2": self.baseline_area_um2,
            "pe_area_um2": self.pe_area_um2,
            "n_pe": self.n_pe,
            "adders": self.adds_per_cycle,
            "multipliers": self.mults_per_cycle,
            "outlier_macs": self.outlier_macs_per_cycle,
        }

    def describe(self) -> str:
        return (f"{self.title}: {self.n_pe} PEs ({self.adds_per_cycle:g} adders, {self.mults_per_cycle:g} multipliers, "
                f"{self.outlier_macs_per_cycle:g} outlier MACs) in the area of {self.baseline.macs_per_cycle} {self.baseline.name} MACs")


@dataclass(frozen=True)
class Board:
    name: str
    dsp: int
    bram36: int
    clock_mhz: float
    bandwidth_gbs: float
    static_w: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive(self, ("dsp", "bram36", "clock_mhz", "bandwidth_gbs"))
        _non_negative(self, ("static_w",))


@dataclass(frozen=True)
class Processor:
    """A CPU or GPU as a roofline: peak MACs per cycle, memory bandwidth, power."""

    name: str
    title: str
    macs_per_cycle: float
    clock_mhz: float
    bandwidth_gbs: float
    weight_bits: int
    power_w: float
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive(self, ("macs_per_cycle", "clock_mhz", "bandwidth_gbs", "weight_bits", "power_w"))


@dataclass(frozen=True)
class FqBertEngine:
    """The FQ-BERT FPGA engine: its parameters, the boards it is built on, the processors it is compared with."""

    name: str
    title: str
    weight_bits: int
    act_bits: int
    scale_bytes_per_row: float
    macs_per_dsp: int
    mac_dsp_fraction: float
    softmax_lanes: int
    layernorm_lanes: int
    gelu_lanes: int
    weight_tile_cycles: int
    bram36_bytes: int
    dsp_mw: float
    bram_mw: float
    logic_w: float
    e_dram_pj_per_bit: float
    boards: Mapping[str, Board] = field(default_factory=dict)
    processors: Mapping[str, Processor] = field(default_factory=dict)
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        _positive(self, ("weight_bits", "act_bits", "macs_per_dsp", "mac_dsp_fraction", "softmax_lanes", "layernorm_lanes", "gelu_lanes",
                         "weight_tile_cycles", "bram36_bytes"))
        _non_negative(self, ("scale_bytes_per_row", "dsp_mw", "bram_mw", "logic_w", "e_dram_pj_per_bit"))
        if self.mac_dsp_fraction > 1:
            raise ValueError(f"{self.name}: mac_dsp_fraction must be at most 1, got {self.mac_dsp_fraction}")
        if not self.boards:
            raise ValueError(f"{self.name}: no boards")


# ---------------------------------------------------------------------------- loading


def arch_names() -> tuple[str, ...]:
    return ARCHS


def read_arch_json(name_or_path: str | os.PathLike) -> dict:
    """The JSON document of a bundled architecture (by name) or of a file (by path)."""
    s = str(name_or_path)
    if s in ARCHS:
        text = resources.files("gobo.hw").joinpath("arch").joinpath(f"{s}.json").read_text()
        where = f"the bundled {s}.json"
    else:
        p = Path(s)
        if not (p.suffix == ".json" and p.is_file()):
            raise ValueError(f"unknown architecture {s!r}; choose one of {', '.join(ARCHS)} or give a .json file")
        text = p.read_text()
        where = str(p)
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("params"), dict):
        raise ValueError(f"{where} has no 'params' object")
    if doc.get("version", VERSION) != VERSION:
        raise ValueError(f"{where} has version {doc.get('version')!r}; this gobo reads version {VERSION}")
    return doc


def _values(where: str, params: Mapping, cls, skip=("name", "title", "sources")) -> tuple[dict, dict]:
    """Split ``{key: {value, source}}`` into values and sources, checked against ``cls``'s fields."""
    values, sources = {}, {}
    for k, entry in params.items():
        if not isinstance(entry, dict) or "value" not in entry or not entry.get("source"):
            raise ValueError(f"{where}: parameter {k!r} must be an object with a 'value' and a non-empty 'source'")
        values[k], sources[k] = entry["value"], str(entry["source"])
    known = {f.name for f in fields(cls)} - set(skip)
    required = {f.name for f in fields(cls) if f.name in known and _required(f)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"{where}: unknown parameters {', '.join(sorted(unknown))}")
    missing = required - set(values)
    if missing:
        raise ValueError(f"{where}: missing parameters {', '.join(sorted(missing))}")
    return values, sources


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def load_arch(name_or_path: str | os.PathLike) -> Accelerator | GoboEngine | FqBertEngine:
    """The architecture of a bundled name (``tpu``, ``eyeriss``, ``tensorcore``, ``gobo``, ``fqbert``) or a JSON file."""
    doc = read_arch_json(name_or_path)
    name = str(doc.get("name", name_or_path))
    title = str(doc.get("title", name))
    params = doc["params"]
    if "boards" in doc:
        values, sources = _values(name, params, FqBertEngine, skip=("name", "title", "sources", "boards", "processors"))
        boards = {}
        for bname, bparams in doc["boards"].items():
            bv, bs = _values(f"{name} board {bname}", bparams, Board)
            boards[bname] = Board(name=bname, sources=bs, **bv)
        procs = {}
        for pname, pparams in doc.get("processors", {}).items():
            pv, ps = _values(f"{name} processor {pname}", pparams, Processor, skip=("name", "sources"))
            procs[pname] = Processor(name=pname, sources=ps, **pv)
        return FqBertEngine(name=name, title=title, boards=boards, processors=procs, sources=sources, **values)
    if "baseline" in params:
        values, sources = _values(name, params, GoboEngine)
        base = load_arch(values.pop("baseline"))
        if not isinstance(base, Accelerator):
            raise ValueError(f"{name}: the baseline must be a MAC-array accelerator, got {base.name}")
        sources = {**sources, **{f"baseline.{k}": v for k, v in base.sources.items()}}
        return GoboEngine(name=name, title=title, baseline=base, sources=sources, **values)
    values, sources = _values(name, params, Accelerator)
    return Accelerator(name=name, title=title, sources=sources, **values)

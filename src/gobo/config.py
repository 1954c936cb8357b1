"""Method configurations: one frozen dataclass per method, JSON round trip by allow-list.

On disk a config is ``{"type": NAME, "version": N, "data": {...}}``; :func:`config_from_json`
only builds the classes registered in :data:`CONFIGS` (never ``eval``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["CONFIGS", "DirectQConfig", "GoboConfig", "config_from_json", "config_to_json", "method_config"]


def _check_bits(name: str, value: int, lo: int = 1, hi: int = 8) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer from {lo} to {hi}, got {value!r}")


@dataclass(frozen=True)
class GoboConfig:
    """GOBO: Gaussian outliers kept exact, the other weights clustered to 2**bits centroids.

    The paper's recipe is ``GoboConfig.paper(bits)``: one codebook per tensor, every tensor
    at ``bits``, L1-stopped refinement. The default adds three data-free improvements:
    per-row normalisation of the weights before clustering (row mean and std stored),
    and a size-aware bit allocation that spends the same number of bytes as uniform
    ``bits`` codes but moves bits from large tensors (the word embeddings) to small ones.
    """

    bits: int = 3  # code bits per weight; with allocate="size", the average over weights
    outlier_threshold: float = -4.0  # log-density below which a weight is an outlier (kept FP32)
    clustering: str = "l1"  # "l1" (paper: stop when the L1 error stops falling), "lloyd", "exact"
    normalize_rows: bool = False  # cluster (w - row mean) / row std; stores 2 float16 per row
    allocate: str = "size"  # "uniform": every tensor at `bits`; "size": data-free mixed bits, same total
    min_bits: int = 2  # bounds for the size-aware allocation
    max_bits: int = 6
    max_iter: int = 200  # refinement iterations at most
    size_exponent: float = 0.5  # allocation: a tensor's relative error weighs (its weights)**size_exponent
    version: int = 1

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)
        _check_bits("min_bits", self.min_bits)
        _check_bits("max_bits", self.max_bits)
        if self.min_bits > self.max_bits:
            raise ValueError(f"min_bits ({self.min_bits}) must not exceed max_bits ({self.max_bits})")
        if self.allocate == "size" and not self.min_bits <= self.bits <= self.max_bits:
            raise ValueError(f"bits ({self.bits}) must lie between min_bits and max_bits")
        if not isinstance(self.outlier_threshold, (int, float)) or self.outlier_threshold != self.outlier_threshold:
            raise ValueError(f"outlier_threshold must be a number, got {self.outlier_threshold!r}")
        if self.clustering not in ("l1", "lloyd", "exact"):
            raise ValueError(f"clustering must be 'l1', 'lloyd' or 'exact', got {self.clustering!r}")
        if self.allocate not in ("uniform", "size"):
            raise ValueError(f"allocate must be 'uniform' or 'size', got {self.allocate!r}")
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive integer, got {self.max_iter!r}")

    @classmethod
    def paper(cls, bits: int = 3, **kw) -> "GoboConfig":
        """The recipe of the MICRO 2020 paper, unchanged."""
        return cls(bits=bits, clustering="l1", normalize_rows=False, allocate="uniform", **kw)


@dataclass(frozen=True)
class DirectQConfig:
    """Round-to-nearest uniform quantization, one [min, max] range per row ("DirectQ")."""

    bits: int = 3
    version: int = 1

    def __post_init__(self) -> None:
        _check_bits("bits", self.bits)


CONFIGS = {"gobo": GoboConfig, "directq": DirectQConfig}


def method_config(method: str, bits: int = 3, **overrides) -> GoboConfig | DirectQConfig:
    """Config for a method name as the CLI spells it: gobo, gobo-paper, directq."""
    if method == "gobo":
        return GoboConfig(bits=bits, **overrides)
    if method == "gobo-paper":
        return GoboConfig.paper(bits=bits, **overrides)
    if method == "directq":
        return DirectQConfig(bits=bits, **overrides)
    raise ValueError(f"unknown method {method!r}; choose gobo, gobo-paper or directq")


def config_to_json(cfg) -> dict:
    for name, cls in CONFIGS.items():
        if type(cfg) is cls:
            data = asdict(cfg)
            version = data.pop("version")
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
    return cls(**data)

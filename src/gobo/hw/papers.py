"""Figures the papers publish, to print beside gobo's estimates.

Only figures stated in the papers' abstracts or text are given; a figure that is not known
here is ``None`` and printed as "not known" (never guessed).
"""

from __future__ import annotations

__all__ = ["FQBERT", "GOBO", "paper_value"]

#: Zadeh et al., GOBO: Quantizing Attention-Based NLP Models for Low Latency and Energy
#: Efficient Inference, MICRO 2020
GOBO = {
    "weight_compression": {"value": 10.0, "note": "about 10x at 3 bits, BERT-base"},
    "memory_compression_speedup": {"value": None, "note": "GOBO as memory compression on TPU-like and Tensor-Cores-like accelerators: 'up to' speedups"},
    "engine_speedup_vs_tensorcore": {"value": 7.0, "note": "about 7x, GOBO accelerator vs Tensor Cores (paper's abstract)"},
    "engine_energy_efficiency_vs_tensorcore": {"value": 3.0, "note": "about 3x, GOBO accelerator vs Tensor Cores (paper's abstract)"},
}

#: Liu et al., Hardware Acceleration of Fully Quantized BERT for Efficient Natural Language
#: Processing (FQ-BERT), DATE 2021
FQBERT = {
    "weight_compression": {"value": 7.94, "note": "4-bit weights, BERT-base"},
    "fps_per_w_zcu102": {"value": 3.18, "note": "FQ-BERT on ZCU102, BERT-base"},
    "fps_per_w_zcu111": {"value": None, "note": "FQ-BERT on ZCU111"},
    "fps_zcu102": {"value": None, "note": "frames per second on ZCU102"},
    "power_w_zcu102": {"value": None, "note": "board power on ZCU102"},
    "seq": {"value": None, "note": "sequence length of the reported figures"},
    "efficiency_vs_cpu": {"value": 28.91, "note": "energy efficiency vs CPU (paper's abstract)"},
    "efficiency_vs_gpu": {"value": 12.72, "note": "energy efficiency vs GPU (paper's abstract)"},
}


def paper_value(table: dict, key: str) -> float | None:
    return table[key]["value"]

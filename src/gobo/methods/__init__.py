"""Quantization methods: pure functions from a weight tensor to a QuantizedTensor."""

import os
from concurrent.futures import ThreadPoolExecutor


def tensor_pool(n: int) -> ThreadPoolExecutor:
    """Threads for work on ``n`` tensors side by side (numpy releases the GIL): one per core, at most 8."""
    return ThreadPoolExecutor(max_workers=max(1, min(n, os.cpu_count() or 1, 8)))

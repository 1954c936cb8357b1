"""Quantization methods: pure functions from a weight tensor to a QuantizedTensor."""

import os
from concurrent.futures import ThreadPoolExecutor


#: weights in one block of rows of the per-weight work (:func:`row_blocks`)
BLOCK = 1 << 16


def row_blocks(rows: int, cols: int, size: int = BLOCK):
    """``(start, stop)`` of consecutive blocks of whole rows of a ``rows x cols`` tensor, about
    ``size`` weights each. Per-weight work done a block at a time keeps its temporaries in
    cache and out of fresh memory: on a large tensor, allocating and faulting in
    tensor-sized temporaries costs more than the arithmetic."""
    step = max(1, size // max(cols, 1))
    for r in range(0, rows, step):
        yield r, min(r + step, rows)


def tensor_pool(n: int) -> ThreadPoolExecutor:
    """Threads for work on ``n`` tensors side by side (numpy releases the GIL): one per core, at most 8."""
    return ThreadPoolExecutor(max_workers=max(1, min(n, os.cpu_count() or 1, 8)))

"""The CPU allocator during training.

PyTorch allocates CPU tensors with malloc. glibc serves blocks below its mmap threshold from
heaps it keeps after free, and raises that threshold on its own up to 32 MiB, so every
activation of a training step (8-25 MiB each for a 0.3B model at 4 x 512 tokens) ends up
cached there; with tensors of many sizes and lifetimes the heaps fragment and the resident
set grows to about 1.6x what is live (measured at 0.3B: 4.0-4.5 GiB resident for a 2.6 GiB
live peak). Fixing the threshold at 16 MiB returns the largest activations to the system when
they are freed: 4,431 -> 3,715 MiB peak RSS there, 167 -> 163 tokens/s, within the
run-to-run noise (scripts/bench_train.py, docs/benchmarks.md). Smaller thresholds trade more
speed for memory (4 MiB: resident = live, 20% slower), so 16 MiB it is.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 16 << 20


def limit_heap_caching(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False

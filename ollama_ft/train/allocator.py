"""The CPU allocator of a training run and of the bridge: glibc's mmap threshold.

PyTorch allocates CPU tensors with malloc. glibc serves blocks below its mmap threshold from
heaps it keeps after free, and raises that threshold on its own up to 32 MiB, so every
activation of a training step (8-25 MiB each for a 0.3B model at 4 x 512 tokens) ends up
cached there; with tensors of many sizes and lifetimes the heaps fragment and the resident
set grows to about 1.6x what is live (measured at 0.3B: 4.0-4.5 GiB resident for a 2.6 GiB
live peak). Fixing the threshold at 16 MiB returns the largest activations to the system when
they are freed: 4,431 -> 3,715 MiB peak RSS there, 167 -> 163 tokens/s, within the
run-to-run noise (scripts/bench_train.py, docs/benchmarks.md). Smaller thresholds trade more
speed for memory (4 MiB: resident = live, 20% slower), so 16 MiB it is.

The bridge (`ollama-ft serve`) fixes it at 1 MiB: request bodies are read and written 4 MiB
at a time in worker threads, and with glibc's moving threshold those blocks came from
per-thread heaps that kept them, so the bridge's RSS climbed under a steady load while
Python's own allocations stayed flat (tracemalloc). A 600 s soak (scripts/bench_serve_load.py
--soak 600, docs/benchmarks.md): 297 MiB at the start, 439-506 MiB in the last minute and
rising before; 277 MiB, then 290-371 MiB with its peaks level from the fifth minute on, with
1 MiB. Nothing of the bridge's is speed-critical at that size.
"""

from __future__ import annotations

import ctypes
import sys

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
THRESHOLD = 16 << 20
SERVE_THRESHOLD = 1 << 20


def limit_heap_caching(threshold: int = THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where that is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False

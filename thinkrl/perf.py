"""Process-wide settings that make PyTorch on CPU faster, applied once.

glibc's ``malloc`` serves large blocks with ``mmap`` and hands them back with
``munmap`` when freed, so a training step that allocates the same few-MB activation
tensors over and over pays a page fault per 4 KB page each time (seen as a large
share of *system* time in a profile). Raising the mmap threshold to its maximum
(32 MB on 64-bit) and keeping freed memory in the heap lets those blocks be
reused; tensors that must stay larger than that (the LM head's chunks are sized to
fit under it) are rare.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import time

import torch

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_done = False


def tune_allocator() -> bool:
    """Keep freed memory for reuse (glibc only; elsewhere a no-op). Returns True if applied."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(opt, val) == 1
            for opt, val in (
                (_M_MMAP_THRESHOLD, 32 << 20),
                (_M_TRIM_THRESHOLD, 256 << 20),
                (_M_TOP_PAD, 64 << 20),
            )
        )
    except (OSError, AttributeError):
        ok = False
    _done = ok
    if not ok:
        log.debug("mallopt not available; allocator left as it is")
    return ok


def matmul_rate(dtype: torch.dtype, m: int, k: int, n: int, seconds: float = 2.0) -> float:
    """Measured GFLOP/s of an [m, k] x [k, n] matmul in ``dtype`` on this machine (for the
    benchmarks' ceilings)."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9

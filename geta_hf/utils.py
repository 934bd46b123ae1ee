"""Small process-level helpers shared by the CLI, the Trainer integration and the benchmarks."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

__all__ = ["tune_cpu_allocator"]

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 32 << 20, trim_threshold: int = 1 << 31) -> bool:
    """Keep freed activation buffers in the glibc heap instead of returning them to the OS.

    PyTorch on CPU allocates and frees many multi-megabyte tensors per training step. With glibc's
    defaults, buffers above the (dynamic) mmap threshold are unmapped on free and page-faulted
    back in on the next allocation; on the machines we measured this costs 0.1-0.3 s of kernel
    time per MiniLM step (see ``scripts/bench_quant.py --allocator default``). Raising the mmap
    and trim thresholds is the ``mallopt`` equivalent of ``MALLOC_MMAP_THRESHOLD_`` /
    ``MALLOC_TRIM_THRESHOLD_`` (PyTorch's CPU tuning guide suggests jemalloc/tcmalloc for the same
    reason). The process keeps its peak heap instead of shrinking. Returns True when applied
    (Linux with glibc), False elsewhere; calling it again is a no-op.
    """
    global _tuned
    if _tuned:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or an unusual libc: nothing to tune
        return False
    ok = mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok
    _tuned = ok
    if ok:
        logger.debug("geta_hf: glibc mmap/trim thresholds raised for CPU training")
    return ok

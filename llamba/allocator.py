"""Keep freed memory in the process: glibc's malloc, by default, hands large freed blocks back to the kernel and every
training step then faults the same buffers in again (the 49,152-wide logits, the tied head's bf16 copy and its
gradient). In `llamba demo` that was 93.8M minor page faults and 4.1 of its 31 CPU-minutes in the kernel; with the
settings below a stage-3 run of 3,072 tokens went from 101 to 134 tok/s (idle 2-core Xeon, BENCHMARKS.md).

The cost: the resident size stays at its high-water mark instead of shrinking between steps. Linux with glibc only;
`LLAMBA_MALLOC=0` leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt parameters (glibc malloc.h) and the values set
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = (
    (M_MMAP_THRESHOLD, 32 << 20),  # the largest glibc accepts: blocks up to 32 MiB come from the heap, reused
    (M_TRIM_THRESHOLD, 2**31 - 1),  # give the heap's free top back only past 2 GiB (the most an int holds)
    (M_TOP_PAD, 1 << 30),  # grow the heap 1 GiB at a time (address space; pages are touched only when used)
)
_DONE = {"tuned": False}


def keep_freed_memory() -> bool:
    """Apply SETTINGS once per process (before the large allocations: the CLI calls it first). Returns whether the
    allocator is now tuned; False off Linux/glibc or with LLAMBA_MALLOC=0."""
    if _DONE["tuned"]:
        return True
    if os.environ.get("LLAMBA_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    _DONE["tuned"] = all(mallopt(param, value) == 1 for param, value in SETTINGS)
    return _DONE["tuned"]

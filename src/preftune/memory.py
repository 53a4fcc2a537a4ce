"""Keep a CPU run's resident memory close to what its tensors need (glibc malloc settings).

On the CPU, PyTorch takes tensor memory from the C library's malloc. glibc serves requests below its
mmap threshold from heap arenas and, each time a large mmapped block is freed, raises that threshold
(up to 32 MiB): after the first training step, the activations of every step (a few MiB to tens of
MiB each) live in arenas that fragment and are rarely given back to the system. Measured with
benchmarks/profile_preftune_step.py on the embedded model (fp32, LoRA, max_length 512, batch 2):
live tensors peak about 230 MiB above the step start, while the resident set grows by 2 GiB.

A fixed threshold (which also turns the raising off) puts every block of at least that size in its
own mapping, returned to the system when the tensor is freed; one arena keeps the small blocks of
all threads together. benchmarks/dpo_vs_trl.py shows what it saves in peak RSS and costs in time.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger("preftune")

# mallopt parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

MMAP_THRESHOLD = 128 * 1024  # glibc's own starting value, kept fixed


def return_freed_memory_to_the_system() -> bool:
    """Set glibc's malloc to give freed tensor memory back (see the module docstring).

    Returns False where this does not apply (not Linux, or a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, MMAP_THRESHOLD),
            (M_ARENA_MAX, 1),
        )
    )
    if not ok:
        logger.debug("mallopt refused a setting; CPU memory may stay above what tensors need")
    return ok

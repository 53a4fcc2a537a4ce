"""How a CPU run takes tensor memory from glibc's malloc: a speed / resident-memory trade-off.

On the CPU, PyTorch takes tensor memory from the C library's malloc. glibc serves a request below
its mmap threshold from a heap arena (freed blocks are reused) and a larger one from a fresh
mapping (returned to the system when freed, but every page of the next one is faulted in and
zeroed by the kernel again). By default it raises that threshold (up to 32 MiB) each time a mapped
block is freed, and gives each thread its own arena: the activations of every step end up in
arenas that fragment, and the resident set of a DPO run of the embedded model grew by 2 GiB while
its live tensors peaked about 230 MiB above the step start (benchmarks/profile_preftune_step.py).

We fix the threshold (which turns the raising off) and use one arena, in one of two settings:

- default (`MMAP_THRESHOLD`, 2 MiB): the many activation-sized blocks of a step come from the
  heap and are reused; a DPO step of the embedded model (fp32, max_length 512, batch 2) took
  about 8-9 s instead of 11-14 s, at a training peak RSS of about 1.65 GiB instead of 1.25 GiB.
- `--low_cpu_memory` (`LOW_MEMORY_MMAP_THRESHOLD`, 128 KiB, glibc's starting value): almost every
  tensor gets its own mapping and goes back to the system when freed; the lowest resident set,
  paid for with page faults (about 3 million per step above: a third of the step's time).

benchmarks/dpo_vs_trl.py measures both against TRL (README, "Performance").
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

MMAP_THRESHOLD = 2 * 1024 * 1024
LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024


def configure_cpu_malloc(low_memory: bool = False) -> bool:
    """Set glibc's malloc for a CPU training run (see the module docstring).

    Returns False where this does not apply (not Linux, or a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    threshold = LOW_MEMORY_MMAP_THRESHOLD if low_memory else MMAP_THRESHOLD
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, threshold),
            (M_TRIM_THRESHOLD, threshold),
            (M_ARENA_MAX, 1),
        )
    )
    if not ok:
        logger.debug("mallopt refused a setting; CPU memory may stay above what tensors need")
    return ok

"""How a CPU run takes tensor memory from glibc's malloc: fast reuse without fragmentation.

On the CPU, PyTorch takes tensor memory from the C library's malloc. glibc serves a request below
its mmap threshold from a heap arena (freed blocks are reused) and a larger one from a fresh
mapping (returned to the system when freed, but every page of the next one is faulted in and
zeroed by the kernel again: in a DPO step of the embedded model that was a third of the step).
Reusing activation-sized blocks from the heap is fast, but the heap fragments: with glibc's
defaults the resident set of that step grew by about 500 MiB while its live tensors grew by about
110 MiB (mallinfo2 sampled during the step: heap 660 MiB, in use at most 310 MiB).

The fragmentation comes from the small free chunks glibc keeps out of circulation, in its
per-thread cache ("tcache") and its fast bins: they count as in use, so the big blocks freed
between them never merge, and the next big request extends the heap. With both off, a freed block
merges with its free neighbours at once and the heap stays within a few tens of MiB of what is
live. Then even the activation tensors of a long row can come from the heap (a 32 MiB mmap
threshold) and be reused, with no page faults. Measured on the embedded model (fp32, max_length
512, batch 2, 4 Trainer steps): 10.2 s/step and 1.66 GiB peak RSS with the tcache on and a 2 MiB
threshold; 9.5 s/step and 1.25 GiB with the settings here (benchmarks/dpo_vs_trl.py compares them
with TRL: README, "Performance").

glibc reads the tcache setting only when a process starts (there is no mallopt for it), so the
command line re-executes itself once with `GLIBC_TUNABLES=glibc.malloc.tcache_count=0`
(`restart_with_malloc_tunables`); the rest is set with mallopt after the model is loaded
(`configure_cpu_malloc`). A user's own `glibc.malloc.tcache_count` in GLIBC_TUNABLES is kept.
Used as a library (no restart), the tcache stays on and the threshold stays at 2 MiB, where the
fragmentation costs least.

Compiled kernel caches. On a CPU, PyTorch runs bf16 matmuls through oneDNN, which compiles a
kernel ("primitive") for each new matmul shape and keeps up to 1024 of them (0.3-0.8 MiB each).
Shared-prompt rows change the token count from step to step, so a DPO step of the embedded model
added about 40 new ones: 28 MiB more every step until the cache was full (some 25 steps and
several hundred MiB later; a microbenchmark filled it at about 0.7 GiB). `set_cpu_library_env` caps
oneDNN's cache at 64 kernels, which holds one step's set, so the kernels of a step are reused
through its layers, its recomputation and its backward; a new kernel costs a few milliseconds to
build (ONEDNN_VERBOSE: 2-8 ms on the embedded model's shapes), so a cap below a step's set
rebuilds them all through the step (32: 5 -> 8 s a step). Above it, ideep (PyTorch's oneDNN
wrapper) keeps its own cache of the matmul "primitive descriptors" it looks kernels up with
(LRU_CACHE_CAPACITY): 258 KiB each (heaptrack), rebuilt in a few microseconds (a loop of two
alternating tiny bf16 matmuls: 35-44 us a call with a cache of 1, as with 1024). A step cycles
through some 40 shapes, so any cache smaller than that misses anyway: it is capped at 16, enough
for the dozen shapes that repeat in token-by-token generation. (The CPU flash attention keeps its
kernels without any limit: preftune.training.pair_attention pads its blocks to a few lengths.)

MKL, which runs the fp32 matmuls (and the bf16 ones inside the CPU flash attention's backward),
keeps the work buffers it packs matrices into for reuse by later calls, per thread. With
MKL_DISABLE_FAST_MM=1 it frees them when a call returns, and glibc's heap reuses the blocks:
fp32, 4 steps, two runs each, peak RSS 1242-1243 MiB against 1256-1258, same step times.

`--low_cpu_memory` keeps glibc's starting threshold (128 KiB): almost every tensor gets its own
mapping and goes back to the system when freed; the lowest resident set, paid for in page faults.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger("preftune")

# mallopt parameters (glibc malloc.h)
M_MXFAST = 1
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

TCACHE_OFF = "glibc.malloc.tcache_count=0"
RESTART_MARK = "PREFTUNE_MALLOC_RESTARTED"  # set in the restarted process: never restart twice

MMAP_THRESHOLD = 32 * 1024 * 1024  # tcache off: activations of rows up to ~14k tokens (fp32) reused
TCACHE_ON_MMAP_THRESHOLD = 2 * 1024 * 1024  # tcache on: a bigger threshold fragments more
LOW_MEMORY_MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024  # free memory at the heap's top kept for the next step


@functools.cache
def _libc() -> ctypes.CDLL:
    """The C library, loaded once (OSError where there is no glibc)."""
    return ctypes.CDLL("libc.so.6", use_errno=True)


# Read by the libraries when they first need them; a user's own values are kept.
CPU_LIBRARY_ENV = {
    "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64",  # oneDNN's compiled kernels
    "LRU_CACHE_CAPACITY": "16",  # ideep's primitive descriptors
    "MKL_DISABLE_FAST_MM": "1",  # MKL's work buffers go back to malloc when a call returns
}


def set_cpu_library_env() -> None:
    """Cap oneDNN's compiled-kernel caches and turn MKL's buffer cache off (see the module
    docstring), unless the environment already sets them. Takes effect if called before the
    process's first matmul."""
    for name, value in CPU_LIBRARY_ENV.items():
        os.environ.setdefault(name, value)


def tcache_is_off() -> bool:
    """Whether this process was started with glibc's per-thread cache off."""
    return "glibc.malloc.tcache_count=0" in os.environ.get("GLIBC_TUNABLES", "")


def restart_with_malloc_tunables() -> None:
    """Re-execute this Python process (same interpreter, same arguments) with glibc's tcache off.

    Call it first thing in a command, before anything is loaded. Does nothing outside Linux, when
    the process already is the restarted one, or when GLIBC_TUNABLES already sets a tcache_count
    (a user's choice, e.g. `glibc.malloc.tcache_count=7` for glibc's default). Caps the kernel
    caches first (`set_cpu_library_env`), in this process and so in the restarted one."""
    set_cpu_library_env()
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if not sys.platform.startswith("linux") or os.environ.get(RESTART_MARK) or "tcache_count" in tunables:
        return
    env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (tunables, TCACHE_OFF) if t))
    env[RESTART_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)


def configure_cpu_malloc(low_memory: bool = False) -> bool:
    """Set glibc's malloc for a CPU training run (see the module docstring).

    Returns False where this does not apply (not Linux, or a C library without mallopt)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = _libc()
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    if low_memory:
        threshold, trim = LOW_MEMORY_MMAP_THRESHOLD, LOW_MEMORY_MMAP_THRESHOLD
    elif tcache_is_off():
        threshold, trim = MMAP_THRESHOLD, TRIM_THRESHOLD
    else:
        threshold, trim = TCACHE_ON_MMAP_THRESHOLD, TCACHE_ON_MMAP_THRESHOLD
    ok = all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, threshold),
            (M_TRIM_THRESHOLD, trim),
            (M_ARENA_MAX, 1),
            (M_MXFAST, 0),  # no fast bins: freed small chunks merge with their neighbours at once
        )
    )
    if not ok:
        logger.debug("mallopt refused a setting; CPU memory may stay above what tensors need")
    return ok


def release_free_heap() -> bool:
    """Hand the free pages inside glibc's heap back to the system (malloc_trim).

    Called in each CPU training step (preftune.training.trainer: at its start, after the reference
    pass, before the backward pass). The heap only shrinks from its top, so a block
    allocated late in a step and kept (a compiled kernel, an optimizer state) holds the freed
    activations below it resident: on the embedded model in bf16 the resident set grew by 100-300
    MiB of such free pages over a few steps. Returning them costs a page fault when a page is used
    again, well under 1% of a step. Returns False where this does not apply (not Linux/glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(_libc().malloc_trim(0) >= 0)
    except (OSError, AttributeError):
        return False


MADV_DONTNEED = 4


def file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of regular files, from /proc/self/maps (Linux)."""
    spans = []
    if not sys.platform.startswith("linux"):
        return spans
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                spans.append((start, end))
    return spans


def _byte_span(tensor) -> tuple[int, int]:
    """[begin, end) addresses of a contiguous tensor's memory."""
    begin = tensor.data_ptr()
    return begin, begin + tensor.numel() * tensor.element_size()


def in_mapped_file(tensor, mappings: list[tuple[int, int]] | None = None) -> bool:
    """Whether all of `tensor`'s memory lies in one of `mappings` (default: `file_mappings()`)."""
    spans = file_mappings() if mappings is None else mappings
    begin, end = _byte_span(tensor)
    return any(start <= begin and end <= stop for start, stop in spans)


def release_file_pages(tensors: list, mappings: list[tuple[int, int]] | None = None) -> int:
    """Take the pages of weights read from a memory-mapped file out of the resident set.

    safetensors weights are views of the mapped checkpoint file. Casting them to another dtype reads
    every page, and those pages stay resident until the whole file is unmapped: the fp32 file plus
    the bf16 copies at once. Called on the old weights right after each cast, the file's pages go
    layer by layer. Only whole pages inside a tensor that lies in a mapped file are released, so
    the file is never touched (a later read would fault the page in again from the page cache).
    Call it only on tensors nothing else writes to. `mappings`: `file_mappings()` read once for
    many calls (casting maps no new files). Returns the bytes released (0 outside Linux)."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    page = os.sysconf("SC_PAGE_SIZE")
    spans = file_mappings() if mappings is None else mappings
    released = 0
    for tensor in tensors:
        if not in_mapped_file(tensor, spans):
            continue
        begin, end = _byte_span(tensor)
        first, last = -(-begin // page) * page, end // page * page
        if (
            last > first
            and libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), MADV_DONTNEED) == 0
        ):
            released += last - first
    return released

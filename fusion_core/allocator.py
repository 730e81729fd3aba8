"""The process's C allocator (glibc on Linux; elsewhere every function here does nothing).

Two services for runs on a CPU, both about memory the process has freed but glibc keeps:

- ``trim_heaps`` gives it back to the system now. It changes no setting: the level loop calls it before it plans a
  level (so the plan counts that memory as free) and after a full patch search (which frees large blocks).
- ``freed_memory_returned`` is a region where large blocks go back to the system as soon as they are freed. It
  changes a process-wide setting that glibc cannot report, so it cannot be set back to what it was, and setting it
  switches off glibc's own adjustment of it for the rest of the process. A library running inside another program
  (ComfyUI) must not enter it; a program that owns its process (our command line, the benchmarks) may, around the
  levels it evaluates in tiles (``stylize``'s ``tiled_level`` argument).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator

import torch

_M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc's malloc.h)
RETURNED_BLOCK = 8 << 20  # blocks of this size and larger are mapped from the system in ``freed_memory_returned``
_GLIBC_LARGEST_THRESHOLD = 32 << 20  # the largest value glibc's own adjustment gives the threshold (64-bit)
_entered = 0  # how many ``freed_memory_returned`` regions are open: only the outermost sets and sets back


def _glibc_function(name: str) -> Callable[..., int] | None:
    """The function ``name`` of glibc, or None (another C library, another system)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already uses
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):
        return None
    return getattr(libc, name, None)


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None."""
    return _glibc_function("mallopt")


def trim_heaps() -> None:
    """Gives the system the free memory in the C allocator's heaps (glibc's ``malloc_trim``; elsewhere nothing).

    glibc keeps what a process frees inside its heaps (images decoded and resized, an earlier level's blocks)
    and returns it only from a heap's top: the system counts it as the process's, not as available, and a plan
    made then would be needlessly small."""
    malloc_trim = _glibc_function("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)


@contextlib.contextmanager
def freed_memory_returned(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """A region where the process's C allocator gives the blocks of RETURNED_BLOCK and more back to the system as
    soon as they are freed (on a CPU under Linux with glibc; elsewhere nothing changes).

    A tiled level on a CPU allocates and frees activations and gradients of many sizes, tile after tile and
    pass after pass. glibc serves blocks below a threshold that it raises up to 32 MB from its heaps, and keeps
    what is freed there for reuse: even with crops that repeat their sizes (tiling.TilePlan), a backward pass
    frees and allocates in an order that leaves holes, the process's resident memory grows beyond the tensors
    alive at any moment, and the memory plan, which counts tensors, is exceeded (figures in BENCHMARKS.md).
    Mapping those blocks from the system costs their page faults again at each allocation, which a tiled
    level's large blocks pay anyway. The setting is the process's: on leaving, the threshold is set to the
    largest value glibc's own adjustment gives it. Regions nest: one inside another changes nothing."""
    global _entered
    mallopt = _mallopt() if enabled and device.type == "cpu" else None
    if mallopt is None:
        yield
        return
    if _entered == 0:
        mallopt(_M_MMAP_THRESHOLD, RETURNED_BLOCK)
    _entered += 1
    try:
        yield
    finally:
        _entered -= 1
        if _entered == 0:
            mallopt(_M_MMAP_THRESHOLD, _GLIBC_LARGEST_THRESHOLD)

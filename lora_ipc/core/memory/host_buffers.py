"""Destinations for a host copy that do not fault a page per 4 KiB: a bounded pool of recycled buffers.

Note [a fetch's destination is recycled, not fresh]
    Copying a slab into a fresh ``torch.empty`` costs a page fault per 4 KiB of the destination: measured
    on a 2-core VM, ``pread`` of 80 MB from a sealed memfd took 71 ms into fresh memory and 23 ms into a
    warm buffer (huge-page-advised fresh memory: 29 ms). A fetch therefore copies into a buffer of this
    pool. The tensors a fetch returns are views of it; when the last of them is freed, the buffer comes
    back here (a finalizer on the array the storage holds) and the next fetch of that size reuses its
    pages, already faulted in. A miss maps fresh anonymous memory, advised ``MADV_HUGEPAGE`` where the
    kernel's THP mode is ``madvise`` (one fault per 2 MiB instead of 512).

    Every buffer is private anonymous memory of this process: nothing of an exporter's is mapped or
    kept, and a buffer is only reused once no tensor can reach it (its storage was freed), so two
    fetches never alias. What the pool keeps idle is bounded (``max_bytes``, ``max_per_size``); a
    buffer that does not fit is unmapped when it comes back.
"""

from __future__ import annotations

import mmap
import threading
import weakref

import numpy as np
import torch

GRANULE = 2 << 20  # buffers are sized in huge pages, so adapters of nearly one size share buffers
DEFAULT_MAX_BYTES = 1 << 30  # idle bytes the process-wide pool keeps
DEFAULT_MAX_PER_SIZE = 4  # idle buffers of one size
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = THP_ENABLED) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``); None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def size_class(nbytes: int) -> int:
    """The size of the buffer that holds ``nbytes``: rounded up to :data:`GRANULE` (at least one)."""
    return max(1, -(-nbytes // GRANULE)) * GRANULE


def map_anonymous(nbytes: int, advise_huge: bool) -> mmap.mmap:
    """``nbytes`` of private anonymous memory, advised ``MADV_HUGEPAGE`` if ``advise_huge`` (and the
    platform has it)."""
    mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if advise_huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            mm.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # advice only
    return mm


class HostBufferPool:
    """``take(nbytes)``: a uint8 tensor of ``nbytes`` over a pooled buffer, back in the pool once freed."""

    def __init__(self, max_bytes: int = DEFAULT_MAX_BYTES, max_per_size: int = DEFAULT_MAX_PER_SIZE):
        if max_bytes < 0 or max_per_size < 0:
            raise ValueError("max_bytes and max_per_size must be >= 0")
        self.max_bytes = max_bytes
        self.max_per_size = max_per_size
        self.advise_huge = thp_mode() in ("madvise", "always")
        # reentrant: a buffer comes back from a finalizer, which the garbage collector may run on any thread at
        # any allocation, this pool's own included
        self._lock = threading.RLock()
        self._idle: dict[int, list[mmap.mmap]] = {}  # size class -> idle buffers, most recent last
        self._idle_bytes = 0
        self.hits = 0
        self.misses = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A contiguous uint8 tensor of ``nbytes`` this process owns (its contents are unspecified)."""
        return self.acquire(nbytes)[0]

    def acquire(self, nbytes: int) -> tuple[torch.Tensor, bool]:
        """:meth:`take`, and whether the buffer was recycled (its pages already faulted in)."""
        if type(nbytes) is not int or nbytes < 0:
            raise ValueError(f"nbytes {nbytes!r:.20}: expected a non-negative int")
        size = size_class(nbytes)
        with self._lock:
            idle = self._idle.get(size)
            mm = idle.pop() if idle else None
            if mm is not None:
                self._idle_bytes -= size
                self.hits += 1
            else:
                self.misses += 1
        recycled = mm is not None
        if mm is None:
            mm = map_anonymous(size, self.advise_huge)
        array = np.frombuffer(mm, dtype=np.uint8)  # the storage keeps this array (and so the mapping) alive
        weakref.finalize(array, self._give_back, size, mm).atexit = False
        return torch.from_numpy(array)[:nbytes], recycled

    def _give_back(self, size: int, mm: mmap.mmap) -> None:
        """The last tensor over ``mm`` was freed: keep it for the next ``take`` of ``size``, or let it go."""
        fresh: list[mmap.mmap] = []  # allocated outside the lock (an allocation can run the collector)
        with self._lock:
            idle = self._idle.setdefault(size, fresh)
            if len(idle) < self.max_per_size and self._idle_bytes + size <= self.max_bytes:
                idle.append(mm)
                self._idle_bytes += size
                return
        # dropped: unmapped once the array that is being freed lets go of its view

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return self._idle_bytes

    def clear(self) -> None:
        """Let every idle buffer go (their memory is returned to the system)."""
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0


HOST_BUFFERS = HostBufferPool()


def pinned_bounce(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host buffer of ``nbytes`` for copies into ``device``: page-locked where CUDA is there (the
    host-to-device copy is then a DMA the host need not wait on per chunk; torch's caching host
    allocator recycles it), plain memory otherwise (no CUDA, or pinning refused)."""
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        except RuntimeError:
            pass  # pinning refused (RLIMIT_MEMLOCK, a container): pageable memory still works
    return torch.empty(nbytes, dtype=torch.uint8)

"""Slab memory from torch's caching allocator that CUDA IPC can share without ptrace permission.

Every slab is allocated from its own ``torch.cuda.MemPool`` (created with the slab's device current) so the
exported cudaMalloc segment holds nothing but that slab (a handle exposes its whole segment). A probe export
checks the handle's type byte: an expandable segment (``b"e"``, whose import needs ptrace permission) is freed
and allocated again with ``expandable_segments:False`` forced for that one allocation, then the allocator
settings are restored (:func:`plain_segments`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading

import torch
from torch.multiprocessing.reductions import reduce_tensor

from ..errors import BackendError
from ..protocol import CudaSlabHandle
from . import refcount
from .cuda_streams import own_streams

log = logging.getLogger("lora_ipc.cuda")

PTRACE_HINT = (
    "this slab was exported from an expandable segment, whose import needs ptrace permission "
    "(pidfd_getfd). Run the trainer without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or "
    "grant CAP_SYS_PTRACE to the engine process"
)
HANDLE_KIND_OFFSET = 1  # byte of torch's sharable handle that says how it was made: b"c" cudaMalloc, b"e" expandable


_settings_lock = threading.Lock()


def allocator_settings() -> str:
    """The last settings string the allocator parsed (what the process set, in code or by env)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def effective_allocator_settings() -> dict:
    """What the allocator does now (``torch.cuda.memory._snapshot()["allocator_settings"]``): unlike the
    string, this counts settings made in several calls (``expandable_segments`` survives a later string
    that omits it; ``max_split_size_mb`` and the like are reset by it)."""
    settings = dict(torch.cuda.memory._snapshot().get("allocator_settings") or {})
    settings.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    settings.pop("PYTORCH_ALLOC_CONF", None)
    return settings


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


@contextlib.contextmanager
def plain_segments():
    """Allocate from ordinary cudaMalloc segments: force ``expandable_segments:False``, then restore.

    torch's parser (c10/core/AllocatorConfig.cpp ``parseArgs``) resets ``max_split_size_mb``,
    ``roundup_power2_divisions`` and ``garbage_collection_threshold`` on every string and keeps
    ``expandable_segments`` unless the string names it. So the last string is set again with
    ``expandable_segments:False`` appended (the other settings stay what they are), and afterwards
    ``expandable_segments:True`` is set and then the last string itself: the effective settings and the
    string the getter returns are both as before. Only entered where an allocation came out expandable.
    """
    with _settings_lock:
        before = allocator_settings()
        _set_allocator_settings(f"{before},expandable_segments:False" if before else "expandable_segments:False")
        try:
            yield
        finally:
            _set_allocator_settings("expandable_segments:True")
            if before:
                _set_allocator_settings(before)


def _handle_kind(tensor: torch.Tensor, index: int) -> tuple[bytes, CudaSlabHandle | None]:
    """Export once to read the handle's type byte; that export's counter is released at once."""
    with own_streams(index):
        _, args = reduce_tensor(tensor)
    storage_handle, rc_handle, rc_offset = bytes(args[7]), bytes(args[11]), int(args[12])
    refcount.add(rc_handle, rc_offset, -1)  # never imported: freed with the storage
    return storage_handle[HANDLE_KIND_OFFSET : HANDLE_KIND_OFFSET + 1], args


def allocate_plain(nbytes: int, device: torch.device):
    """(pool, tensor, probe export args) of a slab in a plain cudaMalloc segment of its own."""
    error: RuntimeError | None = None
    for attempt in range(2):
        pool = torch.cuda.MemPool()  # bound to the device current at its creation
        with contextlib.ExitStack() as stack:
            if attempt:
                stack.enter_context(plain_segments())
            with torch.cuda.use_mem_pool(pool, device=device):
                tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        try:
            kind, args = _handle_kind(tensor, device.index)
        except RuntimeError as exc:  # an older torch refuses to share an expandable segment at all
            kind, args, error = b"e", None, exc
        else:
            error = None
        if kind == b"c":
            return pool, tensor, args
        del tensor, pool
        log.info(
            "lora-ipc: slab came out of an expandable segment (%s); allocating it again with expandable_segments:False",
            error or f"handle kind {kind!r}",
        )
    raise BackendError(
        f"a {nbytes}-byte slab on {device} is not a plain cudaMalloc segment even with "
        f"expandable_segments:False ({error or kind!r}): {PTRACE_HINT}"
    )

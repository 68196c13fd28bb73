"""CUDA backend: torch's own storage sharing (``torch.multiprocessing.reductions``), carried by msgpack.

Producer: every slab is allocated from its own ``torch.cuda.MemPool`` (created with the slab's device
current) so the exported cudaMalloc segment holds nothing but that slab (a handle exposes its whole
segment). Expandable segments are switched off for that one allocation, by reading the allocator's
settings string and restoring exactly that string afterwards (their export needs ptrace permission
through pidfd_getfd); the handle's type byte is checked to be a plain cudaMalloc handle. Each slab
has one interprocess event, re-recorded after every pack, so the importer orders its copy on the GPU
without a host synchronize on the producer.

Note [one export per import]
    ``reduce_tensor`` → ``_share_cuda_`` wraps the storage in a fresh ``CudaIPCSentData`` whose
    shared ref counter starts at 1 (torch/csrc/CudaIPCTypes.cpp). An importing process decrements it
    when its storage dies, or at once when it already had that storage cached; the producer frees
    the block only when every counter reads 0 (else it parks it until ``ipc_collect``). So one
    export may be imported exactly once: :meth:`CudaExportedSlab.handle_for_import` makes a fresh
    export for every reply that carries a handle, and an importing process that already has the slab
    open consumes a surplus handle (:meth:`CudaImportedSlab.consume`) instead of ignoring it.
    Importers share one import per slab per process (``imports.py``).

Consumer: the slab is rebuilt once (``rebuild_cuda_tensor``) on the local device whose UUID matches
the producer's, and kept open; each fetch waits on the ready event and copies the used bytes into
memory it owns on a stream of lora_ipc's own (a vLLM worker's current stream holds queued model
work that a fetch must not wait for), then waits for that copy before the lease is released.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import secrets
import threading

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from ..errors import BackendError, LimitExceeded
from ..protocol import CudaSlabHandle
from .base import Backend, ExportedSlab, ImportedSlab

PTRACE_HINT = (
    "this slab was exported from an expandable segment, whose import needs ptrace permission "
    "(pidfd_getfd). Run the trainer without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or "
    "grant CAP_SYS_PTRACE to the engine process"
)
MAX_EXPORTS_PER_SLAB = 256  # one per importing process (and per re-import); each holds a ref counter
HANDLE_KIND_OFFSET = 1  # byte of torch's sharable handle that says how it was made: b"c" cudaMalloc, b"e" expandable


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_for_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise BackendError(f"GPU {uuid} of the exporter is not visible in this process (CUDA_VISIBLE_DEVICES)")


# ---- allocator settings ------------------------------------------------------------------------

_settings_lock = threading.Lock()


def allocator_settings() -> str:
    """The caching allocator's current settings string (what the process set, in code or by env)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


def parse_settings(settings: str) -> list[tuple[str, str]]:
    """``"a:1,b:x"`` → ``[("a", "1"), ("b", "x")]`` (keys lower-cased, spaces dropped)."""
    pairs = []
    for part in settings.replace(" ", "").split(","):
        if part:
            key, _, value = part.partition(":")
            pairs.append((key.lower(), value))
    return pairs


def expandable_segments_on(settings: str) -> bool:
    return any(k == "expandable_segments" and v.lower() == "true" for k, v in parse_settings(settings))


@contextlib.contextmanager
def plain_segments():
    """Allocate from ordinary cudaMalloc segments, then restore the allocator settings string exactly."""
    with _settings_lock:
        before = allocator_settings()
        if not expandable_segments_on(before):
            yield
            return
        off = ",".join(f"{k}:{'False' if k == 'expandable_segments' else v}" for k, v in parse_settings(before))
        _set_allocator_settings(off)
        try:
            yield
        finally:
            _set_allocator_settings(before)


# ---- producer ----------------------------------------------------------------------------------


class CudaExportedSlab(ExportedSlab):
    def __init__(self, slab_id: str, nbytes: int, device: torch.device):
        self.slab_id = slab_id
        self.nbytes = nbytes
        self.device = device
        with torch.cuda.device(device):
            self._pool = torch.cuda.MemPool()  # bound to the device current at its creation
            with plain_segments(), torch.cuda.use_mem_pool(self._pool, device=device):
                self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
            self._ready = torch.cuda.Event(interprocess=True)
            self._ready.record(torch.cuda.current_stream(device))
        self._exports = 0
        self.handle = self._export()
        self._first_export_given = False  # the export made here serves the first importer

    def _export(self) -> CudaSlabHandle:
        self._exports += 1
        _, args = reduce_tensor(self.tensor)
        (_, _, _, _, _, _, _, handle, size_bytes, offset_bytes, _, rc_handle, rc_offset, ev_handle, ev_sync) = args
        handle = bytes(handle)
        if handle[HANDLE_KIND_OFFSET:HANDLE_KIND_OFFSET + 1] == b"e":
            raise BackendError(f"slab {self.slab_id} was exported from an expandable segment: {PTRACE_HINT}")
        return CudaSlabHandle(
            slab_id=self.slab_id, nbytes=self.nbytes, device_uuid=device_uuid(self.device.index),
            storage_handle=handle, storage_size_bytes=int(size_bytes),
            storage_offset_bytes=int(offset_bytes), ref_counter_handle=bytes(rc_handle),
            ref_counter_offset=int(rc_offset), event_handle=bytes(ev_handle or b""),
            event_sync_required=bool(ev_sync), ready_event=bytes(self._ready.ipc_handle()),
        )

    def handle_for_import(self) -> CudaSlabHandle:
        """A fresh export for one import (Note [one export per import])."""
        if self._exports >= MAX_EXPORTS_PER_SLAB:
            raise LimitExceeded(f"slab {self.slab_id} was exported {self._exports} times (MAX_EXPORTS_PER_SLAB)")
        if not self._first_export_given:
            self._first_export_given = True
            return self.handle
        return dataclasses.replace(self._export(), generation=self.handle.generation)

    def mark_ready(self) -> None:
        self._ready.record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self._views = None  # cached destination views hold the storage too
        self.tensor = None  # type: ignore[assignment]
        self._pool = None
        torch.cuda.ipc_collect()


# ---- consumer ----------------------------------------------------------------------------------

_copy_streams: dict[int, torch.cuda.Stream] = {}


def copy_stream(index: int) -> torch.cuda.Stream:
    """lora_ipc's own stream on a device (one per process), so a fetch never queues behind model work."""
    stream = _copy_streams.get(index)
    if stream is None:
        stream = _copy_streams[index] = torch.cuda.Stream(index)
    return stream


def _rebuild(handle: CudaSlabHandle, index: int) -> torch.Tensor:
    try:
        return rebuild_cuda_tensor(
            torch.Tensor, (handle.nbytes,), (1,), 0, torch.UntypedStorage, torch.uint8, index,
            handle.storage_handle, handle.storage_size_bytes, handle.storage_offset_bytes, False,
            handle.ref_counter_handle, handle.ref_counter_offset, handle.event_handle,
            handle.event_sync_required,
        )
    except RuntimeError as exc:
        text = str(exc).lower()
        if "not permitted" in text:
            hint = PTRACE_HINT
        elif "version" in text or "invalid" in text:
            hint = (f"CUDA IPC handle refused (this process runs torch {torch.__version__}; an exporter on a "
                    "newer torch may write a handle version this one cannot read)")
        else:
            hint = "CUDA IPC import failed"
        raise BackendError(f"slab {handle.slab_id}: {hint}: {exc}") from None


class CudaImportedSlab(ImportedSlab):
    def __init__(self, handle: CudaSlabHandle):
        self.handle = handle
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        index = local_device_for_uuid(handle.device_uuid)
        self.device = torch.device("cuda", index)
        self.tensor = _rebuild(handle, index)
        try:
            self._ready = torch.cuda.Event.from_ipc_handle(self.device, handle.ready_event)
        except RuntimeError as exc:
            raise BackendError(f"slab {handle.slab_id}: cannot open its ready event: {exc}") from None

    def consume(self, handle: CudaSlabHandle) -> None:
        """A surplus export of a slab this process already has open: rebuild it so torch releases its
        ref counter (the storage is cached, so nothing new is mapped), then drop it."""
        _rebuild(handle, self.device.index)

    def copy_out(self, used_bytes: int, device: torch.device | str | None = None) -> torch.Tensor:
        target = self.device if device is None else torch.device(device)
        stream = copy_stream(self.device.index)
        caller = torch.cuda.current_stream(target) if target.type == "cuda" else None
        with torch.cuda.device(self.device), torch.cuda.stream(stream):
            owned = torch.empty(used_bytes, dtype=torch.uint8, device=target)  # allocated on our stream
            stream.wait_event(self._ready)  # GPU-side wait for the producer's last pack
            owned.copy_(self.tensor[:used_bytes], non_blocking=target.type == "cuda")
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()  # our copy is complete before the lease on this slab is dropped
        if caller is not None:
            owned.record_stream(caller)  # the caller's stream uses it from now on
        return owned

    def copy_into(self, dst: torch.Tensor) -> None:
        dst.copy_(self.copy_out(dst.numel(), dst.device))

    def close(self) -> None:
        self.tensor = None  # type: ignore[assignment]


class CudaBackend(Backend):
    def __init__(self, device: torch.device | str | int | None = None):
        if not torch.cuda.is_available():
            raise BackendError("CUDA backend requested but torch.cuda is not available")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def _allocate(self, nbytes: int) -> CudaExportedSlab:
        try:
            return CudaExportedSlab(f"cuda.{self._token}.{next(self._counter)}", nbytes, self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"cannot allocate a {nbytes}-byte slab on {self.device}: {exc}") from None

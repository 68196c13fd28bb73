"""CUDA backend: torch's own storage sharing (``torch.multiprocessing.reductions``), carried by msgpack.

Producer: every slab is allocated from its own ``torch.cuda.MemPool`` so the exported cudaMalloc
segment holds nothing but that slab (a handle exposes its whole segment), with expandable segments
switched off for that one allocation (their export needs ptrace permission via pidfd_getfd). The slab
is exported once (``reduce_tensor``) and gets one interprocess event that is re-recorded after every
pack, so the importer orders its copy on the GPU, without a host synchronize on the producer.

Consumer: the slab is rebuilt once (``rebuild_cuda_tensor``) on the local device whose UUID matches
the producer's, and kept open; each fetch waits on the ready event on the GPU, copies the used bytes
into memory it owns, and waits for that copy before the lease is released.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets

import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from ..errors import BackendError
from ..protocol import CudaSlabHandle
from .base import Backend, ExportedSlab, ImportedSlab

PTRACE_HINT = (
    "this slab was exported from an expandable segment, whose import needs ptrace permission "
    "(pidfd_getfd). Run the trainer without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or "
    "grant CAP_SYS_PTRACE to the engine process"
)


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_for_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise BackendError(f"GPU {uuid} of the exporter is not visible in this process (CUDA_VISIBLE_DEVICES)")


def _expandable_segments_on() -> bool:
    conf = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "") + "," + os.environ.get("PYTORCH_ALLOC_CONF", "")
    return "expandable_segments:true" in conf.replace(" ", "").lower()


@contextlib.contextmanager
def _plain_segments():
    """Allocate from ordinary cudaMalloc segments even when the process uses expandable segments."""
    if not _expandable_segments_on():
        yield
        return
    torch.cuda.memory._set_allocator_settings("expandable_segments:False")
    try:
        yield
    finally:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")


class CudaExportedSlab(ExportedSlab):
    def __init__(self, slab_id: str, nbytes: int, device: torch.device):
        self.slab_id = slab_id
        self.nbytes = nbytes
        self.device = device
        self._pool = torch.cuda.MemPool()
        with _plain_segments(), torch.cuda.use_mem_pool(self._pool, device=device):
            self.tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self._ready = torch.cuda.Event(interprocess=True)
        self._ready.record(torch.cuda.current_stream(device))
        _, args = reduce_tensor(self.tensor)
        (_, _, _, _, _, _, _, handle, size_bytes, offset_bytes, _, rc_handle, rc_offset, ev_handle, ev_sync) = args
        self.handle = CudaSlabHandle(
            slab_id=slab_id, nbytes=nbytes, device_uuid=device_uuid(device.index),
            storage_handle=bytes(handle), storage_size_bytes=int(size_bytes),
            storage_offset_bytes=int(offset_bytes), ref_counter_handle=bytes(rc_handle),
            ref_counter_offset=int(rc_offset), event_handle=bytes(ev_handle or b""),
            event_sync_required=bool(ev_sync), ready_event=bytes(self._ready.ipc_handle()),
        )

    def mark_ready(self) -> None:
        self._ready.record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        self.tensor = None  # type: ignore[assignment]
        self._pool = None
        torch.cuda.ipc_collect()


class CudaImportedSlab(ImportedSlab):
    def __init__(self, handle: CudaSlabHandle):
        self.handle = handle
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        index = local_device_for_uuid(handle.device_uuid)
        self.device = torch.device("cuda", index)
        try:
            self.tensor = rebuild_cuda_tensor(
                torch.Tensor, (handle.nbytes,), (1,), 0, torch.UntypedStorage, torch.uint8, index,
                handle.storage_handle, handle.storage_size_bytes, handle.storage_offset_bytes, False,
                handle.ref_counter_handle, handle.ref_counter_offset, handle.event_handle,
                handle.event_sync_required,
            )
            self._ready = torch.cuda.Event.from_ipc_handle(self.device, handle.ready_event)
        except RuntimeError as exc:
            hint = PTRACE_HINT if "not permitted" in str(exc).lower() else "CUDA IPC import failed"
            raise BackendError(f"slab {handle.slab_id}: {hint}: {exc}") from None

    def copy_into(self, dst: torch.Tensor) -> None:
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(self._ready)  # GPU-side wait for the producer's last pack
            dst.copy_(self.tensor[:dst.numel()], non_blocking=dst.device.type == "cuda")
            done = torch.cuda.Event()
            done.record(stream)
        done.synchronize()  # our copy is complete before the lease on this slab is dropped

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

    def allocate(self, nbytes: int) -> CudaExportedSlab:
        try:
            return CudaExportedSlab(f"cuda.{self._token}.{next(self._counter)}", nbytes, self.device)
        except torch.cuda.OutOfMemoryError as exc:
            raise BackendError(f"cannot allocate a {nbytes}-byte slab on {self.device}: {exc}") from None

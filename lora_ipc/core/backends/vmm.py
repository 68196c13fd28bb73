"""CUDA VMM backend: slabs that torch's caching allocator never sees (csrc/vmm.c through lora_ipc.core.memory.native).

Note [why VMM slabs]
    The torch CUDA IPC path (cuda.py) borrows the caching allocator's sharing: a ref counter per
    export, parked blocks, allocator settings switched around each allocation, a cap on exports.
    A VMM slab is one ``cuMemCreate`` allocation of the device's granularity, exported once as a
    POSIX descriptor; the exporter maps it read-write, every importer maps it read-only
    (``cuMemSetAccess``), and the physical memory lives until the last descriptor and mapping are
    gone: an exporter that dies cannot take memory from under an importer that still copies.
    The descriptor travels only by the descriptor channel (fdchannel.py), so exporter and importer
    may live in different pid namespaces. Neither side's ``torch.cuda.memory_allocated`` changes:
    the tensors over the mappings come from ``__cuda_array_interface__`` (no copy), and the mapping
    is unmapped when the last tensor over it dies (the extension's Mapping destructor).

    Ordering is the torch path's: one interprocess event per slab, recorded after every pack, waited
    for on lora_ipc's copy stream before the importer's copy (``CudaImportedSlab.copy_out``).

Selection: ``$LORA_IPC_CUDA_EXPORT`` = ``torch`` (default, until device measurements decide),
``vmm`` (error if unavailable) or ``auto`` (VMM where the driver and device support it, else torch).
"""

from __future__ import annotations

import itertools
import os
import secrets
import stat

import torch

from ..errors import BackendError
from ..memory import native
from ..protocol import VmmSlabHandle
from .base import Backend, ExportedSlab, receive_generations
from .cuda import CudaImportedSlab
from .cuda_streams import device_uuid, local_device_for_uuid


class _CudaArray:
    """``__cuda_array_interface__`` over a mapping; torch's tensor keeps this (and so the mapping) alive."""

    def __init__(self, mapping, nbytes: int):
        self.mapping = mapping
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "strides": None,
            "version": 2,
            "data": (mapping.ptr, False),
        }  # torch refuses the read-only flag;
        # the importer's mapping is read-only in the page tables (cuMemSetAccess), which is what counts


def tensor_over(mapping, nbytes: int, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over a mapping, no copy; the mapping is unmapped when the last tensor over it dies."""
    with torch.cuda.device(device):
        tensor = torch.as_tensor(_CudaArray(mapping, nbytes), device=device)
    if tensor.data_ptr() != mapping.ptr or tensor.numel() != nbytes:  # torch copied: never run on a copy
        raise BackendError("torch did not wrap the VMM mapping in place")
    return tensor


def _device_info(index: int) -> dict:
    ext = native.vmm()
    info = native.call(ext.device_info, index)
    if not info["vmm"] or not info["posix_fd"]:
        raise BackendError(f"GPU {index} does not support VMM allocations exported as POSIX descriptors")
    return info


class VmmExportedSlab(ExportedSlab):
    passes_descriptor = True

    def __init__(self, slab_id: str, nbytes: int, device: torch.device, uuid: str):
        ext = native.vmm()
        self.slab_id, self.nbytes, self.device = slab_id, nbytes, device
        mapping, self._fd = native.call(ext.create, device.index, nbytes)
        try:
            self.tensor = tensor_over(mapping, nbytes, device)
            with torch.cuda.device(device):
                self._ready = torch.cuda.Event(interprocess=True)
                self._ready.record(torch.cuda.current_stream(device))
            self.handle = VmmSlabHandle(slab_id, nbytes, uuid, bytes(self._ready.ipc_handle()))
        except BaseException:
            os.close(self._fd)
            raise

    def descriptor(self) -> int:
        """A duplicate of the allocation's descriptor (fdchannel.py sends it and closes it)."""
        if self._fd < 0:
            raise BackendError(f"slab {self.slab_id} is closed")
        return os.dup(self._fd)

    def mark_ready(self) -> None:
        self._ready.record(torch.cuda.current_stream(self.device))

    def close(self) -> None:
        if self.tensor is not None and self.tensor.numel():
            torch.cuda.synchronize(self.device)  # no queued pack still writes into the range we let go of
        self._views = None
        self.tensor = None  # type: ignore[assignment]  # the last view gone unmaps it (Mapping's destructor)
        if self._fd >= 0:
            os.close(self._fd)  # importers' mappings keep the memory until they let go
            self._fd = -1


def _check_allocation_fd(fd: int, slab_id: str) -> None:
    """What the driver exports is never a FIFO, socket or directory: such a descriptor from a hostile exporter
    is refused before the driver sees it (the driver imports by descriptor; nothing is opened by path)."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        raise BackendError(f"VMM slab {slab_id}: cannot inspect its descriptor: {exc}") from None
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) or stat.S_ISDIR(mode):
        raise BackendError(f"VMM slab {slab_id}: the exporter sent a {stat.filemode(mode)[0]!r} descriptor: refused")


class VmmImportedSlab(CudaImportedSlab):
    """Mapped read-only from the descriptor the exporter sent; copies as the CUDA IPC import does."""

    def __init__(self, handle: VmmSlabHandle, receive=None):
        if handle.token is None or receive is None:
            raise BackendError(f"VMM slab {handle.slab_id} can only be imported through the descriptor channel")
        ext = native.vmm()
        index = local_device_for_uuid(handle.device_uuid)
        fds = receive(handle.token)
        try:
            self._generations = receive_generations(handle, fds[1:])  # checks and owns the table's descriptor
        except BaseException:
            os.close(fds[0])
            raise
        try:
            _check_allocation_fd(fds[0], handle.slab_id)
            mapping = native.call(ext.import_fd, fds[0], handle.nbytes, index, False)
        except BaseException:
            self._close_generations()
            raise
        finally:
            os.close(fds[0])  # the mapping holds the memory
        self.handle = handle
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        self.device = torch.device("cuda", index)
        self.tensor = tensor_over(mapping, handle.nbytes, self.device)
        try:
            self._ready = torch.cuda.Event.from_ipc_handle(self.device, handle.ready_event)
        except RuntimeError as exc:
            raise BackendError(f"slab {handle.slab_id}: cannot open its ready event: {exc}") from None

    def consume(self, handle) -> None:
        pass  # no ref counters: a surplus handle holds nothing (its token simply expires)

    def close(self) -> None:
        super().close()
        self._close_generations()


class VmmBackend(Backend):
    def __init__(self, device: torch.device | str | int | None = None):
        native.vmm()  # BackendError naming why (no extension, no driver) before anything else
        if not torch.cuda.is_available():
            raise BackendError("CUDA VMM backend requested but torch.cuda is not available")
        dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.init()  # the primary context torch uses is the one the extension makes current
        _device_info(dev.index)
        self.device = dev
        self.uuid = device_uuid(dev.index)
        self.granularity = native.call(native.vmm().granularity, dev.index)
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def allocate(self, nbytes: int) -> ExportedSlab:
        size = -(-self.size_for(nbytes) // self.granularity) * self.granularity
        return self._allocate(size)

    def _allocate(self, nbytes: int) -> VmmExportedSlab:
        return VmmExportedSlab(f"vmm.{self._token}.{next(self._counter)}", nbytes, self.device, self.uuid)

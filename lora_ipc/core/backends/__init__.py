"""Memory backends behind one interface (see ``base``): ``cpu`` (sealed memfds), ``cuda`` (torch CUDA IPC), ``vmm``
(CUDA VMM, native)."""

from __future__ import annotations

import torch

from ..errors import BackendError
from ..protocol import CpuSlabHandle, CudaSlabHandle, SlabHandle, VmmSlabHandle
from .base import Backend, ExportedSlab, ImportedSlab
from .cpu import CpuBackend


def backend_for(device: torch.device | str, cuda_export: str | None = None) -> Backend:
    """The backend that exports slabs living on ``device``; on CUDA, torch's IPC or VMM per ``cuda_export``
    (default ``$LORA_IPC_CUDA_EXPORT``, see vmm.py)."""
    device = torch.device(device)
    if device.type == "cuda":
        from .vmm import cuda_backend

        return cuda_backend(device, cuda_export)
    return CpuBackend()


def slab_device(device: torch.device | str | None, tensors) -> torch.device:
    """Where a slab for ``tensors`` lives: ``device`` if given, else the tensors' own; CUDA with an index."""
    target = torch.device(device) if device is not None else next(iter(tensors.values())).device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def open_slab(handle: SlabHandle, receive=None) -> ImportedSlab:
    """Import a slab described by a validated handle. ``receive(token) -> [fd, ...]`` redeems a
    descriptor-channel token (fdchannel.FdReceiver of the endpoint the handle came from)."""
    if isinstance(handle, CudaSlabHandle):
        from .cuda import CudaImportedSlab

        return CudaImportedSlab(handle)
    if isinstance(handle, VmmSlabHandle):
        from .vmm import VmmImportedSlab

        return VmmImportedSlab(handle, receive)
    if isinstance(handle, CpuSlabHandle):
        from .cpu import CpuImportedSlab

        return CpuImportedSlab(handle, receive)
    raise BackendError(f"no backend imports {type(handle).__name__}")


__all__ = ["Backend", "ExportedSlab", "ImportedSlab", "backend_for", "open_slab", "slab_device"]

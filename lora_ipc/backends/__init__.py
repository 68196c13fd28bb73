"""Memory backends behind one interface (see ``base``): ``cpu`` (POSIX shm) and ``cuda`` (CUDA IPC)."""

from __future__ import annotations

import torch

from ..errors import BackendError
from ..protocol import CpuSlabHandle, CudaSlabHandle, SlabHandle
from .base import Backend, ExportedSlab, ImportedSlab
from .cpu import CpuBackend


def backend_for(device: torch.device | str) -> Backend:
    """The backend that exports slabs living on ``device``."""
    device = torch.device(device)
    if device.type == "cuda":
        from .cuda import CudaBackend

        return CudaBackend(device)
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
    if isinstance(handle, CpuSlabHandle):
        from .cpu import CpuImportedSlab

        return CpuImportedSlab(handle, receive)
    raise BackendError(f"no backend imports {type(handle).__name__}")


__all__ = ["Backend", "ExportedSlab", "ImportedSlab", "backend_for", "open_slab", "slab_device"]

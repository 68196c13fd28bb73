"""Which backend: the one place that reads ``$LORA_IPC_CUDA_EXPORT`` and picks CPU, torch CUDA IPC or VMM to
export a slab, and the importing slab class for a handle."""

from __future__ import annotations

import logging
from typing import cast

import torch

from .. import settings
from ..errors import BackendError
from ..protocol import CpuSlabHandle, CudaSlabHandle, SlabHandle, VmmSlabHandle
from .base import Backend, ImportedSlab
from .cpu import CpuBackend, CpuImportedSlab
from .cuda import CudaBackend, CudaImportedSlab
from .vmm import VmmBackend, VmmImportedSlab

log = logging.getLogger(__name__)
ENV_CUDA_EXPORT = "LORA_IPC_CUDA_EXPORT"
_said: set[str] = set()


def cuda_export_mode(value: str | None = None) -> str:
    """``torch``, ``vmm`` or ``auto``: ``value`` if given (checked by the settings table's row), else the setting."""
    if value is None:
        return cast(str, settings.value(ENV_CUDA_EXPORT))
    return cast(str, settings.SETTINGS[ENV_CUDA_EXPORT].parse(value, given_as="CUDA export"))


def backend_for(device: torch.device | str, cuda_export: str | None = None) -> Backend:
    """The backend that exports slabs living on ``device``. On CUDA: VMM where ``cuda_export`` (default
    ``$LORA_IPC_CUDA_EXPORT``) is ``vmm``, or ``auto`` and the device and driver support it; else torch's CUDA IPC."""
    device = torch.device(device)
    if device.type != "cuda":
        return CpuBackend()
    mode = cuda_export_mode(cuda_export)
    if mode != "torch":
        try:
            return VmmBackend(device)
        except BackendError as exc:
            if mode == "vmm":
                raise
            if str(exc) not in _said:
                _said.add(str(exc))
                log.info("%s=auto: %s; exporting with torch's CUDA IPC", ENV_CUDA_EXPORT, exc)
    return CudaBackend(device)


def slab_device(device: torch.device | str | None, tensors) -> torch.device:
    """Where a slab for ``tensors`` lives: ``device`` if given, else the tensors' own; CUDA with an index."""
    target = torch.device(device) if device is not None else next(iter(tensors.values())).device
    if target.type == "cuda" and target.index is None:
        target = torch.device("cuda", torch.cuda.current_device())
    return target


def open_slab(handle: SlabHandle, receive=None) -> ImportedSlab:
    """Import a slab described by a validated handle. ``receive(token) -> [fd, ...]`` redeems a
    descriptor-channel token (fdchannel.FdReceiver of the endpoint the handle came from): every descriptor an
    import uses (a CPU or VMM slab's memory, any slab's generation table) comes that way, and a handle that
    needs one cannot be imported without it."""
    if isinstance(handle, CudaSlabHandle):
        return CudaImportedSlab(handle, receive)
    if isinstance(handle, VmmSlabHandle):
        return VmmImportedSlab(handle, receive)
    if isinstance(handle, CpuSlabHandle):
        return CpuImportedSlab(handle, receive)
    raise BackendError(f"no backend imports {type(handle).__name__}")

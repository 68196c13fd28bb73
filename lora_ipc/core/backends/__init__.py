"""Memory backends behind one interface (``base``): ``cpu`` (sealed memfds), ``cuda`` (torch CUDA IPC), ``vmm``
(CUDA VMM, native); ``select`` picks one for a device, or for a handle to import."""

from __future__ import annotations

from .base import Backend, ExportedSlab, ImportedSlab
from .select import backend_for, open_slab, slab_device

__all__ = ["Backend", "ExportedSlab", "ImportedSlab", "backend_for", "open_slab", "slab_device"]

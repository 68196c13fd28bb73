"""CPU backend: one sealed memfd per slab (see :mod:`..shm`), mapped by importers read-only.

The exporter maps its slab read-write and packs into it; an importer opens it through
``/proc/<pid>/fd/<fd>``, checks it on the opened descriptor and maps it read-only, once, and keeps
the mapping. The seals make a truncation impossible, so no peer can turn a kept mapping into a SIGBUS.
"""

from __future__ import annotations

import itertools
import os
import secrets

import torch

from ..protocol import CpuSlabHandle
from ..shm import create_sealed, map_fd, open_sealed
from .base import Backend, ExportedSlab, ImportedSlab


class CpuExportedSlab(ExportedSlab):
    device = torch.device("cpu")

    def __init__(self, slab_id: str, nbytes: int):
        self.fd = create_sealed(slab_id, nbytes)
        try:
            self.tensor = map_fd(self.fd, nbytes, writable=True)
        except BaseException:
            os.close(self.fd)
            raise
        self.nbytes = nbytes
        self.slab_id = slab_id
        self.handle = CpuSlabHandle(slab_id, nbytes, os.getpid(), self.fd)

    def mark_ready(self) -> None:
        pass  # CPU copies are complete when pack returns

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._views = None
        if self.fd >= 0:
            os.close(self.fd)  # importers that still map it keep the memory until they unmap
            self.fd = -1


class CpuImportedSlab(ImportedSlab):
    device = torch.device("cpu")

    def __init__(self, handle: CpuSlabHandle):
        fd = open_sealed(handle.pid, handle.fd, handle.slab_id, handle.nbytes)
        try:
            self.tensor = map_fd(fd, handle.nbytes, writable=False)
        finally:
            os.close(fd)  # the mapping keeps the memory; no descriptor per slab stays open
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        self.handle = handle

    def copy_into(self, dst: torch.Tensor) -> None:
        dst.copy_(self.tensor[:dst.numel()])

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)


class CpuBackend(Backend):
    def __init__(self):
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def _allocate(self, nbytes: int) -> CpuExportedSlab:
        return CpuExportedSlab(f"{self._token}.{next(self._counter)}", nbytes)

"""CPU backend: one sealed memfd per slab (see :mod:`..shm`), read by importers with ``pread``.

The exporter maps its slab read-write and packs into it; an importer opens it through
``/proc/<pid>/fd/<fd>`` read-only, checks it on the opened descriptor (sealed, ours, reserved), keeps
that descriptor and copies out of it with ``pread`` (Note [the reader never pays for the exporter's
memory]). The seals make a truncation impossible, so the descriptor stays valid for its whole life.
"""

from __future__ import annotations

import itertools
import os
import secrets

import torch

from ..errors import BackendError
from ..protocol import CpuSlabHandle
from ..shm import create_sealed, map_fd, open_sealed, read_exact
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


BOUNCE_BYTES = 64 << 20  # host buffer for copies into device memory


class CpuImportedSlab(ImportedSlab):
    device = torch.device("cpu")

    def __init__(self, handle: CpuSlabHandle):
        self.fd = open_sealed(handle.pid, handle.fd, handle.slab_id, handle.nbytes)  # read-only, checked
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        self.handle = handle

    def read_into(self, dst: torch.Tensor, offset: int = 0) -> None:
        """Fill ``dst`` (uint8, 1-D, contiguous, in host memory) with the slab's bytes from ``offset``."""
        if offset < 0 or offset + dst.numel() > self.nbytes:
            raise BackendError(f"bytes [{offset}, {offset + dst.numel()}) lie outside slab {self.slab_id}")
        if dst.numel():
            read_exact(self.fd, memoryview(dst.numpy()), offset)

    def copy_into(self, dst: torch.Tensor) -> None:
        if dst.device.type == "cpu" and dst.is_contiguous():
            self.read_into(dst)
            return
        bounce = torch.empty(min(dst.numel(), BOUNCE_BYTES), dtype=torch.uint8)
        for start in range(0, dst.numel(), BOUNCE_BYTES):
            part = bounce[:min(BOUNCE_BYTES, dst.numel() - start)]
            self.read_into(part, start)
            dst[start:start + part.numel()].copy_(part)  # from pageable memory: done with `part` on return

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class CpuBackend(Backend):
    def __init__(self):
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def _allocate(self, nbytes: int) -> CpuExportedSlab:
        return CpuExportedSlab(f"{self._token}.{next(self._counter)}", nbytes)

"""CPU backend: one sealed memfd per slab (see :mod:`..shm`), read by importers through a read-only mapping.

The exporter maps its slab read-write and packs into it; once mapped, the memfd is sealed against any
other write, resize or hole (``F_SEAL_FUTURE_WRITE``, :func:`~lora_ipc.core.memory.shm.create_mapped`). An
importer receives its descriptor by the descriptor channel (the handle's ``token``, fdchannel.py; there is
no other way), checks it before opening anything through it (sealed, ours, reserved), reopens it read-only,
keeps that descriptor and copies out of it through a read-only mapping kept as long as the descriptor (Note
[a copy out of a mapping]), or with ``pread`` where the seals or the range do not allow one (Note [the
reader never pays for the exporter's memory]). The seals make a truncation impossible, so the descriptor
and the mapping stay valid for their whole life.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading

import torch

from ..channels.fdchannel import memfd_descriptor
from ..errors import BackendError
from ..memory.host_buffers import HOST_BUFFERS, pinned_bounce
from ..memory.shm import (
    GenerationReader,
    SlabMapping,
    check_sealed,
    create_mapped,
    first_hole,
    map_slab,
    mappable,
    read_exact,
    reopen_sealed,
)
from ..protocol import NO_TOKEN, CpuSlabHandle
from .base import Backend, ExportedSlab, ImportedSlab, receive_generations


class CpuExportedSlab(ExportedSlab):
    device = torch.device("cpu")
    passes_descriptor = True

    def __init__(self, slab_id: str, nbytes: int):
        self.fd, mm = create_mapped(slab_id, nbytes)  # this mapping is the only way to write it
        self.tensor = torch.frombuffer(mm, dtype=torch.uint8)
        self.nbytes = nbytes
        self.slab_id = slab_id
        self.handle = CpuSlabHandle(slab_id, nbytes, NO_TOKEN)  # a token is attached for each importer

    def descriptor(self) -> int:
        """A duplicate of the memfd, for the descriptor channel (fdchannel.py); BackendError once closed."""

        return memfd_descriptor(self.fd, self.slab_id)

    def mark_ready(self) -> None:
        pass  # CPU copies are complete when pack returns

    def close(self) -> None:
        self.tensor = torch.empty(0, dtype=torch.uint8)
        self._views = None
        if self.fd >= 0:
            os.close(self.fd)  # importers that still map it keep the memory until they unmap
            self.fd = -1


BOUNCE_BYTES = 16 << 20  # one chunk of a host-staged copy into device memory (two are in flight)


class CpuImportedSlab(ImportedSlab):
    device = torch.device("cpu")
    COPIES_WITHOUT_REQUEST = True

    def __init__(self, handle: CpuSlabHandle, receive=None):
        if not handle.channel_token or receive is None:
            raise BackendError(f"CPU slab {handle.slab_id!r} can only be imported through the descriptor channel")
        fd, self._generations = _receive_memfd(handle, receive)
        self.fd = fd  # read by read_into, through the kept mapping where it may (Note [a copy out of a mapping])
        self._mapping: SlabMapping | None = None  # made by the first copy that may use it, kept until close
        self._mapping_lock = threading.Lock()
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        self.handle = handle
        try:  # seals are final once checked (F_SEAL_SEAL): whether a mapping may be used is known for good
            self._mappable = mappable(fd, check_sealed(fd, handle.slab_id, handle.nbytes))
        except BaseException:
            self.close()
            raise
        self._hole_free_to = 0  # [0, this) was seen without holes: it stays so (Note [a copy out of a mapping])

    def read_into(self, dst: torch.Tensor, offset: int = 0) -> None:
        """Fill ``dst`` (uint8, 1-D, contiguous, in host memory) with the slab's bytes from ``offset``."""
        if offset < 0 or offset + dst.numel() > self.nbytes:
            raise BackendError(f"bytes [{offset}, {offset + dst.numel()}) lie outside slab {self.slab_id}")
        if not dst.numel():
            return
        mapping = self._mapping_for(offset + dst.numel())
        if mapping is not None:
            mapping.copy_into(dst, offset)
            return
        read_exact(self.fd, memoryview(dst.numpy()), offset)  # type: ignore[arg-type]  # numpy: 3.12+ buffer

    def _mapping_for(self, end: int) -> SlabMapping | None:
        """The slab's kept mapping if bytes up to ``end`` may be copied through it: sealed for it, and no hole
        before ``end`` (each byte found hole-free is checked once: no hole can appear later); None: ``pread``."""
        if not self._mappable:
            return None
        if end > self._hole_free_to:  # look again from the first hole seen (a later publish may have filled it)
            self._hole_free_to = max(self._hole_free_to, first_hole(self.fd, self._hole_free_to))
        if end > self._hole_free_to:
            return None
        with self._mapping_lock:
            if self._mapping is None and self.fd >= 0:
                self._mapping = map_slab(self.fd, self.nbytes)
                self._mappable = self._mapping is not None  # refused once: pread from then on
            return self._mapping

    def copy_out(self, used_bytes: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Host memory: a recycled buffer of this process (Note [a fetch's destination is recycled, not fresh]);
        elsewhere fresh memory there, filled through :meth:`copy_into`."""
        target = torch.device("cpu") if device is None else torch.device(device)
        if target.type != "cpu":
            return super().copy_out(used_bytes, target)
        if used_bytes > self.nbytes:
            raise BackendError(f"{used_bytes} bytes asked of slab {self.slab_id} ({self.nbytes} bytes)")
        owned = HOST_BUFFERS.take(used_bytes)
        self.copy_into(owned)
        return owned

    def copy_into(self, dst: torch.Tensor) -> None:
        if dst.device.type == "cpu" and dst.is_contiguous():
            self.read_into(dst)
            return
        copy_staged(self.read_into, dst)

    def close(self) -> None:
        with self._mapping_lock:
            mapping, self._mapping = self._mapping, None
            self._mappable = False
        if mapping is not None:
            mapping.close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._close_generations()


def copy_staged(read_into, dst: torch.Tensor, chunk: int = BOUNCE_BYTES) -> None:
    """Fill ``dst`` (uint8, 1-D: device memory, or a host tensor ``pread`` cannot fill in place) through host
    bounce buffers: ``read_into(part, offset)`` fills one, ``copy_`` moves it on. Into CUDA memory the two
    bounces are page-locked (:func:`~lora_ipc.core.memory.host_buffers.pinned_bounce`), so each chunk's copy is a DMA
    queued behind the previous one while the next chunk is read: one pass over the bytes on each side.
    Complete on return."""
    total = dst.numel()
    if not total:
        return
    size = min(total, chunk)
    bounces = [pinned_bounce(size, dst.device) for _ in range(2 if total > size else 1)]
    overlapped = dst.is_cuda and bounces[0].is_pinned()
    done: list = [None] * len(bounces)  # the event after the DMA out of each bounce
    for i, start in enumerate(range(0, total, size)):
        slot = i % len(bounces)
        if done[slot] is not None:
            done[slot].synchronize()  # that bounce's previous DMA has read it
        part = bounces[slot][: min(size, total - start)]
        read_into(part, start)
        dst[start : start + part.numel()].copy_(part, non_blocking=overlapped)
        if overlapped:
            done[slot] = torch.cuda.Event()
            done[slot].record(torch.cuda.current_stream(dst.device))
    if overlapped:
        torch.cuda.current_stream(dst.device).synchronize()  # complete on return, as every copy_into


def _receive_memfd(handle: CpuSlabHandle, receive) -> tuple[int, GenerationReader | None]:
    """The slab's memfd (read-only) and a reader of its generation table, both by the descriptor channel and
    checked before anything is opened through them; BackendError when what came is wrong, the channel's
    own errors (``FdChannelUnavailable``, ``ChannelFailed``) when nothing came."""

    fds = receive(handle.token)
    try:
        # checked before anything is opened: what arrived may be a FIFO (Note [open nothing a peer chose
        # before knowing what it is], shm.py) or writable; this process only ever reads
        fd = reopen_sealed(fds[0], handle.slab_id, handle.nbytes)
    except BaseException:
        for other in fds:
            os.close(other)
        raise
    try:
        return fd, receive_generations(handle, fds[1:])
    except BaseException:
        os.close(fd)
        raise


class CpuBackend(Backend):
    def __init__(self):
        self._token = f"{os.getpid()}.{secrets.token_hex(4)}"
        self._counter = itertools.count(1)

    def _allocate(self, nbytes: int) -> CpuExportedSlab:
        return CpuExportedSlab(f"{self._token}.{next(self._counter)}", nbytes)

"""CUDA backend: torch's own storage sharing (``torch.multiprocessing.reductions``), carried by msgpack.

Producer: a slab's memory comes from :mod:`.cuda_allocator` (a plain cudaMalloc segment of its own); each slab
has one interprocess event, re-recorded after every pack, so the importer orders its copy on the GPU without a
host synchronize on the producer. Every CUDA call on the data path runs on lora_ipc's own streams
(:mod:`.cuda_streams`).

Note [one export per import]
    ``reduce_tensor`` → ``_share_cuda_`` wraps the storage in a fresh ``CudaIPCSentData`` whose
    shared ref counter starts at 1 (torch/csrc/CudaIPCTypes.cpp). An importing process decrements it
    when its storage dies, or at once when it already had that storage cached; the producer frees
    the block only when every counter reads 0 (else it parks it until ``ipc_collect``). So one
    export may be imported exactly once: :meth:`CudaExportedSlab.handle_for_import` makes a fresh
    export for every reply that carries a handle (none at allocation: exports are lazy), and an
    importing process that already has the slab open consumes a surplus handle
    (:meth:`CudaImportedSlab.consume`) instead of ignoring it. Importers share one import per slab per
    process (``imports.py``).

Note [unconfirmed exports]
    An export nobody imports (a reply that was dropped, an importer that died first, a host-fallback
    consumer whose import failed) would keep its counter at 1 and pin the slab in torch's limbo for
    good, with its interprocess event. So each export is sent with its counter raised to 2 (see
    :mod:`.refcount`); an importer subtracts 1 right after its import (or surplus consume) succeeded,
    and 2 when it failed. At close the exporter subtracts 2 from every slot still reading 2: those
    exports were never imported. A slot reading 1 is a live import, and keeps torch's usual rule.

Note [one copy into the caller's memory]
    ``copy_out`` allocates the importer's memory on lora_ipc's stream, so its copy waits for nothing
    the caller queued. ``copy_into(dst)`` (the daemon copying a publisher's staging slab into a slab
    of its own) copies once, straight into ``dst``, on the same stream; but ``dst`` is the caller's
    memory, so the copy is also ordered after the caller's current stream on ``dst``'s device
    (``wait_stream``: work queued on ``dst`` before, such as a check of a recycled slab, comes
    first), which is the barrier torch's own cross-device copy puts on the destination's current
    stream (``copy_device_to_device`` in ATen's Copy.cu). The host waits for the copy's end before
    returning, so ``dst`` needs no ``record_stream`` and the publisher may reuse its slab at once.

Consumer: the slab is rebuilt once (``rebuild_cuda_tensor``) on the local device whose UUID matches
the producer's, and kept open; each fetch waits on the ready event and copies the used bytes into
memory it owns, then waits for that copy before the lease is released. A client in the exporting
process itself uses the exporter's tensor directly (CUDA IPC cannot open a handle in its own process).
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import threading
import weakref

import msgspec
import torch
from torch.multiprocessing.reductions import rebuild_cuda_tensor, reduce_tensor

from ..errors import BackendError, LimitExceeded
from ..memory.shm import GenerationReader
from ..protocol import CudaSlabHandle
from . import refcount
from .base import Backend, ExportedSlab, ImportedSlab, receive_generations
from .cuda_allocator import PTRACE_HINT, allocate_plain
from .cuda_streams import copy_stream, device_uuid, local_device_for_uuid, own_streams

log = logging.getLogger("lora_ipc.cuda")

#: past this many exports a slab is worn out: the store closes it when it is freed instead of recycling it
#: (each export adds one ``CudaIPCSentData`` to the storage's deleter chain, freed only when it dies)
MAX_EXPORTS_PER_SLAB = 256
#: a slab still in use refuses importers past this many exports (LimitExceeded)
HARD_MAX_EXPORTS_PER_SLAB = 4096
UNCONFIRMED = 2  # an export's counter while nobody has confirmed importing it (Note [unconfirmed exports])


# ---- producer ----------------------------------------------------------------------------------

_local_slabs: weakref.WeakValueDictionary[str, CudaExportedSlab] = weakref.WeakValueDictionary()


class CudaExportedSlab(ExportedSlab):
    """``handle`` describes the slab (id, size, storage handle, ready event) but carries no export: it
    must not be sent. Send :meth:`handle_for_import` (one fresh export per importing reply)."""

    handle: CudaSlabHandle

    def __init__(self, slab_id: str, nbytes: int, device: torch.device):
        self.slab_id = slab_id
        self.nbytes = nbytes
        self.device = device
        self._lock = threading.Lock()
        with torch.cuda.device(device):
            self._pool, self.tensor, probe = allocate_plain(nbytes, device)
            self._ready = torch.cuda.Event(interprocess=True)
            self._ready.record(torch.cuda.current_stream(device))
        self._exports = 0
        self._sent: dict[tuple[bytes, int], None] = {}  # (ref-counter file, slot) of every export handed out
        (_, _, _, _, _, _, _, handle, size_bytes, offset_bytes, _, _, _, ev_handle, ev_sync) = probe
        self.handle = CudaSlabHandle(
            slab_id=slab_id,
            nbytes=nbytes,
            device_uuid=device_uuid(device.index),
            storage_handle=bytes(handle),
            storage_size_bytes=int(size_bytes),
            storage_offset_bytes=int(offset_bytes),
            ref_counter_handle=b"",
            ref_counter_offset=0,
            event_handle=bytes(ev_handle or b""),
            event_sync_required=bool(ev_sync),
            ready_event=bytes(self._ready.ipc_handle()),
        )
        _local_slabs[slab_id] = self

    @property
    def worn_out(self) -> bool:
        return self._exports >= MAX_EXPORTS_PER_SLAB

    def _export(self) -> CudaSlabHandle:
        with own_streams(self.device.index):
            _, args = reduce_tensor(self.tensor)
        rc_handle, rc_offset = bytes(args[11]), int(args[12])
        refcount.add(rc_handle, rc_offset, UNCONFIRMED - 1)  # Note [unconfirmed exports]
        self._exports += 1
        self._sent[(rc_handle, rc_offset)] = None
        return msgspec.structs.replace(
            self.handle,
            ref_counter_handle=rc_handle,
            ref_counter_offset=rc_offset,
            event_handle=bytes(args[13] or b""),
            event_sync_required=bool(args[14]),
        )

    def handle_for_import(self) -> CudaSlabHandle:
        """A fresh export for one import (Note [one export per import])."""
        with self._lock:
            if self.tensor is None:
                raise BackendError(f"slab {self.slab_id} is closed")
            if self._exports >= HARD_MAX_EXPORTS_PER_SLAB:
                raise LimitExceeded(
                    f"slab {self.slab_id} was exported {self._exports} times (HARD_MAX_EXPORTS_PER_SLAB)"
                )
            return self._export()

    def discard(self, handle: CudaSlabHandle) -> None:  # type: ignore[override]  # only ours come back
        """An export that was never delivered: release its counter now."""
        key = (handle.ref_counter_handle, handle.ref_counter_offset)
        with self._lock:
            if key in self._sent:
                del self._sent[key]
                refcount.add(*key, -UNCONFIRMED)

    def unconfirmed_exports(self) -> int:
        """Exports handed out that no importer has confirmed (yet)."""
        with self._lock:
            return sum(refcount.read(h, o) == UNCONFIRMED for h, o in self._sent)

    def mark_ready(self) -> None:
        self._ready.record(torch.cuda.current_stream(self.device))

    def read_into(self, dst: torch.Tensor) -> None:
        """Copy the first ``dst.numel()`` bytes into ``dst`` after the last pack (its ready event), on
        lora_ipc's own stream; complete on return."""
        with own_streams(self.device.index) as stream:
            stream.wait_event(self._ready)
            dst.copy_(self.tensor[: dst.numel()], non_blocking=dst.device.type == "cuda")
            stream.synchronize()

    def close(self) -> None:
        with self._lock:
            if self.tensor is None:
                return
            for rc_handle, rc_offset in self._sent:  # Note [unconfirmed exports]
                if refcount.read(rc_handle, rc_offset) == UNCONFIRMED:
                    refcount.add(rc_handle, rc_offset, -UNCONFIRMED)
            self._sent.clear()
            _local_slabs.pop(self.slab_id, None)
            self._views = None  # cached destination views hold the storage too
            with own_streams(self.device.index):
                self.tensor = None  # type: ignore[assignment]
                self._pool = None
                torch.cuda.ipc_collect()


# ---- consumer ----------------------------------------------------------------------------------


def _rebuild(handle: CudaSlabHandle, index: int) -> torch.Tensor:
    try:
        with own_streams(index):
            return rebuild_cuda_tensor(
                torch.Tensor,
                (handle.nbytes,),
                (1,),
                0,
                torch.UntypedStorage,
                torch.uint8,
                index,
                handle.storage_handle,
                handle.storage_size_bytes,
                handle.storage_offset_bytes,
                False,
                handle.ref_counter_handle,
                handle.ref_counter_offset,
                handle.event_handle,
                handle.event_sync_required,
            )
    except RuntimeError as exc:
        text = str(exc).lower()
        if "not permitted" in text:
            hint = PTRACE_HINT
        elif "version" in text or "invalid" in text:
            hint = (
                f"CUDA IPC handle refused (this process runs torch {torch.__version__}; an exporter on a "
                "newer torch may write a handle version this one cannot read)"
            )
        else:
            hint = "CUDA IPC import failed"
        raise BackendError(f"slab {handle.slab_id}: {hint}: {exc}") from None


def _release(handle: CudaSlabHandle, count: int) -> None:
    refcount.add(handle.ref_counter_handle, handle.ref_counter_offset, -count)


def _indices(slab: torch.device, target: torch.device) -> tuple[int, ...]:
    """The devices a copy from ``slab`` to ``target`` runs on (the slab's first: its stream does the copy)."""
    return (slab.index, target.index) if target.type == "cuda" else (slab.index,)


def _receive_table(handle: CudaSlabHandle, receive) -> GenerationReader | None:
    """The exporter's generation table for a slab with a generation slot: its descriptor comes by the
    descriptor channel (``token``), as every descriptor an importer uses does (fdchannel.py)."""
    if handle.generation is None:
        return None
    if handle.token is None or receive is None:
        raise BackendError(
            f"slab {handle.slab_id}: its generation table comes only by the descriptor channel, and the handle "
            "carries no token for it"
        )
    return receive_generations(handle, receive(handle.token))


class CudaImportedSlab(ImportedSlab):
    def __init__(self, handle: CudaSlabHandle, receive=None):
        if not handle.ref_counter_handle:
            raise BackendError(
                f"slab {handle.slab_id}: the handle carries no export (an exporter must send "
                "handle_for_import(), never the slab's own handle)"
            )
        self.handle = handle
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
        try:
            self._generations = _receive_table(handle, receive)
        except BaseException:
            _release(handle, UNCONFIRMED)  # nobody will import this export (Note [unconfirmed exports])
            raise
        local = _local_slabs.get(handle.slab_id)
        if local is not None and local.tensor is not None:  # this process exported it: no IPC
            self.device = local.device
            self.tensor = local.tensor
            self._ready = local._ready
            _release(handle, UNCONFIRMED)
            return
        try:
            index = local_device_for_uuid(handle.device_uuid)
            self.tensor = _rebuild(handle, index)
        except BaseException:
            _release(handle, UNCONFIRMED)  # nobody will import this export (Note [unconfirmed exports])
            self._close_generations()
            raise
        _release(handle, UNCONFIRMED - 1)  # imported: from now on the storage's death releases the rest
        self.device = torch.device("cuda", index)
        try:
            self._ready = torch.cuda.Event.from_ipc_handle(self.device, handle.ready_event)
        except RuntimeError as exc:
            self.close()
            raise BackendError(f"slab {handle.slab_id}: cannot open its ready event: {exc}") from None

    def consume(self, handle: CudaSlabHandle) -> None:  # type: ignore[override]  # open_slab pairs them
        """A surplus export of a slab this process already has open: rebuild it so torch releases its
        ref counter (the storage is cached, so nothing new is mapped), then drop it."""
        local = _local_slabs.get(handle.slab_id)
        if local is not None and self.tensor is local.tensor:  # the exporter's own tensor: nothing to import
            _release(handle, UNCONFIRMED)
            return
        try:
            with own_streams(self.device.index):
                _rebuild(handle, self.device.index)  # dropped here, under our stream
        except BaseException:
            _release(handle, UNCONFIRMED)
            raise
        _release(handle, UNCONFIRMED - 1)

    def copy_out(self, used_bytes: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Fresh memory allocated on lora_ipc's stream, so nothing the caller queued is waited for; the
        caller's stream owns it afterwards (``record_stream``)."""
        target = self.device if device is None else torch.device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
        caller = torch.cuda.current_stream(target) if target.type == "cuda" else None
        with own_streams(*_indices(self.device, target)):
            owned = torch.empty(used_bytes, dtype=torch.uint8, device=target)  # allocated on our stream
        self._copy(owned)
        if caller is not None:
            owned.record_stream(caller)  # the caller's stream uses it from now on
        return owned

    def copy_into(self, dst: torch.Tensor) -> None:
        """One copy straight into ``dst`` (the daemon's own slab in a publish, Note [one copy into the
        caller's memory]); complete on return."""
        if dst.numel() > self.nbytes:
            raise BackendError(f"{dst.numel()} bytes asked of slab {self.slab_id} ({self.nbytes} bytes)")
        self._copy(dst, after=torch.cuda.current_stream(dst.device) if dst.is_cuda else None)

    def _copy(self, dst: torch.Tensor, after: torch.cuda.Stream | None = None) -> None:
        """The slab's first ``dst.numel()`` bytes into ``dst`` on lora_ipc's streams, after the producer's last
        pack (the ready event) and after ``after``'s queued work; the host waits for the copy's end."""
        on_gpu = dst.is_cuda
        with own_streams(*_indices(self.device, dst.device)) as stream:
            stream.wait_event(self._ready)  # GPU-side wait for the producer's last pack
            target_stream = copy_stream(dst.device.index) if on_gpu else stream
            if after is not None:
                target_stream.wait_stream(after)  # what the caller queued on dst comes first
            dst.copy_(self.tensor[: dst.numel()], non_blocking=on_gpu)
            done = torch.cuda.Event()
            done.record(target_stream)  # a cross-device copy ends there
        done.synchronize()  # our copy is complete before the lease on this slab is dropped

    def close(self) -> None:
        """Drop the mapping; torch's IPC deleter synchronizes the current stream, so it runs under ours."""
        self._close_generations()
        tensor, self.tensor = self.tensor, None  # type: ignore[assignment]
        if tensor is None:
            return
        with own_streams(self.device.index):
            del tensor


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

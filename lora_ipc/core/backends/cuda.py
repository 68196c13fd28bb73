"""CUDA backend: torch's own storage sharing (``torch.multiprocessing.reductions``), carried by msgpack.

Producer: every slab is allocated from its own ``torch.cuda.MemPool`` (created with the slab's device
current) so the exported cudaMalloc segment holds nothing but that slab (a handle exposes its whole
segment). A probe export checks the handle's type byte: an expandable segment (``b"e"``, whose import
needs ptrace permission) is freed and allocated again with ``expandable_segments:False`` forced for that
one allocation, then the allocator settings are restored (:func:`plain_segments`). Each slab has one
interprocess event, re-recorded after every pack, so the importer orders its copy on the GPU without a
host synchronize on the producer.

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

Note [lora_ipc's own streams]
    Every CUDA call lora_ipc makes on the data path runs with a stream of its own made current, on the
    slab's device and on the target device (:func:`copy_stream`, created through the driver API, not
    taken from torch's stream pool, which other code shares): the export (torch records its event on
    the current stream, or synchronizes it past ~1000 events), the import (``_new_shared_cuda`` makes
    the current stream wait on that event), the copy (a cross-device copy waits for the target's
    current stream), and the final drop of an import (torch's IPC deleter synchronizes the current
    stream). So none of them waits for model work queued on the caller's stream.

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

import contextlib
import ctypes
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
from ..protocol import CudaSlabHandle
from . import refcount
from .base import Backend, ExportedSlab, ImportedSlab

log = logging.getLogger("lora_ipc.cuda")

PTRACE_HINT = (
    "this slab was exported from an expandable segment, whose import needs ptrace permission "
    "(pidfd_getfd). Run the trainer without PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or "
    "grant CAP_SYS_PTRACE to the engine process"
)
#: past this many exports a slab is worn out: the store closes it when it is freed instead of recycling it
#: (each export adds one ``CudaIPCSentData`` to the storage's deleter chain, freed only when it dies)
MAX_EXPORTS_PER_SLAB = 256
#: a slab still in use refuses importers past this many exports (LimitExceeded)
HARD_MAX_EXPORTS_PER_SLAB = 4096
HANDLE_KIND_OFFSET = 1  # byte of torch's sharable handle that says how it was made: b"c" cudaMalloc, b"e" expandable
UNCONFIRMED = 2  # an export's counter while nobody has confirmed importing it (Note [unconfirmed exports])


def device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def local_device_for_uuid(uuid: str) -> int:
    for i in range(torch.cuda.device_count()):
        if device_uuid(i) == uuid:
            return i
    raise BackendError(f"GPU {uuid} of the exporter is not visible in this process (CUDA_VISIBLE_DEVICES)")


# ---- lora_ipc's own streams (Note [lora_ipc's own streams]) ------------------------------------

_streams: dict[int, torch.cuda.Stream] = {}
_streams_lock = threading.Lock()
CU_STREAM_NON_BLOCKING = 1


def _driver_stream(index: int) -> torch.cuda.Stream:
    """A stream created by ``cuStreamCreate`` in the device's primary context: no other code holds it."""
    cuda = ctypes.CDLL("libcuda.so.1")
    dev, ctx, stream = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_void_p()

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} returned CUresult {rc}")

    check(cuda.cuInit(0), "cuInit")
    check(cuda.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
    check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")  # kept: torch's ctx
    check(cuda.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        check(cuda.cuStreamCreate(ctypes.byref(stream), CU_STREAM_NON_BLOCKING), "cuStreamCreate")
    finally:
        cuda.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    return torch.cuda.ExternalStream(stream.value, device=torch.device("cuda", index))


def copy_stream(index: int) -> torch.cuda.Stream:
    """lora_ipc's own stream on a device (one per process, never destroyed)."""
    stream = _streams.get(index)
    if stream is None:
        with _streams_lock:
            stream = _streams.get(index)
            if stream is None:
                torch.cuda.init()
                try:
                    stream = _driver_stream(index)
                except Exception as exc:  # no driver library, a sandbox: a pooled stream still beats the caller's
                    log.warning(
                        "lora-ipc: cannot create a dedicated CUDA stream on device %d (%s); using one "
                        "from torch's pool",
                        index,
                        exc,
                    )
                    stream = torch.cuda.Stream(index)
                _streams[index] = stream
    return stream


@contextlib.contextmanager
def own_streams(*indices: int):
    """``indices[0]`` current, and lora_ipc's stream current on every one of ``indices``."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.cuda.device(indices[0]))
        for index in dict.fromkeys(indices):
            stack.enter_context(torch.cuda.stream(copy_stream(index)))
        yield copy_stream(indices[0])


# ---- allocator settings ------------------------------------------------------------------------

_settings_lock = threading.Lock()


def allocator_settings() -> str:
    """The last settings string the allocator parsed (what the process set, in code or by env)."""
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)
    if getter is not None:
        return getter()
    return os.environ.get("PYTORCH_ALLOC_CONF") or os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")


def effective_allocator_settings() -> dict:
    """What the allocator does now (``torch.cuda.memory._snapshot()["allocator_settings"]``): unlike the
    string, this counts settings made in several calls (``expandable_segments`` survives a later string
    that omits it; ``max_split_size_mb`` and the like are reset by it)."""
    settings = dict(torch.cuda.memory._snapshot().get("allocator_settings") or {})
    settings.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    settings.pop("PYTORCH_ALLOC_CONF", None)
    return settings


def _set_allocator_settings(settings: str) -> None:
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    (setter or torch.cuda.memory._set_allocator_settings)(settings)


@contextlib.contextmanager
def plain_segments():
    """Allocate from ordinary cudaMalloc segments: force ``expandable_segments:False``, then restore.

    torch's parser (c10/core/AllocatorConfig.cpp ``parseArgs``) resets ``max_split_size_mb``,
    ``roundup_power2_divisions`` and ``garbage_collection_threshold`` on every string and keeps
    ``expandable_segments`` unless the string names it. So the last string is set again with
    ``expandable_segments:False`` appended (the other settings stay what they are), and afterwards
    ``expandable_segments:True`` is set and then the last string itself: the effective settings and the
    string the getter returns are both as before. Only entered where an allocation came out expandable.
    """
    with _settings_lock:
        before = allocator_settings()
        _set_allocator_settings(f"{before},expandable_segments:False" if before else "expandable_segments:False")
        try:
            yield
        finally:
            _set_allocator_settings("expandable_segments:True")
            if before:
                _set_allocator_settings(before)


def _handle_kind(tensor: torch.Tensor, index: int) -> tuple[bytes, CudaSlabHandle | None]:
    """Export once to read the handle's type byte; that export's counter is released at once."""
    with own_streams(index):
        _, args = reduce_tensor(tensor)
    storage_handle, rc_handle, rc_offset = bytes(args[7]), bytes(args[11]), int(args[12])
    refcount.add(rc_handle, rc_offset, -1)  # never imported: freed with the storage
    return storage_handle[HANDLE_KIND_OFFSET : HANDLE_KIND_OFFSET + 1], args


def _allocate(nbytes: int, device: torch.device):
    """(pool, tensor, probe export args) of a slab in a plain cudaMalloc segment of its own."""
    error: RuntimeError | None = None
    for attempt in range(2):
        pool = torch.cuda.MemPool()  # bound to the device current at its creation
        with contextlib.ExitStack() as stack:
            if attempt:
                stack.enter_context(plain_segments())
            with torch.cuda.use_mem_pool(pool, device=device):
                tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        try:
            kind, args = _handle_kind(tensor, device.index)
        except RuntimeError as exc:  # an older torch refuses to share an expandable segment at all
            kind, args, error = b"e", None, exc
        else:
            error = None
        if kind == b"c":
            return pool, tensor, args
        del tensor, pool
        log.info(
            "lora-ipc: slab came out of an expandable segment (%s); allocating it again with expandable_segments:False",
            error or f"handle kind {kind!r}",
        )
    raise BackendError(
        f"a {nbytes}-byte slab on {device} is not a plain cudaMalloc segment even with "
        f"expandable_segments:False ({error or kind!r}): {PTRACE_HINT}"
    )


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
            self._pool, self.tensor, probe = _allocate(nbytes, device)
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


class CudaImportedSlab(ImportedSlab):
    def __init__(self, handle: CudaSlabHandle):
        if not handle.ref_counter_handle:
            raise BackendError(
                f"slab {handle.slab_id}: the handle carries no export (an exporter must send "
                "handle_for_import(), never the slab's own handle)"
            )
        self.handle = handle
        self.slab_id = handle.slab_id
        self.nbytes = handle.nbytes
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

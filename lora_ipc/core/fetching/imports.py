"""One import per slab per server per process, shared by every client in it (Note [one export per import], cuda.py).

Two clients in one process (or a client and the daemon's publish path) must not open the
same slab twice: each CUDA import consumes one export's ref counter. The registry counts the users
of each open slab and closes it when the last one lets go.

Note [imports are keyed by who served them]
    A slab id is chosen by the server, so it names nothing by itself: a hostile server could answer
    with another exporter's slab id and its own memory. An import is therefore keyed by the server's
    identity — the endpoint and the pid the kernel reports for the connection the reply came on
    (``Connection.server``) — plus the slab id, and it is only ever reused for replies of that same
    server. A handle names no process or descriptor: every descriptor it leads to (a CPU or VMM slab's
    memory, the generation table) comes by the descriptor channel, which must be served by that same pid
    (``SO_PEERCRED``, fdchannel.FdReceiver), so the memory and the counter are the answering server's own.
    A handle without a generation slot is refused (every store-made handle carries one; without it a torn
    copy could not be detected). A handle sent again for an open slab must name the same memory as the
    one it was opened from.
"""

from __future__ import annotations

import threading
import time
from typing import NamedTuple

from ..backends import ImportedSlab, open_slab
from ..channels.endpoint import ServerIdentity
from ..errors import ExporterUnavailable, ProtocolError
from ..protocol import MAX_KNOWN, CpuSlabHandle, CudaSlabHandle, SlabHandle, VmmSlabHandle

MAX_KNOWN_SENT = MAX_KNOWN  # slab ids a fetch request may list


class ImportKey(NamedTuple):
    endpoint: str
    server_pid: int
    slab_id: str


def key_for(server: ServerIdentity, slab_id: str) -> ImportKey:
    return ImportKey(server.endpoint, server.pid, slab_id)


def memory_of(handle: SlabHandle) -> tuple:
    """What a handle points at. A fresh CUDA export of the same slab (Note [one export per import]) has
    new ref-counter and event fields; its generation slot (one per slab in the server's store), device
    and extent are the slab's own."""
    if isinstance(handle, CpuSlabHandle):  # its memfd's name is the slab id, checked on what the channel sent
        return ("cpu", handle.nbytes, handle.generation)
    if isinstance(handle, CudaSlabHandle):
        return (
            "cuda",
            handle.device_uuid,
            handle.storage_size_bytes,
            handle.storage_offset_bytes,
            handle.nbytes,
            handle.generation,
        )
    if isinstance(handle, VmmSlabHandle):  # its descriptor travels by the channel, a fresh token each time
        return ("vmm", handle.device_uuid, handle.nbytes, handle.generation)
    raise ProtocolError(f"unknown slab handle {type(handle).__name__}")


def check_owned_by(handle: SlabHandle, server: ServerIdentity) -> None:
    """Refuse a handle without a generation slot. That the memory and the counter are ``server``'s own is
    checked by the descriptor channel that delivers them (:func:`_bound_channel`)."""
    if handle.generation is None:
        raise ProtocolError(
            f"slab {handle.slab_id!r} of {server.endpoint} comes without a generation slot: "
            "a copy torn by a reuse could not be detected, so it is refused"
        )


def _bound_channel(receive, server: ServerIdentity, deadline: float | None = None):
    """``receive`` held to the answering server: the descriptor channel must be served by the process the
    kernel reports for the ZeroMQ reply (pids as this process sees them, so this holds across pid
    namespaces). ``deadline``: the fetch's (fdchannel.FdReceiver)."""

    def receive_from_server(token: bytes) -> list[int]:
        return receive(token, expected_pid=server.pid, deadline=deadline)

    return receive_from_server


class ImportRegistry:
    """Note [no lock across I/O in the import path]
    Opening a slab talks to its exporter (the descriptor channel) and opens what it names; a hostile
    or stuck exporter can make that take until the fetch's deadline. The registry's lock is only ever
    held for bookkeeping: the first fetch of a slab marks it as being opened and opens it without the
    lock; fetches of that same slab of that same server wait for it (until their own deadline), and
    every other fetch of the process goes on."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[ImportKey, list] = {}  # key -> [ImportedSlab, users]
        self._opening: dict[ImportKey, threading.Event] = {}  # keys being opened now (without the lock)

    def acquire(
        self,
        server: ServerIdentity,
        slab_id: str,
        handle: SlabHandle | None,
        receive=None,
        deadline: float | None = None,
    ) -> tuple[ImportKey, ImportedSlab]:
        """The process's import of ``slab_id`` as served by ``server`` (opened from ``handle`` if this
        process has none yet); a handle for a slab already open is consumed, not opened twice.
        ``receive``: the endpoint's descriptor channel (fdchannel.FdReceiver); ``deadline``
        (``time.monotonic()``): the fetch's, for the channel and for waiting on another thread's open."""
        key = key_for(server, slab_id)
        if handle is not None:
            receive = self._checked(server, slab_id, handle, receive, deadline)
        while True:
            with self._lock:
                entry = self._open.get(key)
                if entry is not None:
                    if handle is not None:
                        _same_memory(entry[0], server, slab_id, handle)
                    entry[1] += 1
                    slab = entry[0]
                    break
                if handle is None:
                    raise ProtocolError(f"reply names slab {slab_id!r} but carries no handle for it")
                busy = self._opening.get(key)
                if busy is None:
                    self._opening[key] = threading.Event()
            if busy is None:
                return key, self._open_new(key, handle, receive)
            left = None if deadline is None else deadline - time.monotonic()
            if (left is not None and left <= 0) or not busy.wait(left):
                raise ExporterUnavailable(
                    f"slab {slab_id!r} of {server.endpoint} is still being opened by another fetch of this "
                    "process past this fetch's timeout"
                )
        if handle is not None:
            self._consume_held(key, slab, handle)
        return key, slab

    def _open_new(self, key: ImportKey, handle: SlabHandle, receive) -> ImportedSlab:
        """Open ``key``'s slab without the lock (Note [no lock across I/O in the import path])."""
        try:
            slab = open_slab(handle, receive)
        except BaseException:
            with self._lock:
                self._opening.pop(key).set()
            raise
        with self._lock:
            self._open[key] = [slab, 1]
            self._opening.pop(key).set()
        return slab

    def _consume_held(self, key: ImportKey, slab: ImportedSlab, handle: SlabHandle) -> None:
        """A surplus handle of a slab this caller now holds: consumed outside the lock (CUDA: a ref
        counter file is written); the hold is given back if that fails."""
        try:
            slab.consume(handle)
        except BaseException:
            self.release(key)
            raise

    def consume_surplus(self, server: ServerIdentity, slab_id: str, handle: SlabHandle, slab: ImportedSlab) -> None:
        """A handle for ``slab``, which this client already holds, came again (the server did not know we
        have it): checked like a new one, then consumed (a CUDA export's reference is given back)."""
        self._checked(server, slab_id, handle, None)
        _same_memory(slab, server, slab_id, handle)
        slab.consume(handle)

    @staticmethod
    def _checked(server: ServerIdentity, slab_id: str, handle: SlabHandle, receive, deadline: float | None = None):
        if handle.slab_id != slab_id:
            raise ProtocolError(f"reply names slab {slab_id!r} but its handle is for {handle.slab_id!r}")
        check_owned_by(handle, server)
        return None if receive is None else _bound_channel(receive, server, deadline)

    def release(self, key: ImportKey) -> None:
        with self._lock:
            entry = self._open.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._open[key]
                entry[0].close()

    def known(self, server: ServerIdentity | None, preferred: list[str]) -> list[str]:
        """Slab ids of ``server`` to announce in a fetch: this client's first, then the process's, at most
        MAX_KNOWN_SENT. None (not yet known who serves) announces nothing."""
        if server is None:
            return []
        with self._lock:
            mine = [k.slab_id for k in self._open if k.endpoint == server.endpoint and k.server_pid == server.pid]
            ids = [s for s in preferred if s in set(mine)]
            seen = set(ids)
            ids += [s for s in mine if s not in seen]
            return ids[:MAX_KNOWN_SENT]

    def users(self, slab: str | ImportKey) -> int:
        """Holders of one import (an ``ImportKey``), or of every import of that slab id (a ``str``)."""
        with self._lock:
            if isinstance(slab, ImportKey):
                entry = self._open.get(slab)
                return 0 if entry is None else entry[1]
            return sum(entry[1] for key, entry in self._open.items() if key.slab_id == slab)


def _same_memory(slab: ImportedSlab, server: ServerIdentity, slab_id: str, handle: SlabHandle) -> None:
    if memory_of(handle) != memory_of(slab.handle):
        raise ProtocolError(
            f"{server.endpoint} sent a handle for slab {slab_id!r} that names other memory than the one already open"
        )


REGISTRY = ImportRegistry()

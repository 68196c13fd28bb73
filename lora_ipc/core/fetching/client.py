"""TensorSetClient: fetch a published tensor set (an adapter, a refit bucket) into tensors this process owns.

A first fetch is one round trip: ``FetchRequest`` -> ``FetchReply`` (a lease). The slab is imported the
first time and kept open; the layout is validated the first time and cached by digest, so a steady
state reply carries neither. Then the used bytes are copied into owned memory in one copy, the
lease is released (sent, not waited for) and the owned buffer is cut into per-tensor views.

Note [a fetch without a request]
    Once a client holds a name's slabs, layout and config, the reply tells it nothing the exporter's
    newest-version board (memory/board.py) does not: which version is newest, in which slab, at which
    generation. A fetch of the newest version (or of the version the board names) therefore reads the name's
    board entry, copies out of the slab it names and checks the slab's generation after the copy, as a
    leased copy is checked: no request, no lease, no release, none of the round trip's thread hand-offs
    (a ZeroMQ round trip between idle processes costs 0.4-0.6 ms on a 2-core VM, a board read a few
    microseconds). It then sends a ``FetchNote`` without waiting, so the server's fetch metrics still count it.
    Anything else asks the server, as before: no entry yet (a first fetch), an entry being written or
    withdrawn (the store closed), a slab, layout or config this client does not hold (a new slab, a new
    shape), an older version pinned, another epoch, a slab reused during the copy (the copy is discarded),
    a CUDA slab (its ready event comes with a reply), or a server that is no longer the one that wrote the
    entry or no longer runs (:class:`~.board.ServerWatch`). A server whose board is gone (it exited, it closed
    its store) is therefore still found out by the request, with the same errors as before.
    Without a lease, a slab can be reused under the copy more often than with one; the generation check
    makes that a discarded copy and a request, never a torn version.
"""

from __future__ import annotations

import builtins
import logging
import os
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Self, cast

import torch
import zmq

from .. import protocol as p
from .. import settings
from ..backends import ImportedSlab
from ..channels.connection import Connection
from ..channels.endpoint import daemon_endpoint
from ..channels.fdchannel import ChannelFailed, FdReceiver
from ..errors import (
    BackendError,
    ClientClosed,
    ExporterUnavailable,
    LayoutError,
    LimitExceeded,
    LoraIpcError,
    ProtocolError,
    SlabRecycled,
    StaleEpoch,
)
from ..lru import BoundedLRU
from ..memory.layout import SlabLayout
from .board import BoardSpot, ServerWatch
from .imports import REGISTRY, ImportKey, key_for

MAX_CACHED_LAYOUTS = 32
MAX_CACHED_SLABS = 32
MAX_BOARD_SPOTS = 64  # names whose board entry a client remembers
NOTE_INTERVAL_S = 1.0  # board fetches are told to the server at least this often while a client fetches
ENV_TRANSPORT = "LORA_IPC_TRANSPORT"
ENV_MAX_FETCH_BYTES = "LORA_IPC_MAX_FETCH_BYTES"
DEFAULT_MAX_FETCH_BYTES = 4 << 30
log = logging.getLogger(__name__)


def fetch_bytes_limit(value: int | None = None) -> int:
    """The most bytes one fetch may copy: ``value``, else ``$LORA_IPC_MAX_FETCH_BYTES``, else 4 GiB.

    A reply whose layout uses more is refused (``LimitExceeded``) before anything is imported or
    allocated: the exporter sizes a fetch, the client decides what it can afford.
    """
    if value is None:
        value = cast(int | None, settings.value(ENV_MAX_FETCH_BYTES)) or DEFAULT_MAX_FETCH_BYTES
    if type(value) is not int or value <= 0:
        raise LoraIpcError(f"max_fetch_bytes {value!r:.40}: expected a positive number of bytes")
    return value


def transport_mode(value: str | None = None) -> str:
    """``auto`` (CUDA IPC, falling back to a host-staged copy where it cannot be imported), ``cuda``
    (never fall back) or ``host`` (always the host copy); default ``$LORA_IPC_TRANSPORT`` or auto."""
    if value is None:
        return cast(str, settings.value(ENV_TRANSPORT))
    return cast(str, settings.SETTINGS[ENV_TRANSPORT].parse(value, given_as="transport"))


# One deadline, the client's timeout_s, covers a whole fetch: every try's request, descriptor channel and host
# fallback, and the tries again after a copy lost to a slab reuse (the newest version only: under a publisher that
# outpaces busy readers a few tries can all lose). Whatever a peer does, a fetch ends within timeout_s plus the
# copy in flight.
DEADLINE_SLACK_S = 0.01  # a wait that ran to the deadline may wake this much early (poll rounds to milliseconds)


class _DeviceImportFailed(Exception):
    """Internal: a device (CUDA IPC) slab could not be imported; carries the BackendError."""

    def __init__(self, error: BackendError):
        super().__init__(str(error))
        self.error = error


@dataclass
class TensorSet:
    """One fetched version. ``tensors`` are owned by this process (views of one owned buffer); ``config``
    is what the publisher attached (a LoRA config; empty for a refit bucket)."""

    name: str
    version: int
    tensors: dict[str, torch.Tensor]
    config: dict


class TensorSetClient:
    """A client of one endpoint; :meth:`fetch` returns a ``fetched_as`` (a :class:`TensorSet`; the LoRA
    layer's client, an ``Adapter``).

    ``connect_wait_s``: how long a request waits for a server to appear on an endpoint where nothing
    listens (default ``timeout_s``: a trainer may start after its engine); 0 fails at once."""

    fetched_as: type[TensorSet] = TensorSet

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        timeout_s: float = 10.0,
        context: zmq.Context | None = None,
        trusted_uids: set[int] | None = None,
        transport: str | None = None,
        connect_wait_s: float | None = None,
        max_fetch_bytes: int | None = None,
    ):
        self.endpoint = endpoint or daemon_endpoint()
        self.transport = transport_mode(transport)
        self.max_fetch_bytes = fetch_bytes_limit(max_fetch_bytes)
        self.host_fallbacks = 0  # fetches served by the host-staged copy because CUDA IPC import failed
        self._fell_back = False
        self.client_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.timeout_s = timeout_s
        self._conn = Connection(self.endpoint, timeout_s, context, trusted_uids, connect_wait_s)
        self._receive_fds = FdReceiver(self.endpoint, trusted_uids, timeout_s)  # slabs' descriptors (fdchannel.py)
        self._lock = threading.Lock()
        self._closed = False
        self._slabs: BoundedLRU[ImportKey, ImportedSlab] = BoundedLRU(
            MAX_CACHED_SLABS, lambda key, _: REGISTRY.release(key)
        )  # this client's holds on imports
        self._layouts: BoundedLRU[bytes, SlabLayout] = BoundedLRU(MAX_CACHED_LAYOUTS)
        self._configs: BoundedLRU[bytes, dict] = BoundedLRU(16)
        # where each name's newest-version board entry is read, and whether its writer still runs (Note [a fetch
        # without a request])
        self._spots: BoundedLRU[str, BoardSpot] = BoundedLRU(MAX_BOARD_SPOTS)
        self._watch: ServerWatch | None = None
        self.board_fetches = 0  # fetches made from the board, without a request
        # board fetches not yet told to the server, per name, and since when (Note [a fetch without a request])
        self._untold: list[p.BoardFetch] = []
        self._untold_since = 0.0
        self._untold_epoch = ""  # the epoch of the store whose board they were made from
        # the last fetch's stages in ms (request round trip, slab import incl. descriptor passing, copy into
        # owned memory, lease release, unpack): what ``lora-ipc bench --breakdown`` reports
        self.last_stages: dict[str, float] = {}

    # ---- API -------------------------------------------------------------------------------

    @contextmanager
    def _locked(self):
        """The client's lock, waited for at most ``timeout_s`` (one request at a time on the socket: a
        stuck exporter makes the next caller of this client fail, never wait without end)."""
        if not self._lock.acquire(timeout=self.timeout_s):
            raise ExporterUnavailable(
                f"{self.endpoint}: another request on this client did not finish within {self.timeout_s:g}s"
            )
        try:
            if self._closed:
                raise ClientClosed(f"the client of {self.endpoint} was closed (evicted from the shared clients?)")
            yield
        finally:
            if self._closed:  # closed while this request was in flight
                self._shutdown()
            self._lock.release()

    def list(self) -> list[p.TensorSetSummary]:
        return self.catalog().sets

    def catalog(self, name: str | None = None) -> p.ListReply:
        """The names, their kept versions, and the store's ``epoch`` (what the version numbers are of).

        A full catalog is cut to what fits the server's reply bound (``left_out`` counts the rest); with
        ``name``, only that name's entry (none if it was never published), which is never cut: look a
        name up this way."""
        with self._locked():
            self._tell_untold()
            return self._conn.request(p.ListRequest(name), p.ListReply)

    def versions(self, name: str) -> builtins.list[int]:  # `list` is a method here
        for summary in self.catalog(name).sets:
            if summary.name == name:
                return summary.versions
        return []

    def status(self) -> p.StatusReport:
        """The server's operator view (``msgspec.to_builtins`` makes it plain data, keyed as on the wire)."""
        with self._locked():
            self._tell_untold()
            return self._conn.request(p.StatusRequest(), p.StatusReply).report

    def fetch(
        self,
        name: str,
        version: int | None = None,
        device: torch.device | str | None = None,
        epoch: str | None = None,
        *,
        max_bytes: int | None = None,
    ) -> TensorSet:
        """Lease ``version`` (newest if None), copy it into owned memory on ``device``, release the lease; or,
        once this client holds what the exporter's newest-version board names, copy it from there without a
        request (Note [a fetch without a request]).

        ``epoch`` (from :meth:`catalog` or a ``lora-ipc://`` URI): the version must be of that store
        epoch, else ``StaleEpoch`` (the exporter restarted; the number now names other bytes).

        Returns exactly the bytes of one version or raises: if the slab was reused while it was being
        copied (the lease expired or was revoked), the copy is discarded and the newest version is
        fetched again (``SlabRecycled`` once ``timeout_s`` has passed); a pinned ``version`` raises
        ``SlabRecycled`` at once.
        On CUDA, ``device`` defaults to the local GPU that is the exporter's (matched by UUID).
        A reply for another name or version is refused, and so is one larger than ``max_bytes``
        (default: this client's ``max_fetch_bytes``), before anything is allocated (``LimitExceeded``).
        """
        limit = self.max_fetch_bytes if max_bytes is None else fetch_bytes_limit(max_bytes)
        deadline = time.monotonic() + self.timeout_s  # the whole fetch: every try, channel and fallback
        lost: SlabRecycled | None = None
        while True:
            try:
                return self._fetch_or_fall_back(name, version, device, epoch, limit, deadline)
            except SlabRecycled as exc:
                if version is not None or time.monotonic() >= deadline:
                    raise
                lost = exc
            except ExporterUnavailable:
                if lost is not None and time.monotonic() >= deadline - DEADLINE_SLACK_S:
                    raise lost from None  # the deadline ran out in a try again: the copies lost are the reason
                raise

    def _fetch_or_fall_back(self, name, version, device, epoch, limit: int, deadline: float) -> TensorSet:
        """One try; where a device slab cannot be imported (``auto``), the host-staged copy, and that copy for
        every later fetch of this client."""
        try:
            return self._fetch_once(name, version, device, epoch, limit, deadline)
        except _DeviceImportFailed as failed:
            if self.transport != "auto":
                raise failed.error from None
            if not self._host_only:
                log.warning(
                    "lora-ipc: importing a slab of %s failed (%s); falling back to host-staged copies "
                    "for this client (set %s=host to skip the attempt)",
                    self.endpoint,
                    failed.error,
                    ENV_TRANSPORT,
                )
            self._fell_back = True
            return self._fetch_once(name, version, device, epoch, limit, deadline)

    @property
    def _host_only(self) -> bool:
        return self.transport == "host" or self._fell_back

    def _fetch_once(
        self,
        name: str,
        version: int | None,
        device: torch.device | str | None,
        epoch: str | None,
        limit: int,
        deadline: float,
    ) -> TensorSet:
        with self._locked():
            from_board = self._fetch_from_board(name, version, device, epoch, limit)
            if from_board is not None:
                return from_board
            self._tell_untold()  # before the request: the server's counts are exact once it answers
            started = time.perf_counter()
            host = self._host_only
            known = REGISTRY.known(self._conn.server, [k.slab_id for k in reversed(self._slabs.keys())])
            reply = self._conn.request(
                p.FetchRequest(
                    name,
                    version,
                    self.client_id,
                    known,
                    self._layouts.keys(),
                    self._configs.keys(),
                    "host" if host else "device",
                    epoch,
                ),
                p.FetchReply,
                deadline=deadline,
            )
            replied = time.perf_counter()
            server = self._conn.server
            fetch_ms = 0.0
            try:
                if epoch is not None and reply.epoch != epoch:  # a server that ignored the request's epoch
                    raise StaleEpoch(f"{name!r} v{reply.version}: asked for epoch {epoch!r}, got {reply.epoch!r}")
                _check_reply(reply, name, version, limit)
                config = self._config_for(reply)
                try:
                    slab = self._slab_for(server, reply, deadline)
                except BackendError as exc:
                    # a channel that did not answer is not a slab this process cannot import: no fallback (that
                    # doubled the fetch's time and made the client fall back for life)
                    if host or reply.slab is None or isinstance(exc, ChannelFailed):
                        raise
                    raise _DeviceImportFailed(exc) from None
                if host and self.transport == "auto":
                    self.host_fallbacks += 1
                layout = self._layout_for(reply, slab)
                imported = time.perf_counter()
                owned = slab.copy_out(layout.used_bytes, device)
                now = slab.generation_now()
                if now is not None and now != reply.generation:
                    raise SlabRecycled(
                        f"{name!r} v{reply.version}: slab {reply.slab_id} was reused during the copy "
                        f"(generation {reply.generation} -> {now}); copy discarded"
                    )
                copied = time.perf_counter()
                fetch_ms = (copied - started) * 1e3
                self._remember_spot(name, server, reply, slab)
            finally:
                try:
                    self._conn.send(p.ReleaseRequest(reply.lease_id, fetch_ms))
                except LoraIpcError:
                    pass  # the lease expires on its own
            self._forget_dead_slabs(server, reply.live_slabs)
        released = time.perf_counter()
        tensors = layout.unpack(owned)
        self.last_stages = {
            "request_ms": (replied - started) * 1e3,
            "import_ms": (imported - replied) * 1e3,
            "copy_ms": (copied - imported) * 1e3,
            "release_ms": (released - copied) * 1e3,
            "unpack_ms": (time.perf_counter() - released) * 1e3,
        }
        return self.fetched_as(reply.name, reply.version, tensors, dict(config))

    def _fetch_from_board(
        self, name: str, version: int | None, device: torch.device | str | None, epoch: str | None, limit: int
    ) -> TensorSet | None:
        """The fetch made from the newest-version board, or None where the server must be asked (Note [a fetch
        without a request]). Under the client's lock."""
        spot = self._spots.get(name)
        if spot is None:
            return None
        started = time.perf_counter()
        watch = self._watch
        if (
            spot.server != self._conn.server
            or (epoch is not None and epoch != spot.epoch)
            or watch is None
            or watch.pid != spot.server.pid
            or not watch.alive()
        ):
            self._spots.pop(name)
            return None
        via = self._slabs.get(spot.via)
        entry = None if via is None else via.newest_at(spot.offset)
        if entry is None or (version is not None and entry.version != version) or entry.used_bytes > limit:
            return None
        key = key_for(spot.server, entry.slab_id)
        slab = self._slabs.get(key)
        layout = self._layouts.get(entry.layout_digest)
        config = self._configs.get(entry.config_digest)
        if (
            slab is None
            or layout is None
            or config is None
            or not slab.COPIES_WITHOUT_REQUEST
            or layout.used_bytes != entry.used_bytes
            or layout.used_bytes > slab.nbytes
        ):
            return None
        read = time.perf_counter()
        try:
            owned = slab.copy_out(layout.used_bytes, device)
            intact = slab.generation_now() == entry.generation
        except BackendError:
            return None  # the request says what is wrong
        if not intact:
            return None  # reused during the copy: discarded, and the server is asked
        copied = time.perf_counter()
        spot.via = key
        self.board_fetches += 1
        if self._host_only and self.transport == "auto":
            self.host_fallbacks += 1  # a host copy, as the request would have served
        self._note(spot.epoch, p.BoardFetch(name, entry.version, (copied - started) * 1e3))
        noted = time.perf_counter()
        tensors = layout.unpack(owned)
        self.last_stages = {
            "request_ms": (read - started) * 1e3,  # the board read in place of the round trip
            "import_ms": 0.0,
            "copy_ms": (copied - read) * 1e3,
            "release_ms": (noted - copied) * 1e3,  # the FetchNote in place of the release
            "unpack_ms": (time.perf_counter() - noted) * 1e3,
        }
        return self.fetched_as(name, entry.version, tensors, dict(config))

    def _note(self, epoch: str, fetch: p.BoardFetch) -> None:
        """Keep a board fetch to tell the server: one ``FetchNote`` per batch, sent once ``MAX_NOTED_FETCHES`` are
        kept or ``NOTE_INTERVAL_S`` passed (and before every request, :meth:`_tell_untold`), so a server never has
        more than one reply to it queued per batch (it drops a peer whose replies pile up: server.py ``_reply``)."""
        if self._untold and epoch != self._untold_epoch:
            self._tell_untold()  # a batch is of one store
        if not self._untold:
            self._untold_since, self._untold_epoch = time.monotonic(), epoch
        self._untold.append(fetch)
        if len(self._untold) >= p.MAX_NOTED_FETCHES or time.monotonic() - self._untold_since >= NOTE_INTERVAL_S:
            self._tell_untold()

    def _tell_untold(self) -> None:
        """Send the board fetches not yet told, in one ``FetchNote`` not waited for. Under the lock. The note names
        the epoch of the store they were made from: whoever serves the endpoint now refuses it if that store was
        closed or replaced since (``StaleEpoch``; the reply is dropped unread, as every note's is)."""
        untold, self._untold = self._untold, []
        if not untold:
            return
        try:
            self._conn.notify(p.FetchNote(self._untold_epoch, untold))
        except LoraIpcError:
            pass  # only metrics are lost

    def _remember_spot(self, name: str, server, reply: p.FetchReply, slab: ImportedSlab) -> None:
        """After a fetch by request: where ``name``'s board entry is read from now on, if it can be."""
        if reply.board_entry is None or not slab.COPIES_WITHOUT_REQUEST or not self._watching(server):
            self._spots.pop(name)
            return
        self._spots.put(name, BoardSpot(server, reply.board_entry, reply.epoch, key_for(server, reply.slab_id)))

    def _watching(self, server) -> bool:
        """Whether ``server``'s process is watched (a new watch when the server changed, or when the watched process
        exited: ``server`` just answered, so its pid now names a new process) and alive."""
        if self._watch is not None and (self._watch.pid != server.pid or not self._watch.alive()):
            self._watch.close()
            self._watch = None
        if self._watch is None:
            try:
                self._watch = ServerWatch(server.pid)
            except (OSError, AttributeError):  # no pidfd here (or no such process): every fetch asks
                return False
        return self._watch.alive()

    def close(self) -> None:
        """Close the client; never waits: a request in flight finishes and then closes the socket.
        Later calls raise ``ClientClosed``."""
        self._closed = True
        if self._lock.acquire(blocking=False):
            try:
                self._shutdown()
            finally:
                self._lock.release()

    def _shutdown(self) -> None:  # under the lock
        if not self._conn.closed:
            self._tell_untold()  # sent as the socket closes: best effort (the socket does not linger)
            self._spots.clear()
            self._slabs.clear()  # releases this client's hold on each import
            self._conn.close()
            if self._watch is not None:
                self._watch.close()
                self._watch = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- caches ----------------------------------------------------------------------------

    def _slab_for(self, server, reply: p.FetchReply, deadline: float | None = None) -> ImportedSlab:
        """The import of the reply's slab, as served by ``server`` (Note [imports are keyed by who served them])."""
        if server is None:
            raise ProtocolError(f"cannot tell which process serves {self.endpoint}; reply refused")
        key = ImportKey(server.endpoint, server.pid, reply.slab_id)
        slab = self._slabs.get(key)
        if slab is not None:
            if reply.slab is not None:
                REGISTRY.consume_surplus(server, reply.slab_id, reply.slab, slab)
            return slab
        key, slab = REGISTRY.acquire(server, reply.slab_id, reply.slab, self._receive_fds, deadline)
        return self._slabs.put(key, slab)

    def _config_for(self, reply: p.FetchReply) -> dict:
        config = self._configs.get(reply.config_digest)
        if config is None:
            if reply.config is None:
                raise ProtocolError("reply omits a config this client does not have")
            if p.digest_of(reply.config) != reply.config_digest:
                raise ProtocolError("config digest does not match the config")
            config = self._configs.put(reply.config_digest, reply.config)
        return config

    def _layout_for(self, reply: p.FetchReply, slab: ImportedSlab) -> SlabLayout:
        layout = self._layouts.get(reply.layout_digest)
        if layout is None:
            if reply.entries is None:
                raise ProtocolError("reply omits a layout this client does not have")
            layout = SlabLayout.from_wire(reply.entries, reply.used_bytes, slab.nbytes)
            if layout.digest != reply.layout_digest:
                raise ProtocolError("layout digest does not match its entries")
            self._layouts.put(layout.digest, layout)
        if layout.used_bytes != reply.used_bytes or layout.used_bytes > slab.nbytes:
            raise LayoutError(f"layout of {layout.used_bytes} bytes does not fit slab {slab.slab_id} ({slab.nbytes})")
        return layout

    def _forget_dead_slabs(self, server, live: builtins.list[str]) -> None:
        """Let go of slabs the server no longer lists, and of every slab of a server that was replaced."""
        live_set = set(live)
        for key in [
            k
            for k in self._slabs
            if (k.endpoint, k.server_pid) != (server.endpoint, server.pid) or k.slab_id not in live_set
        ]:
            self._slabs.pop(key)
            REGISTRY.release(key)


def _check_reply(reply: p.FetchReply, name: str, version: int | None, limit: int) -> None:
    """Before anything is imported or allocated: the reply is for what was asked, and affordable."""
    if reply.name != name or (version is not None and reply.version != version):
        asked = f"{name!r} v{version}" if version is not None else f"the newest {name!r}"
        raise ProtocolError(f"asked for {asked}, the reply is for {reply.name!r:.80} v{reply.version}; refused")
    if reply.used_bytes > limit:
        raise LimitExceeded(
            f"{name!r} v{reply.version} needs {reply.used_bytes} bytes, more than this client "
            f"copies in one fetch ({limit}; max_fetch_bytes / ${ENV_MAX_FETCH_BYTES})"
        )

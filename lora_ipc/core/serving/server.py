"""The ZeroMQ loop over a :class:`TensorSetStore`: a thread inside a trainer, or the daemon's main loop.

One ROUTER socket. Each request is answered on its own from the store (no request waits for another
client), every frame is validated by ``protocol.decode`` and every failure becomes an ``ErrorReply``
to the sender and a log line; the loop itself never dies on a peer's input.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import zmq

from .. import protocol as p
from ..backends import ImportedSlab, open_slab
from ..channels.connection import make_socket
from ..channels.endpoint import prepare_ipc_path
from ..channels.fdchannel import FdServer
from ..channels.guard import ConnectionGuard, socket_identity
from ..errors import LeaseError, LoraIpcError, ProtocolError, StaleEpoch
from ..lru import BoundedLRU
from ..memory.layout import SlabLayout
from .store import TensorSetStore

log = logging.getLogger(__name__)
POLL_MS = 50
# Replies queued per peer. A client has one request in flight plus a few fire-and-forget release
# replies it reads later; a peer whose queue is full does not read its replies and is disconnected.
# Bytes queued per peer <= SEND_HWM x the largest reply: MAX_LISTED_BYTES (+ a few KiB) for list and
# status, one layout for a fetch (see docs/design/security-internals.md).
SEND_HWM = 8
MAX_LISTED_BYTES = 64 << 10  # what a list or status reply lists one by one; the rest is counted
TRIM_INTERVAL_S = 1.0  # after peers went away, give freed heap back to the OS at most this often
MAX_PUBLISH_SOURCES = 8  # publishers' staging slabs a daemon keeps mapped (CUDA IPC handles must not be re-opened)
UNSEEN_GRACE_S = 0.5  # a lease holder on a connection the guard had not seen is taken for alive this long


class PeerConnection(NamedTuple):
    """The connection a peer's messages came on (Note [a message names its connection late]): the fd they were
    read from, the guard's serial for that connection (None where the guard had not seen it yet) and its
    socket's (device, inode) (:func:`~..channels.guard.socket_identity`; None if it could not be read)."""

    fd: int
    serial: int | None
    socket: tuple[int, int] | None


NO_CONNECTION = PeerConnection(-1, None, None)


def _filter_peers(sock: zmq.Socket, uids: set[int]) -> bool:
    """Accept ipc connections only from these uids (SO_PEERCRED, checked by libzmq at connect time).

    The socket file is also 0600 in a 0700 directory; this is the second check, against a process
    that gets hold of the path anyway. Returns False where libzmq cannot filter.
    """
    try:
        for uid in uids:
            sock.setsockopt(zmq.IPC_FILTER_UID, uid)
        return True
    except (AttributeError, zmq.ZMQError) as exc:
        log.warning("peer credential check unavailable on this platform (%s); relying on file permissions", exc)
        return False


def publish_source_key(peer: bytes, handle: p.SlabHandle) -> tuple:
    """What a daemon keys a publisher's opened staging slab by: the connection that sent it and the memory the
    handle names. A CUDA handle's ref-counter fields change with every publish (each carries a fresh export,
    Note [one export per import]); the memory they export does not. Nor does a token (a CPU staging memfd is
    pushed again with each publish)."""
    if isinstance(handle, p.CudaSlabHandle):
        handle = msgspec.structs.replace(
            handle,
            ref_counter_handle=b"",
            ref_counter_offset=0,
            event_handle=b"",
            event_sync_required=False,
            token=None,
        )
    elif isinstance(handle, p.CpuSlabHandle):
        handle = msgspec.structs.replace(handle, token=p.NO_TOKEN)
    elif handle.channel_token is not None:
        handle = msgspec.structs.replace(handle, token=None)
    return (peer, handle)


class TensorSetServer:
    def __init__(
        self,
        store: TensorSetStore,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        allowed_uids: set[int] | None = None,
    ):
        self.store = store
        self.endpoint = endpoint
        self._path = prepare_ipc_path(endpoint)
        self._sock = make_socket(context, zmq.ROUTER)
        self._sock.setsockopt(zmq.SNDHWM, SEND_HWM)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full queue is reported (and its peer dropped)
        self.peer_check = _filter_peers(self._sock, {os.getuid()} if allowed_uids is None else allowed_uids)
        self.guard = ConnectionGuard(self._sock, self._path)  # before bind: it must see every connection
        try:
            self._sock.bind(endpoint)
            os.chmod(self._path, 0o600)
        except BaseException:
            self.guard.close()
            self._sock.close(0)
            raise
        # slabs' descriptors by SCM_RIGHTS beside the ZeroMQ socket (fdchannel.py)
        try:
            self._fds = FdServer(endpoint, {os.getuid()} if allowed_uids is None else allowed_uids)
        except BaseException:
            self.guard.close()
            self._sock.close(0)
            os.unlink(self._path)
            raise
        self._trimmed_at = (0.0, 0)
        # routing id -> the connection it came on (Note [a message names its connection late])
        self._peers: BoundedLRU[bytes, PeerConnection] = BoundedLRU(4 * self.guard.cap)
        # routing ids holding leases -> their connection and when it was first named so (Note [leases die with
        # their connection], store.py)
        self._fetchers: dict[bytes, tuple[PeerConnection, float]] = {}
        self._asking = NO_CONNECTION  # the connection of the request being served
        store.holder_alive = self._holder_alive
        self.requests = 0
        # (publishing connection, its handle) -> import: see _on_publish
        self._publish_sources: BoundedLRU[tuple[bytes, p.SlabHandle], ImportedSlab] = BoundedLRU(
            MAX_PUBLISH_SOURCES, lambda _, s: s.close()
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handlers: dict[type[p.Message], Callable[[Any, bytes], p.Message]] = {  # by the message's type
            p.ListRequest: self._on_list,
            p.FetchRequest: self._on_fetch,
            p.ReleaseRequest: self._on_release,
            p.FetchNote: self._on_fetch_note,
            p.PublishRequest: self._on_publish,
            p.StatusRequest: self._on_status,
        }

    # ---- loop ------------------------------------------------------------------------------

    def serve_forever(self) -> None:
        self._fds.start()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                self._release_closed()
                if not poller.poll(POLL_MS):
                    self.store.expire_leases()
                    self._trim_after_disconnects()
                    continue
                for _ in range(1024):  # a bounded batch, then the loop's own checks
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    fd = _source_fd(frames[-1])
                    self.guard.touch(fd)
                    self._serve_one([f.bytes for f in frames], self._connection_of(frames[0].bytes, fd))
        finally:
            self._fds.stop()
            self._publish_sources.clear()
            self.guard.close()
            self._sock.close(0)
            try:
                os.unlink(self._path)
            except OSError:  # already gone (or replaced by a newer server's socket, which must stay)
                pass

    def _trim_after_disconnects(self) -> None:
        """Peers that went away leave their freed reply buffers in malloc's arenas: hand them back."""
        at, seen = self._trimmed_at
        now = time.monotonic()
        if self.guard.disconnects != seen and now - at >= TRIM_INTERVAL_S:
            self._trimmed_at = (now, self.guard.disconnects)
            _malloc_trim()

    def _connection_of(self, identity: bytes, fd: int) -> PeerConnection:
        """The connection a peer's messages come on: its fd, the guard's serial for it and its socket's inode,
        as first seen.

        Note [a message names its connection late]
            A message's ``SRCFD`` is the fd it was read from, but messages already read stay queued in
            the socket after their connection closed, and by the time the server reads them the fd may
            belong to another peer. So the server pins each peer (routing id) to the connection it
            first came on; a drop names that connection and the guard refuses it once the fd is
            another one. Pinned before the guard saw the accept, a peer is pinned to the previous
            connection and is never dropped for not reading (the guard's cap still sheds it).

        Note [a connection is known by its socket's inode]
            The guard learns of accepts and closes from libzmq's monitor, in a thread that runs behind the
            server loop, so its serial for an fd can be the previous connection's. Every client probes the
            endpoint (connect, close) just before its ZeroMQ socket connects, and that connection usually
            gets the probe's fd number: its first request was taken for the probe's connection, and when the
            guard then saw the probe's close, the client's leases were dropped (under load). The inode of the
            socket an fd is when a message is read names the connection itself: while that socket lives, no
            other has its inode, and libzmq closes the fd when the peer goes. So a close on a holder's fd
            drops its leases only if its socket is no longer there, whatever serial it was pinned to.
        """
        pinned = self._peers.get(identity)
        if pinned is None or pinned.fd != fd:
            pinned = self._peers.put(identity, PeerConnection(fd, self.guard.connection(fd), socket_identity(fd)))
        return pinned

    @staticmethod
    def _socket_open(connection: PeerConnection) -> bool | None:
        """Whether the holder's connection is still open, told by its socket's inode; None where it is unknown."""
        if connection.socket is None:
            return None
        return socket_identity(connection.fd) == connection.socket

    def _release_closed(self) -> None:
        """Leases of connections the guard saw close are released now (Note [leases die with their
        connection], store.py), not ``lease_timeout_s`` later: a holder whose fd closed goes if its socket is
        gone (Note [a connection is known by its socket's inode]); where its inode is unknown, if its serial
        closed, or with the next connection that closes on its fd if it was pinned with no serial."""
        closed = self.guard.closed
        if not closed:
            return
        serials: set[int] = set()
        fds: set[int] = set()
        while closed:
            fd, serial = closed.popleft()
            serials.add(serial)
            fds.add(fd)
        for holder, (connection, _) in list(self._fetchers.items()):
            gone = False
            if connection.fd in fds:
                is_open = self._socket_open(connection)
                if is_open is not None:
                    gone = not is_open
                else:
                    gone = connection.serial is None or connection.serial in serials
            if gone or not self.store.holds_leases(holder):
                del self._fetchers[holder]
                self.store.release_holder(holder)

    def _holder_alive(self, holder: bytes) -> bool:
        """Whether the connection that took ``holder``'s leases is still open (True for holders that are
        not this server's peers, such as a relay's own)."""
        entry = self._fetchers.get(holder)
        if entry is None:
            return True
        connection, since = entry
        is_open = self._socket_open(connection)
        if is_open is not None:
            return is_open
        if connection.serial is None:
            # named when the guard knew no connection on its fd: one not seen yet (alive, and seen within
            # moments) or one already closed (its message read late). Which, no one can tell later: the fd
            # may carry another connection by then. Given the benefit of the doubt for a while only.
            return time.monotonic() - since < UNSEEN_GRACE_S
        return self.guard.is_open(connection.serial)

    def _serve_one(self, frames: list[bytes], connection: PeerConnection = NO_CONNECTION) -> None:
        # DEALER peers send [identity, b"", payload]; anything else is answered with an error if addressable
        self.requests += 1
        if len(frames) < 2:
            return
        identity, payload = frames[0], frames[-1]
        request_id = 0
        message: p.Message | None = None
        self._asking = connection
        try:
            frame = p.decode(payload, p.REQUEST_TYPES)
            request_id, message = frame.request_id, frame.message
            reply = self._handlers[type(message)](message, identity)
        except LoraIpcError as exc:
            if isinstance(exc, ProtocolError):  # the id of a request that could not be decoded
                request_id = exc.request_id or request_id
            self.store.count_error(exc)
            # a release that lost the race with a publish revoking its lease is routine (the reader's copy
            # was checked by the slab's generation), and so is a note of board fetches made before a restart:
            # counted, not shouted
            late = (isinstance(exc, LeaseError) and isinstance(message, p.ReleaseRequest)) or (
                isinstance(exc, StaleEpoch) and isinstance(message, p.FetchNote)
            )
            log.log(
                logging.DEBUG if late else logging.WARNING,
                "request %d rejected: %s: %.500s",
                request_id,
                type(exc).__name__,
                exc,
            )
            reply = p.ErrorReply.from_error(exc)
        except Exception as exc:  # a bug of ours: the peer still gets a typed reply
            self.store.count_error(exc)
            log.exception("request %d failed", request_id)
            reply = p.ErrorReply("LoraIpcError", f"internal error: {type(exc).__name__}: {exc}")
        self._reply(identity, p.encode(reply, request_id), connection, request_id)

    def _reply(self, identity: bytes, payload: bytes, connection: PeerConnection, request_id: int) -> None:
        """Send one reply without blocking; a peer that does not read its replies is disconnected.

        Note [a full queue, judged late]
            libzmq learns that a peer read its replies from commands its IO thread sends every
            SEND_HWM/2 replies, and the socket processes those commands lazily: every 100 messages
            received, when a receive finds nothing, when polled. A server busy with many peers can
            go on receiving for a while, so a fast client that reads everything may look SEND_HWM
            replies behind (a legitimate client was dropped this way under load). Before judging,
            the pending commands are processed (``ZMQ_EVENTS`` does that) and the send tried again:
            what is then still queued is at most SEND_HWM/2 - 1 replies behind the truth.
        """
        frames = [identity, b"", payload]
        try:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                self._sock.getsockopt(zmq.EVENTS)  # process pending commands: the peer's reads catch up
                self._sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:  # still SEND_HWM replies unread: a peer that does not read is disconnected
            if self.guard.drop(connection.fd, connection.serial):
                log.warning("peer on fd %d does not read its replies: disconnected", connection[0])
        except zmq.ZMQError as exc:  # peer gone (EHOSTUNREACH): never block the loop on one client
            if exc.errno != errno.EHOSTUNREACH:
                log.info("reply to request %d dropped: %s", request_id, exc)

    # ---- handlers --------------------------------------------------------------------------

    def _on_list(self, msg: p.ListRequest, peer: bytes) -> p.ListReply:
        if msg.name is not None:  # one name: never cut, whatever the catalog's size
            found = self.store.summary(msg.name)
            return p.ListReply([] if found is None else [found], self.store.epoch)
        listed, left_out = self.store.summaries(max_bytes=MAX_LISTED_BYTES)
        return p.ListReply(
            listed[: p.MAX_SETS_LISTED], self.store.epoch, left_out + max(0, len(listed) - p.MAX_SETS_LISTED)
        )

    def _on_fetch(self, msg: p.FetchRequest, peer: bytes) -> p.FetchReply:
        lease, pv = self.store.lease(msg.name, msg.version, peer, msg.client_id, msg.epoch)
        known = self._fetchers.get(peer)
        if known is None or known[0] != self._asking:  # its leases go with this connection
            self._fetchers[peer] = (self._asking, time.monotonic())
        if msg.transport == "host":
            try:
                self.store.stage_to_host(pv)
            except BaseException:
                self.store.release(lease.lease_id, peer)
                raise
        slab, generation = pv.slab_for(msg.transport)
        layout = pv.layout
        try:
            handle = None if slab.slab_id in msg.known_slabs else slab.handle_for_import()
        except BaseException:  # e.g. LimitExceeded: the lease taken above must not leak
            self.store.release(lease.lease_id, peer)
            raise
        return p.FetchReply(
            name=pv.name,
            version=pv.version,
            lease_id=lease.lease_id,
            config_digest=pv.config_digest,
            config=None if pv.config_digest in msg.known_configs else pv.config,
            slab_id=slab.slab_id,
            slab=None if handle is None else self._fds.attach(slab, handle),
            generation=generation,
            layout_digest=layout.digest,
            entries=None if layout.digest in msg.known_layouts else layout.to_wire(),
            used_bytes=layout.used_bytes,
            live_slabs=self.store.live_slab_ids(),
            epoch=self.store.epoch,
            board_entry=self.store.board_entry(pv.name) if slab is pv.slab else None,  # not for a host-staged copy
        )

    def _on_release(self, msg: p.ReleaseRequest, peer: bytes) -> p.ReleaseReply:
        self.store.release(msg.lease_id, peer, msg.fetch_ms)
        return p.ReleaseReply(msg.lease_id)

    def _on_fetch_note(self, msg: p.FetchNote, peer: bytes) -> p.FetchNoteReply:
        return p.FetchNoteReply(self.store.count_board_fetches(msg.epoch, msg.fetches))

    def _on_publish(self, msg: p.PublishRequest, peer: bytes) -> p.PublishReply:
        """Copy a publisher's staging slab in. The slab is opened once and kept (CUDA IPC handles must not
        be re-opened), keyed by the connection that sent it (its ROUTER identity) and the whole handle
        (name, size; the CUDA memory handle): an import made for one connection is never used for another,
        whatever slab id either of them names. A CPU staging slab's memfd comes only by the daemon's
        descriptor channel, pushed with the token the handle names (a handle naming none is refused)."""
        layout = SlabLayout.from_wire(msg.entries, msg.used_bytes, msg.slab.nbytes)
        key = publish_source_key(peer, msg.slab)
        source = self._publish_sources.get(key)
        token = msg.slab.channel_token
        pushed = self._fds.take_pushed(token) if token else []  # fdchannel.py
        try:
            if source is None:  # a publisher's staging slab: opened once, kept while it is in use
                source = self._publish_sources.put(
                    key, open_slab(msg.slab, (lambda _token: [pushed.pop()]) if pushed else None)
                )
            else:
                source.consume(msg.slab)  # every publish carries a fresh export (Note [one export per import])
        finally:
            for fd in pushed:  # not taken (the slab was open already, or the import failed first)
                os.close(fd)
        version = self.store.publish_copy(msg.name, layout, msg.config, source.copy_into, source.device)
        return p.PublishReply(msg.name, version)

    def _on_status(self, msg: p.StatusRequest, peer: bytes) -> p.StatusReply:
        g = self.guard
        server = p.ServerStatus(g.live, g.cap, g.peak, g.dropped, self.requests)
        report = self.store.status(max_listed_bytes=MAX_LISTED_BYTES)
        return p.StatusReply(msgspec.structs.replace(report, endpoint=self.endpoint, pid=os.getpid(), server=server))

    # ---- thread ----------------------------------------------------------------------------

    def start(self) -> TensorSetServer:
        self._thread = threading.Thread(target=self.serve_forever, name="lora-ipc-server", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._fds.stop()  # never served: its descriptor socket goes too


def _source_fd(frame: zmq.Frame) -> int:
    """The fd of the connection a message came in on (libzmq's ZMQ_SRCFD; -1 where unsupported)."""
    try:
        return frame.get(zmq.SRCFD)
    except (zmq.ZMQError, AttributeError):
        return -1


def _load_malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_MALLOC_TRIM = _load_malloc_trim()


def _malloc_trim() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)

"""The descriptor channel: slabs travel as file descriptors (``SCM_RIGHTS``) beside the ZeroMQ socket.

Note [why descriptors travel by a side socket]
    ZeroMQ cannot carry descriptors, and opening ``/proc/<pid>/fd/<n>`` would need the exporter's pid to
    mean the same process on both sides (one pid namespace) plus ptrace-read permission, and would trust a
    pid and fd number the peer wrote into its handle. A descriptor received over a Unix socket needs none of
    that: a trainer and an engine in two containers of one pod, or two pods on one node sharing a socket
    directory, can exchange slabs. It is the only way a descriptor reaches an importer (protocol 3: handles
    carry no pid or fd; a peer without a channel is ``FdChannelUnavailable``, no fallback).

    Each server listens on ``<its ipc path>.fd`` (SOCK_SEQPACKET, 0600, in the same directory, so the
    endpoint's trusted-directory rules cover it). A fetch reply that carries a slab handle carries a
    one-time ``token`` (16 random bytes, single use, expiring after ``TOKEN_TTL_S``); the client
    connects, checks the listener's uid and pid with ``SO_PEERCRED`` (the pid must be the one the kernel
    reports for the ZeroMQ connection the reply came on: the memory is the answering server's own, which
    is what a handle's pid once claimed), sends the token and receives the slab's descriptor (CPU, VMM),
    plus the descriptor of the exporter's generation table when the slab has one (a CUDA IPC handle's
    token redeems that table alone). The server checks the connecting peer's uid the same way.

    The other direction: a ``RemoteExporter`` pushes its staging slab's memfd to a daemon
    (``b"P" + token`` with exactly one descriptor, the token of its own choosing), then names that
    token in its ``PublishRequest``; the daemon takes the descriptor once (bounded, expiring) and
    checks it like any other. A push is the only request that may carry a descriptor.

    The wire (its bytes are declared in ``lora_ipc.core.protocol.descriptors``): request = ``b"F" + token``
    (17 bytes, exactly). Reply = ``b"K" + <count byte>`` with ``count`` descriptors attached, or
    ``b"E" + <utf-8 reason>`` with none (``b"G"``: the memory was freed since the token was issued, which an
    importer treats as a recycled slab and fetches again). Anything else, and any
    descriptor a peer sends unasked, is refused and closed: the receiving side always takes the
    ancillary data (``MSG_CMSG_CLOEXEC``), closes what it did not ask for, and treats a truncated
    control message (``MSG_CTRUNC``: the receiver ran out of descriptors) as an error.
    The importer checks every descriptor it gets (shm.check_sealed: sealed, our name, owner, size,
    reserved; reopened read-only), before it opens anything through it (Note [open nothing a peer chose
    before knowing what it is], shm.py).

Note [shares of the channel]
    A same-uid peer can connect and say nothing (for ``CONNECTION_TIMEOUT_S``), or push descriptors it
    never publishes. Neither may cost another peer its turn (peers.py: Note [a fork cannot buy a bigger
    share]):

    - connections: at ``MAX_CONNECTIONS`` a new connection is still accepted, and the oldest connection
      of the heaviest peer (group, then process) is dropped to make room. A squatter holding many
      connections, from one process, from many of one group, or through exited connectors, loses its
      own; a client that connects and asks at once is never the one dropped while it is not the heaviest.
    - pushes: each is held for the process that pushed it (its pidfd), at most ``PUSHED_PER_PROCESS``
      per process (its own oldest makes room), ``MAX_PUSHED`` in all. A push of another process is never
      evicted: when the table is full, entries of processes that exited and expired entries go first,
      and if none did the new push is refused (its publisher gets a typed error, nobody loses theirs).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import selectors
import socket
import stat
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar, Protocol, cast

import msgspec

from ..errors import BackendError, EndpointNotTrusted, SlabRecycled
from ..memory.shm import MEMFD_PREFIX
from ..protocol.descriptors import (
    ERR,
    GONE,
    MAX_FDS,
    MAX_REPLY,
    PUSH,
    SUFFIX,
    TOKEN_BYTES,
    UCRED,
    fetch_request,
    ok_reply,
    push_request,
    read_ok,
    read_request,
    refusal,
)
from .endpoint import _check_dir_chain, ipc_path
from .peers import Peer, Process, heaviest, peer_of_socket

if TYPE_CHECKING:
    from ..protocol import SlabHandle


class DescriptorSource(Protocol):
    """What the channel needs of an exported slab (``backends.base.ExportedSlab``, a layer above): whether
    its memory travels as a descriptor, a duplicate of that descriptor, and this process's descriptor of the
    generation table its handle names (-1: none)."""

    passes_descriptor: ClassVar[bool]
    generation_fd: int

    def descriptor(self) -> int: ...


log = logging.getLogger(__name__)

TOKEN_TTL_S = 60.0
MAX_TOKENS = 1024  # outstanding tokens per server; the oldest is dropped first
MAX_CONNECTIONS = 64  # open connections on the server at once; past it the heaviest peer's oldest is dropped
CONNECTION_TIMEOUT_S = 5.0  # a peer must send its request within this (a same-uid peer; bounded by MAX_CONNECTIONS)
MAX_PUSHED = 128  # pushed descriptors a server holds until their PublishRequest arrives (Note [shares of the channel])
PUSHED_PER_PROCESS = 2  # of them, per pushing process: its own oldest makes room for its next
PUSHED_TTL_S = 30.0


def fd_socket_path(endpoint: str) -> str:
    """The descriptor socket beside ``endpoint``'s ipc socket (never chosen by a peer)."""
    return ipc_path(endpoint) + SUFFIX


def _peer_cred(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the peer as the kernel reports them (pid 0: a process in a pid namespace we cannot see)."""
    pid, uid, _gid = UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
    return pid, uid


def _peer_uid(sock: socket.socket) -> int:
    return _peer_cred(sock)[1]


def _recv(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One message and the descriptors attached to it (at most ``maxfds``; extra ones are closed by the
    kernel). Raises BackendError when the control message was truncated (the fds did not arrive)."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_REPLY, max(maxfds, 1), socket.MSG_CMSG_CLOEXEC)
    if flags & socket.MSG_CTRUNC:
        _close_all(fds)
        raise BackendError(
            "descriptor not delivered (control message truncated: out of file descriptors, or more "
            "descriptors than asked for)"
        )
    return data, fds


def _close_all(fds) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


# --------------------------------------------------------------------------------------------
# server side
# --------------------------------------------------------------------------------------------

#: what a token redeems: a callable returning duplicates of the descriptors to send (BackendError if gone)
Provider = Callable[[], list[int]]


class TokenTable:
    """One-time tokens: issued with a fetch reply, redeemed once, expiring; bounded in number."""

    def __init__(self, ttl_s: float = TOKEN_TTL_S, limit: int = MAX_TOKENS):
        self.ttl_s = ttl_s
        self.limit = limit
        self._tokens: OrderedDict[bytes, tuple[float, Provider]] = OrderedDict()
        self._lock = threading.Lock()

    def issue(self, provider: Provider) -> bytes:
        token = secrets.token_bytes(TOKEN_BYTES)
        with self._lock:
            self._tokens[token] = (time.monotonic() + self.ttl_s, provider)
            while len(self._tokens) > self.limit:
                self._tokens.popitem(last=False)
        return token

    def redeem(self, token: bytes) -> Provider:
        with self._lock:
            entry = self._tokens.pop(token, None)
        if entry is None or entry[0] < time.monotonic():
            raise BackendError("unknown, expired or already used descriptor token")
        return entry[1]

    def __len__(self) -> int:
        return len(self._tokens)


class FdServer:
    """Listens on ``<endpoint path>.fd`` and hands out descriptors for tokens (a thread of its own)."""

    def __init__(self, endpoint: str, allowed_uids: set[int]):
        self.path = fd_socket_path(endpoint)
        self.allowed_uids = set(allowed_uids)
        self.tokens = TokenTable()
        self.refused = 0  # requests refused (bad token, wrong uid, malformed, descriptors sent unasked)
        if os.path.lexists(self.path):  # ours and stale: prepare_ipc_path has vetted the directory and endpoint
            st = os.lstat(self.path)
            if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
                raise EndpointNotTrusted(f"{self.path} exists and is not a socket of ours")
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._listener.bind(self.path)
            os.chmod(self.path, 0o600)
            self._listener.listen(64)
            self._listener.setblocking(False)
        except OSError as exc:
            self._listener.close()
            raise BackendError(f"cannot listen on {self.path}: {exc}") from None
        self._sel = selectors.DefaultSelector()  # made here: the process's descriptors are all open after init
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._starved = False
        self._pushed: OrderedDict[bytes, tuple[float, int, Process]] = OrderedDict()  # token -> deadline, fd, pusher
        self._pushed_lock = threading.Lock()

    def take_pushed(self, token: bytes) -> list[int]:
        """The descriptor a publisher pushed with ``token`` (once); the caller owns it."""
        with self._pushed_lock:
            entry = self._pushed.pop(bytes(token), None)
        if entry is None:
            raise BackendError("no descriptor was pushed with this token (or it expired)")
        deadline, fd, pusher = entry
        pusher.close()
        if deadline < time.monotonic():
            os.close(fd)
            raise BackendError("the pushed descriptor expired before its publish request arrived")
        return [fd]

    def _keep_pushed(self, token: bytes, fd: int, pusher: Process) -> None:
        """Hold ``fd`` for ``pusher`` (Note [shares of the channel]); BackendError (nothing kept) if it
        cannot be held without evicting another process's push. Owns ``fd`` and ``pusher`` either way."""
        now = time.monotonic()
        dropped: list[tuple[float, int, Process]] = []
        try:
            with self._pushed_lock:
                if token in self._pushed:
                    raise BackendError("a descriptor was already pushed with this token")
                mine = [t for t, (_, _, p) in self._pushed.items() if p.key == pusher.key]
                while len(mine) >= PUSHED_PER_PROCESS:  # its own oldest makes room
                    dropped.append(self._pushed.pop(mine.pop(0)))
                if len(self._pushed) >= MAX_PUSHED:  # expired entries, and those of exited processes
                    for t in [t for t, (d, _, p) in self._pushed.items() if d < now or not p.alive()]:
                        dropped.append(self._pushed.pop(t))
                if len(self._pushed) >= MAX_PUSHED:
                    raise BackendError(
                        f"{len(self._pushed)} pushed descriptors of other processes are waiting for their publish "
                        "requests; try again"
                    )
                self._pushed[token] = (now + PUSHED_TTL_S, fd, pusher)
        except BaseException:
            _close_all([fd])
            pusher.close()
            raise
        finally:
            for _, old_fd, old_pusher in dropped:
                _close_all([old_fd])
                old_pusher.close()

    def offer(self, provider: Provider) -> bytes:
        return self.tokens.issue(provider)

    def start(self) -> FdServer:
        self._thread = threading.Thread(target=self._serve, name="lora-ipc-fds", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._thread is None:
            self._sel.close()
        with contextlib.suppress(OSError):
            self._listener.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        with self._pushed_lock:
            for _, fd, pusher in self._pushed.values():
                _close_all([fd])
                pusher.close()
            self._pushed.clear()

    # ---- loop ------------------------------------------------------------------------------

    def _serve(self) -> None:
        sel = self._sel
        deadlines: dict[socket.socket, float] = {}  # in accept order: the oldest first
        paused_until = 0.0
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.05):
                    if key.data is None:
                        if time.monotonic() >= paused_until and not self._accept(sel, deadlines):
                            paused_until = time.monotonic() + 0.05  # out of descriptors: let it pass
                    else:
                        conn = cast(socket.socket, key.fileobj)  # registered by _accept
                        self._answer(conn)
                        self._drop(sel, deadlines, conn)
                now = time.monotonic()
                for conn in [c for c, d in deadlines.items() if d < now]:
                    self.refused += 1
                    self._drop(sel, deadlines, conn)
        finally:
            for conn in list(deadlines):
                self._drop(sel, deadlines, conn)
            sel.close()

    def _accept(self, sel, deadlines) -> bool:
        try:
            conn, _ = self._listener.accept()
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                if not self._starved:  # once per episode, not every retry
                    log.warning("descriptor channel: cannot accept (%s); retrying", exc)
                self._starved = True
                return False
            raise
        if self._starved:
            self._starved = False
            log.warning("descriptor channel: accepting again")
        who = peer_of_socket(conn)
        if who.uid not in self.allowed_uids:
            self.refused += 1
            conn.close()
            return True
        if len(deadlines) >= MAX_CONNECTIONS:  # Note [shares of the channel]
            self.refused += 1
            self._drop(sel, deadlines, self._heaviest_oldest(sel, deadlines))
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, who)
        deadlines[conn] = time.monotonic() + CONNECTION_TIMEOUT_S
        return True

    @staticmethod
    def _heaviest_oldest(sel, deadlines: dict[socket.socket, float]) -> socket.socket:
        """The oldest connection of the process holding the most connections within the group holding the most."""
        peers = {conn: cast(Peer, sel.get_key(conn).data) for conn in deadlines}
        shares = Counter(who.share for who in peers.values())
        share = heaviest(shares)
        processes = Counter(who.proc for who in peers.values() if who.share == share)
        proc = heaviest(processes)
        return next(conn for conn, who in peers.items() if who.share == share and who.proc == proc)

    @staticmethod
    def _drop(sel, deadlines, conn) -> None:
        deadlines.pop(conn, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn)
        conn.close()

    def _answer(self, conn: socket.socket) -> None:
        try:
            data, unasked = _recv(conn, 4)
        except (OSError, BackendError) as exc:
            self.refused += 1
            log.info("descriptor channel: request dropped: %s", exc)
            return
        try:
            request = read_request(data, len(unasked))
            if request is not None and request[0] == PUSH:
                self._keep_pushed(request[1], unasked.pop(), Process(conn))  # owned by the table now (or closed)
                conn.send(ok_reply(0))
                return
            if unasked:
                raise BackendError(f"{len(unasked)} descriptors sent unasked (closed)")
            if request is None:
                raise BackendError("malformed descriptor request")
            fds = self.tokens.redeem(request[1])()  # duplicates: closed once sent
            try:
                if not 1 <= len(fds) <= MAX_FDS:
                    raise BackendError(f"internal: {len(fds)} descriptors for one token")
                socket.send_fds(conn, [ok_reply(len(fds))], fds)
            finally:
                _close_all(fds)
        except BackendError as exc:
            self.refused += 1
            log.info("descriptor channel: request refused: %s", exc)
            with contextlib.suppress(OSError):
                conn.send(refusal(str(exc), gone=isinstance(exc, SlabGone)))
        except OSError as exc:
            self.refused += 1
            log.info("descriptor channel: reply dropped: %s", exc)
        finally:
            _close_all(unasked)

    def attach(self, slab: DescriptorSource, handle: SlabHandle) -> SlabHandle:
        """``handle`` with a fresh token that redeems ``slab``'s descriptor (where its memory travels as one)
        and its generation table's (where the handle names a slot): the only way either reaches an importer.
        Unchanged for a handle that needs neither (a CUDA IPC handle without a generation slot)."""
        passes = slab.passes_descriptor and handle.PASSES_DESCRIPTOR
        slot = handle.generation
        if not passes and slot is None:
            return handle
        table_fd = slab.generation_fd

        def provider() -> list[int]:
            fds = [slab.descriptor()] if passes else []
            try:
                if slot is not None:
                    fds.append(memfd_descriptor(table_fd, slot.table))
            except BaseException:
                _close_all(fds)
                raise
            return fds

        return msgspec.structs.replace(handle, token=self.offer(provider))


def memfd_descriptor(fd: int, name: str) -> int:
    """A duplicate of ``fd`` if it is this process's memfd ``name`` (a closed store's fd number is reused);
    the caller closes it. Checked on the duplicate, so a close racing with this cannot send another file."""

    try:
        copy = os.dup(fd) if fd >= 0 else -1
    except OSError:
        copy = -1
    try:
        target = os.readlink(f"/proc/self/fd/{copy}") if copy >= 0 else ""
    except OSError:
        target = ""
    if target != f"/memfd:{MEMFD_PREFIX}{name} (deleted)":
        if copy >= 0:
            os.close(copy)
        raise SlabGone(f"shared memory {name!r} is gone")
    return copy


# --------------------------------------------------------------------------------------------
# client side
# --------------------------------------------------------------------------------------------


class SlabGone(BackendError):
    """Server side: the memory a token names was freed since (its version evicted, its lease revoked)."""


class ChannelFailed(BackendError):
    """The descriptor channel did not deliver within the fetch's time (no answer, refused, reset): a
    property of the exporter's channel, not of the slab, so no reason to fall back to host copies."""


class FdChannelUnavailable(ChannelFailed):
    """The peer has no descriptor channel: nothing can be imported from it, or pushed to it (descriptors
    travel by no other way)."""


def _remaining(deadline: float, path: str) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise ChannelFailed(f"descriptor channel {path}: no descriptor within the fetch's timeout")
    return left


class FdReceiver:
    """Redeems tokens at the descriptor socket beside ``endpoint``; the caller owns the fds returned."""

    def __init__(self, endpoint: str, trusted_uids: set[int] | None = None, timeout_s: float = 10.0):
        self.endpoint = endpoint
        self.trusted_uids = {os.getuid()} if trusted_uids is None else set(trusted_uids)
        self.timeout_s = timeout_s

    def __call__(self, token: bytes, expected_pid: int | None = None, deadline: float | None = None) -> list[int]:
        """The descriptors ``token`` names. ``expected_pid``: the pid the kernel reports for the ZeroMQ
        server the token came from; the channel must be served by that same process (imports.py).
        ``deadline`` (``time.monotonic()``): the whole exchange (connect, send, receive) ends by then, and
        by ``timeout_s`` from now at the latest, whatever the peer does (``ChannelFailed``)."""
        path = fd_socket_path(self.endpoint)
        end = time.monotonic() + self.timeout_s
        end = end if deadline is None else min(end, deadline)
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise FdChannelUnavailable(f"no descriptor channel at {path}: {exc}") from None
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in self.trusted_uids:
            raise EndpointNotTrusted(f"{path} is not a socket of a trusted uid (uid {st.st_uid})")
        _check_dir_chain(os.path.dirname(os.path.abspath(path)), self.trusted_uids)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open the descriptor channel: {exc}") from None
        with sock:
            try:
                sock.settimeout(_remaining(end, path))
                sock.connect(path)
                pid, uid = _peer_cred(sock)
                if uid not in self.trusted_uids:
                    raise EndpointNotTrusted(f"{path} is served by uid {uid}, not {sorted(self.trusted_uids)}")
                if expected_pid is not None and pid != expected_pid:
                    raise EndpointNotTrusted(
                        f"{path} is served by process {pid}, but {self.endpoint} by process "
                        f"{expected_pid}: descriptor refused"
                    )
                sock.settimeout(_remaining(end, path))
                sock.send(fetch_request(token))
                sock.settimeout(_remaining(end, path))
                data, fds = _recv(sock, MAX_FDS)
            except TimeoutError:
                raise ChannelFailed(f"descriptor channel {path}: no answer within the fetch's timeout") from None
            except OSError as exc:
                raise ChannelFailed(f"descriptor channel {path}: {exc}") from None
        if read_ok(data, len(fds)):
            return fds
        _close_all(fds)
        if not data and not fds:  # closed on us (a server out of room, or gone): the channel, not the slab
            raise ChannelFailed(f"descriptor channel {path}: closed without an answer")
        if data[:1] == GONE:  # the slab was freed after the fetch reply: fetch again (not a failing import)
            raise SlabRecycled(f"slab freed before its descriptor was taken: {data[1:].decode(errors='replace')[:300]}")
        if data[:1] == ERR:
            raise BackendError(f"descriptor refused by the exporter: {data[1:].decode(errors='replace')[:300]}")
        raise BackendError(f"malformed descriptor reply ({len(data)} bytes, {len(fds)} descriptors)")


def push_fd(endpoint: str, fd: int, trusted_uids: set[int] | None = None, timeout_s: float = 10.0) -> bytes:
    """Hand ``fd`` to the server at ``endpoint`` (a publisher's staging slab); returns the token to name it by.
    ``FdChannelUnavailable`` if the server has no descriptor channel."""
    trusted = {os.getuid()} if trusted_uids is None else set(trusted_uids)
    path = fd_socket_path(endpoint)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise FdChannelUnavailable(f"no descriptor channel at {path}: {exc}") from None
    if not stat.S_ISSOCK(st.st_mode) or st.st_uid not in trusted:
        raise EndpointNotTrusted(f"{path} is not a socket of a trusted uid (uid {st.st_uid})")
    _check_dir_chain(os.path.dirname(os.path.abspath(path)), trusted)
    token = secrets.token_bytes(TOKEN_BYTES)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(timeout_s)
            sock.connect(path)
            uid = _peer_uid(sock)
            if uid not in trusted:
                raise EndpointNotTrusted(f"{path} is served by uid {uid}, not {sorted(trusted)}")
            socket.send_fds(sock, [push_request(token)], [fd])
            data, fds = _recv(sock, 1)
    except OSError as exc:
        raise BackendError(f"descriptor channel {path}: {exc}") from None
    _close_all(fds)
    if data != ok_reply(0) or fds:
        raise BackendError(f"descriptor push refused: {data[1:].decode(errors='replace')[:300]}")
    return token

"""Connection guard for a server's ROUTER: no number of peers can make libzmq abort the process.

Note [why a guard]
    libzmq's ``ipc_listener_t::accept`` asserts on any ``accept()`` errno it does not expect, and
    EMFILE is not among them (libzmq 4.3.5, src/ipc_listener.cpp): the first connection that finds
    the process out of file descriptors aborts it (SIGABRT, "Too many open files"). libzmq has no
    connection limit of its own, so the server keeps one:

    1. At start the soft ``RLIMIT_NOFILE`` is raised to the hard one (where the kernel allows).
    2. ``cap`` connections at most, sized so that as many fds again, plus ``RESERVE_FDS`` for the
       rest of the process, stay free above it (the headroom that absorbs a burst the guard has not
       seen yet), and no more than ``MAX_CONNECTIONS`` (memory: see the server's per-peer budget).
    3. A socket monitor (``EVENT_ACCEPTED``: its value is the accepted fd; ``EVENT_DISCONNECTED``)
       counts live connections in a thread of its own, which blocks on the monitor and reacts
       without waiting for the server loop. Over ``cap`` it drops connections by ``shutdown()`` on
       a dup of their fd (after checking the fd is still a socket accepted on our path): libzmq
       then reads EOF, closes its fd and reports DISCONNECTED. ``ZMQ_BACKLOG`` is small, so few
       connections wait in the kernel queue.
    4. Whom to drop: a connection of the peer (peers.py, Note [a fork cannot buy a bigger share]: its
       uid and cgroup, taken at accept; connectors that exited are one peer, and so are those that
       can be neither seen nor asked) that holds the most connections, and of its connections first
       one that never sent a request (oldest first), then the least recently active (``touch(fd)``,
       called by the server with each request's ``SRCFD``). Forking a child per connection buys an
       attacker nothing (before, each child was a "peer" of its own and a legitimate client with two
       connections looked the heaviest), and a flood that reconnects as fast as it is dropped arrives
       as never-active connections, dropped before any connection that asked something.

    Not done: unbinding the listener at the cap. libzmq's listener owns the sessions it accepted,
    so ``zmq_unbind`` closes every connection accepted on it, the legitimate ones included.
    Residual risk: the guard reacts after libzmq's IO thread has accepted. Between the moment the
    count passes ``cap`` and the moment the guard thread runs (it needs the GIL; a thread holding
    the GIL in a long C call delays it), at most the headroom (``cap + RESERVE_FDS`` fds, or much
    more where the hard limit could be raised) may be accepted. A local attacker who opens
    connections faster than that within one GIL hand-over, at a hard limit too low to raise,
    could still exhaust the fds. A higher hard limit (systemd ``LimitNOFILE``, ``ulimit -Hn``)
    makes the headroom as large as the limit. An attacker spreading a flood over as many
    processes as there are slots makes legitimate clients reconnect (they do so on their own), it
    cannot kill the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource
import socket
import struct
import threading
import time
from collections import OrderedDict, deque

import zmq

from .peers import heaviest, peer_of_fd

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 512  # per server; with the per-peer reply budget this bounds queued reply memory
MIN_CONNECTIONS = 16  # even at a tiny fd limit a server takes this many (its fds are then at risk: logged)
RESERVE_FDS = 128  # fds left for everything else in the process (slabs, files, the trainer's own)
BACKLOG = 16  # connections waiting in the kernel queue (libzmq's default is 100)
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_POLL_MS = 100
_EVENT = struct.Struct("=Hi")  # a monitor event's first frame: event, value (for ACCEPTED: the fd)


def socket_identity(fd: int) -> tuple[int, int] | None:
    """The (device, inode) of what ``fd`` is now, None if nothing. A socket's inode number is its own while it
    lives, so it tells a connection from an earlier or later one with the same fd number, and whether it is
    still open (libzmq closes a connection's fd when the peer goes); the device keeps an fd reused for a file
    of another filesystem with the same inode number from passing for it."""
    try:
        st = os.fstat(fd)
    except OSError:  # EBADF: closed (or -1, no fd at all)
        return None
    return st.st_dev, st.st_ino


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard limit (to ``fs.nr_open`` when the hard one is
    unlimited); returns the limits in force afterwards. Failing to raise is not an error."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.info("could not raise the soft fd limit from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def open_fd_count() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # listdir's own fd
    except OSError:
        return 0


def connection_cap(soft_limit: int, open_fds: int, maximum: int = MAX_CONNECTIONS) -> int:
    """Connections a server may hold: a third of what is free above ``RESERVE_FDS``, the rest
    being the burst headroom; at most ``maximum``, at least ``MIN_CONNECTIONS``."""
    if soft_limit == resource.RLIM_INFINITY:
        return maximum
    return max(MIN_CONNECTIONS, min(maximum, (soft_limit - open_fds - RESERVE_FDS) // 3))


class _SockAddrUn(ctypes.Structure):
    _fields_ = [("family", ctypes.c_ushort), ("path", ctypes.c_char * 108)]


_LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_getsockname, _getsockopt, _shutdown = _LIBC.getsockname, _LIBC.getsockopt, _LIBC.shutdown
_BUFFERS = (_SockAddrUn(), ctypes.c_uint32(), (ctypes.c_int * 3)(), ctypes.c_uint32())
_ADDR_REF, _ALEN_REF, _CRED_REF, _CLEN_REF = (ctypes.byref(b) for b in _BUFFERS)


def _peer_pid_if_ours(fd: int, path: bytes, shutdown: bool) -> int | None:
    """The peer pid of ``fd`` if it is a unix socket whose local name is ``path`` (one accepted by
    our listener), else None; with ``shutdown``, also shut it down. Plain syscalls on the fd
    libzmq owns (no dup: it must work when fds are short, and fast)."""
    addr, alen, cred, clen = _BUFFERS  # only the guard thread calls this (under its lock)
    alen.value = ctypes.sizeof(addr)
    if _getsockname(fd, _ADDR_REF, _ALEN_REF) != 0 or addr.family != socket.AF_UNIX or addr.path != path:
        return None
    clen.value = ctypes.sizeof(cred)
    if _getsockopt(fd, socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED_REF, _CLEN_REF) != 0:
        return None
    if shutdown and _shutdown(fd, socket.SHUT_RDWR) != 0:
        return None
    return cred[0]


class _Held:
    """One peer's connections: those that never sent a request (accept order), then the others (least
    recently active first). The first is the one to drop."""

    __slots__ = ("idle", "active")

    def __init__(self):
        self.idle: OrderedDict[int, None] = OrderedDict()
        self.active: OrderedDict[int, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.idle) + len(self.active)

    def __contains__(self, fd: int) -> bool:
        return fd in self.idle or fd in self.active

    def touch(self, fd: int) -> None:
        if self.idle.pop(fd, 0) is None:  # its first request
            self.active[fd] = None
        elif fd in self.active:
            self.active.move_to_end(fd)

    def remove(self, fd: int) -> None:
        self.idle.pop(fd, None)
        self.active.pop(fd, None)

    def first(self) -> int:
        return next(iter(self.idle or self.active))


class ConnectionGuard:
    """Counts and caps the connections of one ROUTER. Create it before ``bind`` (the monitor must
    see every connection); the socket's owner thread calls :meth:`close` before closing the socket."""

    def __init__(self, sock: zmq.Socket, path: str, *, max_connections: int = MAX_CONNECTIONS):
        soft, _hard = raise_nofile_limit()
        self.cap = connection_cap(soft, open_fd_count(), max_connections)
        if soft != resource.RLIM_INFINITY and soft - open_fd_count() - RESERVE_FDS < 2 * self.cap:
            log.warning(
                "fd limit %d leaves little headroom above %d connections: raise it (ulimit -Hn)", soft, self.cap
            )
        self._path = os.fsencode(path)
        sock.setsockopt(zmq.BACKLOG, BACKLOG)
        self._inproc = f"inproc://lora-ipc-guard-{os.getpid()}-{id(self):x}"
        sock.monitor(self._inproc, _EVENTS)
        self._sock = sock
        self._mon = sock.context.socket(zmq.PAIR)
        self._mon.setsockopt(zmq.LINGER, 0)
        self._mon.setsockopt(zmq.RCVHWM, 0)  # never lose an event (a lost DISCONNECTED would leak a slot)
        self._mon.connect(self._inproc)
        self._lock = threading.Lock()
        self._active: dict[int, float] = {}  # fd -> last activity (monotonic)
        self._share_of: dict[int, tuple] = {}  # fd -> the peer it counts for (peers.Peer.share)
        self._by_share: dict[tuple, _Held] = {}  # peer -> its fds not being dropped, the first to drop first
        # (fd, serial) of connections that went away, for the server to drain (bounded: one it missed is only late)
        self.closed: deque[tuple[int, int]] = deque(maxlen=1 << 16)
        self._dropping: set[int] = set()  # shut down, DISCONNECTED not seen yet
        # fds a request came in on before this thread saw their accept (its monitor runs behind the server
        # loop); the accept then counts the connection as active, not as one that never asked
        self._asked_before_accept: set[int] = set()
        self._serial: dict[int, int] = {}  # fd -> which connection accepted on it (numbers are reused)
        self._live_serials: set[int] = set()
        self._accepted = 0
        self.dropped = 0
        self.sheds = 0
        self.peak = 0
        self.disconnects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lora-ipc-guard", daemon=True)
        self._thread.start()

    # ---- what the server loop calls -----------------------------------------------------------

    @property
    def live(self) -> int:
        return len(self._active)

    def touch(self, fd: int) -> None:
        """A request arrived on connection ``fd``."""
        with self._lock:
            if fd in self._active:
                self._active[fd] = time.monotonic()
                held = self._by_share.get(self._share_of.get(fd, ()))  # set with _active: always there
                if held is not None:
                    held.touch(fd)
            elif fd >= 0:  # its accept is still in the monitor's queue (at most one entry per fd number)
                self._asked_before_accept.add(fd)

    def connection(self, fd: int) -> int | None:
        """Which connection ``fd`` is now (a serial number, new with each accept), None if not one of ours."""
        return self._serial.get(fd)

    def is_open(self, connection: int | None) -> bool:
        """Whether the connection with this serial is still open (as far as the guard has seen)."""
        return connection is not None and connection in self._live_serials

    def drop(self, fd: int, connection: int | None) -> bool:
        """Disconnect the peer on ``fd`` (e.g. one that does not read its replies), if ``fd`` still is
        ``connection``: a message read after its connection closed names an fd that another connection
        may have by now (see Note [a message names its connection late] in server.py)."""
        with self._lock:
            return (
                connection is not None
                and self._serial.get(fd) == connection
                and fd in self._active
                and fd not in self._dropping
                and self._drop(fd)
            )

    def close(self) -> None:
        """Stop monitoring (call from the socket's owner thread, before closing the socket)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:  # no monitor left to disable (the socket is closing): nothing to undo
            pass
        self._stop.set()
        self._thread.join(2.0)

    # ---- the guard thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._mon.poll(_POLL_MS):
                    continue
                recv, unpack, on_event = self._mon.recv, _EVENT.unpack_from, self._on_event
                while True:
                    try:
                        head = recv(zmq.NOBLOCK)
                        recv(zmq.NOBLOCK)  # the endpoint (always ours)
                    except zmq.Again:
                        break
                    if len(head) >= 6:
                        on_event(*unpack(head))
                with self._lock:
                    self._shed()
        except zmq.ZMQError as exc:  # context terminated under us: nothing left to guard
            log.debug("guard stopped: %s", exc)
        finally:
            self._mon.close(0)

    def _on_event(self, event: int, fd: int) -> None:
        with self._lock:
            if event == zmq.EVENT_ACCEPTED:
                self._forget(fd)  # a reused number: the old connection is gone
                self._accepted += 1
                self._serial[fd] = self._accepted
                self._live_serials.add(self._accepted)
                ours = _peer_pid_if_ours(fd, self._path, False) is not None  # else: closed again, DISCONNECTED follows
                share = peer_of_fd(fd).share if ours else (-1, "gone")
                self._active[fd] = time.monotonic()
                self._share_of[fd] = share
                held = self._by_share.setdefault(share, _Held())
                held.idle[fd] = None
                if fd in self._asked_before_accept:  # it asked before this thread saw it: not a squatter
                    self._asked_before_accept.discard(fd)
                    held.touch(fd)
                self.peak = max(self.peak, len(self._active))
                if len(self._active) - len(self._dropping) > self.cap + 64:
                    self._shed()  # far behind: do not wait for the end of the batch
            elif event == zmq.EVENT_DISCONNECTED:
                self._forget(fd)
                self.disconnects += 1

    def _forget(self, fd: int) -> None:
        self._active.pop(fd, None)
        serial = self._serial.pop(fd, None)
        if serial is not None:
            self._live_serials.discard(serial)
            self.closed.append((fd, serial))
        self._dropping.discard(fd)
        self._unlist(fd, self._share_of.pop(fd, None))

    def _unlist(self, fd: int, share: tuple | None) -> None:
        if share is None:
            return
        held = self._by_share.get(share)
        if held is not None:
            held.remove(fd)
            if not held:
                del self._by_share[share]

    def _shed(self) -> None:
        """Over ``cap``: drop connections of the process holding the most, least recently active first."""
        excess = len(self._active) - len(self._dropping) - self.cap
        if excess <= 0:
            return
        self.sheds += 1
        sizes = {share: len(held) for share, held in self._by_share.items()}
        if self.sheds in (1, 10, 100, 1000, 10000, 100000) and sizes:
            share = heaviest(sizes)
            log.warning(
                "%d connections (cap %d): dropping those of uid %d, group %s (%d) first (round %d)",
                len(self._active),
                self.cap,
                share[0],
                share[1],
                sizes[share],
                self.sheds,
            )
        while excess > 0 and sizes:
            share = heaviest(sizes)
            victim = self._by_share[share].first()  # never active, else least recently active
            sizes[share] -= 1
            if not sizes[share]:
                del sizes[share]
            if not self._drop(victim):  # not (any more) a connection of ours: forget it
                self._forget(victim)
            excess -= 1

    def _drop(self, fd: int) -> bool:
        """Shut ``fd`` down if it still is a connection of ours (lock held)."""
        if _peer_pid_if_ours(fd, self._path, True) is None:
            return False
        self._dropping.add(fd)
        self._unlist(fd, self._share_of.get(fd))
        self.dropped += 1
        return True

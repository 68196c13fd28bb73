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
    4. Whom to drop: a connection of the peer process (``SO_PEERCRED`` pid, taken at accept) that
       holds the most connections, and of its connections the least recently active (``touch(fd)``,
       called by the server with each request's ``SRCFD``). A client process holds one or two
       connections, so a flood from a few processes is dropped first, however it reconnects.

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

import logging
import os
import resource
import socket
import struct
import threading
import time

import zmq

log = logging.getLogger("lora_ipc.guard")

MAX_CONNECTIONS = 512  # per server; with the per-peer reply budget this bounds queued reply memory
MIN_CONNECTIONS = 16  # even at a tiny fd limit a server takes this many (its fds are then at risk: logged)
RESERVE_FDS = 128  # fds left for everything else in the process (slabs, files, the trainer's own)
BACKLOG = 16  # connections waiting in the kernel queue (libzmq's default is 100)
_EVENTS = zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED
_POLL_MS = 100


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
    """Connections a server may hold: half of what is free above ``RESERVE_FDS``, the other half
    being the burst headroom; at most ``maximum``, at least ``MIN_CONNECTIONS``."""
    if soft_limit == resource.RLIM_INFINITY:
        return maximum
    return max(MIN_CONNECTIONS, min(maximum, (soft_limit - open_fds - RESERVE_FDS) // 2))


class ConnectionGuard:
    """Counts and caps the connections of one ROUTER. Create it before ``bind`` (the monitor must
    see every connection); the socket's owner thread calls :meth:`close` before closing the socket."""

    def __init__(self, sock: zmq.Socket, path: str, *, max_connections: int = MAX_CONNECTIONS):
        soft, _hard = raise_nofile_limit()
        self.cap = connection_cap(soft, open_fd_count(), max_connections)
        if soft != resource.RLIM_INFINITY and soft - open_fd_count() - RESERVE_FDS < 2 * self.cap:
            log.warning("fd limit %d leaves little headroom above %d connections: raise it (ulimit -Hn)",
                        soft, self.cap)
        self._path = path
        self._abs_path = os.path.abspath(path)
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
        self._pid_of: dict[int, int] = {}  # fd -> peer pid (0: unknown)
        self._by_pid: dict[int, set[int]] = {}  # peer pid -> its fds not being dropped
        self._dropping: set[int] = set()  # shut down, DISCONNECTED not seen yet
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
        if fd in self._active:
            self._active[fd] = time.monotonic()

    def drop(self, fd: int) -> bool:
        """Disconnect the peer on ``fd`` (e.g. one that does not read its replies)."""
        with self._lock:
            return fd in self._active and fd not in self._dropping and self._drop(fd)

    def close(self) -> None:
        """Stop monitoring (call from the socket's owner thread, before closing the socket)."""
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._stop.set()
        self._thread.join(2.0)

    # ---- the guard thread ---------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._mon.poll(_POLL_MS):
                    continue
                while True:
                    try:
                        frames = self._mon.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if len(frames) >= 1 and len(frames[0]) >= 6:
                        event, value = struct.unpack("=Hi", frames[0][:6])
                        self._on_event(event, value)
        except zmq.ZMQError as exc:  # context terminated under us: nothing left to guard
            log.debug("guard stopped: %s", exc)
        finally:
            self._mon.close(0)

    def _on_event(self, event: int, fd: int) -> None:
        with self._lock:
            if event == zmq.EVENT_ACCEPTED:
                self._forget(fd)  # a reused number: the old connection is gone
                pid = self._inspect(fd)
                self._active[fd] = time.monotonic()
                self._pid_of[fd] = pid or 0  # None: already closed again, DISCONNECTED follows
                self._by_pid.setdefault(pid or 0, set()).add(fd)
                self.peak = max(self.peak, len(self._active))
                self._shed()
            elif event == zmq.EVENT_DISCONNECTED:
                self._forget(fd)
                self.disconnects += 1

    def _forget(self, fd: int) -> None:
        self._active.pop(fd, None)
        self._dropping.discard(fd)
        self._unlist(fd, self._pid_of.pop(fd, None))

    def _unlist(self, fd: int, pid: int | None) -> None:
        fds = self._by_pid.get(pid) if pid is not None else None
        if fds is not None:
            fds.discard(fd)
            if not fds:
                del self._by_pid[pid]

    def _shed(self) -> None:
        """Over ``cap``: drop connections of the process holding the most, least recently active first."""
        excess = len(self._active) - len(self._dropping) - self.cap
        if excess <= 0:
            return
        self.sheds += 1
        if self.sheds in (1, 10, 100, 1000, 10000, 100000):
            pid, fds = max(self._by_pid.items(), key=lambda kv: len(kv[1]))
            log.warning("%d connections (cap %d): dropping those of pid %d (%d) first (round %d)",
                        len(self._active), self.cap, pid, len(fds), self.sheds)
        while excess > 0 and self._by_pid:
            _pid, fds = max(self._by_pid.items(), key=lambda kv: len(kv[1]))
            victim = min(fds, key=lambda f: self._active.get(f, 0.0))
            if not self._drop(victim):  # not (any more) a connection of ours: forget it
                self._forget(victim)
            excess -= 1

    def _drop(self, fd: int) -> bool:
        """Shut ``fd`` down if it still is a connection of ours (lock held)."""
        if self._inspect(fd, shutdown=True) is None:
            return False
        self._dropping.add(fd)
        self._unlist(fd, self._pid_of.get(fd))
        self.dropped += 1
        return True

    def _inspect(self, fd: int, shutdown: bool = False) -> int | None:
        """The peer pid of ``fd`` if it is a socket accepted on our path (the number may have been
        closed by libzmq and reused by the process for something else since the event), else None;
        with ``shutdown``, also shut it down."""
        try:
            dup = os.dup(fd)
        except OSError:
            return None
        try:
            s = socket.socket(fileno=dup)
        except OSError:
            os.close(dup)
            return None
        try:
            if s.family != socket.AF_UNIX or s.getsockname() not in (self._path, self._abs_path):
                return None
            pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            if shutdown:
                s.shutdown(socket.SHUT_RDWR)
            return pid
        except OSError:
            return None
        finally:
            s.close()

"""Who is on the other end of a Unix socket, as the kernel reports it, in terms a fork cannot multiply.

Note [a fork cannot buy a bigger share]
    A server shares out what it holds (the connection guard's slots, the descriptor channel's
    connections and pushed descriptors) among its peers. ``SO_PEERCRED``'s pid is no peer: a process
    that forks a child per connection (the child connects, passes the socket back and exits) is as
    many "peers" as it likes, each with one connection, and a legitimate client with two connections
    looks like the heaviest; across pid namespaces every outside peer is pid 0. So a share is counted
    by what a fork inherits and cannot change:

    - ``uid``: the kernel's, from ``SO_PEERCRED``;
    - ``group``: the cgroup of the connecting process, by its id (``SO_PEERPIDFD`` and
      ``PIDFD_GET_INFO``, Linux 6.13; else ``/proc/<pid>/cgroup``). A process cannot leave its cgroup
      without write access to another one, which a container or a batch job does not grant. A
      connector that already exited when the server looks is ``gone`` (a socket passed on: the fork
      trick); one in a pid namespace the server cannot see (``SO_PEERCRED`` pid 0; the kernel answers
      no pidfd question about it either) is ``hidden``: each of those is one group, however many
      processes are in it, and within a group the guard goes by activity (guard.py).

    ``proc`` names the process within its group (its pidfd's inode where pidfds have their own, Linux
    6.9, else its pid) for what is held per process; a process can fork, so no share is counted by it.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import select
import socket
import struct
from typing import NamedTuple

GONE = "gone"  # the connecting process exited before the server looked (its socket was passed on)
HIDDEN = "hidden"  # in a pid namespace this process cannot see, and no pidfd to ask
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5
_CRED = struct.Struct("3i")
_PIDFD_INFO = struct.Struct("QQIII")  # mask, cgroupid, pid, tgid, ppid: the start of struct pidfd_info
_PIDFD_INFO_SIZE = 64  # PIDFD_INFO_SIZE_VER0
_PIDFD_INFO_CGROUPID = 1 << 2
_PIDFD_GET_INFO = (3 << 30) | (_PIDFD_INFO_SIZE << 16) | (0xFF << 8) | 11  # _IOWR(PIDFS_IOCTL_MAGIC, 11, ...), 6.13
_LIBC = ctypes.CDLL(None, use_errno=True)


class Peer(NamedTuple):
    uid: int
    group: str
    proc: int

    @property
    def share(self) -> tuple[int, str]:
        """What a share is counted by: the uid and the group (Note [a fork cannot buy a bigger share])."""
        return self.uid, self.group


def _sockopt(fd: int, option: int, size: int) -> bytes | None:
    """``getsockopt(fd, SOL_SOCKET, option)`` on a raw descriptor (one libzmq owns: no dup, no object)."""
    buf = ctypes.create_string_buffer(size)
    length = ctypes.c_uint32(size)
    if _LIBC.getsockopt(fd, socket.SOL_SOCKET, option, buf, ctypes.byref(length)) != 0:
        return None
    return buf.raw[: length.value]


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))  # a pidfd turns readable when its process exits


def _cgroup_id_of_pidfd(pidfd: int) -> int | None:
    buf = bytearray(_PIDFD_INFO_SIZE)
    struct.pack_into("Q", buf, 0, _PIDFD_INFO_CGROUPID)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf, True)
    except OSError:
        return None
    mask, cgroup_id, *_ = _PIDFD_INFO.unpack_from(buf)
    return cgroup_id if mask & _PIDFD_INFO_CGROUPID else None


def cgroup_of(pid: int) -> str | None:
    """Process ``pid``'s cgroup, named as ``PIDFD_GET_INFO`` names it (the cgroup v2 directory's inode),
    or by the text of ``/proc/<pid>/cgroup`` where there is no v2 hierarchy; None if it is gone."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            text = f.read(4096).decode(errors="replace").strip()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            try:
                return str(os.stat("/sys/fs/cgroup" + line[3:].split(" ")[0]).st_ino)
            except OSError:
                break
    return text


@functools.cache
def _pidfds_have_own_inodes() -> bool:
    """pidfs (Linux 6.9+): a pidfd's inode number names its process; before, every pidfd shared one inode."""
    fds: list[int] = []
    try:
        fds = [os.pidfd_open(os.getpid()), os.pidfd_open(os.getppid() if os.getpid() == 1 else 1)]
        return os.fstat(fds[0]).st_ino != os.fstat(fds[1]).st_ino
    except (OSError, AttributeError):
        return False
    finally:
        for fd in fds:
            os.close(fd)


def peer_of_fd(fd: int) -> Peer:
    """The peer of the connected Unix socket ``fd`` (Note [a fork cannot buy a bigger share])."""
    raw = _sockopt(fd, socket.SO_PEERCRED, _CRED.size)
    if raw is None or len(raw) < _CRED.size:
        return Peer(-1, GONE, 0)
    pid, uid, _gid = _CRED.unpack(raw)
    group: str | None = None
    proc = pid
    pidfd_raw = _sockopt(fd, SO_PEERPIDFD, 4)
    pidfd = struct.unpack("i", pidfd_raw)[0] if pidfd_raw is not None and len(pidfd_raw) == 4 else -1
    if pidfd >= 0:
        try:
            if _exited(pidfd):
                return Peer(uid, GONE, 0)
            cgroup_id = _cgroup_id_of_pidfd(pidfd)
            group = None if cgroup_id is None else str(cgroup_id)
            if _pidfds_have_own_inodes():
                proc = os.fstat(pidfd).st_ino
        finally:
            os.close(pidfd)
    if group is None:
        if pid <= 0:
            return Peer(uid, HIDDEN, 0)
        group = cgroup_of(pid)
        if group is None:
            return Peer(uid, GONE, 0)
    return Peer(uid, "cgroup:" + group, proc)


def peer_of_socket(sock: socket.socket) -> Peer:
    return peer_of_fd(sock.fileno())


def heaviest(counts: dict):
    """The key with the largest count (the first such in iteration order: the oldest on a tie)."""
    return max(counts, key=counts.__getitem__)


class Process:
    """The very process at the other end of a socket, for what must die with its holder: a pidfd (neither
    a reused pid nor a pid namespace fools it). :meth:`alive`; :attr:`key`, one per process (where
    pidfds have no inodes of their own, the peer's pid: ``gone`` and ``hidden`` peers then share one).
    Close it when done."""

    def __init__(self, sock: socket.socket):
        self.peer = peer_of_socket(sock)
        raw = _sockopt(sock.fileno(), SO_PEERPIDFD, 4)
        self._pidfd = struct.unpack("i", raw)[0] if raw is not None and len(raw) == 4 else -1
        self.key = (self.peer.uid, self.peer.group, self.peer.proc)

    def alive(self) -> bool:
        """False once the process exited; where that cannot be known, whether it was there at all."""
        if self._pidfd < 0:
            return self.peer.group != GONE
        return not _exited(self._pidfd)

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1

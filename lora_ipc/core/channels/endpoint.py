"""Endpoints: where a server listens. Local ``ipc://`` sockets only, in directories only their owner controls.

Note [who may stand behind an endpoint]
    A Unix socket path is only as trustworthy as the directories above it: whoever can write the
    socket's directory can unlink our socket and bind their own. So a server refuses to bind in a
    directory that is not owned by its uid or that group/other can write, and every ancestor must be
    owned by root or that uid and be unwritable by others unless sticky (/tmp). A client checks the
    same chain for the server's uid and then asks the kernel who is listening (``SO_PEERCRED`` on a
    probe connection): a server of any uid but its own (or ``trusted_uids``) is refused with
    ``EndpointNotTrusted`` before a single request is sent.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
import tempfile
from dataclasses import dataclass

from .. import settings
from ..errors import EndpointInUse, EndpointNotTrusted, ExporterUnavailable, LoraIpcError

ENV_ENDPOINT = "LORA_IPC_ENDPOINT"

__all__ = [
    "ENV_ENDPOINT",
    "EndpointInUse",
    "ServerIdentity",
    "daemon_endpoint",
    "default_endpoint",
    "ipc_path",
    "prepare_ipc_path",
    "private_runtime_dir",
    "server_identity",
    "server_uid",
]


@dataclass(frozen=True)
class ServerIdentity:
    """Who serves an endpoint, as the kernel reports it (``SO_PEERCRED``): the listening process's pid
    and uid. Caches of what a server handed out are keyed by this, never by ids the server chose."""

    endpoint: str
    pid: int
    uid: int


def default_endpoint() -> str:
    """Where a new in-process exporter listens: ``$LORA_IPC_ENDPOINT``, else a socket in a fresh
    private (0700) directory. Clients never use this (it would invent a path nobody serves); they
    default to :func:`daemon_endpoint`."""
    env = settings.value(ENV_ENDPOINT)
    if env:
        return str(env)
    return "ipc://" + os.path.join(tempfile.mkdtemp(prefix="lora-ipc-"), "exporter.sock")


def daemon_endpoint() -> str:
    """Where ``lora-ipc serve`` listens by default: ``$LORA_IPC_ENDPOINT``, else a per-user private path."""
    env = settings.value(ENV_ENDPOINT)
    if env:
        return str(env)
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(tempfile.gettempdir(), f"lora-ipc-{os.getuid()}")
    return "ipc://" + os.path.join(base, "lora-ipc", "daemon.sock")


def user_runtime_dir() -> str | None:
    """``$XDG_RUNTIME_DIR`` when it is a directory of this uid that nobody else can enter (mode 0700, in a
    trusted chain), else None."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if not base or not os.path.isabs(base):
        return None
    try:
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            return None
        _check_ancestors(os.path.dirname(base), base, {os.getuid()})
    except (OSError, EndpointNotTrusted):
        return None
    return base


def private_runtime_dir(name: str) -> str:
    """A directory for this uid's sockets that no other user can create first or enter: ``name`` inside
    :func:`user_runtime_dir` (made 0700), else a fresh random one (``mkdtemp``, 0700). Never a predictable
    path in a shared directory such as /tmp: another user could make it first and deny every server that
    expects it (see Note [who may stand behind an endpoint]). Whoever needs the path learns it from the
    server that made it (e.g. a Ray relay's ``info()``)."""
    base = user_runtime_dir()
    if base is not None:
        directory = os.path.join(base, name)
        try:
            _make_private_dirs(directory)
            _check_dir_chain(directory, {os.getuid()})
            return directory
        except (OSError, EndpointNotTrusted):
            pass  # e.g. a stale entry of another kind there: a random directory instead
    return tempfile.mkdtemp(prefix=f"{name}-")


def trusted_dir(directory: str) -> bool:
    """Whether ``directory`` may hold this uid's sockets (the check a server makes before binding there)."""
    try:
        _check_dir_chain(directory, {os.getuid()})
    except (OSError, EndpointNotTrusted):
        return False
    return True


def ipc_path(endpoint: str) -> str:
    """The socket path of an ``ipc://`` endpoint; anything else (tcp://, inproc://) is refused, on both sides."""
    if not isinstance(endpoint, str) or not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
        raise LoraIpcError(
            f"endpoint {endpoint!r:.200}: only local ipc:// endpoints are supported (CUDA IPC and shared "
            "memory only work between processes on one machine)"
        )
    path = endpoint[len("ipc://") :]
    if "\0" in path or len(path) > 100:  # sun_path holds 108 bytes
        raise LoraIpcError(f"endpoint {endpoint!r:.200}: not a usable socket path")
    return path


def _check_dir_chain(directory: str, owner_uids: set[int]) -> None:
    """The socket's directory: a real directory owned by one of ``owner_uids``, not group/other
    writable. Its ancestors (symlinks resolved): owned by root or those uids, unwritable by others
    unless sticky."""
    try:
        st = os.lstat(directory)
    except OSError as exc:
        raise EndpointNotTrusted(f"cannot inspect {directory}: {exc}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise EndpointNotTrusted(f"{directory} is not a directory (a symlink?); refusing to use a socket in it")
    if st.st_uid not in owner_uids:
        raise EndpointNotTrusted(
            f"{directory} belongs to uid {st.st_uid}, not {sorted(owner_uids)}: another user "
            "could replace the socket in it. Remove it or pick another endpoint"
        )
    if st.st_mode & 0o022:
        raise EndpointNotTrusted(
            f"{directory} is writable by group/other (mode {stat.S_IMODE(st.st_mode):o}): "
            "another user could replace the socket in it. chmod go-w it or pick another endpoint"
        )
    _check_ancestors(os.path.dirname(directory), directory, owner_uids)


def _check_ancestors(parent: str, below: str, owner_uids: set[int]) -> None:
    parent = os.path.realpath(parent)
    while True:
        st = os.stat(parent)
        if st.st_uid not in owner_uids | {0}:
            raise EndpointNotTrusted(
                f"{parent}, above {below}, belongs to uid {st.st_uid}, not "
                f"{sorted(owner_uids)}: remove it or pick another endpoint"
            )
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise EndpointNotTrusted(f"{parent}, above {below}, is writable by group/other and not sticky")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def _make_private_dirs(directory: str) -> None:
    """Create missing components with mode 0700 (whatever the umask), each only inside a trusted parent."""
    missing = []
    d = directory
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    if missing:
        _check_ancestors(d, directory, {os.getuid()})  # never create anything inside someone else's directory
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass  # a racer made it: the chain check below decides whether we may use it


def prepare_ipc_path(endpoint: str) -> str:
    """Make (0700) or vet the socket's directory and refuse an endpoint a live server holds.

    ZeroMQ silently unlinks and steals an existing ipc socket file; checking first turns that into a
    clear error, while a stale file left by a dead server of ours is removed.
    """
    path = ipc_path(endpoint)
    directory = os.path.dirname(os.path.abspath(path))
    _make_private_dirs(directory)
    _check_dir_chain(directory, {os.getuid()})
    if os.path.lexists(path):
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            raise EndpointNotTrusted(f"{path} exists and is not a socket of ours; remove it or pick another endpoint")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
                raise
            os.unlink(path)
        else:
            raise EndpointInUse(f"{endpoint} is already served by another process; stop it or pick another --endpoint")
        finally:
            probe.close()
    return path


def server_uid(endpoint: str, trusted_uids: set[int]) -> int | None:
    """The uid of the process listening on ``endpoint`` if it is trusted; None if nothing listens yet.

    Raises ``EndpointNotTrusted`` for an untrusted directory chain, socket file or listener.
    """
    server = server_identity(endpoint, trusted_uids)
    return None if server is None else server.uid


PROBE_TIMEOUT_S = 1.0  # a listener whose accept queue stays full is "not serving yet", never a hang


def server_identity(endpoint: str, trusted_uids: set[int], timeout_s: float = PROBE_TIMEOUT_S) -> ServerIdentity | None:
    """Pid and uid of the process listening on ``endpoint`` (kernel-reported) if it is trusted; None
    if nothing listens yet, or if the listener's accept queue stayed full for ``timeout_s`` (a blocking
    connect to a full Unix listener waits for as long as the listener likes: a same-uid process that
    listens and never accepts must not hang its clients). Raises ``EndpointNotTrusted`` as
    :func:`server_uid` does, ``ExporterUnavailable`` when this process is out of descriptors."""
    path = ipc_path(endpoint)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        raise EndpointNotTrusted(f"{path} is not a socket")
    if st.st_uid not in trusted_uids:
        raise EndpointNotTrusted(
            f"{path} belongs to uid {st.st_uid}, not {sorted(trusted_uids)}; refusing to "
            "talk to it (pass trusted_uids to allow another user's server)"
        )
    _check_dir_chain(os.path.dirname(os.path.abspath(path)), trusted_uids)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError as exc:  # EMFILE/ENFILE: typed, not a raw OSError out of a fetch
        raise ExporterUnavailable(f"cannot open a socket to check who serves {path}: {exc}") from None
    try:
        probe.settimeout(timeout_s)
        probe.connect(path)
        pid, uid, _gid = struct.unpack(
            "3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        )
    except TimeoutError:
        return None  # its accept queue is full: not serving (yet); the caller waits up to its own deadline
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN):
            return None  # a stale file: nothing listens yet
        raise EndpointNotTrusted(f"cannot check who serves {path}: {exc}") from None
    finally:
        probe.close()
    if uid not in trusted_uids:
        raise EndpointNotTrusted(
            f"{path} is served by uid {uid}, not {sorted(trusted_uids)}; refusing to talk to "
            "it (pass trusted_uids to allow another user's server)"
        )
    return ServerIdentity(endpoint, pid, uid)

"""Endpoints: where a server listens. Local ``ipc://`` sockets only, owner-only permissions."""

from __future__ import annotations

import errno
import os
import socket
import tempfile

from .errors import LoraIpcError

ENV_ENDPOINT = "LORA_IPC_ENDPOINT"


class EndpointInUse(LoraIpcError):
    """Another live server already listens on this endpoint."""


def default_endpoint() -> str:
    """Where a new in-process exporter listens: ``$LORA_IPC_ENDPOINT``, else a socket in a fresh
    private (0700) directory. Clients never use this (it would invent a path nobody serves); they
    default to :func:`daemon_endpoint`."""
    env = os.environ.get(ENV_ENDPOINT)
    if env:
        return env
    return "ipc://" + os.path.join(tempfile.mkdtemp(prefix="lora-ipc-"), "exporter.sock")


def ipc_path(endpoint: str) -> str:
    if not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
        raise LoraIpcError(
            f"endpoint {endpoint!r}: only local ipc:// endpoints are supported (CUDA IPC and shared "
            "memory only work between processes on one machine)"
        )
    return endpoint[len("ipc://"):]


def prepare_ipc_path(endpoint: str) -> str:
    """Make the socket's directory (0700 when we create it) and refuse an endpoint a live server holds.

    ZeroMQ silently unlinks and steals an existing ipc socket file; checking first turns that into a
    clear error, while a stale file left by a dead server is removed.
    """
    path = ipc_path(endpoint)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            os.unlink(path)
        else:
            raise EndpointInUse(f"{endpoint} is already served by another process; stop it or pick another --endpoint")
        finally:
            probe.close()
    return path


def daemon_endpoint() -> str:
    """Where ``lora-ipc serve`` listens by default: ``$LORA_IPC_ENDPOINT``, else a per-user private path."""
    env = os.environ.get(ENV_ENDPOINT)
    if env:
        return env
    base = os.environ.get("XDG_RUNTIME_DIR") or os.path.join(tempfile.gettempdir(), f"lora-ipc-{os.getuid()}")
    return "ipc://" + os.path.join(base, "lora-ipc", "daemon.sock")

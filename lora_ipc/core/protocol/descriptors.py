"""The descriptor channel's bytes (``lora_ipc.core.channels.fdchannel`` speaks them; why it exists is its Note).

A ``SOCK_SEQPACKET`` Unix socket at ``<ipc path>`` + :data:`SUFFIX`. One connection carries one request and
one reply; each is one datagram, descriptors ride along as ``SCM_RIGHTS`` ancillary data.

Fetch (importer -> exporter), exactly 17 bytes, no descriptor::

    0      1                                  17
    +------+----------------------------------+
    | 'F'  | token (16 bytes, from the handle) |
    +------+----------------------------------+

Push (a ``RemoteExporter`` -> daemon), exactly 17 bytes, exactly one descriptor (its staging slab)::

    0      1                                  17
    +------+----------------------------------+
    | 'P'  | token (16 bytes, pusher's choice) |     + SCM_RIGHTS [slab fd]
    +------+----------------------------------+

Replies (exporter -> importer), at most :data:`MAX_REPLY` bytes::

    +------+-------+
    | 'K'  | count |     + SCM_RIGHTS [count descriptors]: the slab's (CPU, VMM), then its generation
    +------+-------+       table's; for a CUDA IPC handle the table's alone
                           (1 <= count <= MAX_FDS; a push is answered K 0 with none)

    +------+------------------------------+
    | 'E'  | reason (UTF-8, <= 511 bytes) |   refused; no descriptor
    +------+------------------------------+

    +------+------------------------------+
    | 'G'  | reason (UTF-8, <= 511 bytes) |   the memory was freed since the token was issued:
    +------+------------------------------+   fetch again (a recycled slab, not a failed import)

Anything else, and any descriptor a peer sends unasked, is refused and closed. The peer's identity is
the kernel's ``SO_PEERCRED`` (:data:`UCRED`: ``struct ucred``, three native ints pid, uid, gid), on both sides;
an importer takes descriptors only from the pid that answered its ZeroMQ request (handles name no process).
"""

from __future__ import annotations

import struct

SUFFIX = ".fd"  # the channel's socket: the endpoint's ipc path + this
TOKEN_BYTES = 16
MAX_FDS = 2  # a slab and its generation table
MAX_REPLY = 512  # bytes of a reply datagram (and of the largest request a server reads)

FETCH = b"F"
PUSH = b"P"
OK = b"K"
ERR = b"E"
GONE = b"G"  # the memory was freed after the token was issued (churn, not an error)

REQUEST_BYTES = 1 + TOKEN_BYTES
#: ``struct ucred`` as ``getsockopt(SOL_SOCKET, SO_PEERCRED)`` fills it: pid, uid, gid (native ints)
UCRED = struct.Struct("3i")


def fetch_request(token: bytes) -> bytes:
    """The fetch datagram for ``token``."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token has {TOKEN_BYTES} bytes, not {len(token)}")
    return FETCH + bytes(token)


def push_request(token: bytes) -> bytes:
    """The push datagram for ``token`` (sent with exactly one descriptor)."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"a token has {TOKEN_BYTES} bytes, not {len(token)}")
    return PUSH + bytes(token)


def ok_reply(count: int) -> bytes:
    """The reply that carries ``count`` descriptors (0 answers a push)."""
    if not 0 <= count <= MAX_FDS:
        raise ValueError(f"a reply carries 0 to {MAX_FDS} descriptors, not {count}")
    return OK + bytes([count])


def refusal(reason: str, gone: bool = False) -> bytes:
    """An ``E`` (or, ``gone``, a ``G``) reply: the kind byte and the reason, cut to fit :data:`MAX_REPLY`."""
    return (GONE if gone else ERR) + reason.encode()[: MAX_REPLY - 1]


def read_request(data: bytes, descriptors: int) -> tuple[bytes, bytes] | None:
    """(kind, token) of a well-formed request that came with ``descriptors`` descriptors: ``FETCH`` with
    none, ``PUSH`` with exactly one. None for anything else."""
    if len(data) != REQUEST_BYTES:
        return None
    kind = data[:1]
    if (kind == FETCH and descriptors == 0) or (kind == PUSH and descriptors == 1):
        return kind, bytes(data[1:])
    return None


def read_ok(data: bytes, descriptors: int) -> bool:
    """Whether ``data`` is the ``K`` reply for exactly the ``descriptors`` that came with it (1 to MAX_FDS)."""
    return data[:1] == OK and len(data) == 2 and data[1] == descriptors and 1 <= descriptors <= MAX_FDS

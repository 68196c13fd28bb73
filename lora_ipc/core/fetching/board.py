"""What a client keeps to fetch from an exporter's newest-version board (Note [a fetch without a request], client.py).

A :class:`BoardSpot` says where one name's board entry is read: which server wrote it, at which byte offset of
that server's generation table, through which of this client's imports (any import of that server carries the
table; the last slab fetched for the name is used). A :class:`ServerWatch` tells whether that server is still
alive: the board stays readable after its writer died, the server's socket does not.
"""

from __future__ import annotations

import os
import select
from dataclasses import dataclass

from ..channels.endpoint import ServerIdentity
from .imports import ImportKey


@dataclass
class BoardSpot:
    server: ServerIdentity  # who wrote the entry (the fetch reply that named it came from this process)
    offset: int  # the entry's byte offset in that server's generation table
    epoch: str  # the store's epoch the entry's version numbers are of
    via: ImportKey  # the import whose copy of the table descriptor the entry is read through


class ServerWatch:
    """Whether process ``pid`` (the server of a reply) still runs, through a pidfd: a pid reused by another
    process after it exits does not fool it. ``OSError`` where pidfds are missing (Linux before 5.3, another
    platform): no watch, so no fetch from the board."""

    def __init__(self, pid: int):
        self.pid = pid
        self._fd = os.pidfd_open(pid)
        self._poll = select.poll()  # not select(): a vLLM worker's descriptors can be numbered past FD_SETSIZE
        self._poll.register(self._fd, select.POLLIN)

    def alive(self) -> bool:
        if self._fd < 0:
            return False
        return not self._poll.poll(0)  # a pidfd polls readable once its process exited

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            self._poll.unregister(fd)
            os.close(fd)

    def __del__(self) -> None:  # a client collected without close() leaves no pidfd behind
        if getattr(self, "_fd", -1) >= 0:  # not when pidfd_open refused in __init__
            self.close()

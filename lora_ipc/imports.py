"""One import per slab per process, shared by every client in it (Note [one export per import], cuda.py).

Two ``AdapterClient``s in one process (or a client and the daemon's publish path) must not open the
same slab twice: each CUDA import consumes one export's ref counter. The registry counts the users
of each open slab and closes it when the last one lets go.
"""

from __future__ import annotations

import threading

from .backends import ImportedSlab, open_slab
from .errors import ProtocolError
from .protocol import SlabHandle

MAX_KNOWN_SENT = 64  # slab ids a fetch request may list (protocol limit)


class ImportRegistry:
    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, list] = {}  # slab_id -> [ImportedSlab, users]

    def acquire(self, slab_id: str, handle: SlabHandle | None, receive=None) -> ImportedSlab:
        """The process's import of ``slab_id`` (opened from ``handle`` if this process has none yet);
        a handle for a slab already open is consumed, not opened twice."""
        with self._lock:
            entry = self._open.get(slab_id)
            if entry is not None:
                entry[1] += 1
                if handle is not None:
                    entry[0].consume(handle)
                return entry[0]
            if handle is None or handle.slab_id != slab_id:
                raise ProtocolError(f"reply names slab {slab_id!r} but carries no handle for it")
            slab = open_slab(handle, receive)  # receive: the endpoint's descriptor channel (fdchannel.py)
            self._open[slab_id] = [slab, 1]
            return slab

    def release(self, slab_id: str) -> None:
        with self._lock:
            entry = self._open.get(slab_id)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] <= 0:
                del self._open[slab_id]
                entry[0].close()

    def known(self, preferred: list[str]) -> list[str]:
        """Slab ids to announce in a fetch: this client's first, then the process's, at most MAX_KNOWN_SENT."""
        with self._lock:
            ids = [s for s in preferred if s in self._open]
            ids += [s for s in self._open if s not in set(ids)]
            return ids[:MAX_KNOWN_SENT]

    def users(self, slab_id: str) -> int:
        with self._lock:
            entry = self._open.get(slab_id)
            return 0 if entry is None else entry[1]


REGISTRY = ImportRegistry()

"""The slabs under a store: allocation, recycling, one generation slot per slab, byte accounting.

The store (store.py) decides *when* a slab is needed and when it is free again (versions, the keep
policy, leases); this pool decides what memory that is. ``take`` hands out a recycled slab that fits
(at least the bytes asked, at most about twice) or allocates one, within ``max_bytes`` and
``max_slabs`` (``LimitExceeded``; unused free slabs are closed first to make room). ``give_back``
keeps at most ``max_free`` slabs for reuse, oldest closed first; a worn-out slab (CUDA: too many
exports on it) is closed instead. A training loop republishing one name reaches a steady state
that allocates nothing.

Note [a generation bump before every write]
    Every slab has a reuse counter (a slot of ``shm.GenerationTable``, named in the slab's handle).
    ``take`` bumps it before it returns the slab, so it has moved before the caller writes a byte.
    An importer that read the counter in a fetch reply and reads the same value after its copy knows
    no write had started when its copy ended; a lease revoked or expired under it shows as a moved
    counter (``SlabRecycled``), never as torn bytes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import msgspec
import torch

from ..backends import Backend, ExportedSlab, backend_for
from ..errors import LimitExceeded, StoreClosed
from ..memory.board import NewestEntry
from ..memory.shm import GenerationTable
from ..protocol import GenerationSlot


@dataclass(frozen=True)
class SlabCounts:
    live: int  # slabs held, in use or free
    free: int  # slabs kept for reuse
    bytes: int  # their sizes together
    allocated: int  # slabs allocated over the pool's life (recycling keeps this flat)


class SlabPool:
    def __init__(self, *, max_bytes: int, max_slabs: int, max_free: int, board_entries: int = 0):
        self.max_bytes = max_bytes
        self.max_slabs = max_slabs
        self.max_free = max_free
        self.board_entries = board_entries  # newest-version board entries after the generation counters (board.py)
        self._lock = threading.Lock()
        self._backends: dict[torch.device, Backend] = {}
        self._slabs: dict[str, ExportedSlab] = {}  # slab_id -> every live slab, in use or free
        self._slot_of: dict[str, int] = {}  # slab_id -> its generation slot
        self._free: list[ExportedSlab] = []  # oldest first
        self._bytes = 0  # live slabs' sizes, plus what allocations under way reserved
        self._allocated = 0
        self._generations: GenerationTable | None = None  # made with the first slab
        self._closed = False

    def take(self, device: torch.device, nbytes: int) -> tuple[ExportedSlab, int]:
        """A slab of at least ``nbytes`` on ``device`` and its generation, already bumped
        (Note [a generation bump before every write])."""
        slab = self._recycled(device, nbytes)
        if slab is None:
            slab = self._allocated_slab(device, nbytes)
        with self._lock:
            table = self._open_table()  # a close() raced this publish: its slab is closed already
            return slab, table.bump(self._slot_of[slab.slab_id])

    def give_back(self, slab: ExportedSlab) -> None:
        """``slab`` holds nothing anyone needs: keep it for reuse, or close it (worn out, or past ``max_free``)."""
        with self._lock:
            if slab.worn_out:
                self._close(slab)
                return
            self._free.append(slab)
            while len(self._free) > self.max_free:
                self._close(self._free.pop(0))

    def generation_of(self, slab: ExportedSlab) -> int | None:
        """``slab``'s reuse counter now (None once the slab is closed)."""
        with self._lock:
            slot, table = self._slot_of.get(slab.slab_id), self._generations
            return None if slot is None or table is None else table.read(slot)

    def post_newest(self, index: int, entry: NewestEntry) -> int | None:
        """Board entry ``index`` names ``entry`` (the slab must be one of this pool's, so the table exists);
        where the entry lies in the table, or None where this table has no board."""
        with self._lock:
            table = self._open_table()
            offset = table.board_entry_offset(index)
            if offset is not None and table.board is not None:
                table.board.post(index, entry)
            return offset

    def slabs(self) -> list[ExportedSlab]:
        """Every live slab, in use or free, oldest allocation first."""
        with self._lock:
            return list(self._slabs.values())

    def free_slabs(self) -> list[ExportedSlab]:
        with self._lock:
            return list(self._free)

    def counts(self) -> SlabCounts:
        with self._lock:
            return SlabCounts(
                len(self._slabs), len(self._free), sum(s.nbytes for s in self._slabs.values()), self._allocated
            )

    def close(self) -> None:
        """Close every slab (in use or not) and the generation table."""
        with self._lock:
            self._closed = True
            for slab in list(self._slabs.values()):
                self._close(slab)
            self._free.clear()
            if self._generations is not None:
                self._generations.close()
                self._generations = None

    # ---- inside ------------------------------------------------------------------------------

    def _recycled(self, device: torch.device, nbytes: int) -> ExportedSlab | None:
        """The smallest free slab on ``device`` that holds ``nbytes`` without wasting more than about half."""
        with self._lock:
            fits = [s for s in self._free if nbytes <= s.nbytes <= 2 * nbytes + Backend.GRANULE and s.device == device]
            if not fits:
                return None
            best = min(fits, key=lambda s: s.nbytes)
            self._free.remove(best)
            return best

    def _allocated_slab(self, device: torch.device, nbytes: int) -> ExportedSlab:
        """A new slab with a generation slot of its own; its bytes are reserved before the (unlocked) allocation."""
        size = Backend.size_for(nbytes)
        with self._lock:
            while self._free and self._bytes + size > self.max_bytes:
                self._close(self._free.pop(0))  # room made from unused slabs first
            if self._bytes + size > self.max_bytes:
                raise LimitExceeded(f"a {size}-byte slab would exceed max_slab_bytes ({self.max_bytes})")
            if len(self._slabs) >= self.max_slabs:
                raise LimitExceeded(f"already {len(self._slabs)} slabs (max_slabs)")
            if self._generations is None and not self._closed:
                self._generations = GenerationTable(self.max_slabs, self.board_entries)
            table = self._open_table()
            backend = self._backends.get(device)
            if backend is None:
                backend = self._backends[device] = backend_for(device)
            slot = table.take_slot()
            self._bytes += size
        try:
            slab = backend.allocate(nbytes)
        except BaseException:
            with self._lock:
                if not self._closed:
                    table.free_slot(slot)
                self._bytes -= size
            raise
        slab.handle = msgspec.structs.replace(slab.handle, generation=GenerationSlot(slot, table.name))
        slab.generation_fd = table.fd  # the descriptor channel sends the table with the slab (fdchannel.py)
        with self._lock:
            if self._closed:  # closed while this slab was being allocated: it never joins the pool
                self._bytes -= size
                slab.close()
                raise StoreClosed("the store was closed during the publish")
            self._bytes += slab.nbytes - size  # a backend may round up further (VMM: the device's granularity)
            self._slabs[slab.slab_id] = slab
            self._slot_of[slab.slab_id] = slot
            self._allocated += 1
        return slab

    def _open_table(self) -> GenerationTable:
        """The generation table (lock held); ``StoreClosed`` once the pool was closed."""
        if self._closed or self._generations is None:
            raise StoreClosed("the store was closed: nothing more is published into it")
        return self._generations

    def _close(self, slab: ExportedSlab) -> None:
        del self._slabs[slab.slab_id]
        slot = self._slot_of.pop(slab.slab_id)
        if self._generations is not None:
            self._generations.free_slot(slot)
        self._bytes -= slab.nbytes
        slab.close()

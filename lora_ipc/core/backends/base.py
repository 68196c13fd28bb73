"""The memory-backend interface: a flat byte slab one process exports and another imports.

Producer side: ``Backend.allocate(nbytes) -> ExportedSlab``; ``slab.pack(layout, tensors)``, then
``slab.mark_ready()``; send ``slab.handle_for_import()``. Consumer side: ``open_slab(handle) -> ImportedSlab``
(kept open and reused across versions), then ``copy_out(used_bytes, device)`` returns memory the
consumer owns, fully written, so the lease on the slab can be dropped right after.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar

import torch

from ..errors import BackendError
from ..memory.board import NewestEntry
from ..memory.layout import SlabLayout
from ..memory.shm import GenerationReader, reopen_sealed
from ..protocol import SlabHandle


class ExportedSlab(ABC):
    slab_id: str
    nbytes: int
    device: torch.device
    tensor: torch.Tensor  # uint8, 1-D, nbytes long
    handle: SlabHandle
    _views: tuple[bytes, list[torch.Tensor]] | None = None
    #: whether the slab's memory is a descriptor that can travel by the descriptor channel (fdchannel.py):
    #: then :meth:`descriptor` gives it, and the slab's handles declare ``PASSES_DESCRIPTOR`` too
    passes_descriptor: ClassVar[bool] = False
    #: this process's descriptor of the generation table the slab's handle names (slab_pool.py; -1: none): the
    #: descriptor channel sends a duplicate of it with the slab (fdchannel.FdServer.attach)
    generation_fd: int = -1

    def descriptor(self) -> int:
        """A duplicate of the descriptor holding the slab's memory (the caller closes it); only where
        ``passes_descriptor``."""
        raise BackendError(f"a {type(self).__name__} has no descriptor to pass")

    def handle_for_import(self) -> SlabHandle:
        """The handle to give one importing process (CUDA: a fresh export each time, see cuda.py)."""
        return self.handle

    def discard(self, handle: SlabHandle) -> None:  # noqa: B027 - a no-op by default, on purpose
        """A handle from :meth:`handle_for_import` that never reached its importer (CUDA: release its export)."""

    @property
    def worn_out(self) -> bool:
        """True when the slab should be closed rather than recycled (CUDA: too many exports on it)."""
        return False

    def read_into(self, dst: torch.Tensor) -> None:
        """Copy the first ``dst.numel()`` bytes into ``dst`` after the last pack; complete on return."""
        dst.copy_(self.tensor[: dst.numel()])

    def pack(self, layout: SlabLayout, tensors: Mapping[str, torch.Tensor]) -> None:
        """Write ``tensors`` at ``layout``'s places in this slab (one batched copy); :meth:`mark_ready` follows."""
        layout.pack(self.destination_views(layout), tensors)

    def destination_views(self, layout: SlabLayout) -> list[torch.Tensor]:
        """Per-entry views of this slab for ``layout``, cached: a recycled slab re-packs with no new views."""
        if self._views is None or self._views[0] != layout.digest:
            self._views = (layout.digest, layout.destination_views(self.tensor))
        return self._views[1]

    @abstractmethod
    def mark_ready(self) -> None:
        """Called after every pack: orders the importer's reads after the pack's writes."""

    @abstractmethod
    def close(self) -> None:
        """Release the memory (importers that still map it keep their mapping alive)."""


class ImportedSlab(ABC):
    slab_id: str
    nbytes: int
    device: torch.device  # where the mapping lives in this process
    handle: SlabHandle
    # the reader of the exporter's generation table that came with this slab by the descriptor channel (the
    # only way it comes): this slab's own, never shared with a slab of another server (imports.py)
    _generations: GenerationReader | None = None
    #: a copy out of this slab needs nothing from the exporter but the bytes and the generation check, so a client
    #: may make it from the newest-version board without a request (Note [a fetch without a request], client.py).
    #: Not a CUDA slab: each publish there has a ready event of its own, which only a fetch reply carries.
    COPIES_WITHOUT_REQUEST: ClassVar[bool] = False

    def consume(self, handle: SlabHandle) -> None:  # noqa: B027 - a no-op by default, on purpose
        """Account for a surplus handle of this already-open slab (CUDA: release its ref counter)."""

    def generation_now(self) -> int | None:
        """The slab's reuse counter as the exporter sees it now (None if the exporter keeps none)."""
        slot = self.handle.generation
        if slot is None:
            return None
        if self._generations is None:
            raise BackendError(f"slab {self.slab_id!r}: its generation table never came by the descriptor channel")
        return self._generations.read(slot.slot)

    def newest_at(self, offset: int) -> NewestEntry | None:
        """The newest-version board entry at byte ``offset`` of this slab's generation table (None: none there
        now, or no table)."""
        return None if self._generations is None else self._generations.newest_at(offset)

    def _close_generations(self) -> None:
        if self._generations is not None:
            self._generations.close()
            self._generations = None

    @abstractmethod
    def copy_into(self, dst: torch.Tensor) -> None:
        """Copy the slab's first ``dst.numel()`` bytes into ``dst`` (uint8, 1-D); complete on return."""

    def copy_out(self, used_bytes: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The first ``used_bytes`` in a new uint8 tensor this process owns (on ``device``, default the slab's)."""
        owned = torch.empty(used_bytes, dtype=torch.uint8, device=self.device if device is None else device)
        self.copy_into(owned)
        return owned

    @abstractmethod
    def close(self) -> None:
        """Drop the mapping."""


def receive_generations(handle: SlabHandle, extra: list[int]) -> GenerationReader | None:
    """A reader of the exporter's generation table from ``extra``, the descriptors that came beside the
    slab's own (none, or the table's exactly when the handle has a generation slot); owns ``extra``."""
    slot = handle.generation
    try:
        if slot is None:
            if extra:
                raise BackendError(f"exporter sent {len(extra)} descriptors beside slab {handle.slab_id!r} unasked")
            return None
        if len(extra) != 1:
            raise BackendError(
                f"slab {handle.slab_id!r} has a generation slot, but {len(extra)} descriptors came for its table"
            )
        table_fd = reopen_sealed(extra[0], slot.table, 8)  # checked first (a FIFO would block), then read-only
    except BaseException:
        for other in extra:
            os.close(other)
        raise
    return GenerationReader(table_fd, slot.table)  # checks it, owns it


class Backend(ABC):
    #: slab sizes are rounded up to this, so slabs of similar sizes can be recycled for each other
    GRANULE = 64 << 10

    @classmethod
    def size_for(cls, nbytes: int) -> int:
        """The size a slab for ``nbytes`` gets: rounded up to ``GRANULE``."""
        return -(-nbytes // cls.GRANULE) * cls.GRANULE

    def allocate(self, nbytes: int) -> ExportedSlab:
        """A new exported slab of ``size_for(nbytes)`` bytes, holding nothing but what will be packed into it."""
        return self._allocate(self.size_for(nbytes))

    @abstractmethod
    def _allocate(self, nbytes: int) -> ExportedSlab:
        """Allocate exactly ``nbytes``."""

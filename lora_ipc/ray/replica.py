"""What crosses nodes: one version's metadata plus its used bytes as uint8 arrays in Ray's object store.

The bytes travel as consecutive pieces, numpy arrays of ``piece_bytes`` each (Ray's object store moves
them between nodes and maps them zero-copy on the receiving node, which copies one piece into its slab
while Ray moves the next); the metadata is the same layout wire and PEFT config the ZeroMQ protocol carries,
and the receiving relay validates it with ``SlabLayout.from_wire`` exactly as a server validates a
publish from a local peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LayoutError, ProtocolError
from ..layout import SlabLayout
from ..protocol import MAX_CONFIG_NODES, Config, Count, Entries, Name, Positive, WireStruct, check_fields, check_tree


class ReplicaMeta(WireStruct, frozen=True):
    """A version's metadata as one relay ships it to another (declared like the ZeroMQ messages' fields)."""

    name: Name
    version: Positive
    entries: Entries  # SlabLayout.to_wire() (lists) on the sending side
    used_bytes: Count
    config: Config
    piece_bytes: Count = 0  # the bytes travel as consecutive pieces of this size (the last one shorter); 0: one

    def layout_for(self, data: np.ndarray) -> SlabLayout:
        """The validated layout of ``data`` (the version's used bytes, as shipped in one piece); the fields are
        checked first, as a server checks a decoded message's."""
        layout = self.layout_for_pieces(1)
        self.check_piece(0, data)
        return layout

    def layout_for_pieces(self, count: int) -> SlabLayout:
        """The validated layout, when the used bytes are shipped as ``count`` pieces (each piece is checked
        with :meth:`check_piece` as it arrives)."""
        check_fields(self, f"replica of {self.name!r:.80}:")
        try:
            check_tree(self.config, MAX_CONFIG_NODES, "config")
        except ValueError as exc:
            raise ProtocolError(f"replica of {self.name!r:.80}: {exc}") from None
        if count != self.piece_count():
            raise LayoutError(
                f"{self.name} v{self.version}: {count} pieces shipped, {self.used_bytes} bytes in pieces of "
                f"{self.piece_bytes} make {self.piece_count()}"
            )
        return SlabLayout.from_wire(self.entries, self.used_bytes, self.used_bytes)

    def piece_count(self) -> int:
        step = self.piece_bytes or self.used_bytes
        if type(step) is not int or step <= 0:
            raise LayoutError(f"{self.name} v{self.version}: piece_bytes {self.piece_bytes!r:.20} is not a size")
        return -(-self.used_bytes // step)

    def check_piece(self, index: int, piece: object) -> np.ndarray:
        """``piece`` if it is the ``index``-th piece of the used bytes: a 1-D uint8 array of that piece's size."""
        if not isinstance(piece, np.ndarray) or piece.dtype != np.uint8 or piece.ndim != 1:
            raise LayoutError(f"{self.name} v{self.version}: replica bytes must be a 1-D uint8 array")
        count, step = self.piece_count(), self.piece_bytes or self.used_bytes
        want = min(step, self.used_bytes - index * step) if 0 <= index < count else 0
        if piece.nbytes != want:
            raise LayoutError(
                f"{self.name} v{self.version}: {piece.nbytes} bytes shipped in piece {index}, the layout "
                f"({self.used_bytes} bytes in {count} pieces) says {want}"
            )
        return piece


@dataclass(frozen=True)
class ReplicationReport:
    """What ``Relay.replicate`` did: per other node, ``"served"`` or why not."""

    name: str
    version: int
    nodes: dict[str, str]
    elapsed_ms: float

    @property
    def failed(self) -> dict[str, str]:
        """Nodes whose relay exists but does not serve the version (a node without a relay is not counted)."""
        return {node: why for node, why in self.nodes.items() if why not in ("served", "no relay on this node")}

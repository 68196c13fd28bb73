"""What crosses nodes: one version's metadata plus its used bytes as one uint8 array in Ray's object store.

The bytes travel as a numpy array (Ray's object store moves it between nodes and maps it zero-copy on
the receiving node); the metadata is the same layout wire and PEFT config the ZeroMQ protocol carries,
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

    def layout_for(self, data: np.ndarray) -> SlabLayout:
        """The validated layout of ``data`` (the version's used bytes, as shipped); the fields are checked
        first, as a server checks a decoded message's."""
        check_fields(self, f"replica of {self.name!r:.80}:")
        try:
            check_tree(self.config, MAX_CONFIG_NODES, "config")
        except ValueError as exc:
            raise ProtocolError(f"replica of {self.name!r:.80}: {exc}") from None
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
            raise LayoutError(f"{self.name} v{self.version}: replica bytes must be a 1-D uint8 array")
        if data.nbytes != self.used_bytes:
            raise LayoutError(
                f"{self.name} v{self.version}: {data.nbytes} bytes shipped, layout says {self.used_bytes}"
            )
        return SlabLayout.from_wire(self.entries, self.used_bytes, data.nbytes)


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

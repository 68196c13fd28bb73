"""Where relays are found: one named, detached actor per Ray node, and its node-local endpoint.

The endpoint is a function of the node id alone, so a relay that Ray restarts binds the same
``ipc://`` path, and engines and trainers on that node reconnect to it without being told. Simulated
nodes of one machine (``ray.cluster_utils.Cluster``) share ``/tmp`` and still get distinct paths.
"""

from __future__ import annotations

import os
import tempfile

NAMESPACE = "lora_ipc"
ACTOR_PREFIX = "relay-"


def relay_actor_name(node_id: str) -> str:
    return ACTOR_PREFIX + node_id


def relay_endpoint(node_id: str, endpoint_dir: str | None = None) -> str:
    base = endpoint_dir or os.path.join(tempfile.gettempdir(), f"lora-ipc-ray-{os.getuid()}")
    return "ipc://" + os.path.join(base, f"{node_id[:24]}.sock")

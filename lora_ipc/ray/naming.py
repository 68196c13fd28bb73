"""Where relays are found: one named, detached actor per Ray node, and its node-local endpoint.

A relay's socket lives in a directory no other user can create first or enter
(:func:`~lora_ipc.core.channels.endpoint.private_runtime_dir`: ``$XDG_RUNTIME_DIR/lora-ipc-ray`` when that is ours
and 0700, else a fresh ``mkdtemp`` directory), never at a predictable path in /tmp. Trainers and
engines learn the endpoint from the relay's ``info()`` (``start_relays``, ``local_endpoint``). The
relay records its directory in Ray's GCS key-value store per node, so a relay that Ray restarts binds
the same ``ipc://`` path and engines on that node reconnect without being told. Simulated nodes of one
machine (``ray.cluster_utils.Cluster``) get distinct paths (the socket is named after the node).
"""

from __future__ import annotations

import os

from ..core.channels.endpoint import private_runtime_dir

NAMESPACE = "lora_ipc"
ACTOR_PREFIX = "relay-"
RUNTIME_DIR_NAME = "lora-ipc-ray"


def relay_actor_name(node_id: str) -> str:
    return ACTOR_PREFIX + node_id


def relay_endpoint(node_id: str, endpoint_dir: str | None = None) -> str:
    """The endpoint of ``node_id``'s relay in ``endpoint_dir`` (default: a fresh private directory)."""
    base = endpoint_dir or private_runtime_dir(RUNTIME_DIR_NAME)
    return "ipc://" + os.path.join(base, f"{node_id[:24]}.sock")

"""lora_ipc on Ray: one relay per node, publish from a trainer actor, load into vLLM engine actors.

    relays = lora_ipc.ray.start_relays()                 # node_id -> endpoint, idempotent
    version = lora_ipc.ray.publish("policy", peft_model) # in the trainer actor (rank 0)
    lora_ipc.ray.load(engine_actors, "policy", version)  # every engine, concurrently

Inside a node adapters move through shared memory (CUDA IPC on GPU); between nodes each version
travels once, as one flat buffer, through Ray's object store. Needs ``pip install lora-ipc[ray]``.
"""

try:
    import ray  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without Ray
    raise ImportError("lora_ipc.ray needs Ray: pip install 'lora-ipc[ray]'") from exc

from .errors import EngineLoadError, ReplicationError
from .load import load, served_version
from .publish import publish
from .relay_fleet import local_endpoint, relay_endpoints, start_relays, stop_relays

__all__ = [
    "EngineLoadError",
    "ReplicationError",
    "load",
    "local_endpoint",
    "publish",
    "relay_endpoints",
    "served_version",
    "start_relays",
    "stop_relays",
]

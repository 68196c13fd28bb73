"""``publish``: from a trainer actor (or the driver) into this node's relay, then to every node's relay."""

from __future__ import annotations

import threading
from typing import Any

import ray

from ..core.errors import ExporterUnavailable
from ..lora.adapters import RemoteExporter
from .errors import ReplicationError
from .relay_fleet import forget_local_relay, local_relay

_exporters: dict[str, RemoteExporter] = {}
_lock = threading.Lock()


def publish(name: str, adapter: Any, peft_config: Any = None, *, wait: bool = True, timeout_s: float = 60.0) -> int:
    """Publish ``adapter`` (what ``AdapterExporter.publish`` takes) on every node; return its version.

    The adapter is packed once, in this process, into a staging slab that the relay of this node
    copies (shared memory on CPU, CUDA IPC on GPU: no trip through Ray). That relay numbers the
    version and ships its bytes, once, through Ray's object store to the relays of the other nodes,
    which serve it under the same number. ``wait=True`` returns once every relay serves it
    (:class:`ReplicationError` names the nodes that do not); ``wait=False`` returns once this node's
    relay serves it. One process publishes a given adapter name (as the rank-0 trainer does).
    """
    relay, info = local_relay()
    endpoint = info["endpoint"]
    with _lock:
        exporter = _exporters.get(endpoint)
        if exporter is None:
            exporter = _exporters[endpoint] = RemoteExporter(endpoint, device=info["device"], timeout_s=timeout_s)
        try:
            version = exporter.publish(name, adapter, peft_config)
        except ExporterUnavailable:
            # the relay is gone or restarting: drop this socket so the unanswered request is never replayed
            _exporters.pop(endpoint).close()
            forget_local_relay()
            raise
    report_ref = relay.replicate.remote(name, version, timeout_s)
    if not wait:
        return version
    try:
        report = ray.get(report_ref, timeout=timeout_s + 10)
    except ray.exceptions.RayActorError:
        forget_local_relay()
        raise
    if report.failed:
        raise ReplicationError(
            f"{name} v{version} is not served on {len(report.failed)} node(s): {report.failed}", report.failed
        )
    return version


def close() -> None:
    """Close this process's publishing sockets and staging slabs."""
    with _lock:
        while _exporters:
            _exporters.popitem()[1].close()

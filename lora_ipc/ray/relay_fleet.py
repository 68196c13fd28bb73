"""Starting and finding relays: ``start_relays``, ``stop_relays``, ``local_endpoint``, ``relay_endpoints``."""

from __future__ import annotations

import logging
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..store import new_epoch
from .naming import NAMESPACE, relay_actor_name
from .relay_actor import Relay, alive_node_ids, relay_handle

RELAY_CONCURRENCY = 8  # Ray calls a relay runs at once: replicate to peers while peers replicate to it
_RelayActor = ray.remote(Relay)
_local: dict[str, tuple] = {}  # node id -> (relay handle, relay info), per process
_lock = threading.Lock()
log = logging.getLogger("lora_ipc.ray")


def start_relays(
    keep: int = 2, *, timeout_s: float = 120.0, actor_options: dict | None = None, **server_options
) -> dict[str, str]:
    """Start (idempotently) one relay per alive Ray node; return ``node_id -> ipc:// endpoint``.

    Each relay is a detached, restartable (``max_restarts=-1``) actor pinned to its node with hard
    node affinity and no CPU reservation, so it outlives whichever trainer or driver started it.
    ``server_options`` go to :class:`~lora_ipc.ray.relay_actor.Relay` (``device``, ``lease_timeout_s``,
    ``check_finite``, ``endpoint_dir``); relays already running keep the options they started with.
    ``actor_options`` are added to the actor's Ray options: for GPU slabs (``device="cuda"``) give the
    relay its node's GPU, e.g. ``{"num_gpus": 0.01}`` or a ``runtime_env`` setting
    ``CUDA_VISIBLE_DEVICES``. Returns once every relay answers on its socket.
    """
    handles = {node: relay_handle(node) for node in alive_node_ids()}
    running = [h for h in handles.values() if h is not None]
    # one epoch for the whole set (Note [one epoch per relay set], relay_actor.py): a running one's, else a new one
    epoch = ray.get(running[0].epoch.remote(), timeout=timeout_s) if running else new_epoch()
    for node, handle in handles.items():
        if handle is None:
            options = dict(
                name=relay_actor_name(node),
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime="detached",
                max_restarts=-1,
                max_task_retries=0,
                max_concurrency=RELAY_CONCURRENCY,
                num_cpus=0,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False),
            )
            options.update(actor_options or {})
            handles[node] = _RelayActor.options(**options).remote(node, keep=keep, epoch=epoch, **server_options)
    ready = ray.get([h.wait_ready.remote(timeout_s) for h in handles.values()], timeout=timeout_s + 10)
    if not all(ready):
        raise TimeoutError(f"relays not serving within {timeout_s:g}s")
    infos = ray.get([h.info.remote() for h in handles.values()])
    return {info["node_id"]: info["endpoint"] for info in infos}


def relay_endpoints() -> dict[str, str]:
    """``node_id -> endpoint`` of the relays running on alive nodes (none are started)."""
    out = {}
    for node in alive_node_ids():
        handle = relay_handle(node)
        if handle is not None:
            out[node] = ray.get(handle.info.remote())["endpoint"]
    return out


def local_relay() -> tuple:
    """``(handle, info)`` of the relay on the calling process's node (started if there is none),
    remembered per process: a relay Ray restarts keeps its handle and endpoint."""
    node = ray.get_runtime_context().get_node_id()
    with _lock:
        known = _local.get(node)
    if known is not None:
        return known
    handle = relay_handle(node)
    if handle is None:
        start_relays()
        handle = relay_handle(node)
    known = (handle, ray.get(handle.info.remote()))
    with _lock:
        _local[node] = known
    return known


def forget_local_relay() -> None:
    """Look the local relay up again next time (after it was stopped and started anew)."""
    with _lock:
        _local.clear()


def local_endpoint() -> str:
    """The ``ipc://`` endpoint of this node's relay: what engine actors fetch from.

    An engine actor sets ``os.environ["LORA_IPC_ENDPOINT"] = local_endpoint()`` before it builds its
    ``LLM``/``AsyncLLM``, so its workers (and ``lora_request``) use the relay of their own node.
    """
    return local_relay()[1]["endpoint"]


def stop_relays() -> int:
    """Stop every relay (their shared memory is freed); returns how many were stopped."""
    stopped = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor.get("namespace") == NAMESPACE and actor["name"].startswith(relay_actor_name("")):
            handle = ray.get_actor(actor["name"], namespace=NAMESPACE)
            try:
                ray.get(handle.shutdown.remote(), timeout=30)
            except ray.exceptions.RayError as exc:  # dead, hung or failing: it is killed next all the same
                log.warning("relay %s did not shut down cleanly (killing it): %s", actor["name"], exc)
            ray.kill(handle, no_restart=True)
            stopped += 1
    with _lock:
        _local.clear()
    return stopped

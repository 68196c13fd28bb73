"""The relay: one Ray actor per node, a lora_ipc server over a store that owns that node's copies.

Same node, the relay is an ordinary lora_ipc server: trainers publish into it with
:class:`~lora_ipc.RemoteExporter` (shared memory, or CUDA IPC on GPU), engines fetch from it with the
vLLM plugin. Across nodes, the publishing node's relay ships each version once, as one flat uint8
buffer in Ray's object store, to every other relay (:meth:`Relay.replicate`), which serves it under
the same version number (:meth:`Relay.accept`).

Version numbers come from one authority for the whole set (:mod:`.numbering`: Ray's GCS), so a
(name, version, epoch) names one byte set on every node: a second publisher of a name on another
node gets its own numbers (and its replication reports the newer version the other node serves), and
a relay Ray restarted never issues a number it issued before it died.

A relay that Ray restarts (``max_restarts=-1``) binds the same endpoint (its directory is recorded
in the GCS), first copies the newest version of every name from a peer relay, and only then starts
answering on its socket; publishers and engines wait for it within their
timeouts. The Ray methods run on a small thread pool (``max_concurrency``), so relays replicating to
each other at the same time never wait on one another.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings

import numpy as np
import ray
import torch

from ..core.channels.endpoint import private_runtime_dir, trusted_dir
from ..core.errors import SlabRecycled
from ..core.protocol import StatusReport
from ..core.serving.server import TensorSetServer
from ..core.serving.store import TensorSetStore
from . import numbering
from .naming import NAMESPACE, RUNTIME_DIR_NAME, relay_actor_name, relay_endpoint
from .replica import ReplicaMeta, ReplicationReport

log = logging.getLogger("lora_ipc.ray")
HOLDER = b"ray-relay"  # the relay's own leases, taken in process
PEERS_TTL_S = 5.0  # how long a relay trusts its list of peers before asking Ray again
NO_RELAY = "no relay on this node"


def alive_node_ids() -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n.get("Alive")]


def relay_handle(node_id: str):
    """The relay actor of ``node_id``, or None when none was started there."""
    try:
        return ray.get_actor(relay_actor_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None


class _NumberedStore(TensorSetStore):
    """A store whose own publishes take their version numbers from ``claim(name, at_least)`` (the relay
    set's authority); a replica keeps the number its origin was given (``publish_copy(version=...)``)."""

    def __init__(self, claim, **options):
        super().__init__(**options)
        self._claim = claim
        self._numbering = threading.Lock()  # one claim and add at a time: numbers stay increasing here

    def _add(self, name, slab, layout, config, generation, version=None):
        if version is not None:
            return super()._add(name, slab, layout, config, generation, version)
        with self._numbering:
            version = self._claim(name, self.newest_version(name) + 1)
            return super()._add(name, slab, layout, config, generation, version)


def _endpoint_dir(node_id: str) -> str:
    """This node's relay directory: the one recorded in the GCS if it is still a private directory of ours
    (a relay Ray restarted binds the same path), else a new private one, recorded."""
    known = numbering.remembered_dir(node_id)
    if known is not None and trusted_dir(known):
        return known
    directory = private_runtime_dir(RUNTIME_DIR_NAME)
    numbering.remember_dir(node_id, directory)
    return directory


class Relay:
    def __init__(
        self,
        node_id: str,
        *,
        keep: int = 2,
        device: str = "cpu",
        lease_timeout_s: float = 30.0,
        check_finite: bool = False,
        endpoint_dir: str | None = None,
        catch_up_timeout_s: float = 20.0,
        epoch: str | None = None,
    ):
        here = ray.get_runtime_context().get_node_id()
        if here != node_id:  # node affinity is hard; this would mean two relays claim one node
            raise RuntimeError(f"relay for node {node_id} was placed on node {here}")
        # A relay only copies bytes. torch's intra-op thread pool makes each CPU copy_ wake every
        # thread: measured on a busy 2-core machine, a 128 KB copy took 8 ms that way and 8 us on one thread.
        torch.set_num_threads(1)
        self.node_id = node_id
        self.device = torch.device(device)
        self.endpoint = relay_endpoint(node_id, endpoint_dir or _endpoint_dir(node_id))
        with warnings.catch_warnings():  # Ray's property warns about an internal use of actor_id
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.store = _NumberedStore(self._claim, keep=keep, lease_timeout_s=lease_timeout_s, check_finite=check_finite)
        # Note [one epoch per relay set]: every relay of a set serves under the epoch start_relays drew, so a
        # pinned URI made against one node's relay names the same bytes on every node. A relay Ray restarts
        # takes its peers' epoch only if it can continue their numbering (_catch_up); with no peer to copy
        # from, it keeps the fresh epoch its new store drew. Within an epoch every number is claimed from the
        # set's authority (numbering.py) before it is used, so a restarted relay never issues one again.
        if epoch is not None and not self.restarted:
            self.store.epoch = epoch
        self._accept_lock = threading.Lock()
        self._server: TensorSetServer | None = None
        self._ready = threading.Event()
        self._caught_up: dict[str, int] = {}
        self._catch_up_timeout_s = catch_up_timeout_s
        self._peer_cache: tuple[float, dict] = (0.0, {})
        self._last_replication: dict[str, dict] = {}  # name -> what the last replicate() of it took, per stage
        self._start_error: str | None = None
        threading.Thread(target=self._catch_up_then_serve, name="lora-ipc-relay-start", daemon=True).start()

    def _claim(self, name: str, at_least: int) -> int:
        return numbering.claim_version(self.store.epoch, name, at_least, self.node_id)

    # ---- start -----------------------------------------------------------------------------

    def _catch_up_then_serve(self) -> None:
        try:
            self._catch_up()
        except Exception:  # a relay with nothing is still a relay: the next publish fills it
            log.exception("relay %s: catching up from peers failed", self.node_id[:8])
        try:
            self._server = TensorSetServer(self.store, self.endpoint).start()
        except Exception as exc:  # e.g. EndpointInUse: say so to whoever waits, instead of never being ready
            self._start_error = f"{type(exc).__name__}: {exc}"
            log.error("relay %s cannot serve on %s: %s", self.node_id[:8], self.endpoint, self._start_error)
            self._ready.set()
            return
        self._ready.set()
        for handle in self._peers(cached=False).values():  # so they replicate to this relay from now on
            handle.forget_peers.remote()
        log.info(
            "relay %s serving on %s (restarted=%s, caught up %s)",
            self.node_id[:8],
            self.endpoint,
            self.restarted,
            self._caught_up,
        )

    def _catch_up(self) -> None:
        """Copy, from the other relays, the newest version of each name they serve."""
        peers = list(self._peers(cached=False).values())
        if not peers:
            return
        epochs = set()
        for ref in ray.wait(
            [h.epoch.remote() for h in peers], num_returns=len(peers), timeout=self._catch_up_timeout_s
        )[0]:
            try:
                epochs.add(ray.get(ref))
            except ray.exceptions.RayError as exc:
                log.warning("relay %s: a peer did not say its epoch: %s", self.node_id[:8], exc)
        if len(epochs) == 1:
            self.store.epoch = epochs.pop()
        elif epochs:
            log.warning(
                "relay %s: peers serve under different epochs %s; keeping %s",
                self.node_id[:8],
                sorted(epochs),
                self.store.epoch,
            )
        refs = [h.newest_replicas.remote() for h in peers]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=self._catch_up_timeout_s)
        best: dict[str, tuple[ReplicaMeta, ray.ObjectRef]] = {}
        for ref in ready:
            try:
                offers = ray.get(ref)
            except ray.exceptions.RayError as exc:  # the peer's own error arrives as a RayTaskError
                log.warning("relay %s: a peer could not offer replicas: %s", self.node_id[:8], exc)
                continue
            for meta, data_ref in offers:
                if meta.name not in best or meta.version > best[meta.name][0].version:
                    best[meta.name] = (meta, data_ref)
        for meta, data_ref in best.values():
            [data] = ray.get([data_ref], timeout=self._catch_up_timeout_s)
            self._caught_up[meta.name] = self.accept(meta, data)

    # ---- what Ray calls --------------------------------------------------------------------

    def info(self) -> dict:
        return {
            "node_id": self.node_id,
            "endpoint": self.endpoint,
            "pid": os.getpid(),
            "device": str(self.device),
            "restarted": self.restarted,
            "ready": self._ready.is_set() and not self._start_error,
            "error": self._start_error,
            "caught_up": dict(self._caught_up),
            "epoch": self.store.epoch,
        }

    def epoch(self) -> str:
        return self.store.epoch

    def wait_ready(self, timeout_s: float = 60.0) -> bool:
        ready = self._ready.wait(timeout_s)
        if self._start_error:
            raise RuntimeError(f"relay on node {self.node_id} cannot serve on {self.endpoint}: {self._start_error}")
        return ready

    def versions(self) -> dict[str, list[int]]:
        return {s.name: list(s.versions) for s in self.store.summaries()[0]}

    def status(self) -> StatusReport:
        return self.store.status()

    def replica(self, name: str, version: int | None = None) -> tuple[ReplicaMeta, ray.ObjectRef]:
        """This relay's copy of ``name`` (newest if ``version`` is None) put into Ray's object store."""
        lease, pv = self.store.lease(name, version, HOLDER)
        try:
            used = pv.layout.used_bytes
            data = pv.slab.tensor[:used]
            if data.device.type != "cpu":
                data = data.cpu()
            ref = ray.put(data.numpy())  # one copy of the used bytes into the object store
            if not self.store.intact(pv):
                raise SlabRecycled(f"{name!r} v{pv.version} was reused while it was copied; ask again")
        finally:
            self.store.release(lease.lease_id, HOLDER)
        return ReplicaMeta(pv.name, pv.version, pv.layout.to_wire(), used, dict(pv.config)), ref

    def newest_replicas(self) -> list[tuple[ReplicaMeta, ray.ObjectRef]]:
        return [self.replica(name) for name in self.versions()]

    def accept(self, meta: ReplicaMeta, data: np.ndarray) -> int:
        """Serve ``meta.version`` from ``data`` (its used bytes); an older or known version is skipped.

        Returns the newest version of ``meta.name`` this relay serves afterwards.
        """
        layout = meta.layout_for(data)
        with self._accept_lock:
            if meta.version <= self.store.newest_version(meta.name):
                return self.store.newest_version(meta.name)
            with warnings.catch_warnings():  # read-only object-store memory: we only read it
                warnings.simplefilter("ignore", UserWarning)
                source = torch.from_numpy(data)
            return self.store.publish_copy(
                meta.name, layout, meta.config, lambda dst: dst.copy_(source), self.device, version=meta.version
            )

    def replicate(self, name: str, version: int, timeout_s: float = 60.0) -> ReplicationReport:
        """Ship ``version`` of ``name`` to the relays of every other alive node; return when each serves it."""
        started = time.perf_counter()
        peers = self._peers()
        nodes: dict[str, str] = {}
        stages: dict[str, float] = {}
        if peers:
            meta, data_ref = self.replica(name, version)
            stages["replica_put_ms"] = (time.perf_counter() - started) * 1e3
            pending = {h.accept.remote(meta, data_ref): node for node, h in peers.items()}
            ready, late = ray.wait(list(pending), num_returns=len(pending), timeout=timeout_s)
            for ref in ready:
                node = pending[ref]
                try:
                    newest = ray.get(ref)
                    nodes[node] = "served" if newest == version else f"serves newer version {newest}"
                except ray.exceptions.RayActorError as exc:  # that relay is gone for good, or restarting
                    self._peer_cache = (0.0, {})
                    nodes[node] = NO_RELAY if relay_handle(node) is None else f"{type(exc).__name__}: {exc}"
                except ray.exceptions.RayError as exc:  # the report says why, per node (ReplicationError)
                    nodes[node] = f"{type(exc).__name__}: {exc}"
            for ref in late:
                nodes[pending[ref]] = f"no answer within {timeout_s:g}s"
            stages["ship_accept_ms"] = (time.perf_counter() - started) * 1e3 - stages["replica_put_ms"]
        report = ReplicationReport(name, version, nodes, (time.perf_counter() - started) * 1e3)
        self._last_replication[name] = {"version": version, "elapsed_ms": report.elapsed_ms, "stages_ms": stages}
        return report

    def last_replication(self, name: str) -> dict | None:
        """What the last :meth:`replicate` of ``name`` took: ``version``, ``elapsed_ms`` and ``stages_ms``
        (``replica_put_ms``: the used bytes into Ray's object store; ``ship_accept_ms``: until every peer serves
        them). For benchmarks and inspection."""
        return self._last_replication.get(name)

    def shutdown(self) -> None:
        """Stop serving and free this node's copies (before the actor is killed)."""
        self._ready.wait(self._catch_up_timeout_s)
        if self._server is not None:
            self._server.stop()
        self.store.close()

    # ---- peers -----------------------------------------------------------------------------

    def forget_peers(self) -> None:
        """A relay started (or restarted) elsewhere: look the peers up again at the next replicate."""
        self._peer_cache = (0.0, {})

    def _peers(self, cached: bool = True) -> dict:
        """Relays of the other alive nodes, looked up in Ray's GCS at most every ``PEERS_TTL_S``
        (sooner when a new relay announces itself through ``forget_peers``)."""
        fetched_at, peers = self._peer_cache
        if cached and time.monotonic() - fetched_at < PEERS_TTL_S:
            return peers
        peers = {}
        for node in alive_node_ids():
            if node != self.node_id:
                handle = relay_handle(node)
                if handle is not None:
                    peers[node] = handle
        self._peer_cache = (time.monotonic(), peers)
        return peers

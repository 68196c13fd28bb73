"""Versions of named tensor sets, the keep policy, leases and their expiry. No sockets here: the server drives this.

A *tensor set* is what lora_ipc moves: named tensors and a config (a LoRA adapter and its config, or a
refit bucket with none). Each ``publish`` of a name makes its next version.

Life of a version: ``publish`` takes a slab from the store's :class:`~lora_ipc.core.serving.slab_pool.SlabPool` (a
recycled one when a free slab fits), packs the version into it and makes it the newest. Once more
than ``keep`` newer versions exist it stops being fetchable; its slab goes back to the pool as soon
as no lease holds it. A lease is taken by every fetch and dropped by the client when its copy is
complete, or reclaimed after ``lease_timeout_s`` if the client vanished.

Note [leases bound nothing on their own]
    A client that leases every new version and never releases would pin one slab per version, so
    every kind of state has a cap (:class:`Limits`), each enforced with ``LimitExceeded``. Past
    ``max_retiring_per_name`` pinned old versions, the oldest one's leases are *revoked* and its
    slab reused. That is safe because every slab has a reuse counter bumped before each write (Note
    [a generation bump before every write] in slab_pool.py): a client whose lease was revoked or
    expired sees the counter moved after its copy and discards the copy (``SlabRecycled``) instead
    of returning a torn version.
    Leases are bound to the connection that took them and their ids are random, so nobody else can
    release them. Expiry pops a heap: its cost does not grow with the number of leases.

Note [leases die with their connection]
    A lease outliving its connection by ``lease_timeout_s`` let a flood of fetches on throwaway sockets
    fill ``max_leases`` for everyone (issue 23, item 15). The server releases a connection's leases as
    soon as its guard sees it close (``release_holder``). At ``max_leases`` the leases of every holder
    it does not see connected (``holder_alive``) go first, and then, rather than refusing the fetch,
    the oldest lease of the holder with the most: the guard sees a closing connection late under load,
    so "connected" is only a first filter, and a revoked lease costs its reader at most a
    ``SlabRecycled`` (the slab's generation still guards its copy; a lease of a version still kept
    pins nothing). A flood can churn the table, never fill it against another holder.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .. import protocol as p
from ..backends import ExportedSlab, slab_device
from ..errors import AdapterRejected, LeaseError, LimitExceeded, StaleEpoch, TensorSetNotFound, VersionNotFound
from ..memory.board import NewestEntry
from ..memory.layout import SlabLayout
from ..memory.layout_cache import LayoutCache
from ..protocol import MAX_STATUS_LEASES, TensorSetSummary, digest_of
from .slab_pool import SlabPool

_STATUS_ENTRY_BYTES = 160  # msgpack size of one status version entry, its name aside (upper estimate)


@dataclass(frozen=True)
class Limits:
    """Caps on what peers can make a store hold. Each is enforced with ``LimitExceeded``."""

    max_names: int = 1024  # distinct names (adapters, refit streams)
    max_slab_bytes: int = 64 << 30  # all slabs together (kept, retiring, free)
    max_slabs: int = 4096  # slabs in all (one generation counter each)
    max_leases: int = 1 << 16  # live leases in all
    max_leases_per_holder: int = 64  # live leases per connection
    max_retiring_per_name: int = 2  # old versions pinned by leases; past it the oldest is revoked


@dataclass
class PublishedVersion:
    name: str
    version: int
    slab: ExportedSlab
    layout: SlabLayout
    config: dict  # the publisher's (a LoRA config; empty for a refit bucket)
    published_at: float
    generation: int
    leases: set[int] = field(default_factory=set)  # lease ids
    config_digest: bytes = b""
    host: ExportedSlab | None = None  # host-staged copy of a GPU version (transport fallback), made on demand
    host_generation: int = 0

    def slab_for(self, transport: str) -> tuple[ExportedSlab, int]:
        if transport == "host" and self.host is not None:
            return self.host, self.host_generation
        return self.slab, self.generation


@dataclass(frozen=True)
class Lease:
    lease_id: int
    name: str
    version: int
    holder: bytes  # the connection that took it; only it may release it
    client: str  # the client's self-reported id, for operators
    expires_at: float


LATENCY_BUCKETS_MS = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)


@dataclass
class LatencyHistogram:
    """Cumulative-friendly counts per upper bound (ms), Prometheus style; the last bucket is +Inf."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_MS) + 1))
    total_ms: float = 0.0
    n: int = 0

    def observe(self, ms: float) -> None:
        i = next((i for i, b in enumerate(LATENCY_BUCKETS_MS) if ms <= b), len(LATENCY_BUCKETS_MS))
        self.counts[i] += 1
        self.total_ms += ms
        self.n += 1

    def report(self) -> p.LatencyStatus:
        return p.LatencyStatus([*LATENCY_BUCKETS_MS, "+Inf"], list(self.counts), round(self.total_ms, 3), self.n)


@dataclass
class StoreMetrics:
    publishes: int = 0
    fetches: int = 0
    board_fetches: int = 0  # of ``fetches``: made from the newest-version board, told by a FetchNote
    bytes_published: int = 0
    bytes_served: int = 0
    leases_expired: int = 0
    leases_revoked: int = 0
    host_stagings: int = 0
    errors: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    fetch_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    publish_latency: LatencyHistogram = field(default_factory=LatencyHistogram)

    def report(self, slabs_allocated: int) -> p.MetricsStatus:
        return p.MetricsStatus(
            publishes=self.publishes,
            fetches=self.fetches,
            board_fetches=self.board_fetches,
            bytes_published=self.bytes_published,
            bytes_served=self.bytes_served,
            leases_expired=self.leases_expired,
            leases_revoked=self.leases_revoked,
            host_stagings=self.host_stagings,
            errors=self.errors,
            errors_by_type=dict(self.errors_by_type),
            slabs_allocated=slabs_allocated,
            fetch_latency=self.fetch_latency.report(),
            publish_latency=self.publish_latency.report(),
        )


def new_epoch() -> str:
    """8 random hex digits: two stores share one with probability 2**-32."""
    return secrets.token_hex(4)


class TensorSetStore:
    """Versions of named tensor sets, each in a slab of :attr:`pool`, and the leases readers hold on them."""

    def __init__(
        self,
        *,
        keep: int = 2,
        lease_timeout_s: float = 30.0,
        max_free_slabs: int = 2,
        check_finite: bool = False,
        clock: Callable[[], float] = time.monotonic,
        limits: Limits | None = None,
    ):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self.limits = limits or Limits()
        self.lease_timeout_s = lease_timeout_s
        self.check_finite = check_finite
        self.clock = clock
        self.started_at = time.time()
        # Version numbers start again at 1 in every store: the epoch, random per store, tells a
        # (name, version) of this store from the same pair of an earlier one (see new_epoch).
        self.epoch = new_epoch()
        self.metrics = StoreMetrics()
        self._lock = threading.RLock()
        self._versions: dict[str, dict[int, PublishedVersion]] = {}  # fetchable, oldest first
        self._last_version: dict[str, int] = {}
        self._retiring: dict[tuple[str, int], PublishedVersion] = {}  # past `keep`, still leased
        self._leases: dict[int, Lease] = {}
        self._lease_heap: list[tuple[float, int]] = []  # (expires_at, lease_id); stale entries skipped
        self._leases_by_holder: dict[bytes, set[int]] = {}  # holder -> its lease ids
        # set by the server: False for a holder whose connection is gone (Note [leases die with their connection])
        self.holder_alive: Callable[[bytes], bool] | None = None
        self.leases_dropped_with_connection = 0
        # every slab the versions live in: allocation, recycling, generation slots, byte accounting
        self.pool = SlabPool(
            max_bytes=self.limits.max_slab_bytes,
            max_slabs=self.limits.max_slabs,
            max_free=max_free_slabs,
            board_entries=self.limits.max_names,
        )
        # name -> (its newest-version board entry, where that lies in the generation table: None where there is no
        # board); a name keeps its entry for the store's life (names are never dropped; max_names bounds them)
        self._board: dict[str, tuple[int, int | None]] = {}
        self._layouts = LayoutCache()
        self._last_config: tuple[dict, bytes] | None = None  # (config object, its digest)

    # ---- publishing ------------------------------------------------------------------------

    def publish(
        self,
        name: str,
        tensors: Mapping[str, torch.Tensor],
        config: dict | None = None,
        device: torch.device | str | None = None,
    ) -> int:
        """Pack ``tensors`` into a slab on ``device`` (default: where the tensors are) as the next version."""
        layout = self._layouts.layout_for(tensors)
        return self._publish_into(
            name, layout, config or {}, slab_device(device, tensors), lambda slab: slab.pack(layout, tensors)
        )

    def publish_copy(
        self,
        name: str,
        layout: SlabLayout,
        config: dict,
        copy_into: Callable[[torch.Tensor], object],
        device: torch.device,
        version: int | None = None,
    ) -> int:
        """Add a version whose bytes ``copy_into(slab_tensor)`` writes (the daemon's copy of a remote slab).

        ``version``: keep another store's version number (a Ray relay serving a replica of what the
        publishing node's relay numbered). It must be newer than every version of ``name`` here, so
        numbers stay increasing and one number never names two different versions in one store.
        """
        if version is not None:
            self._check_newer(name, version)
        return self._publish_into(
            name, layout, config, device, lambda slab: copy_into(slab.tensor[: layout.used_bytes]), version
        )

    def newest_version(self, name: str) -> int:
        """The last version number given to ``name`` in this store (0 if none)."""
        with self._lock:
            return self._last_version.get(name, 0)

    def _check_newer(self, name: str, version: int) -> None:
        if type(version) is not int or version <= self.newest_version(name):
            raise ValueError(f"{name!r} version {version!r} is not newer than version {self.newest_version(name)} here")

    def _publish_into(
        self,
        name: str,
        layout: SlabLayout,
        config: dict,
        device: torch.device,
        write: Callable[[ExportedSlab], object],
        version: int | None = None,
    ) -> int:
        started = time.perf_counter()
        p.check_name(name)  # every way in (exporter, daemon, relay): names that round-trip and mean one thing
        with self._lock:
            if name not in self._versions and len(self._versions) >= self.limits.max_names:
                raise LimitExceeded(f"already {len(self._versions)} names (max_names); {name!r} refused")
        slab, generation = self.pool.take(device, layout.used_bytes)  # generation bumped before any write
        try:
            write(slab)
            if self.check_finite:
                _reject_non_finite(layout, slab.tensor)
            slab.mark_ready()
            version = self._add(name, slab, layout, config, generation, version)
        except BaseException:
            self.pool.give_back(slab)
            raise
        self.metrics.publish_latency.observe((time.perf_counter() - started) * 1e3)
        return version

    def _add(
        self,
        name: str,
        slab: ExportedSlab,
        layout: SlabLayout,
        config: dict,
        generation: int,
        version: int | None = None,
    ) -> int:
        with self._lock:
            if version is None:
                version = self._last_version.get(name, 0) + 1
            else:
                self._check_newer(name, version)
            pv = PublishedVersion(
                name, version, slab, layout, config, time.time(), generation, config_digest=self._config_digest(config)
            )
            self._post_newest(pv)  # first: a store closed meanwhile raises here, before the version is added
            self._last_version[name] = version
            versions = self._versions.setdefault(name, {})
            versions[version] = pv
            self.metrics.publishes += 1
            self.metrics.bytes_published += layout.used_bytes
            while len(versions) > self.keep:
                old = versions.pop(next(iter(versions)))
                if old.leases:
                    self._retiring[(old.name, old.version)] = old
                else:
                    self._free_version(old)
            retiring = [r for r in self._retiring.values() if r.name == name]
            for r in retiring[: max(0, len(retiring) - self.limits.max_retiring_per_name)]:
                self._revoke(r)
            return version

    def _post_newest(self, pv: PublishedVersion) -> None:
        """``pv`` is its name's newest version: say so on the board (lock held), once its bytes are all written."""
        index = self._board[pv.name][0] if pv.name in self._board else len(self._board)
        entry = NewestEntry(
            pv.version, pv.generation, pv.layout.used_bytes, pv.layout.digest, pv.config_digest, pv.slab.slab_id
        )
        self._board[pv.name] = (index, self.pool.post_newest(index, entry))

    def board_entry(self, name: str) -> int | None:
        """Where ``name``'s newest-version board entry lies in the generation table (None: no board here)."""
        with self._lock:
            entry = self._board.get(name)
            return None if entry is None else entry[1]

    def _config_digest(self, config: dict) -> bytes:
        """Digest of a config, remembered for the last config object seen (a training loop republishes one)."""
        last = self._last_config
        if last is not None and last[0] is config:
            return last[1]
        digest = digest_of(config)
        self._last_config = (config, digest)
        return digest

    def _revoke(self, pv: PublishedVersion) -> None:
        """Take a retiring version's slab back from its lease holders (their copies will not validate)."""
        for lease_id in list(pv.leases):
            self._forget_lease(self._leases[lease_id])
        self.metrics.leases_revoked += len(pv.leases)
        pv.leases.clear()
        del self._retiring[(pv.name, pv.version)]
        self._free_version(pv)

    def _free_version(self, pv: PublishedVersion) -> None:
        self.pool.give_back(pv.slab)
        if pv.host is not None:
            self.pool.give_back(pv.host)
            pv.host = None

    def stage_to_host(self, pv: PublishedVersion) -> None:
        """Give a GPU version a host copy (once per version): the fallback where CUDA IPC import fails."""
        if pv.host is not None or pv.slab.device.type == "cpu":
            return
        host, generation = self.pool.take(torch.device("cpu"), pv.layout.used_bytes)
        try:
            pv.slab.read_into(host.tensor[: pv.layout.used_bytes])  # after the pack's ready event (CUDA)
        except BaseException:
            self.pool.give_back(host)
            raise
        with self._lock:
            pv.host, pv.host_generation = host, generation
            self.metrics.host_stagings += 1

    # ---- leases ----------------------------------------------------------------------------

    def lease(
        self, name: str, version: int | None, holder: bytes, client: str = "", epoch: str | None = None
    ) -> tuple[Lease, PublishedVersion]:
        """Lease ``version`` (newest if None). ``epoch``, when given, must be this store's: a version
        number of another epoch names other bytes (``StaleEpoch``)."""
        if epoch is not None and epoch != self.epoch:
            raise StaleEpoch(
                f"{name!r} v{version}: epoch {epoch!r:.40} is not this store's ({self.epoch}); the "
                "exporter restarted and its version numbers started again"
            )
        with self._lock:
            self.expire_leases()
            versions = self._versions.get(name)
            if not versions:
                raise TensorSetNotFound(f"nothing named {name!r} has been published")
            if version is None:
                version = next(reversed(versions))
            pv = versions.get(version)
            if pv is None:
                raise VersionNotFound(f"{name!r} version {version} is not kept (kept: {list(versions)})")
            held = len(self._leases_by_holder.get(holder, ()))
            if held >= self.limits.max_leases_per_holder:
                raise LimitExceeded(
                    f"this connection already holds {held} leases (max_leases_per_holder); "
                    "release them before fetching again"
                )
            if len(self._leases) >= self.limits.max_leases:
                self._make_room_for(holder)
            lease = Lease(secrets.randbits(62) + 1, name, version, holder, client, self.clock() + self.lease_timeout_s)
            self._leases[lease.lease_id] = lease
            self._leases_by_holder.setdefault(holder, set()).add(lease.lease_id)
            heapq.heappush(self._lease_heap, (lease.expires_at, lease.lease_id))
            pv.leases.add(lease.lease_id)
            self.metrics.fetches += 1
            self.metrics.bytes_served += pv.layout.used_bytes
            return lease, pv

    def release(self, lease_id: int, holder: bytes, fetch_ms: float = 0.0) -> None:
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or lease.holder != holder:  # someone else's lease reads as unknown
                raise LeaseError(f"lease {lease_id} is unknown, expired, revoked or not yours")
            self._forget_lease(lease)
            self._drop(lease)
            if fetch_ms > 0:
                self.metrics.fetch_latency.observe(fetch_ms)

    def count_board_fetches(self, epoch: str, fetches: list[p.BoardFetch]) -> int:
        """Fetches a client made from this store's newest-version board (a ``FetchNote``): counted as fetches,
        their bytes too for versions still here (a fast publisher may have dropped one since). A note of another
        epoch is refused (``StaleEpoch``: made from a store since closed or replaced at this endpoint), and so is
        one naming a version never published; otherwise a note is the peer's word, as a fetch's own latency is."""
        if epoch != self.epoch:
            raise StaleEpoch(f"a fetch note of epoch {epoch!r:.40} is not this store's ({self.epoch}); not counted")
        with self._lock:
            for f in fetches:
                if f.version > self._last_version.get(f.name, 0):
                    raise TensorSetNotFound(f"a fetch note names {f.name!r:.80} v{f.version}, never published here")
            for f in fetches:
                pv = self._versions.get(f.name, {}).get(f.version) or self._retiring.get((f.name, f.version))
                self.metrics.bytes_served += 0 if pv is None else pv.layout.used_bytes
                if f.fetch_ms > 0:
                    self.metrics.fetch_latency.observe(f.fetch_ms)
            self.metrics.fetches += len(fetches)
            self.metrics.board_fetches += len(fetches)
            return len(fetches)

    def release_holder(self, holder: bytes) -> int:
        """Drop every lease of ``holder`` (its connection went away: Note [leases die with their
        connection]); how many there were."""
        with self._lock:
            leases = [self._leases[lease_id] for lease_id in self._leases_by_holder.get(holder, ())]
            for lease in leases:
                self._forget_lease(lease)
                self._drop(lease)
            self.leases_dropped_with_connection += len(leases)
            self.metrics.leases_expired += len(leases)  # reclaimed without a release, as an expiry is
            return len(leases)

    def holds_leases(self, holder: bytes) -> bool:
        return holder in self._leases_by_holder

    def _make_room_for(self, holder: bytes) -> None:
        """At ``max_leases`` (lock held): the leases of holders whose connection is gone go first; if that
        is not enough, the oldest lease of the holder with the most is revoked (Note [leases die with
        their connection]). ``LimitExceeded`` only when every lease is the asker's own."""
        if self.holder_alive is not None:
            for gone in [h for h in self._leases_by_holder if not self.holder_alive(h)]:
                self.release_holder(gone)
        while len(self._leases) >= self.limits.max_leases:
            others = [(len(ids), h) for h, ids in self._leases_by_holder.items() if h != holder]
            if not others:
                raise LimitExceeded(f"{len(self._leases)} leases are live (max_leases)")
            heaviest = max(others, key=lambda item: item[0])[1]
            oldest = min((self._leases[i] for i in self._leases_by_holder[heaviest]), key=lambda lz: lz.expires_at)
            self._forget_lease(oldest)
            self._drop(oldest)  # its reader's copy is still checked by the slab's generation (SlabRecycled)
            self.metrics.leases_revoked += 1

    def _forget_lease(self, lease: Lease) -> None:
        del self._leases[lease.lease_id]
        ids = self._leases_by_holder[lease.holder]
        ids.discard(lease.lease_id)
        if not ids:
            del self._leases_by_holder[lease.holder]
        if len(self._lease_heap) > 2 * len(self._leases) + 64:  # drop stale heap entries, amortized O(1)
            self._lease_heap = [(lz.expires_at, lz.lease_id) for lz in self._leases.values()]
            heapq.heapify(self._lease_heap)

    def _drop(self, lease: Lease) -> None:
        key = (lease.name, lease.version)
        pv = self._versions.get(lease.name, {}).get(lease.version) or self._retiring.get(key)
        if pv is None or lease.lease_id not in pv.leases:
            return
        pv.leases.discard(lease.lease_id)
        if not pv.leases and key in self._retiring:
            del self._retiring[key]
            self._free_version(pv)

    def expire_leases(self) -> int:
        """Reclaim leases past their deadline: pops the heap, so it costs O(expired · log n)."""
        with self._lock:
            now = self.clock()
            expired = 0
            while self._lease_heap and self._lease_heap[0][0] <= now:
                _, lease_id = heapq.heappop(self._lease_heap)
                lease = self._leases.get(lease_id)
                if lease is None or lease.expires_at > now:
                    continue  # released earlier: a stale entry
                self._forget_lease(lease)
                self._drop(lease)
                expired += 1
            self.metrics.leases_expired += expired
            return expired

    def intact(self, pv: PublishedVersion) -> bool:
        """Whether ``pv``'s slab still holds ``pv`` (its reuse counter has not moved), for in-process readers."""
        return self.pool.generation_of(pv.slab) == pv.generation

    def lease_count(self) -> int:
        with self._lock:
            return len(self._leases)

    # ---- views -----------------------------------------------------------------------------

    def summaries(self, max_bytes: int | None = None) -> tuple[list[TensorSetSummary], int]:
        """One summary per name, and how many were left out to keep the list's wire size
        under ``max_bytes`` (an upper estimate per entry; None: all)."""
        with self._lock:
            out = [_summary(name, vs) for name, vs in self._versions.items()]
        listed = _within_bytes(out, lambda s: len(s.name.encode()) + 9 * len(s.versions) + 48, max_bytes)
        return listed, len(out) - len(listed)

    def summary(self, name: str) -> TensorSetSummary | None:
        """``name``'s summary (None if it was never published): what a named list request answers, whatever
        the size of the catalog."""
        with self._lock:
            vs = self._versions.get(name)
            return None if vs is None else _summary(name, vs)

    def live_slab_ids(self) -> list[str]:
        return [s.slab_id for s in self.pool.slabs()]

    def status(self, max_listed_bytes: int | None = None) -> p.StatusReport:
        """The operator view. ``max_listed_bytes`` bounds the wire size of the version list (an upper
        estimate per entry); those left out are counted in ``versions_left_out``."""
        with self._lock:
            now = self.clock()
            slabs = self.pool.counts()
            pvs = [*(pv for vs in self._versions.values() for pv in vs.values()), *self._retiring.values()]
            listed = _within_bytes(pvs, lambda pv: len(pv.name.encode()) + _STATUS_ENTRY_BYTES, max_listed_bytes)
            return p.StatusReport(
                uptime_s=round(time.time() - self.started_at, 3),
                epoch=self.epoch,
                keep=self.keep,
                versions=[
                    p.VersionStatus(
                        name=pv.name,
                        version=pv.version,
                        bytes=pv.layout.used_bytes,
                        tensors=len(pv.layout.entries),
                        leases=len(pv.leases),
                        retiring=(pv.name, pv.version) in self._retiring,
                        published_at=pv.published_at,
                    )
                    for pv in listed
                ],
                versions_left_out=len(pvs) - len(listed),
                lease_count=len(self._leases),
                leases=[
                    p.LeaseStatus(
                        lease_id=lease.lease_id,
                        name=lease.name,
                        version=lease.version,
                        holder=lease.client or lease.holder.hex(),
                        expires_in_s=round(lease.expires_at - now, 3),
                    )
                    for lease in itertools.islice(self._leases.values(), MAX_STATUS_LEASES)
                ],
                limits=dataclasses.asdict(self.limits),
                slabs=p.SlabStatus(live=slabs.live, free=slabs.free, bytes=slabs.bytes),
                metrics=self.metrics.report(slabs.allocated),
            )

    def count_error(self, exc: BaseException) -> None:
        with self._lock:
            self.metrics.errors += 1
            key = type(exc).__name__
            self.metrics.errors_by_type[key] = self.metrics.errors_by_type.get(key, 0) + 1

    def close(self) -> None:
        with self._lock:
            self.pool.close()
            self._versions.clear()
            self._retiring.clear()
            self._leases.clear()
            self._leases_by_holder.clear()
            self._lease_heap.clear()


def _summary(name: str, vs: dict[int, PublishedVersion]) -> TensorSetSummary:
    """The newest ``MAX_VERSIONS_LISTED`` kept versions (a store's ``keep`` may be larger)."""
    return TensorSetSummary(name, list(vs)[-p.MAX_VERSIONS_LISTED :], sum(pv.layout.used_bytes for pv in vs.values()))


def _reject_non_finite(layout: SlabLayout, slab: torch.Tensor) -> None:
    """Refuse a packed version holding NaN/Inf (costs one read of the slab and one synchronize)."""
    bad = layout.non_finite_names(slab)
    if bad:
        raise AdapterRejected(f"non-finite values (NaN/Inf) in {bad[:5]}{' …' if len(bad) > 5 else ''}")


def _within_bytes(items: list, size, max_bytes: int | None) -> list:
    """The longest prefix of ``items`` whose ``size`` sum stays within ``max_bytes`` (None: all)."""
    if max_bytes is None:
        return items
    total = 0
    for i, item in enumerate(items):
        total += size(item)
        if total > max_bytes:
            return items[:i]
    return items

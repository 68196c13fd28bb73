"""Versions, the keep policy, leases and their expiry. No sockets here: the server drives this.

Life of a version: ``publish`` packs it into a slab (a recycled one when a free slab fits) and makes
it the newest. Once more than ``keep`` newer versions exist it stops being fetchable; its slab goes
back to the free pool as soon as no lease holds it. A lease is taken by every fetch and dropped by
the client when its copy is complete, or reclaimed after ``lease_timeout_s`` if the client vanished.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .backends import Backend, ExportedSlab, backend_for, slab_device
from .errors import AdapterNotFound, AdapterRejected, LeaseError, VersionNotFound
from .layout import SlabLayout, align_up, signature_of
from .protocol import AdapterSummary

SLAB_GRANULE = 64 << 10


@dataclass
class PublishedVersion:
    name: str
    version: int
    slab: ExportedSlab
    layout: SlabLayout
    peft_config: dict
    published_at: float
    leases: int = 0


@dataclass(frozen=True)
class Lease:
    lease_id: int
    name: str
    version: int
    holder: str
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

    def report(self) -> dict:
        return {"buckets_ms": list(LATENCY_BUCKETS_MS) + ["+Inf"], "counts": list(self.counts),
                "sum_ms": round(self.total_ms, 3), "count": self.n}


@dataclass
class StoreMetrics:
    publishes: int = 0
    fetches: int = 0
    bytes_published: int = 0
    bytes_served: int = 0
    leases_expired: int = 0
    errors: int = 0
    slabs_allocated: int = 0
    errors_by_type: dict[str, int] = field(default_factory=dict)
    fetch_latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    publish_latency: LatencyHistogram = field(default_factory=LatencyHistogram)


class AdapterStore:
    def __init__(self, *, keep: int = 2, lease_timeout_s: float = 30.0, max_free_slabs: int = 2,
                 check_finite: bool = False, clock: Callable[[], float] = time.monotonic):
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.keep = keep
        self.lease_timeout_s = lease_timeout_s
        self.max_free_slabs = max_free_slabs
        self.check_finite = check_finite
        self.clock = clock
        self.started_at = time.time()
        self.metrics = StoreMetrics()
        self._lock = threading.RLock()
        self._backends: dict[torch.device, Backend] = {}
        self._versions: dict[str, dict[int, PublishedVersion]] = {}  # fetchable, oldest first
        self._last_version: dict[str, int] = {}
        self._retiring: dict[tuple[str, int], PublishedVersion] = {}  # past `keep`, still leased
        self._leases: dict[int, Lease] = {}
        self._free: list[ExportedSlab] = []
        self._lease_ids = itertools.count(1)
        self._layouts: dict[tuple, SlabLayout] = {}

    # ---- publishing ------------------------------------------------------------------------

    def publish(self, name: str, tensors: Mapping[str, torch.Tensor], peft_config: dict,
                device: torch.device | str | None = None) -> int:
        """Pack ``tensors`` into a slab on ``device`` (default: where the tensors are) as the next version."""
        layout = self._layout_for(tensors)
        return self._publish_into(name, layout, peft_config, slab_device(device, tensors),
                                  lambda slab: layout.pack(slab.destination_views(layout), tensors))

    def publish_copy(self, name: str, layout: SlabLayout, peft_config: dict,
                     copy_into: Callable[[torch.Tensor], None], device: torch.device,
                     version: int | None = None) -> int:
        """Add a version whose bytes ``copy_into(slab_tensor)`` writes (the daemon's copy of a remote slab).

        ``version``: keep another store's version number (a Ray relay serving a replica of what the
        publishing node's relay numbered). It must be newer than every version of ``name`` here, so
        numbers stay increasing and one number never names two different adapters in one store.
        """
        if version is not None:
            self._check_newer(name, version)
        return self._publish_into(name, layout, peft_config, device,
                                  lambda slab: copy_into(slab.tensor[:layout.used_bytes]), version)

    def newest_version(self, name: str) -> int:
        """The last version number given to ``name`` in this store (0 if none)."""
        with self._lock:
            return self._last_version.get(name, 0)

    def _check_newer(self, name: str, version: int) -> None:
        if type(version) is not int or version <= self.newest_version(name):
            raise ValueError(f"{name!r} version {version!r} is not newer than version {self.newest_version(name)} here")

    def _publish_into(self, name: str, layout: SlabLayout, peft_config: dict, device: torch.device,
                      write: Callable[[ExportedSlab], None], version: int | None = None) -> int:
        started = time.perf_counter()
        slab = self._take_slab(device, layout.used_bytes)
        try:
            write(slab)
            if self.check_finite:
                _reject_non_finite(layout, slab.tensor)
            slab.mark_ready()
            version = self._add(name, slab, layout, peft_config, version)
        except BaseException:
            self._give_back(slab)
            raise
        self.metrics.publish_latency.observe((time.perf_counter() - started) * 1e3)
        return version

    def _layout_for(self, tensors: Mapping[str, torch.Tensor]) -> SlabLayout:
        """Plan once per distinct (names, dtypes, shapes); a training loop republishes the same layout."""
        key = signature_of(tensors)
        with self._lock:
            layout = self._layouts.get(key)
        if layout is None:
            layout = SlabLayout.plan(tensors)
            with self._lock:
                self._layouts[key] = layout
                while len(self._layouts) > 16:
                    self._layouts.pop(next(iter(self._layouts)))
        return layout

    def _add(self, name: str, slab: ExportedSlab, layout: SlabLayout, peft_config: dict,
             version: int | None = None) -> int:
        with self._lock:
            if version is None:
                version = self._last_version.get(name, 0) + 1
            else:
                self._check_newer(name, version)
            self._last_version[name] = version
            versions = self._versions.setdefault(name, {})
            versions[version] = PublishedVersion(name, version, slab, layout, peft_config, time.time())
            self.metrics.publishes += 1
            self.metrics.bytes_published += layout.used_bytes
            while len(versions) > self.keep:
                old = versions.pop(next(iter(versions)))
                if old.leases:
                    self._retiring[(old.name, old.version)] = old
                else:
                    self._give_back(old.slab)
            return version

    def _take_slab(self, device: torch.device, nbytes: int) -> ExportedSlab:
        with self._lock:
            fits = [s for s in self._free if nbytes <= s.nbytes <= 2 * nbytes + SLAB_GRANULE
                    and s.device == device]
            if fits:
                best = min(fits, key=lambda s: s.nbytes)
                self._free.remove(best)
                return best
            backend = self._backends.get(device)
            if backend is None:
                backend = self._backends[device] = backend_for(device)
            self.metrics.slabs_allocated += 1
        return backend.allocate(align_up(nbytes, SLAB_GRANULE))

    def _give_back(self, slab: ExportedSlab) -> None:
        with self._lock:
            self._free.append(slab)
            while len(self._free) > self.max_free_slabs:
                self._free.pop(0).close()

    # ---- leases ----------------------------------------------------------------------------

    def lease(self, name: str, version: int | None, holder: str) -> tuple[Lease, PublishedVersion]:
        with self._lock:
            self.expire_leases()
            versions = self._versions.get(name)
            if not versions:
                raise AdapterNotFound(f"no adapter named {name!r} has been published")
            if version is None:
                version = next(reversed(versions))
            pv = versions.get(version)
            if pv is None:
                raise VersionNotFound(f"{name!r} version {version} is not kept (kept: {list(versions)})")
            lease = Lease(next(self._lease_ids), name, version, holder, self.clock() + self.lease_timeout_s)
            self._leases[lease.lease_id] = lease
            pv.leases += 1
            self.metrics.fetches += 1
            self.metrics.bytes_served += pv.layout.used_bytes
            return lease, pv

    def release(self, lease_id: int, fetch_ms: float = 0.0) -> None:
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is None:
                raise LeaseError(f"lease {lease_id} is unknown or expired")
            self._drop(lease)
            if fetch_ms > 0:
                self.metrics.fetch_latency.observe(fetch_ms)

    def _drop(self, lease: Lease) -> None:
        key = (lease.name, lease.version)
        pv = self._versions.get(lease.name, {}).get(lease.version) or self._retiring.get(key)
        if pv is None:
            return
        pv.leases -= 1
        if pv.leases == 0 and key in self._retiring:
            del self._retiring[key]
            self._give_back(pv.slab)

    def expire_leases(self) -> int:
        with self._lock:
            now = self.clock()
            expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
            for lease in expired:
                del self._leases[lease.lease_id]
                self._drop(lease)
            self.metrics.leases_expired += len(expired)
            return len(expired)

    # ---- views -----------------------------------------------------------------------------

    def summaries(self) -> list[AdapterSummary]:
        with self._lock:
            return [AdapterSummary(name, list(vs), sum(pv.layout.used_bytes for pv in vs.values()))
                    for name, vs in self._versions.items()]

    def live_slab_ids(self) -> list[str]:
        with self._lock:
            slabs = [pv.slab for vs in self._versions.values() for pv in vs.values()]
            slabs += [pv.slab for pv in self._retiring.values()] + self._free
            return [s.slab_id for s in slabs]

    def status(self) -> dict:
        with self._lock:
            now = self.clock()
            m = self.metrics
            return {
                "uptime_s": round(time.time() - self.started_at, 3),
                "keep": self.keep,
                "adapters": [
                    {"name": pv.name, "version": pv.version, "bytes": pv.layout.used_bytes,
                     "tensors": len(pv.layout.entries), "leases": pv.leases,
                     "retiring": (pv.name, pv.version) in self._retiring, "published_at": pv.published_at}
                    for pv in [*(p for vs in self._versions.values() for p in vs.values()), *self._retiring.values()]
                ],
                "leases": [{"lease_id": lease.lease_id, "name": lease.name, "version": lease.version,
                            "holder": lease.holder, "expires_in_s": round(lease.expires_at - now, 3)}
                           for lease in self._leases.values()],
                "slabs": {"live": len(self.live_slab_ids()), "free": len(self._free),
                          "bytes": sum(s.nbytes for s in self._all_slabs())},
                "metrics": {"publishes": m.publishes, "fetches": m.fetches, "bytes_published": m.bytes_published,
                            "bytes_served": m.bytes_served, "leases_expired": m.leases_expired,
                            "errors": m.errors, "errors_by_type": dict(m.errors_by_type),
                            "slabs_allocated": m.slabs_allocated,
                            "fetch_latency": m.fetch_latency.report(),
                            "publish_latency": m.publish_latency.report()},
            }

    def _all_slabs(self) -> list[ExportedSlab]:
        slabs = [pv.slab for vs in self._versions.values() for pv in vs.values()]
        return slabs + [pv.slab for pv in self._retiring.values()] + self._free

    def count_error(self, exc: BaseException) -> None:
        with self._lock:
            self.metrics.errors += 1
            key = type(exc).__name__
            self.metrics.errors_by_type[key] = self.metrics.errors_by_type.get(key, 0) + 1

    def close(self) -> None:
        with self._lock:
            for slab in self._all_slabs():
                slab.close()
            self._versions.clear()
            self._retiring.clear()
            self._free.clear()
            self._leases.clear()


def _reject_non_finite(layout: SlabLayout, slab: torch.Tensor) -> None:
    """Refuse a packed version holding NaN/Inf (costs one read of the adapter and one synchronize)."""
    bad = layout.non_finite_names(slab)
    if bad:
        raise AdapterRejected(f"non-finite values (NaN/Inf) in {bad[:5]}{' …' if len(bad) > 5 else ''}")

"""Prometheus metrics for a server, read from ``TensorSetStore.status()`` at scrape time."""

from __future__ import annotations

import threading
from typing import Any

from .store import TensorSetStore


class StoreCollector:
    def __init__(self, store: TensorSetStore, prefix: str = "lora_ipc"):
        self.store = store
        self.prefix = prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.store.status()
        m, pfx = s.metrics, self.prefix
        for key, doc in (
            ("publishes", "versions published"),
            ("fetches", "fetches served"),
            ("board_fetches", "fetches made from the newest-version board, without a request (counted in fetches)"),
            ("bytes_published", "bytes packed into slabs"),
            ("bytes_served", "bytes leased to clients"),
            ("leases_expired", "leases reclaimed after their timeout"),
            ("errors", "requests rejected"),
        ):
            yield CounterMetricFamily(f"{pfx}_{key}", doc, value=getattr(m, key))
        yield GaugeMetricFamily(f"{pfx}_live_leases", "leases currently held", value=s.lease_count)
        yield GaugeMetricFamily(f"{pfx}_slab_bytes", "bytes of slab memory held", value=s.slabs.bytes)
        versions = GaugeMetricFamily(f"{pfx}_adapter_version", "newest kept version per adapter", labels=["adapter"])
        newest: dict[str, int] = {}
        for kept in s.versions:
            newest[kept.name] = max(newest.get(kept.name, 0), kept.version)
        for name, version in newest.items():
            versions.add_metric([name], version)
        yield versions
        for key, doc in (
            ("fetch_latency", "client-measured fetch latency (request or board read -> owned copy)"),
            ("publish_latency", "publish latency (pack into a slab)"),
        ):
            h = getattr(m, key)
            buckets, running = [], 0
            for bound, count in zip(h.buckets_ms, h.counts):
                running += count
                buckets.append(("+Inf" if bound == "+Inf" else str(bound / 1e3), running))
            yield HistogramMetricFamily(f"{pfx}_{key}_seconds", doc, buckets=buckets, sum_value=h.sum_ms / 1e3)


MAX_SCRAPERS = 8  # connections served at once; more are closed at accept
SCRAPE_TIMEOUT_S = 5.0  # a connection must send its request (and take its reply) within this


def serve_metrics(store: TensorSetStore, port: int, addr: str = "127.0.0.1"):
    """Expose the store's metrics over HTTP (a thread of its own); the server, or None (and nothing
    started) without prometheus_client.

    Any local user can connect to a loopback TCP port, so the server is bounded: ``MAX_SCRAPERS``
    connections at once (more are closed as they are accepted), each given ``SCRAPE_TIMEOUT_S`` to send
    its request and read the reply. prometheus_client's own ``start_http_server`` starts a thread per
    connection with no bound and no timeout: a peer holding idle connections would grow the process's
    threads and descriptors without limit.
    """
    try:
        from prometheus_client import CollectorRegistry
        from prometheus_client.exposition import MetricsHandler
    except ImportError:
        return None
    from http.server import ThreadingHTTPServer

    registry = CollectorRegistry()
    registry.register(StoreCollector(store))

    base: Any = MetricsHandler.factory(registry)  # prometheus_client's handler bound to this registry

    class Handler(base):
        timeout = SCRAPE_TIMEOUT_S

        def log_message(self, format, *args):  # noqa: A002 - the base class's name
            pass

    class BoundedServer(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 16

        def __init__(self, address):
            self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)
            self.accepted = 0  # connections given a thread (its own, started)
            self.refused = 0  # connections closed at accept, every slot taken
            super().__init__(address, Handler)

        def process_request(self, request, client_address):
            if not self._slots.acquire(blocking=False):
                self.refused += 1
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:
                self._slots.release()
                raise
            self.accepted += 1

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self._slots.release()

    server = BoundedServer((addr, port))
    threading.Thread(target=server.serve_forever, name="lora-ipc-metrics", daemon=True).start()
    return server

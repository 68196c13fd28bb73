"""Prometheus metrics for a server, read from ``AdapterStore.status()`` at scrape time."""

from __future__ import annotations

from .store import AdapterStore


class StoreCollector:
    def __init__(self, store: AdapterStore, prefix: str = "lora_ipc"):
        self.store = store
        self.prefix = prefix

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.store.status()
        m, pfx = s["metrics"], self.prefix
        for key, doc in (("publishes", "versions published"), ("fetches", "fetches served"),
                         ("bytes_published", "bytes packed into slabs"), ("bytes_served", "bytes leased to clients"),
                         ("leases_expired", "leases reclaimed after their timeout"), ("errors", "requests rejected")):
            yield CounterMetricFamily(f"{pfx}_{key}", doc, value=m[key])
        yield GaugeMetricFamily(f"{pfx}_live_leases", "leases currently held", value=s["lease_count"])
        yield GaugeMetricFamily(f"{pfx}_slab_bytes", "bytes of slab memory held", value=s["slabs"]["bytes"])
        versions = GaugeMetricFamily(f"{pfx}_adapter_version", "newest kept version per adapter", labels=["adapter"])
        newest: dict[str, int] = {}
        for a in s["adapters"]:
            newest[a["name"]] = max(newest.get(a["name"], 0), a["version"])
        for name, v in newest.items():
            versions.add_metric([name], v)
        yield versions
        for key, doc in (("fetch_latency", "client-measured fetch latency (request -> owned copy)"),
                         ("publish_latency", "publish latency (pack into a slab)")):
            h = m[key]
            buckets, running = [], 0
            for bound, count in zip(h["buckets_ms"], h["counts"]):
                running += count
                buckets.append(("+Inf" if bound == "+Inf" else str(bound / 1e3), running))
            yield HistogramMetricFamily(f"{pfx}_{key}_seconds", doc, buckets=buckets, sum_value=h["sum_ms"] / 1e3)


def serve_metrics(store: AdapterStore, port: int, addr: str = "127.0.0.1") -> bool:
    """Expose the store's metrics over HTTP; False (and nothing started) without prometheus_client."""
    try:
        from prometheus_client import CollectorRegistry, start_http_server
    except ImportError:
        return False
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    start_http_server(port, addr=addr, registry=registry)
    return True

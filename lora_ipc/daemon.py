"""``lora-ipc serve``: the adapter server as a standalone process that owns its slabs."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from .metrics import serve_metrics
from .server import AdapterServer
from .store import AdapterStore

log = logging.getLogger("lora_ipc.daemon")


def serve(endpoint: str, *, keep: int = 2, lease_timeout_s: float = 30.0, drain_s: float = 5.0,
          metrics_port: int | None = None, check_finite: bool = False, ready=print) -> int:
    store = AdapterStore(keep=keep, lease_timeout_s=lease_timeout_s, check_finite=check_finite)
    server = AdapterServer(store, endpoint)  # raises EndpointInUse if another server holds it
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_port is not None and not serve_metrics(store, metrics_port):
        log.warning("prometheus_client is not installed: no metrics endpoint")
    server.start()
    ready(f"lora-ipc serving on {endpoint}", flush=True)
    while not stop.wait(0.2):
        pass
    # drain: let in-flight fetches finish their copy and release, up to drain_s
    deadline = drain_s
    while store.status()["leases"] and deadline > 0:
        stop.wait(0.1)
        deadline -= 0.1
    leases = store.status()["leases"]
    if leases:
        print(f"lora-ipc: {len(leases)} lease(s) still held at shutdown: "
              + ", ".join(f"{lease['holder']}:{lease['name']}@v{lease['version']}" for lease in leases),
              file=sys.stderr)
    server.stop()
    store.close()
    print("lora-ipc: stopped; shared memory released", flush=True)
    return 0

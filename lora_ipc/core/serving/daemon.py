"""``lora-ipc serve``: the adapter server as a standalone process that owns its slabs."""

from __future__ import annotations

import logging
import signal
import threading
import time

from .metrics import serve_metrics
from .server import TensorSetServer
from .store import TensorSetStore

log = logging.getLogger(__name__)


def serve(
    endpoint: str,
    *,
    keep: int = 2,
    lease_timeout_s: float = 30.0,
    drain_s: float = 5.0,
    metrics_port: int | None = None,
    check_finite: bool = False,
) -> int:
    """Serve until SIGTERM/SIGINT, then drain. Everything it says goes through this module's logger."""
    store = TensorSetStore(keep=keep, lease_timeout_s=lease_timeout_s, check_finite=check_finite)
    server = TensorSetServer(store, endpoint)  # raises EndpointInUse if another server holds it
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if metrics_port is not None and serve_metrics(store, metrics_port) is None:
        log.warning("prometheus_client is not installed: no metrics endpoint")
    server.start()
    log.info("serving on %s", endpoint)
    while not stop.wait(0.2):
        pass
    # drain: let in-flight fetches finish their copy and release, up to drain_s (stop is set: sleep, don't wait on it)
    deadline = time.monotonic() + drain_s
    while store.lease_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    held = store.lease_count()
    if held:
        leases = store.status().leases
        log.warning(
            "%d lease(s) still held at shutdown: %s%s",
            held,
            ", ".join(f"{lease.holder}:{lease.name}@v{lease.version}" for lease in leases[:10]),
            " …" if held > 10 else "",
        )
    server.stop()
    store.close()
    log.info("stopped; shared memory released")
    return 0

"""Attacks on the descriptor paths (issue 23, items 10, 11, 16): no descriptor a peer sends can block.

A same-uid peer chooses what an importer receives: a descriptor sent over the descriptor channel (the
only way a descriptor reaches an importer; handles name no ``/proc/<pid>/fd/<fd>`` any more). A FIFO
without a writer there made ``open`` block for ever, in a client's fetch (under the process-wide import
lock: every fetch of the process waited) and in the daemon's only serving thread. A channel that accepts
and never answers cost a fetch twice its timeout (the host fallback tried again) and held up every other
fetch of the process. Each test here failed on the code before; the attackers are real processes
(tests/hostile.py), the victims real clients and a real ``lora-ipc serve``.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from lora_ipc import AdapterClient, AdapterExporter, RemoteExporter
from lora_ipc.core import protocol as p
from lora_ipc.core.channels.connection import Connection
from lora_ipc.core.channels.fdchannel import push_fd
from lora_ipc.core.errors import BackendError, LoraIpcError
from lora_ipc.core.memory.layout import SlabLayout

from . import models
from .helpers import assert_same_adapter
from .hostile import HostileChannel

HANG_BOUND_S = 60  # "does not hang": far above any legitimate time here, far below for ever


def _in_thread(fn):
    """Run ``fn`` in a daemon thread; returns (thread, result dict: "value" or "error")."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def _fetch(endpoint: str, timeout_s: float, clients: list | None = None):
    client = AdapterClient(endpoint, timeout_s=timeout_s)
    if clients is not None:
        clients.append(client)
    try:
        return client.fetch("a")
    finally:
        if clients is None:
            client.close()


@pytest.fixture
def hostile(tmp_path):
    started = []

    def start(mode: str) -> HostileChannel:
        started.append(HostileChannel(f"ipc://{tmp_path}/h.sock", mode, str(tmp_path / "fifo")))
        return started[-1]

    yield start
    for server in started:
        server.kill()


@pytest.mark.parametrize("mode", ["fifo_table", "fifo_slab"])
def test_a_fifo_named_by_a_hostile_server_is_refused_not_opened(hostile, mode):
    """``fifo_table``: a real sealed slab and, as its generation table, a FIFO (before: the table was
    reopened read-only before any check and the fetch blocked for ever); ``fifo_slab``: the FIFO as the
    slab."""
    server = hostile(mode)
    clients: list = []
    thread, out = _in_thread(lambda: _fetch(server.endpoint, 10, clients))
    thread.join(HANG_BOUND_S)
    assert not thread.is_alive(), f"a fetch from a server sending a FIFO ({mode}) hangs"
    assert isinstance(out.get("error"), BackendError), out
    assert "not lora-ipc shared memory" in str(out["error"]) or "not a regular file" in str(out["error"]), out
    clients[0].close()


def test_a_fifo_named_in_a_publish_does_not_stop_the_daemon(tmp_path, daemons):
    """A FIFO of the sender pushed to the daemon's descriptor channel and named by a PublishRequest's token:
    refused with a typed error, and the daemon's only serving thread goes on (before: it blocked in open
    for ever, and every publish and fetch after it timed out)."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemons(endpoint)
    fifo_path = str(tmp_path / "fifo")
    os.mkfifo(fifo_path, 0o600)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)
    tensors = models.constant_adapter(3)
    layout = SlabLayout.plan(tensors)
    nbytes = -(-layout.used_bytes // (64 << 10)) * (64 << 10)
    handle = p.CpuSlabHandle(f"{os.getpid()}.fifo.1", nbytes, push_fd(endpoint, fifo))
    conn = Connection(endpoint, 20)
    try:
        with pytest.raises(LoraIpcError) as refused:
            conn.request(
                p.PublishRequest("evil", models.RANDOM_ADAPTER_CONFIG, handle, layout.to_wire(), layout.used_bytes),
                p.PublishReply,
            )
        assert type(refused.value) is BackendError, refused.value
        assert "not lora-ipc shared memory" in str(refused.value), refused.value
    finally:
        conn.close()
        os.close(fifo)
    with RemoteExporter(endpoint, timeout_s=20) as publisher:  # the daemon still serves
        assert publisher.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG) == 1
    with AdapterClient(endpoint, timeout_s=20) as client:
        assert_same_adapter(client.fetch("a").tensors, tensors)


TIMEOUT_S = 5.0
SLACK_S = 2.5  # start-up and scheduling on a loaded machine; the code before took a second TIMEOUT_S


def test_a_silent_channel_costs_a_fetch_its_timeout_once(hostile):
    """The channel accepts and never answers: the fetch ends within its timeout with a typed error, and the
    client does not fall back to host copies (before: twice the timeout, then host copies for life)."""
    server = hostile("silent")
    with AdapterClient(server.endpoint, timeout_s=TIMEOUT_S) as client:
        started = time.monotonic()
        with pytest.raises(BackendError, match="descriptor channel"):
            client.fetch("a")
        took = time.monotonic() - started
        assert took < TIMEOUT_S + SLACK_S, f"the fetch took {took:.1f}s with a timeout of {TIMEOUT_S}s"
        assert not client._host_only and client.host_fallbacks == 0
    assert server.accepted() == 1  # one attempt, not a second through the fallback


def test_a_silent_channel_delays_no_other_fetch_of_the_process(hostile, tmp_path):
    """While one fetch waits on a hostile channel, a fetch of another exporter in the same process goes
    through (before: it waited for the import lock that the hostile fetch held across the channel's I/O)."""
    server = hostile("silent")
    clients: list = []
    stuck, stuck_out = _in_thread(lambda: _fetch(server.endpoint, 120, clients))
    server.accepted()  # the hostile fetch now waits in the channel
    with AdapterExporter(f"ipc://{tmp_path}/legit.sock") as exporter:
        tensors = models.random_adapter(5)
        exporter.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
        legit, out = _in_thread(lambda: _fetch(exporter.endpoint, 30))
        legit.join(HANG_BOUND_S / 2)
        assert not legit.is_alive(), "a fetch of another exporter waited for the hostile one"
        assert "value" in out, out
        assert_same_adapter(out["value"].tensors, tensors)
        assert stuck.is_alive()  # the hostile fetch was still waiting all along
    server.kill()  # its channel connection closes: the hostile fetch ends
    stuck.join(HANG_BOUND_S)
    assert not stuck.is_alive() and isinstance(stuck_out.get("error"), LoraIpcError), stuck_out
    clients[0].close()

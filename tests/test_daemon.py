"""``lora-ipc serve`` as its own process: trainers publish into it and may exit; engines fetch from it."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
import zmq
from safetensors.torch import load_file

from lora_ipc import AdapterClient, RemoteExporter
from lora_ipc.core import protocol as p

from . import models
from .helpers import assert_same_adapter, cli, shm_fds, shm_files, start_daemon
from .procs import publish_from_short_lived_trainer


@pytest.fixture
def daemon(tmp_path):
    endpoint = f"ipc://{tmp_path}/daemon.sock"
    proc = start_daemon(endpoint, "--drain", "0.5")
    yield endpoint, proc
    if proc.poll() is None:
        proc.terminate()
        proc.wait(20)


def test_adapter_outlives_the_trainer_that_published_it(daemon, tmp_path):
    endpoint, proc = daemon
    assert publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref")) == 0  # the trainer has exited
    reference = load_file(tmp_path / "ref" / "adapter_model.safetensors")
    with AdapterClient(endpoint) as client:
        adapter = client.fetch("policy")
    assert adapter.version == 1
    assert_same_adapter(adapter.tensors, reference)
    assert shm_files() == [], "the trainer left its staging slab behind"


def test_status_json_reports_adapters_versions_and_leases(daemon, tmp_path):
    endpoint, proc = daemon
    publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref"))
    publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref2"), seed=1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", p.encode(p.FetchRequest("policy", 1, "holder-under-test"), 1)])
    assert sock.poll(5000)
    lease = p.decode(sock.recv_multipart()[-1]).message
    assert isinstance(lease, p.FetchReply)

    out = cli("status", "--endpoint", endpoint, "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert [(a["name"], a["version"]) for a in report["versions"]] == [("policy", 1), ("policy", 2)]
    assert report["pid"] == proc.pid and report["uptime_s"] > 0
    [held] = report["leases"]
    assert (held["holder"], held["name"], held["version"]) == ("holder-under-test", "policy", 1)
    assert report["versions"][0]["leases"] == 1

    human = cli("status", "--endpoint", endpoint)
    assert "policy" in human.stdout and "holder-under-test" in human.stdout

    sock.send_multipart([b"", p.encode(p.ReleaseRequest(lease.lease_id), 2)])
    assert sock.poll(5000)
    sock.recv_multipart()
    sock.close(0)
    report = json.loads(cli("status", "--endpoint", endpoint, "--json").stdout)
    assert report["leases"] == [] and report["metrics"]["fetches"] == 1


def test_sigterm_releases_shared_memory_and_socket(daemon, tmp_path):
    endpoint, proc = daemon
    publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref"))
    with AdapterClient(endpoint) as client:
        client.fetch("policy")
    assert shm_fds(proc.pid)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    print(f"daemon stopped {time.monotonic() - started:.2f}s after SIGTERM")
    assert shm_fds(proc.pid) == [] and shm_files(proc.pid) == []
    assert not os.path.exists(endpoint[len("ipc://") :])
    assert "shared memory released" in proc.stdout.read()


def test_held_leases_are_reported_at_shutdown(daemon, tmp_path):
    endpoint, proc = daemon
    publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref"))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", p.encode(p.FetchRequest("policy", None, "stuck-engine"), 1)])
    assert sock.poll(5000)
    sock.recv_multipart()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0
    assert "stuck-engine" in proc.stdout.read()
    assert shm_fds(proc.pid) == [] and shm_files(proc.pid) == []
    sock.close(0)


def test_second_serve_on_the_same_endpoint_fails_clearly(daemon):
    endpoint, proc = daemon
    out = cli("serve", "--endpoint", endpoint, timeout=30)
    assert out.returncode == 2
    assert "already served" in out.stderr
    with AdapterClient(endpoint, timeout_s=5) as client:  # the first daemon is unharmed
        assert client.list() == []


def test_prometheus_metrics(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"ipc://{tmp_path}/m.sock"
    proc = start_daemon(endpoint, "--metrics-port", str(port))
    try:
        publish_from_short_lived_trainer(endpoint, str(tmp_path / "ref"))
        with AdapterClient(endpoint) as client:
            client.fetch("policy")
            client.fetch("policy")
            deadline = time.monotonic() + 30  # the second release travels after the fetch returns
            while client.status().leases:
                assert time.monotonic() < deadline, "the daemon never saw the release"
                time.sleep(0.01)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        assert "lora_ipc_fetches_total 2.0" in body
        assert 'lora_ipc_adapter_version{adapter="policy"} 1.0' in body
        assert "lora_ipc_fetch_latency_seconds_count 2.0" in body
    finally:
        proc.terminate()
        proc.wait(20)


# ---- crash consistency and drain ---------------------------------------------------------------------


def test_nothing_outlives_a_sigkilled_daemon_or_an_unclosed_remote_exporter(tmp_path, daemons):
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemon = daemons(endpoint)
    script = (
        "from lora_ipc import RemoteExporter; import torch, os;"
        f"r = RemoteExporter({endpoint!r}); r.publish('a', {{'w': torch.ones(64, 64)}},"
        " {'r': 8, 'lora_alpha': 8, 'target_modules': ['q_proj']}); print(os.getpid(), flush=True); os._exit(0)"
    )
    trainer = int(
        subprocess.run([sys.executable, "-c", script], check=True, timeout=60, capture_output=True, text=True).stdout
    )  # exited without closing its RemoteExporter
    assert shm_files(trainer, daemon.pid) == [] and shm_fds(daemon.pid)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait(10)
    assert shm_files(daemon.pid) == [] and shm_fds(daemon.pid) == []
    again = daemons(endpoint)  # the stale socket is taken over
    again.terminate()
    assert again.wait(20) == 0


def test_drain_waits_while_a_lease_is_held(tmp_path, daemons):
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemon = daemons(endpoint, "--drain", "2")
    with RemoteExporter(endpoint) as remote:
        remote.publish("a", {"w": torch.ones(64, 64)}, models.RANDOM_ADAPTER_CONFIG)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send_multipart([b"", p.encode(p.FetchRequest("a", None, "stuck"), 1)])
    assert sock.poll(5000)
    sock.recv_multipart()
    started = time.monotonic()
    daemon.send_signal(signal.SIGTERM)
    assert daemon.wait(20) == 0
    waited = time.monotonic() - started
    assert waited >= 1.8, f"exited after {waited:.2f}s with a lease held and --drain 2"
    assert "stuck" in daemon.stdout.read()
    sock.close(0)


@pytest.mark.vllm
def test_demo_runs_end_to_end():
    pytest.importorskip("vllm")
    out = cli("demo", "--steps", "2", timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if "|" in line and line.strip()[:1].isdigit()]
    assert len(rows) == 2 and all(" True " in row for row in rows), out.stdout
    assert "median swap: lora-ipc" in out.stdout

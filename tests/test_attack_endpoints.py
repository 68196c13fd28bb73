"""Attacks on endpoints (security.md, *Endpoints*): who may serve a socket we connect to, and who may
connect to ours. Only local ``ipc://`` sockets, in directories of our own; a server of another uid is
refused before a byte is sent; a peer of another uid is filtered; a listener that never accepts cannot
hang a client; ``lora-ipc://`` URIs name an endpoint and parse by one rule.

Second-uid tests run as root with a real user made by ``useradd`` (the ``attacker`` fixture; skipped with a
reason otherwise); the other side of each attack is a real second process.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import zmq

from lora_ipc import (
    AdapterClient,
    AdapterExporter,
    BadAdapterURI,
    EndpointNotTrusted,
    ExporterUnavailable,
    LoraIpcError,
    RemoteExporter,
)
from lora_ipc.core import protocol as p
from lora_ipc.core.serving.server import TensorSetServer
from lora_ipc.core.serving.store import TensorSetStore
from lora_ipc.lora.uri import AdapterURI

from . import models
from .helpers import private_endpoint
from .hostile import run_as

# ---- who may connect: local sockets, owner-only, peer credentials ------------------------------------


def test_default_endpoint_is_private():
    with AdapterExporter() as exporter:
        path = exporter.endpoint[len("ipc://") :]
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://*:5555", "inproc://x", "ipc://"])
def test_network_endpoints_are_refused(endpoint):
    """Exporters, clients, remote exporters and lora-ipc:// URIs take local ipc:// endpoints only."""
    for make in (AdapterExporter, AdapterClient, RemoteExporter):
        with pytest.raises(LoraIpcError, match="only local ipc://"):
            make(endpoint)
    with pytest.raises(BadAdapterURI):
        AdapterURI.parse(str(AdapterURI("a", 1, "ipc:///x", "ab12")).replace("ipc%3A%2F%2F%2Fx", endpoint))


def test_peers_of_another_uid_are_refused(tmp_path):
    store = TensorSetStore()
    store.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    endpoint = f"ipc://{tmp_path}/other-user.sock"
    server = TensorSetServer(store, endpoint, allowed_uids={os.getuid() + 12345}).start()
    try:
        assert server.peer_check
        with AdapterClient(endpoint, timeout_s=1.0) as client, pytest.raises(ExporterUnavailable):
            client.list()
    finally:
        server.stop()
        store.close()


def test_clients_without_an_endpoint_use_the_daemon_path_and_create_nothing(monkeypatch, tmp_path):
    import tempfile

    from lora_ipc import RemoteExporter
    from lora_ipc.core.channels.endpoint import daemon_endpoint

    monkeypatch.delenv("LORA_IPC_ENDPOINT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with AdapterClient(timeout_s=0.2) as client, RemoteExporter(timeout_s=0.2) as remote:
        assert client.endpoint == remote.endpoint == daemon_endpoint()
    assert list(tmp_path.iterdir()) == []  # no invented private directory nobody serves
    monkeypatch.setenv("LORA_IPC_ENDPOINT", "ipc:///tmp/x.sock")
    with AdapterClient(timeout_s=0.2) as client:
        assert client.endpoint == "ipc:///tmp/x.sock"


# ---- endpoint hijack by another user -----------------------------------------------------------------


def _impostor(conn, endpoint):
    """Binds ``endpoint`` and answers every request with a fake adapter list; reports how many it saw."""
    sock = zmq.Context().socket(zmq.ROUTER)
    sock.bind(endpoint)
    conn.send("ready")
    seen = 0
    while not conn.poll(0):
        if sock.poll(50):
            identity, *_, payload = sock.recv_multipart()
            seen += 1
            fake = p.ListReply([p.TensorSetSummary("policy", [41, 42], 1)], "0f")
            sock.send_multipart([identity, b"", p.encode(fake, p.decode(payload).request_id)])
    conn.recv()
    conn.send(seen)


def attacker_dir(user, mode=0o755) -> str:
    d = tempfile.mkdtemp(prefix="lora-ipc-attacker-")
    os.chown(d, *user)
    os.chmod(d, mode)
    return d


def test_serve_refuses_a_default_directory_another_user_precreated(attacker, tmp_path):
    shared_tmp = tempfile.mkdtemp(prefix="lora-ipc-sticky-")
    os.chmod(shared_tmp, 0o1777)  # like /tmp
    planted = os.path.join(shared_tmp, f"lora-ipc-{os.getuid()}")
    os.mkdir(planted)
    os.chown(planted, *attacker)
    os.chmod(planted, 0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "LORA_IPC_ENDPOINT")}
    env["TMPDIR"] = shared_tmp
    out = subprocess.run(
        [sys.executable, "-m", "lora_ipc", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2, out
    assert "belongs to uid" in out.stderr and str(attacker[0]) in out.stderr
    assert os.listdir(planted) == []  # no socket was bound in it
    os.chown(planted, 0, 0)  # ours, but writable by others: refused too
    out = subprocess.run(
        [sys.executable, "-m", "lora_ipc", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "writable by group/other" in out.stderr, out
    shutil.rmtree(shared_tmp)


@pytest.fixture
def impostor(attacker):
    """A server of another uid, in a directory of its own: (endpoint, control pipe)."""
    directory = attacker_dir(attacker)
    endpoint = f"ipc://{directory}/daemon.sock"
    proc, conn = run_as(attacker, _impostor, endpoint)
    assert conn.poll(20) and conn.recv() == "ready"
    yield endpoint, conn
    proc.kill()
    shutil.rmtree(directory, ignore_errors=True)


def test_clients_refuse_a_server_of_another_uid(impostor):
    endpoint, conn = impostor
    with AdapterClient(endpoint, timeout_s=2) as client, pytest.raises(EndpointNotTrusted, match="uid"):
        client.list()
    with RemoteExporter(endpoint, timeout_s=2) as remote, pytest.raises(EndpointNotTrusted):
        remote.publish("secret-name", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    conn.send("count")
    assert conn.poll(10)
    assert conn.recv() == 0  # the impostor saw no request at all: no name, config or handle leaked


def test_an_explicitly_trusted_uid_is_allowed(impostor, attacker):
    endpoint, _ = impostor
    with AdapterClient(endpoint, timeout_s=2, trusted_uids={attacker[0]}) as client:
        assert client.versions("policy") == [41, 42]


# ---- a listener that never accepts -------------------------------------------------------------------


def test_a_listener_that_never_accepts_cannot_hang_a_client():
    """A same-uid process binds the endpoint, listens and never accepts: once its accept queue is full, a
    blocking connect would wait for as long as it likes. The client's check of who serves the endpoint
    gives up like any other unanswered request: ExporterUnavailable within its timeout (before: hung)."""
    import socket
    import threading

    from lora_ipc.core.errors import ExporterUnavailable

    endpoint = private_endpoint("never-accepts")
    path = endpoint[len("ipc://") :]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers = []
    try:
        listener.bind(path)
        listener.listen(0)
        for _ in range(4):  # fill the accept queue (a backlog of 0 still queues one)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
            except (BlockingIOError, OSError):
                s.close()
                break
            fillers.append(s)
        assert fillers, "the accept queue did not take a connection"
        outcome = []

        def fetch():
            try:
                with AdapterClient(endpoint, timeout_s=2.0) as client:
                    client.fetch("a")
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                outcome.append(exc)

        worker = threading.Thread(target=fetch, daemon=True)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the client hung on a listener that never accepts"
        assert len(outcome) == 1 and isinstance(outcome[0], ExporterUnavailable), outcome
    finally:
        for s in fillers:
            s.close()
        listener.close()
        os.unlink(path)


# ---- lora-ipc:// URIs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "uri",
    [
        "lora-ipc://[::1/v1?endpoint=ipc:///x",
        "lora-ipc://a/v99999999999999999999999",
        "lora-ipc://a/v0?endpoint=ipc:///x",
        "lora-ipc://a/x?endpoint=ipc:///x",
        "lora-ipc:///v1?endpoint=ipc:///x",
        "lora-ipc://a/v1?endpoint=ipc:///x&evil=1",
    ],
)
def test_malformed_uris_raise_a_lora_ipc_error(uri):
    with pytest.raises(BadAdapterURI):
        AdapterURI.parse(uri)


def test_uri_scheme_has_one_rule():
    uri = "LORA-IPC://policy/v3?endpoint=ipc%3A%2F%2F%2Ftmp%2Fx.sock&epoch=ab12"
    assert AdapterURI.matches(uri)
    assert AdapterURI.parse(uri) == AdapterURI("policy", 3, "ipc:///tmp/x.sock", "ab12")

"""Hostile peers and inputs: who may connect (local sockets, owner-only, peer credentials, a real second
user), what a handle may make an importer open, what a peer may do to shared memory and leases, what the
wire decodes (no pickle; errors echo the request id), and lora-ipc:// URIs. Several tests reproduce an
attack of the adversarial review (issue 8) as it was done.

Second-uid tests run as root with a real user made by ``useradd`` (skipped with a reason otherwise); the
other side of each attack is a real second process. What an attacker can make a process *hold* (memory,
slabs, leases, descriptors) is in test_resource_bounds.py.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pathlib
import pwd
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import msgpack
import pytest
import torch
import zmq

from lora_ipc import (
    AdapterClient,
    AdapterExporter,
    BackendError,
    BadAdapterURI,
    EndpointNotTrusted,
    ExporterUnavailable,
    LoraIpcError,
    RemoteExporter,
)
from lora_ipc.core import protocol as p
from lora_ipc.core.backends import open_slab
from lora_ipc.core.backends.cpu import CpuBackend
from lora_ipc.core.memory.shm import create_sealed
from lora_ipc.core.protocol import CpuSlabHandle
from lora_ipc.core.serving.server import TensorSetServer
from lora_ipc.core.serving.store import TensorSetStore
from lora_ipc.lora.uri import AdapterURI

from . import models
from .helpers import shm_fds
from .procs import ExporterProcess

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_ipc"


FORK = mp.get_context("fork")
ATTACKER = "loraipc-attacker"


@pytest.fixture(scope="module")
def attacker():
    """(uid, gid) of a real second user."""
    if os.getuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd to create a second user")
    try:
        pw = pwd.getpwnam(ATTACKER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", ATTACKER], check=True)
        pw = pwd.getpwnam(ATTACKER)
    return pw.pw_uid, pw.pw_gid


def run_as(user, target, *args):
    """Fork a process that drops to ``user`` and runs ``target(conn, *args)``; returns (process, conn)."""
    parent, child = FORK.Pipe()

    def main():
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
        target(child, *args)

    proc = FORK.Process(target=main, daemon=True)
    proc.start()
    return proc, parent


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


# ---- access: local sockets, owner-only, peer credentials ---------------------------------------------


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


# ---- shared memory: handles name no paths; what is opened is checked on the opened descriptor --------


def test_slabs_are_sealed_memfds_with_no_path():
    """No file under /dev/shm to pre-create, link or leave behind; no one can resize the memory."""
    import fcntl

    from lora_ipc.core.memory.shm import SEALS

    slab = CpuBackend().allocate(4096)
    try:
        assert os.readlink(f"/proc/self/fd/{slab.fd}") == f"/memfd:lora-ipc.{slab.slab_id} (deleted)"
        assert fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS) & SEALS == SEALS
        with pytest.raises(PermissionError):
            os.ftruncate(slab.fd, 1)
    finally:
        slab.close()


def test_a_handle_larger_than_the_slab_is_refused_not_a_sigbus():
    slab = CpuBackend().allocate(4096)
    try:
        with pytest.raises(BackendError, match="the handle says"):
            open_slab(CpuSlabHandle(slab.slab_id, 1 << 20, os.getpid(), slab.fd))
    finally:
        slab.close()


def _hold_memfd(conn, name, sealed):
    if sealed:
        fd = create_sealed(name, 1 << 16)
    else:
        fd = os.memfd_create("lora-ipc." + name, os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 16)
    conn.send((os.getpid(), fd))
    conn.recv()


def assert_import_refused(proc, conn, name, needle):
    """The memfd ``proc`` holds, named like a slab, must not import."""
    pid, fd = conn.recv()
    try:
        with pytest.raises(BackendError, match=needle):
            open_slab(p.CpuSlabHandle(name, 1 << 16, pid, fd))
    finally:
        conn.send("done")
        proc.join(5)


def test_importer_refuses_memory_of_another_user(attacker):
    assert_import_refused(*run_as(attacker, _hold_memfd, "x.1", True), "x.1", "not owned by this user")


def test_importer_refuses_a_handle_pointing_at_a_private_file_or_unsealed_memory(tmp_path):
    secret = tmp_path / "root-only"
    secret.write_bytes(b"s" * 4096)
    os.chmod(secret, 0o600)
    with open(secret, "rb") as f:  # what a link in /dev/shm used to make an importer open
        with pytest.raises(BackendError, match="not lora-ipc shared memory"):
            open_slab(p.CpuSlabHandle("x.2", 4096, os.getpid(), f.fileno()))
    parent, child = FORK.Pipe()
    holder = FORK.Process(target=_hold_memfd, args=(child, "x.3", False), daemon=True)
    holder.start()
    assert_import_refused(holder, parent, "x.3", "not sealed")


# ---- no SIGBUS: sealed memory nobody can truncate; importers read only -------------------------------


def test_publisher_cannot_truncate_its_staging_slab_under_the_daemon(tmp_path):
    exporter = ExporterProcess(keep=2)
    try:
        with RemoteExporter(exporter.endpoint, timeout_s=10) as remote:
            remote.publish("pushed", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
            with pytest.raises(PermissionError):  # the review's attack: truncate, then publish again
                os.ftruncate(remote._staging.fd, 0)
            assert remote.publish("pushed", models.random_adapter(2), models.RANDOM_ADAPTER_CONFIG) == 2
        with AdapterClient(exporter.endpoint) as client:
            assert client.fetch("pushed").version == 2  # the daemon is alive and serving
    finally:
        exporter.close()


def test_exporter_slab_cannot_be_truncated_under_a_client():
    exporter = ExporterProcess(keep=2)
    try:
        exporter.call("publish_random", "a", 1)
        with AdapterClient(exporter.endpoint) as client:
            client.fetch("a")
            slab_paths = shm_fds(exporter.pid)
            for path in slab_paths:
                fd = os.open(path, os.O_RDWR)
                try:
                    with pytest.raises(PermissionError):
                        os.ftruncate(fd, 0)
                finally:
                    os.close(fd)
            adapter = client.fetch("a")  # used to die here with SIGBUS
            assert torch.equal(next(iter(adapter.tensors.values())), next(iter(models.random_adapter(1).values())))
    finally:
        exporter.close()


def test_importers_open_slabs_read_only(exporter_proc):
    """Importers read slabs with pread (issue 15: no mapping, so a hole never costs them a page): every
    descriptor they hold on the exporter's memory is read-only, and nothing of it is mapped writable."""
    exporter_proc.call("publish_random", "ro", 1)
    with AdapterClient(exporter_proc.endpoint) as client:
        client.fetch("ro")
        modes = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
                with open(f"/proc/self/fdinfo/{fd}") as f:
                    flags = int(next(line.split()[1] for line in f if line.startswith("flags:")), 8)
            except (OSError, StopIteration):
                continue
            if target.startswith("/memfd:lora-ipc.") and f".{exporter_proc.pid}." in f".{target[16:]}":
                modes.append(flags & os.O_ACCMODE)
        assert modes and set(modes) == {os.O_RDONLY}, modes
        with open("/proc/self/maps") as f:
            # the exporter's memory only (slabs this process exported in earlier tests are its own, writable)
            perms = {
                line.split()[1]
                for line in f
                if f"/memfd:lora-ipc.{exporter_proc.pid}." in line
                or f"/memfd:lora-ipc.gen.{exporter_proc.pid}." in line
            }
        assert not any("w" in perm for perm in perms), perms


# ---- leases ------------------------------------------------------------------------------------------


def test_leases_are_bound_to_their_connection_and_unguessable():
    exporter = ExporterProcess(keep=2)
    try:
        exporter.call("publish_random", "a", 1)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.connect(exporter.endpoint)
        ids = []
        for i in range(5):
            sock.send_multipart([b"", p.encode(p.FetchRequest("a", None, "holder"), i + 1)])
            assert sock.poll(5000)
            ids.append(p.decode(sock.recv_multipart()[-1]).message.lease_id)
        assert all(abs(a - b) > 1000 for a, b in zip(ids, ids[1:]))  # random, not sequential
        other = zmq.Context.instance().socket(zmq.DEALER)
        other.connect(exporter.endpoint)
        other.send_multipart([b"", p.encode(p.ReleaseRequest(ids[0]), 9)])
        assert other.poll(5000)
        reply = p.decode(other.recv_multipart()[-1]).message
        assert isinstance(reply, p.ErrorReply) and reply.error == "LeaseError"
        assert exporter.call("status").lease_count == 5  # nobody else dropped them
        sock.send_multipart([b"", p.encode(p.ReleaseRequest(ids[0]), 10)])
        assert sock.poll(5000) and isinstance(p.decode(sock.recv_multipart()[-1]).message, p.ReleaseReply)
        sock.close(0)
        other.close(0)
    finally:
        exporter.close()


# ---- the wire: no pickle, typed errors, URIs ---------------------------------------------------------


def test_no_pickle_where_peer_bytes_are_decoded():
    forbidden = re.compile(
        r"\b(import pickle|from pickle|cPickle|cloudpickle|dill|recv_pyobj|send_pyobj|"
        r"pickle\.loads?|torch\.load|ForkingPickler|marshal\.loads?)\b"
    )
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert hits == []
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan really looked at the package


def test_version_mismatch_errors_echo_the_request_id(exporter_proc):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter_proc.endpoint)
    sock.send_multipart([b"", msgpack.packb([p.PROTOCOL_VERSION + 7, "list", 4242, {}])])
    assert sock.poll(5000)
    frame = p.decode(sock.recv_multipart()[-1])
    assert frame.request_id == 4242 and "protocol version" in frame.message.message
    sock.close(0)


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

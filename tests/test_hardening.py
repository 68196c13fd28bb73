"""Issue #8: the attacks of the adversarial review, each reproduced as it was done, and what must hold.

Second-uid tests run as root with a real user made by ``useradd`` (skipped with a reason otherwise);
the other side of each attack is a real second process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import msgpack
import pytest
import torch
import zmq

from lora_ipc import (
    AdapterClient,
    BackendError,
    BadAdapterURI,
    EndpointNotTrusted,
    LimitExceeded,
    Limits,
    LoraIpcError,
    RemoteExporter,
    SlabRecycled,
    VersionNotFound,
)
from lora_ipc import protocol as p
from lora_ipc.backends import open_slab
from lora_ipc.shm import create_sealed
from lora_ipc.store import AdapterStore
from lora_ipc.vllm.uri import AdapterURI

from . import models
from .helpers import open_fds, shm_fds, shm_files
from .procs import ExporterProcess

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
            fake = p.ListReply([p.AdapterSummary("policy", [41, 42], 1)])
            sock.send_multipart([identity, b"", p.encode(fake, p.decode(payload).request_id)])
    conn.recv()
    conn.send(seen)


def attacker_dir(user, mode=0o755) -> str:
    d = tempfile.mkdtemp(prefix="lora-ipc-attacker-")
    os.chown(d, *user)
    os.chmod(d, mode)
    return d


# ---- 1. endpoint hijack -----------------------------------------------------------------------


def test_serve_refuses_a_default_directory_another_user_precreated(attacker, tmp_path):
    shared_tmp = tempfile.mkdtemp(prefix="lora-ipc-sticky-")
    os.chmod(shared_tmp, 0o1777)  # like /tmp
    planted = os.path.join(shared_tmp, f"lora-ipc-{os.getuid()}")
    os.mkdir(planted)
    os.chown(planted, *attacker)
    os.chmod(planted, 0o777)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "LORA_IPC_ENDPOINT")}
    env["TMPDIR"] = shared_tmp
    out = subprocess.run([sys.executable, "-m", "lora_ipc", "serve"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2, out
    assert "belongs to uid" in out.stderr and str(attacker[0]) in out.stderr
    assert os.listdir(planted) == []  # no socket was bound in it
    os.chown(planted, 0, 0)  # ours, but writable by others: refused too
    out = subprocess.run([sys.executable, "-m", "lora_ipc", "serve"], env=env, capture_output=True, text=True,
                         timeout=60)
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


# ---- 2. links: handles name no paths; what is opened is checked on the opened descriptor -----------


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


# ---- 3. no SIGBUS: sealed, reserved memory -----------------------------------------------------


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


FULL_MEMORY_SCRIPT = textwrap.dedent("""
    import os, resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    import torch
    from lora_ipc import AdapterExporter, BackendError, AdapterClient
    exporter = AdapterExporter(keep=2)
    small = {"w": torch.ones(64, 64)}
    exporter.publish("small", small, {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]})
    before = sorted(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # memory for at most 1 MiB more
    try:
        exporter.publish("big", {"w": torch.ones(1024, 1024)}, {"r": 8, "lora_alpha": 8, "target_modules": ["q_proj"]})
        print("NO ERROR")
    except BackendError as exc:
        print("BackendError:", exc)
    leaked = sorted(set(os.listdir("/proc/self/fd")) - set(before))
    with AdapterClient(exporter.endpoint) as client:
        print("still serving", client.fetch("small").version, "leaked fds", leaked)
    exporter.close()
""")


def test_memory_that_cannot_be_reserved_is_a_backend_error_not_a_crash():
    out = subprocess.run([sys.executable, "-c", FULL_MEMORY_SCRIPT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "BackendError: cannot reserve" in out.stdout, out.stdout
    assert "still serving 1 leaked fds []" in out.stdout, out.stdout


@pytest.mark.skipif(os.getuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare -m")
def test_a_full_dev_shm_does_not_matter():
    """The review filled /dev/shm; slabs are memfds now, so a 64 KiB /dev/shm changes nothing."""
    script = ("from lora_ipc import AdapterExporter, AdapterClient; import torch;"
              "e = AdapterExporter(); e.publish('a', {'w': torch.ones(512, 512)}, {'r': 8, 'lora_alpha': 8,"
              " 'target_modules': ['q_proj']});"
              "c = AdapterClient(e.endpoint); print('fetched', c.fetch('a').version); c.close(); e.close()")
    out = subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs /dev/shm && "
                          f"dd if=/dev/zero of=/dev/shm/fill bs=4k count=16 2>/dev/null; "
                          f"{sys.executable} -c \"{script}\""], capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    if "mount" in out.stderr and out.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr[-200:]}")
    assert out.returncode == 0 and "fetched 1" in out.stdout, out.stderr[-2000:]


# ---- 4. torn adapters ---------------------------------------------------------------------------


def test_a_copy_overtaken_by_slab_reuse_is_never_returned(monkeypatch):
    """Lease expires mid-copy while the exporter recycles the slab: fetch returns one version or raises."""
    from lora_ipc.backends.cpu import CpuImportedSlab

    exporter = ExporterProcess(keep=1, lease_timeout_s=0.05)
    exporter.call("stream_constant", "c")
    slow = {"n": 0}

    def slow_copy(self, dst):  # the first half, a long stall (the lease expires), then the rest
        half = dst.numel() // 2
        self.read_into(dst[:half], 0)
        if slow["n"] < 6:
            slow["n"] += 1
            time.sleep(0.3)
        self.read_into(dst[half:], half)

    monkeypatch.setattr(CpuImportedSlab, "copy_into", slow_copy)
    recycled = 0
    try:
        with AdapterClient(exporter.endpoint, timeout_s=10) as client:
            while not client.versions("c"):
                time.sleep(0.01)
            for _ in range(12):
                try:
                    adapter = client.fetch("c", version=client.versions("c")[-1])
                except SlabRecycled:
                    recycled += 1
                    continue
                except VersionNotFound:  # keep=1 and a fast publisher: already gone before the lease
                    continue
                values = {float(t.float().unique().item()) for t in adapter.tensors.values() if t.numel()}
                assert values == {float(adapter.version)}, f"torn: v{adapter.version} holds {sorted(values)[:5]}"
            slow["n"] = 99  # copies at full speed again: the newest version is retried by the client, never torn
            newest = 0
            for _ in range(20):  # a fast publisher with keep=1 may still overtake a copy: never a torn one
                try:
                    adapter = client.fetch("c")
                except SlabRecycled:
                    continue
                values = {float(t.float().unique().item()) for t in adapter.tensors.values()}
                assert values == {float(adapter.version)}
                newest += 1
            assert newest >= 1
    finally:
        exporter.close()
    assert recycled >= 1  # the attack really happened (and was caught)


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
        assert exporter.call("status")["lease_count"] == 5  # nobody else dropped them
        sock.send_multipart([b"", p.encode(p.ReleaseRequest(ids[0]), 10)])
        assert sock.poll(5000) and isinstance(p.decode(sock.recv_multipart()[-1]).message, p.ReleaseReply)
        sock.close(0)
        other.close(0)
    finally:
        exporter.close()


# ---- 5. memory amplification ----------------------------------------------------------------------


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))


@pytest.mark.parametrize("kind", ["list", "publish", "fetch"])
def test_a_hostile_frame_costs_little(exporter_proc, kind):
    nested = b"\x91" * (16 << 20)  # 16 MiB of one-element arrays nested in each other
    empties = b"\xdd" + (8 << 20).to_bytes(4, "big") + b"\x90" * (8 << 20)  # 8M empty arrays
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter_proc.endpoint)
    before = rss(exporter_proc.pid)
    for i, body in enumerate((nested, empties)):
        frame = (b"\x94" + msgpack.packb(p.PROTOCOL_VERSION) + msgpack.packb(kind) + msgpack.packb(7 + i)
                 + b"\x81\xa7entries" + body)
        started = time.perf_counter()
        sock.send_multipart([b"", frame])
        assert sock.poll(10_000)
        reply = p.decode(sock.recv_multipart()[-1])
        assert isinstance(reply.message, p.ErrorReply) and reply.request_id == 7 + i, reply
        print(f"{kind}: {len(frame) >> 20} MiB hostile frame refused in {(time.perf_counter() - started) * 1e3:.1f} ms")
    grown = rss(exporter_proc.pid) - before
    print(f"{kind}: exporter RSS +{grown >> 10} KiB")
    assert grown < 48 << 20  # the frames themselves are 16 MiB; nothing built from them
    sock.close(0)


# ---- 6. bounded state ---------------------------------------------------------------------------


def test_leases_per_connection_are_capped_and_expiry_does_not_scan():
    store = AdapterStore(limits=Limits(max_leases_per_holder=8))
    store.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    for _ in range(8):
        store.lease("a", None, b"greedy")
    with pytest.raises(LimitExceeded, match="max_leases_per_holder"):
        store.lease("a", None, b"greedy")
    store.lease("a", None, b"polite")  # others are unaffected

    class NoScan(dict):
        def values(self):
            raise AssertionError("expiry scanned every lease")

    store._leases = NoScan(store._leases)
    for _ in range(1000):
        store.expire_leases()
    assert store.lease_count() == 9
    store.close()


def test_keep_bounds_slabs_even_when_a_client_pins_every_version():
    exporter = ExporterProcess(keep=2)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter.endpoint)
    try:
        for i in range(40):
            exporter.call("publish_random", "pinned", i % 5)
            sock.send_multipart([b"", p.encode(p.FetchRequest("pinned", None, "pinner"), i + 1)])
            assert sock.poll(5000)
            sock.recv_multipart()  # leased, never released
        status = exporter.call("status")
        # keep=2 + max_retiring_per_adapter=2 pinned + max_free_slabs=2 free
        assert status["slabs"]["live"] <= 6, status["slabs"]
        assert len(shm_fds(exporter.pid)) <= 7  # those slabs + the generation table
        assert status["metrics"]["leases_revoked"] >= 30
    finally:
        sock.close(0)
        exporter.close()


def test_adapter_names_and_slab_bytes_are_capped_and_failures_leave_nothing():
    store = AdapterStore(limits=Limits(max_adapters=20, max_slab_bytes=24 << 20))
    fds = open_fds(os.getpid())
    for i in range(20):
        store.publish(f"n{i}", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_adapters"):
        store.publish("one-too-many", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_slab_bytes"):
        store.publish("n0", {"w": torch.zeros(8 << 20)}, models.RANDOM_ADAPTER_CONFIG)
    assert [a["name"] for a in store.status()["adapters"]][:1] == ["n0"]
    assert store.status()["slabs"]["live"] == 20
    assert open_fds(os.getpid()) - fds == 2 * 20 + 2  # 20 slabs and the generation table (fd + mmap's dup)
    store.close()
    assert open_fds(os.getpid()) == fds


def test_shared_clients_are_bounded(tmp_path):
    from lora_ipc.client import MAX_SHARED_CLIENTS, _shared, shared_client

    for i in range(MAX_SHARED_CLIENTS):  # the context's own descriptors exist before we count
        shared_client(f"ipc://{tmp_path}/warm-{i}.sock")
    before = open_fds(os.getpid())
    for i in range(100):
        shared_client(f"ipc://{tmp_path}/nobody-{i}.sock")
    assert len(_shared) == MAX_SHARED_CLIENTS
    deadline = time.monotonic() + 10  # closed sockets give their descriptors back on libzmq's reaper thread
    while open_fds(os.getpid()) > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert open_fds(os.getpid()) <= before


# ---- 7. crash consistency -------------------------------------------------------------------------


def test_nothing_outlives_a_sigkilled_daemon_or_an_unclosed_remote_exporter(tmp_path, daemons):
    endpoint = f"ipc://{tmp_path}/d.sock"
    daemon = daemons(endpoint)
    script = ("from lora_ipc import RemoteExporter; import torch, os;"
              f"r = RemoteExporter({endpoint!r}); r.publish('a', {{'w': torch.ones(64, 64)}},"
              " {'r': 8, 'lora_alpha': 8, 'target_modules': ['q_proj']}); print(os.getpid(), flush=True); os._exit(0)")
    trainer = int(subprocess.run([sys.executable, "-c", script], check=True, timeout=60, capture_output=True,
                                 text=True).stdout)  # exited without closing its RemoteExporter
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


# ---- 8. smaller items -------------------------------------------------------------------------------


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "inproc://x", "ipc://"])
def test_clients_refuse_non_ipc_endpoints(endpoint):
    with pytest.raises(LoraIpcError, match="only local ipc://"):
        AdapterClient(endpoint)
    with pytest.raises(LoraIpcError, match="only local ipc://"):
        RemoteExporter(endpoint)
    with pytest.raises(BadAdapterURI):
        AdapterURI.parse(str(AdapterURI("a", 1, "ipc:///x", "ab12")).replace("ipc%3A%2F%2F%2Fx", endpoint))


@pytest.mark.parametrize("uri", ["lora-ipc://[::1/v1?endpoint=ipc:///x", "lora-ipc://a/v99999999999999999999999",
                                 "lora-ipc://a/v0?endpoint=ipc:///x", "lora-ipc://a/x?endpoint=ipc:///x",
                                 "lora-ipc:///v1?endpoint=ipc:///x", "lora-ipc://a/v1?endpoint=ipc:///x&evil=1"])
def test_malformed_uris_raise_a_lora_ipc_error(uri):
    with pytest.raises(BadAdapterURI):
        AdapterURI.parse(uri)


def test_uri_scheme_has_one_rule():
    uri = "LORA-IPC://policy/v3?endpoint=ipc%3A%2F%2F%2Ftmp%2Fx.sock&epoch=ab12"
    assert AdapterURI.matches(uri)
    assert AdapterURI.parse(uri) == AdapterURI("policy", 3, "ipc:///tmp/x.sock", "ab12")


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
            perms = {line.split()[1] for line in f if f"/memfd:lora-ipc.{exporter_proc.pid}." in line
                     or f"/memfd:lora-ipc.gen.{exporter_proc.pid}." in line}
        assert not any("w" in perm for perm in perms), perms


def test_version_mismatch_errors_echo_the_request_id(exporter_proc):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter_proc.endpoint)
    sock.send_multipart([b"", msgpack.packb([p.PROTOCOL_VERSION + 7, "list", 4242, {}])])
    assert sock.poll(5000)
    frame = p.decode(sock.recv_multipart()[-1])
    assert frame.request_id == 4242 and "protocol version" in frame.message.message
    sock.close(0)

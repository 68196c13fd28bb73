"""Resource bounds: what a peer (hostile or merely slow) or a publisher can make a process hold. Hostile
frames cost no more than the frame; leases, slabs, adapter names, slab bytes and shared clients are capped;
memory that cannot be reserved is a typed error, never a crash; /dev/shm is not used at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import msgpack
import pytest
import torch
import zmq

from lora_ipc import LimitExceeded, Limits
from lora_ipc.core import protocol as p
from lora_ipc.core.serving.store import TensorSetStore

from . import models
from .helpers import memfd_fds, open_fds, shm_fds
from .procs import ExporterProcess

# ---- memory amplification by hostile frames ----------------------------------------------------------


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
        frame = (
            b"\x94"
            + msgpack.packb(p.PROTOCOL_VERSION)
            + msgpack.packb(kind)
            + msgpack.packb(7 + i)
            + b"\x81\xa7entries"
            + body
        )
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


# ---- bounded state: leases, slabs, names, bytes, clients ---------------------------------------------


def test_leases_per_connection_are_capped_and_expiry_does_not_scan():
    store = TensorSetStore(limits=Limits(max_leases_per_holder=8))
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
        # keep=2 + max_retiring_per_name=2 pinned + max_free_slabs=2 free
        assert status.slabs.live <= 6, status.slabs
        assert len(shm_fds(exporter.pid)) <= 7  # those slabs + the generation table
        assert status.metrics.leases_revoked >= 30
    finally:
        sock.close(0)
        exporter.close()


def test_adapter_names_and_slab_bytes_are_capped_and_failures_leave_nothing():
    store = TensorSetStore(limits=Limits(max_names=20, max_slab_bytes=24 << 20))
    fds = memfd_fds(os.getpid())
    for i in range(20):
        store.publish(f"n{i}", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_names"):
        store.publish("one-too-many", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    with pytest.raises(LimitExceeded, match="max_slab_bytes"):
        store.publish("n0", {"w": torch.zeros(8 << 20)}, models.RANDOM_ADAPTER_CONFIG)
    assert [v.name for v in store.status().versions][:1] == ["n0"]
    assert store.status().slabs.live == 20
    assert memfd_fds(os.getpid()) - fds == 2 * 20 + 2  # 20 slabs and the generation table (fd + mmap's dup)
    store.close()
    assert memfd_fds(os.getpid()) == fds


def test_shared_clients_are_bounded(tmp_path):
    from lora_ipc.lora.adapters import MAX_SHARED_CLIENTS, _shared, shared_client

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


# ---- memory the system cannot give -------------------------------------------------------------------


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
    script = (
        "from lora_ipc import AdapterExporter, AdapterClient; import torch;"
        "e = AdapterExporter(); e.publish('a', {'w': torch.ones(512, 512)}, {'r': 8, 'lora_alpha': 8,"
        " 'target_modules': ['q_proj']});"
        "c = AdapterClient(e.endpoint); print('fetched', c.fetch('a').version); c.close(); e.close()"
    )
    out = subprocess.run(
        [
            "unshare",
            "-m",
            "sh",
            "-c",
            f"mount -t tmpfs -o size=64k tmpfs /dev/shm && "
            f"dd if=/dev/zero of=/dev/shm/fill bs=4k count=16 2>/dev/null; "
            f'{sys.executable} -c "{script}"',
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    if "mount" in out.stderr and out.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr[-200:]}")
    assert out.returncode == 0 and "fetched 1" in out.stdout, out.stderr[-2000:]

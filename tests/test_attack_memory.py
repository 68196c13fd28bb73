"""Attacks on shared memory (security.md, *Shared memory*): what a peer may make an importer open, and
what a peer may do to memory we share. Slabs are sealed memfds with no path, and their descriptors reach an
importer only by the descriptor channel; a descriptor of anything else sent that way (a private file,
unsealed memory, another user's memfd, a descriptor that is not a slab) is a ``BackendError`` checked on
the received descriptor before anything is opened through it; nobody can truncate a slab under its reader (no
SIGBUS); importers hold the exporter's memory read-only; memory that cannot be reserved is a typed error
and /dev/shm is not used at all.

What a *hostile exporter's* memory may cost a client (sparse or punched slabs, byte caps) is in
test_attack_identity.py; descriptors and paths that could block an importer in test_attack_descriptors.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from multiprocessing.reduction import recv_handle, send_handle

import pytest
import torch

from lora_ipc import AdapterClient, BackendError, RemoteExporter
from lora_ipc.core import protocol as p
from lora_ipc.core.backends import open_slab
from lora_ipc.core.backends.cpu import CpuBackend
from lora_ipc.core.channels.fdchannel import push_fd
from lora_ipc.core.memory.shm import create_sealed
from lora_ipc.core.protocol import CpuSlabHandle

from . import models
from .helpers import TOKEN, delivered, shm_fds, still_serving
from .hostile import FORK, run_as
from .procs import ExporterProcess

# ---- handles name no paths; what is opened is checked on the opened descriptor -----------------------


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
            open_slab(CpuSlabHandle(slab.slab_id, 1 << 20, TOKEN), delivered(slab.fd))
    finally:
        slab.close()


def _hold_memfd(conn, name, sealed):
    """Make a memfd named like a slab and send its descriptor to the test process (``SCM_RIGHTS``), as a
    hostile exporter's channel would send it."""
    if sealed:
        fd = create_sealed(name, 1 << 16)
    else:
        fd = os.memfd_create("lora-ipc." + name, os.MFD_CLOEXEC)
        os.ftruncate(fd, 1 << 16)
    send_handle(conn, fd, os.getppid())
    conn.recv()


def assert_import_refused(proc, conn, name, needle):
    """The memfd ``proc`` made, named like a slab and delivered by descriptor, must not import."""
    fd = recv_handle(conn)
    try:
        with pytest.raises(BackendError, match=needle):
            open_slab(p.CpuSlabHandle(name, 1 << 16, TOKEN), delivered(fd))
    finally:
        os.close(fd)
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
            open_slab(p.CpuSlabHandle("x.2", 4096, TOKEN), delivered(f.fileno()))
    parent, child = FORK.Pipe()
    holder = FORK.Process(target=_hold_memfd, args=(child, "x.3", False), daemon=True)
    holder.start()
    assert_import_refused(holder, parent, "x.3", "not sealed")


# ---- a handle in a peer's publish --------------------------------------------------------------------


def test_a_handle_naming_something_else_than_a_slab_is_rejected(served, staged):
    """A publish whose pushed descriptor is an open regular file (not a sealed lora-ipc memfd) is refused on
    the received fd; one whose token names no pushed descriptor is refused too (nothing else is opened)."""
    import msgspec

    exporter_proc, peer = served
    tensors, layout, slab = staged
    with open("/etc/hostname", "rb") as f:
        handle = msgspec.structs.replace(slab.handle, token=push_fd(exporter_proc.endpoint, f.fileno()))
        frame = p.encode(p.PublishRequest("x", {}, handle, layout.to_wire(), layout.used_bytes), 4)
        peer.expect_error(frame, "BackendError", "not lora-ipc shared memory")
        gone = msgspec.structs.replace(slab.handle, token=os.urandom(16))
        frame = p.encode(p.PublishRequest("x", {}, gone, layout.to_wire(), layout.used_bytes), 5)
        peer.expect_error(frame, "BackendError", "no descriptor was pushed")
    still_serving(exporter_proc)


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

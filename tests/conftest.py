"""Fixtures and collection rules; shared helper functions live in helpers.py."""

import os
import pwd
import shutil
import subprocess
import tempfile

import pytest
import torch

from .procs import ExporterProcess


@pytest.fixture(scope="module")
def exporter_proc():
    proc = ExporterProcess(keep=3)
    yield proc
    proc.close()


@pytest.fixture
def short_dir():
    """A fresh directory with a short path, for ipc:// sockets (a socket path must fit in 108 bytes, which
    pytest's tmp_path does not promise). Only sockets are expected in it: anything else fails the teardown."""
    d = tempfile.mkdtemp(prefix="lic-")
    yield d
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


@pytest.fixture(scope="module")
def endpoint():
    """One module's exporter endpoint (a socket in a fresh short directory), shared by its servers."""
    root = tempfile.mkdtemp(prefix="lic-")
    yield f"ipc://{root}/exporter.sock"
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny Llama (``lora_ipc.tiny``) saved as a Hugging Face model directory, once per module."""
    from lora_ipc.tiny import write_model_dir

    return write_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))


@pytest.fixture
def daemons():
    """``daemons(endpoint, *args)`` starts ``lora-ipc serve``; whatever is still running at the end is killed."""
    from .helpers import start_daemon

    started = []

    def start(endpoint, *extra):
        started.append(start_daemon(endpoint, *extra))
        return started[-1]

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


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


@pytest.fixture(scope="module")
def served(exporter_proc):
    """The module's exporter serving ``helpers.SERVED``, and a raw peer of it (``hostile.RawPeer``)."""
    from .helpers import SERVED
    from .hostile import RawPeer

    exporter_proc.call("publish_random", *SERVED)
    peer = RawPeer(exporter_proc.endpoint)
    yield exporter_proc, peer
    peer.close()


@pytest.fixture
def staged():
    """A real exported CPU slab holding a valid adapter, as a RemoteExporter would send it."""
    from lora_ipc.core.backends.cpu import CpuBackend
    from lora_ipc.core.memory.layout import SlabLayout

    from . import models

    tensors = models.random_adapter(3)
    layout = SlabLayout.plan(tensors)
    slab = CpuBackend().allocate(1 << 16)
    layout.pack(slab.destination_views(layout), tensors)
    yield tensors, layout, slab
    slab.close()


# The unit tier (`-m unit`, the command to run while editing; under a minute): modules whose tests start no
# child process and no vLLM engine. A unit test that starts one fails (no_child_processes below).
UNIT_MODULES = frozenset(
    {
        "test_attack_frames",
        "test_host_buffers",
        "test_layers",
        "test_docs",
        "test_refcount",
        "test_relay_units",
        "test_settings",
        "test_slab_pool",
        "test_transport_selection",
        "test_wire",
    }
)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if item.module.__name__.rsplit(".", 1)[-1] in UNIT_MODULES and "slow" not in item.keywords:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def no_child_processes(request, monkeypatch):
    """Holds the unit tier to its definition: a unit test that forks or runs a program fails."""
    if request.node.get_closest_marker("unit") is None:
        return

    def refused(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} is in the unit tier but started a child process")

    import os
    import subprocess

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refused)
    monkeypatch.setattr(os, "fork", refused)

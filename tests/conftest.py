"""Fixtures and collection rules; shared helper functions live in helpers.py."""

import os
import shutil
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


# The unit tier (`-m unit`, the command to run while editing; under a minute): modules whose tests start no
# child process and no vLLM engine. A unit test that starts one fails (no_child_processes below).
UNIT_MODULES = frozenset(
    {
        "test_bad_input",
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

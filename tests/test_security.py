"""Access: local sockets only, owner-only permissions, peer credentials checked, no pickle anywhere."""

import os
import pathlib
import re
import stat

import pytest
import torch

from lora_ipc import AdapterClient, AdapterExporter, BackendError, ExporterUnavailable, LoraIpcError
from lora_ipc.backends import open_slab
from lora_ipc.backends.cpu import CpuBackend
from lora_ipc.protocol import CpuSlabHandle
from lora_ipc.server import AdapterServer
from lora_ipc.store import AdapterStore

from . import models

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_ipc"


def test_default_endpoint_is_private():
    with AdapterExporter() as exporter:
        path = exporter.endpoint[len("ipc://"):]
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://*:5555", "inproc://x", "ipc://"])
def test_network_endpoints_are_refused(endpoint):
    with pytest.raises(LoraIpcError, match="only local ipc://"):
        AdapterExporter(endpoint)


def test_peers_of_another_uid_are_refused(tmp_path):
    store = AdapterStore()
    store.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
    endpoint = f"ipc://{tmp_path}/other-user.sock"
    server = AdapterServer(store, endpoint, allowed_uids={os.getuid() + 12345}).start()
    try:
        assert server.peer_check
        with AdapterClient(endpoint, timeout_s=1.0) as client, pytest.raises(ExporterUnavailable):
            client.list()
    finally:
        server.stop()
        store.close()


def test_slabs_are_sealed_memfds_with_no_path():
    """No file under /dev/shm to pre-create, link or leave behind; no one can resize the memory."""
    import fcntl

    from lora_ipc.shm import SEALS

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


def test_no_pickle_where_peer_bytes_are_decoded():
    forbidden = re.compile(r"\b(import pickle|from pickle|cPickle|cloudpickle|dill|recv_pyobj|send_pyobj|"
                           r"pickle\.loads?|torch\.load|ForkingPickler|marshal\.loads?)\b")
    hits = [f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
            for path in PACKAGE.rglob("*.py")
            for n, line in enumerate(path.read_text().splitlines(), 1) if forbidden.search(line)]
    assert hits == []
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan really looked at the package


def test_store_check_finite_rejects_nan_and_keeps_the_last_good_version():
    """The store-level switch (the daemon's and AdapterExporter's): NaN refused, version 1 stays."""
    tensors = models.random_adapter(1)
    store = AdapterStore(check_finite=True)
    try:
        store.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
        tensors[next(iter(tensors))][0, 0] = torch.nan
        with pytest.raises(LoraIpcError, match="non-finite"):
            store.publish("a", tensors, models.RANDOM_ADAPTER_CONFIG)
        assert [a["version"] for a in store.status()["adapters"]] == [1]
    finally:
        store.close()


def test_clients_without_an_endpoint_use_the_daemon_path_and_create_nothing(monkeypatch, tmp_path):
    import tempfile

    from lora_ipc import RemoteExporter
    from lora_ipc.endpoint import daemon_endpoint

    monkeypatch.delenv("LORA_IPC_ENDPOINT", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with AdapterClient(timeout_s=0.2) as client, RemoteExporter(timeout_s=0.2) as remote:
        assert client.endpoint == remote.endpoint == daemon_endpoint()
    assert list(tmp_path.iterdir()) == []  # no invented private directory nobody serves
    monkeypatch.setenv("LORA_IPC_ENDPOINT", "ipc:///tmp/x.sock")
    with AdapterClient(timeout_s=0.2) as client:
        assert client.endpoint == "ipc:///tmp/x.sock"

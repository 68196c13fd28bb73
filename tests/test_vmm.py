"""The CUDA VMM backend (backends/vmm.py over csrc/vmm.c).

Without a driver (CI): selecting it is a clean ``BackendError`` that says "no CUDA driver", ``auto``
falls back, its handles travel the protocol. With a GPU (``gpu`` marker, the device script): round
trip bitwise, read-only imports, an exporter SIGKILLed under an importer, torch's allocator untouched.
"""

import gc
import multiprocessing as mp
import os
import signal
import time

import msgspec
import pytest
import torch

from lora_ipc import AdapterClient, AdapterExporter
from lora_ipc.core import protocol as p
from lora_ipc.core.backends import backend_for, open_slab
from lora_ipc.core.channels.endpoint import ServerIdentity
from lora_ipc.core.errors import BackendError, ConfigError
from lora_ipc.core.fetching.imports import REGISTRY
from lora_ipc.core.memory import native

from . import models
from .helpers import assert_same_adapter, cuda_round_trip
from .procs import ExporterProcess

HAVE_DRIVER = native.status()[0]
VMM_ENV = {"LORA_IPC_CUDA_EXPORT": "vmm"}


def vmm_handle(**kw) -> p.VmmSlabHandle:
    fields = dict(
        slab_id="vmm.1.ab.1",
        nbytes=2 << 20,
        device_uuid="GPU-0",
        ready_event=b"e" * 64,
        generation=p.GenerationSlot(3, "gen.77.ab"),
        token=b"t" * 16,
    )
    fields.update(kw)
    return p.VmmSlabHandle(**fields)


def test_vmm_handles_travel_the_protocol_and_bad_ones_are_refused():
    def reply(slab):
        return p.FetchReply(
            name="a",
            version=1,
            lease_id=1,
            config_digest=b"c" * 16,
            config=None,
            slab_id="vmm.1.ab.1",
            slab=slab,
            generation=1,
            layout_digest=b"l" * 16,
            entries=None,
            used_bytes=10,
            live_slabs=["vmm.1.ab.1"],
            epoch="0f",
        )

    good = vmm_handle()
    assert p.decode(p.encode(reply(good))).message.slab == good
    for bad in (vmm_handle(token=b"short"), vmm_handle(nbytes=0), vmm_handle(ready_event=b"x" * 300)):
        with pytest.raises(p.ProtocolError):
            p.decode(p.encode(reply(bad)))


def test_an_unknown_export_mode_is_refused(monkeypatch):
    monkeypatch.setenv("LORA_IPC_CUDA_EXPORT", "magic")
    with pytest.raises(ConfigError, match="LORA_IPC_CUDA_EXPORT.*expected one of"):
        backend_for("cuda:0")


@pytest.mark.skipif(HAVE_DRIVER, reason="a CUDA driver is present")
def test_without_a_driver_vmm_says_so_and_auto_falls_back(monkeypatch):
    with pytest.raises(BackendError, match="^CUDA VMM unavailable: (no CUDA driver|lora_ipc native extension)"):
        backend_for("cuda:0", "vmm")
    with pytest.raises(BackendError, match="^CUDA VMM unavailable"):
        open_slab(vmm_handle(), lambda token: pytest.fail("no descriptor should be asked for"))
    with pytest.raises(BackendError, match="descriptor channel"):
        open_slab(vmm_handle(token=None))
    monkeypatch.setenv("LORA_IPC_CUDA_EXPORT", "auto")  # auto: the torch path, which says what it lacks
    with pytest.raises(BackendError, match="torch.cuda is not available"):
        backend_for("cuda:0")
    monkeypatch.setenv("LORA_IPC_CUDA_EXPORT", "vmm")
    with AdapterExporter(device="cuda:0") as exporter:  # a trainer asking for VMM gets the reason, typed
        with pytest.raises(BackendError, match="^CUDA VMM unavailable"):
            exporter.publish("a", models.random_adapter(0), models.RANDOM_ADAPTER_CONFIG)


# ---- on a GPU ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vmm_exporter():
    proc = ExporterProcess(keep=2, device="cuda", env=VMM_ENV)
    yield proc
    proc.close()


def _imported(client: AdapterClient):
    from lora_ipc.core.backends.vmm import VmmImportedSlab

    slabs = [client._slabs.get(s) for s in list(client._slabs.keys())]
    assert slabs and all(isinstance(s, VmmImportedSlab) for s in slabs), slabs
    return slabs[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DRIVER, reason="CUDA VMM unavailable")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_vmm_round_trip_is_bitwise_equal(vmm_exporter, tmp_path, dtype):
    with cuda_round_trip(vmm_exporter, tmp_path, f"p-{dtype}", dtype) as client:
        _imported(client)  # the slabs came as VMM imports


def _write_through_import(endpoint, name, conn):
    from lora_ipc import AdapterClient

    client = AdapterClient(endpoint)
    client.fetch(name)
    slab = next(client._slabs.get(s) for s in client._slabs.keys())
    conn.send(("imported", type(slab).__name__))
    try:
        slab.tensor[:1024].fill_(0x5A)
        torch.cuda.synchronize()
        conn.send(("wrote", None))
    except Exception as exc:  # the write faults: the context is lost, which is the point
        conn.send(("refused", f"{type(exc).__name__}: {exc}"[:500]))


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DRIVER, reason="CUDA VMM unavailable")
def test_an_importer_cannot_write_the_exporters_slab(vmm_exporter):
    vmm_exporter.call("publish_random", "w", 5)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_write_through_import, args=(vmm_exporter.endpoint, "w", child), daemon=True)
    proc.start()
    try:
        assert parent.poll(120)
        assert parent.recv() == ("imported", "VmmImportedSlab")
        outcome = parent.recv() if parent.poll(120) else ("died", proc.exitcode)
        print("importer write:", outcome)
        assert outcome[0] != "wrote", outcome
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    with AdapterClient(vmm_exporter.endpoint) as client:  # the exporter's bytes are untouched
        want = {k: v.cuda() for k, v in models.random_adapter(5).items()}
        assert_same_adapter(client.fetch("w").tensors, want)


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DRIVER, reason="CUDA VMM unavailable")
def test_an_exporter_killed_under_an_importer_leaves_its_data_until_released():
    proc = ExporterProcess(keep=1, device="cuda", env=VMM_ENV)
    try:
        proc.call("publish_random", "k", 9)
        client = AdapterClient(proc.endpoint)
        first = client.fetch("k")
        slab = _imported(client)
        kept = slab.copy_out(slab.nbytes)  # what the mapping holds now
        torch.cuda.synchronize()
        proc.kill()
        assert proc.proc.exitcode == -signal.SIGKILL, proc.proc.exitcode  # dead and reaped, its context gone
        assert torch.equal(slab.copy_out(slab.nbytes), kept)  # intact after the exporter died
        want = {k: v.cuda() for k, v in models.random_adapter(9).items()}
        assert_same_adapter(first.tensors, want)
        free_held, _ = torch.cuda.mem_get_info()
        nbytes, slab_id = slab.nbytes, slab.slab_id
        del slab, kept
        client.close()  # the last holder lets go: the registry closes the import, the mapping is unmapped
        gc.collect()
        torch.cuda.synchronize()
        deadline = time.monotonic() + 30
        while torch.cuda.mem_get_info()[0] < free_held + nbytes and time.monotonic() < deadline:
            time.sleep(0.1)
        free_after, _ = torch.cuda.mem_get_info()
        print("free before/after release:", free_held, free_after, "slab", nbytes)
        assert free_after >= free_held + nbytes
        assert REGISTRY.users(slab_id) == 0
    finally:
        proc.close()


@pytest.mark.gpu
@pytest.mark.skipif(not HAVE_DRIVER, reason="CUDA VMM unavailable")
def test_vmm_slabs_leave_torchs_allocator_alone(vmm_exporter):
    vmm_exporter.call("publish_random", "m0", 1)
    exporter_before = vmm_exporter.call("cuda_memory")
    torch.cuda.synchronize()
    with AdapterClient(vmm_exporter.endpoint) as client:
        client.fetch("m0")
        torch.cuda.synchronize()
        importer_before = torch.cuda.memory_allocated()
        for i in range(2, 6):  # new versions, new slabs (keep=2): allocated by cuMemCreate, not torch
            vmm_exporter.call("publish_random", f"m{i}", i)
            got = client.fetch(f"m{i}")
            del got
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == importer_before  # the mappings are not torch's
        assert vmm_exporter.call("cuda_memory")[0] == exporter_before[0]


def test_release_frees_a_vmm_import_once(monkeypatch):
    """The registry's accounting (no GPU needed): a VMM slab's surplus handle consumes nothing."""
    from lora_ipc.core.backends.vmm import VmmImportedSlab

    closed = []
    fake = VmmImportedSlab.__new__(VmmImportedSlab)
    fake.close = lambda: closed.append(True)
    fake.consume(vmm_handle())  # a no-op: no ref counter to give back
    monkeypatch.setattr("lora_ipc.core.fetching.imports.open_slab", lambda handle, receive=None: fake)
    # ownership is test_attack_identity's
    monkeypatch.setattr("lora_ipc.core.fetching.imports.check_owned_by", lambda handle, server: None)
    handle = vmm_handle(slab_id="vmm.reg.1")
    fake.handle = handle
    server = ServerIdentity("ipc:///nowhere/vmm.sock", os.getpid(), os.getuid())
    key, slab = REGISTRY.acquire(server, "vmm.reg.1", handle)
    assert slab is fake
    assert REGISTRY.acquire(server, "vmm.reg.1", msgspec.structs.replace(handle, token=b"u" * 16))[1] is fake
    REGISTRY.release(key)
    assert not closed
    REGISTRY.release(key)
    assert closed == [True]

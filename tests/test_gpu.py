"""The same two-process round trip on CUDA (CUDA IPC backend). Skipped without a GPU."""

import pytest
import torch
from safetensors.torch import load_file

from lora_ipc import AdapterClient

from . import models
from .helpers import assert_same_adapter, cuda_round_trip
from .procs import ExporterProcess

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_exporter():
    proc = ExporterProcess(keep=2, device="cuda")
    yield proc
    proc.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_round_trip_is_bitwise_equal(gpu_exporter, tmp_path, dtype):
    with cuda_round_trip(gpu_exporter, tmp_path, f"p-{dtype}", dtype) as client:
        on_cpu = client.fetch(f"p-{dtype}", device="cpu")
        assert all(t.device.type == "cpu" for t in on_cpu.tensors.values())


def test_cuda_expandable_segments_trainer(tmp_path):
    proc = ExporterProcess(device="cuda", env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    try:
        proc.call("publish_peft", "exp", "bfloat16", 1, str(tmp_path))
        with AdapterClient(proc.endpoint) as client:
            assert_same_adapter(client.fetch("exp").tensors, load_file(tmp_path / "adapter_model.safetensors"))
    finally:
        proc.close()


def test_an_expandable_segments_trainer_sigkilled_under_an_importer_leaves_owned_tensors_intact(tmp_path):
    """The trainer (expandable segments on) dies by SIGKILL while this process holds its slab imported and owns a
    copy: the owned tensors stay bitwise equal, the next fetch is a typed ExporterUnavailable within the client's
    timeout (no hang), closing the import frees it, and CUDA still works in this process."""
    from lora_ipc import ExporterUnavailable

    proc = ExporterProcess(device="cuda", env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    try:
        proc.call("publish_peft", "k", "bfloat16", 1, str(tmp_path))
        expected = load_file(tmp_path / "adapter_model.safetensors")
        client = AdapterClient(proc.endpoint, timeout_s=2.0)
        owned = client.fetch("k").tensors
        assert_same_adapter(owned, expected)
        proc.kill()
        with pytest.raises(ExporterUnavailable):
            client.fetch("k")
        assert_same_adapter(owned, expected)  # the copy is ours: the dead trainer's memory is not behind it
        client.close()
        del owned
        torch.cuda.synchronize()
        probe = torch.arange(1 << 20, device="cuda")
        assert int(probe.sum()) == (1 << 20) * ((1 << 20) - 1) // 2  # the context is not poisoned
    finally:
        proc.close()


def test_cuda_memory_flat_over_cycles(gpu_exporter):
    with AdapterClient(gpu_exporter.endpoint) as client:

        def cycle(n):
            for i in range(n):
                gpu_exporter.call("publish_random", "soak", i % 3)
                client.fetch("soak")

        cycle(50)
        torch.cuda.synchronize()
        warm = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), gpu_exporter.call("cuda_memory"))
        cycle(300)
        torch.cuda.synchronize()
        after = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved(), gpu_exporter.call("cuda_memory"))
        print("client allocated/reserved, exporter allocated/reserved: warm", warm, "after", after)
        assert after == warm
        expected = {k: v.cuda() for k, v in models.random_adapter(299 % 3).items()}
        assert_same_adapter(client.fetch("soak").tensors, expected)


# ---- issue #9: each hypothesis of the source review, as a test --------------------------------------

CYCLES_PER_MS = 1_000_000  # torch.cuda._sleep cycles, roughly 0.5-1 ms on current GPUs


def _importer_main(conn, endpoint, name):
    from lora_ipc import AdapterClient

    with AdapterClient(endpoint) as client:
        client.fetch(name)
        conn.send("imported")
        conn.recv()
    conn.send("closed")


def test_many_importers_then_close_returns_exporter_memory(tmp_path):
    """Item 1: 3 importing processes + 2 clients in one process, then every import closes and the exporter
    closes its store: both sides are back at their baseline (a counter left at 1 pins the slab in torch's limbo)."""
    from .procs import SPAWN

    consumer_baseline = torch.cuda.memory_allocated()
    proc = ExporterProcess(keep=2, device="cuda")
    try:
        baseline = proc.call("cuda_memory")
        proc.call("publish_random", "multi", 1)
        children = []
        for _ in range(3):
            parent, child = SPAWN.Pipe()
            p = SPAWN.Process(target=_importer_main, args=(child, proc.endpoint, "multi"), daemon=True)
            p.start()
            assert parent.poll(120) and parent.recv() == "imported"
            children.append((p, parent))
        a, b = AdapterClient(proc.endpoint), AdapterClient(proc.endpoint)
        ref = {k: v.cuda() for k, v in models.random_adapter(1).items()}
        got_a, got_b = a.fetch("multi").tensors, b.fetch("multi").tensors
        assert_same_adapter(got_a, ref)
        assert_same_adapter(got_b, ref)
        a.close()
        assert_same_adapter(b.fetch("multi").tensors, ref)  # the other client's import is intact
        b.close()
        for p, parent in children:
            parent.send("close")
            assert parent.poll(60) and parent.recv() == "closed"
            p.join(30)
        del got_a, got_b, ref
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == consumer_baseline
        allocated, reserved = proc.call("close_exporter")
        print("exporter memory baseline", baseline, "after close", (allocated, reserved))
        assert allocated == baseline[0]
    finally:
        proc.close()


def test_exports_nobody_imported_do_not_pin_the_slab(monkeypatch):
    """P1: versions never fetched (no export made for them), a host-fallback consumer whose CUDA import failed,
    and handles that never reached an importer (a dropped reply): after close, memory is back at baseline."""
    from lora_ipc import BackendError
    from lora_ipc.core.backends.cuda import CudaBackend
    from lora_ipc.core.fetching import imports

    base = torch.cuda.memory_allocated()
    backend = CudaBackend("cuda")
    slabs = [backend.allocate(8 << 20) for _ in range(4)]
    handles = [slabs[0].handle_for_import() for _ in range(3)]  # exported, never imported
    assert slabs[0].unconfirmed_exports() == 3
    for s in slabs:
        s.close()
    del slabs, handles
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    assert torch.cuda.memory_allocated() == base

    real = imports.open_slab

    def refuse_cuda(handle, receive=None):
        if handle.TAG == "cuda":
            raise BackendError("CUDA IPC import refused (forced by the test)")
        return real(handle, receive)  # the host copy's memfd comes by the descriptor channel

    proc = ExporterProcess(keep=2, device="cuda")
    try:
        baseline = proc.call("cuda_memory")
        for v in range(4):
            proc.call("publish_random", "never", v)
        proc.call("publish_random", "refused", 1)
        monkeypatch.setattr(imports, "open_slab", refuse_cuda)
        with AdapterClient(proc.endpoint) as client:
            client.fetch("refused")
            assert client.host_fallbacks == 1
        allocated, _ = proc.call("close_exporter")
        assert allocated == baseline[0]
    finally:
        proc.close()


def test_allocator_settings_set_in_two_calls_effective_settings_kept_and_handles_plain(tmp_path):
    """Item 2 / P2: expandable_segments on from the environment, then a second settings string that omits it
    (torch keeps it on; the string no longer says so): publish still gets a plain cudaMalloc ('c') slab, and
    the EFFECTIVE settings (memory snapshot) and the settings string are what they were."""
    proc = ExporterProcess(device="cuda", env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    try:
        proc.call("set_allocator_settings", "max_split_size_mb:256,garbage_collection_threshold:0.7")
        before = proc.call("effective_settings")
        assert before[1]["expandable_segments"] is True, before  # the precondition of the fault
        assert "expandable" not in before[0]
        proc.call("publish_peft", "exp", "bfloat16", 1, str(tmp_path))
        assert proc.call("handle_kinds") == ["c"]
        assert proc.call("effective_settings") == before
        with AdapterClient(proc.endpoint) as client:
            assert_same_adapter(client.fetch("exp").tensors, load_file(tmp_path / "adapter_model.safetensors"))
    finally:
        proc.close()


def _cycles_per_ms() -> float:
    """torch.cuda._sleep cycles per millisecond on this GPU (measured, not assumed)."""
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(20_000_000)
    end.record()
    end.synchronize()
    return 20_000_000 / start.elapsed_time(end)


def test_a_busy_caller_stream_delays_neither_first_import_fetch_nor_release(gpu_exporter):
    """P4/P5: with 1 s of work queued on the caller's stream, the first fetch (the import), a second fetch and
    the release of the import (client close: torch's IPC deleter synchronizes the CURRENT stream) all return
    while that work still runs."""
    gpu_exporter.call("publish_random", "busy", 4)
    busy = int(1000 * _cycles_per_ms())
    client = AdapterClient(gpu_exporter.endpoint)
    try:
        torch.cuda.synchronize()
        torch.cuda._sleep(busy)
        adapter = client.fetch("busy")
        after_first = torch.cuda.current_stream().query()
        again = client.fetch("busy")
        after_second = torch.cuda.current_stream().query()
    finally:
        client.close()
    after_release = torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert not after_first, "the first import waited for the caller's queued work"
    assert not after_second, "the fetch waited for the caller's queued work"
    assert not after_release, "releasing the import synchronized the caller's stream"
    expected = {k: v.cuda() for k, v in models.random_adapter(4).items()}
    assert_same_adapter(adapter.tensors, expected)
    assert_same_adapter(again.tensors, expected)


def test_the_first_import_does_not_make_the_callers_stream_wait_for_the_exporter(gpu_exporter):
    """P5: torch records each export's event on the exporter's current stream and the import makes the
    importer's current stream wait on it. With 1 s of work queued on the exporter's stream, the caller's
    stream must not inherit that wait (lora_ipc exports and imports on streams of its own)."""
    gpu_exporter.call("publish_random", "exporter-busy", 5)
    busy = int(1000 * _cycles_per_ms())
    with AdapterClient(gpu_exporter.endpoint) as client:
        torch.cuda.synchronize()
        gpu_exporter.call("queue_work", busy)
        adapter = client.fetch("exporter-busy")  # the import
        waits = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        assert not waits, "the caller's stream waits for the exporter's queued work"
        assert_same_adapter(adapter.tensors, {k: v.cuda() for k, v in models.random_adapter(5).items()})


def test_lora_ipc_stream_is_its_own_not_one_of_torchs_pooled_streams():
    """P6: torch.cuda.Stream() hands out a pool of 32 streams round robin; lora_ipc's must not be among them."""
    from lora_ipc.core.backends.cuda_streams import copy_stream

    own = copy_stream(torch.cuda.current_device())
    others = [torch.cuda.Stream() for _ in range(64)]
    assert all(s.cuda_stream != own.cuda_stream for s in others)


def test_host_staging_waits_for_a_pack_on_a_side_stream():
    """P3: the trainer packs on a side stream behind 0.5 s of work; a host-transport client's copy (staged
    by the server thread) must see that version's bytes, not what the slab held before."""
    proc = ExporterProcess(keep=2, device="cuda")
    try:
        cycles = int(500 * _cycles_per_ms())
        with AdapterClient(proc.endpoint, transport="host") as client:
            for value in (1, 2, 3):
                version = proc.call("publish_constant_on_side_stream", "side", value, cycles)
                adapter = client.fetch("side", version=version)
                assert all(bool((t == float(value)).all()) for t in adapter.tensors.values()), value
    finally:
        proc.close()


def test_client_in_the_exporting_process_uses_the_slab_without_fallback():
    """P8: CUDA IPC cannot open a handle in the process that made it; a client there must still fetch."""
    from lora_ipc import AdapterExporter

    tensors = {k: v.cuda() for k, v in models.random_adapter(6).items()}
    base = torch.cuda.memory_allocated()
    with AdapterExporter(device="cuda") as exporter:
        exporter.publish("self", tensors, models.RANDOM_ADAPTER_CONFIG)
        with AdapterClient(exporter.endpoint, transport="cuda") as client:  # "cuda": no host fallback
            adapter = client.fetch("self")
            assert client.host_fallbacks == 0
            assert_same_adapter(adapter.tensors, tensors)
            del adapter
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base


def test_worn_out_slab_refuses_without_leaking_the_lease_and_is_not_recycled(monkeypatch):
    """P7: past the export cap a slab refuses importers (LimitExceeded) without leaking the lease taken for
    the fetch, and a worn-out slab is closed when freed instead of going back to the free pool."""
    from lora_ipc import AdapterExporter, LoraIpcError
    from lora_ipc.core.backends import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "MAX_EXPORTS_PER_SLAB", 2)
    monkeypatch.setattr(cuda_backend, "HARD_MAX_EXPORTS_PER_SLAB", 3)
    tensors = {k: v.cuda() for k, v in models.random_adapter(7).items()}
    with AdapterExporter(device="cuda", keep=1) as exporter:
        exporter.publish("cap", tensors, models.RANDOM_ADAPTER_CONFIG)
        worn = exporter.store.pool.slabs()[0]
        for _ in range(3):  # each client imports anew (the process's import closes with it): one export each
            with AdapterClient(exporter.endpoint) as client:
                client.fetch("cap")
        with AdapterClient(exporter.endpoint) as client, pytest.raises(LoraIpcError, match="export"):
            client.fetch("cap")
        assert not exporter.store._leases, "the refused fetch's lease leaked"
        exporter.publish("cap", tensors, models.RANDOM_ADAPTER_CONFIG)
        exporter.publish("cap", tensors, models.RANDOM_ADAPTER_CONFIG)
        assert worn.tensor is None and worn not in exporter.store.pool.free_slabs()
        with AdapterClient(exporter.endpoint) as client:
            assert_same_adapter(client.fetch("cap").tensors, tensors)


def test_remote_exporter_sends_a_fresh_export_each_publish_and_the_daemon_consumes_it(tmp_path):
    """P9: every publish carries its own export; the daemon imports the first and consumes the rest, so no
    counter is left unconfirmed (or decremented twice after a daemon restart)."""
    from lora_ipc import RemoteExporter

    from .helpers import start_daemon

    endpoint = f"ipc://{tmp_path}/daemon.sock"
    daemon = start_daemon(endpoint)
    try:
        with RemoteExporter(endpoint, device="cuda") as remote:
            for seed in range(3):
                remote.publish(
                    "remote",
                    {k: v.cuda() for k, v in models.random_adapter(seed).items()},
                    models.RANDOM_ADAPTER_CONFIG,
                )
                staging = remote._staging
                assert staging._exports == seed + 1
                assert staging.unconfirmed_exports() == 0
            with AdapterClient(endpoint) as client:
                expected = {k: v.cuda() for k, v in models.random_adapter(2).items()}
                assert_same_adapter(client.fetch("remote").tensors, expected)
    finally:
        daemon.terminate()
        daemon.wait(30)


@pytest.fixture
def imported_random_slab():
    """(exported slab of 64 MiB of random bytes, its import in this process): the import of a daemon's publish."""
    from lora_ipc.core.backends import open_slab
    from lora_ipc.core.backends.cuda import CudaBackend

    slab = CudaBackend().allocate(64 << 20)
    slab.tensor.copy_(torch.randint(0, 256, (slab.nbytes,), dtype=torch.uint8, device=slab.device))
    slab.mark_ready()
    imported = open_slab(slab.handle_for_import())
    yield slab, imported
    imported.close()
    slab.close()


def test_copy_into_copies_once_straight_into_the_destination(imported_random_slab):
    """Issue 16 item 6: a publish into a daemon (CudaImportedSlab.copy_into) allocates no temporary of the
    slab's size on the way (it used to copy_out into one, then copy again)."""
    slab, imported = imported_random_slab
    dst = torch.empty(slab.nbytes, dtype=torch.uint8, device=slab.device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    imported.copy_into(dst)
    assert torch.cuda.max_memory_allocated() - base < slab.nbytes // 2, "copy_into allocated a temporary"
    assert torch.equal(dst, slab.tensor)


def test_copy_into_comes_after_work_the_caller_queued_on_the_destination(imported_random_slab):
    """copy_into writes the caller's memory on lora_ipc's stream: a fill the caller queued on dst behind 0.2 s of
    work must land before the copy, not over it (Note [one copy into the caller's memory])."""
    slab, imported = imported_random_slab
    dst = torch.zeros(slab.nbytes, dtype=torch.uint8, device=slab.device)
    torch.cuda.synchronize()
    torch.cuda._sleep(int(200 * _cycles_per_ms()))
    dst.fill_(7)  # queued on the caller's stream behind the sleep
    imported.copy_into(dst)
    torch.cuda.synchronize()
    assert torch.equal(dst, slab.tensor)


def test_fetch_does_not_wait_for_work_queued_on_the_callers_stream(gpu_exporter):
    """Item 3: with ~50 ms of work queued on the current stream, the fetch returns before that work ends."""
    gpu_exporter.call("publish_random", "side", 1)
    with AdapterClient(gpu_exporter.endpoint) as client:
        client.fetch("side")  # import once
        torch.cuda.synchronize()
        torch.cuda._sleep(50 * CYCLES_PER_MS)
        adapter = client.fetch("side")
        assert not torch.cuda.current_stream().query(), "the fetch waited for the caller's queued work"
        torch.cuda.synchronize()
        assert_same_adapter(adapter.tensors, {k: v.cuda() for k, v in models.random_adapter(1).items()})


def _torn_reads(proc, client, packs):
    torn = 0
    for v in range(1, packs + 1):
        published = proc.call("publish_constant_behind_work", "order", v, 100 * CYCLES_PER_MS)
        adapter = client.fetch("order", version=published)
        torn += any(bool((t != float(v)).any()) for t in adapter.tensors.values())
    return torn


def test_the_ready_event_orders_the_copy_after_the_pack(monkeypatch):
    """Item 4: 20 packs, each behind ~0.1 s of queued producer work: 0 torn reads; without the event
    wait the same run sees torn reads (so the test can fail)."""
    from lora_ipc.core.backends import cuda as cuda_backend

    proc = ExporterProcess(keep=1, device="cuda")
    try:
        with AdapterClient(proc.endpoint) as client:
            assert _torn_reads(proc, client, 20) == 0
            monkeypatch.setattr(torch.cuda.Stream, "wait_event", lambda self, event: None)
            assert _torn_reads(proc, client, 5) > 0
    finally:
        proc.close()
    assert cuda_backend  # imported for the patch target's module


def test_a_refused_handle_is_a_backend_error_naming_torch():
    """Item 5: a handle this torch cannot read is a BackendError, never a crash."""
    import msgspec

    from lora_ipc import BackendError
    from lora_ipc.core.backends import open_slab

    proc = ExporterProcess(device="cuda")
    try:
        proc.call("publish_random", "v", 1)
        with AdapterClient(proc.endpoint) as client:
            reply_handle = None
            client.fetch("v")
            slab = next(iter(client._slabs.values()))
            reply_handle = slab.handle
        bad = msgspec.structs.replace(  # no generation table to receive: straight to torch's rebuild
            reply_handle,
            slab_id="bad",
            storage_handle=b"\xff" + reply_handle.storage_handle[1:],
            generation=None,
            token=None,
        )
        with pytest.raises(BackendError, match="torch"):
            open_slab(bad)
    finally:
        proc.close()


def test_host_fallback_when_cuda_ipc_cannot_be_imported(gpu_exporter, monkeypatch):
    """Item 6: a forced import failure -> one warning, host-staged copy (once per version), correct bytes."""
    from lora_ipc import BackendError
    from lora_ipc.core.fetching import imports

    real = imports.open_slab

    def refuse_cuda(handle, receive=None):
        if handle.TAG == "cuda":
            raise BackendError("CUDA IPC import refused (forced by the test)")
        return real(handle, receive)  # the host copy's memfd comes by the descriptor channel

    monkeypatch.setattr(imports, "open_slab", refuse_cuda)
    gpu_exporter.call("publish_random", "fb", 2)
    with AdapterClient(gpu_exporter.endpoint) as client:
        for _ in range(3):
            adapter = client.fetch("fb", device="cuda")
            assert_same_adapter(adapter.tensors, {k: v.cuda() for k, v in models.random_adapter(2).items()})
        assert client.host_fallbacks == 3
    assert gpu_exporter.call("status").metrics.host_stagings >= 1

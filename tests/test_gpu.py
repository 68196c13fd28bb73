"""The same two-process round trip on CUDA (CUDA IPC backend). Skipped without a GPU."""


import pytest
import torch
from safetensors.torch import load_file

from lora_ipc import AdapterClient

from . import models
from .helpers import assert_same_adapter
from .procs import ExporterProcess

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_exporter():
    proc = ExporterProcess(keep=2, device="cuda")
    yield proc
    proc.close()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_cuda_round_trip_is_bitwise_equal(gpu_exporter, tmp_path, dtype):
    gpu_exporter.call("publish_peft", f"p-{dtype}", dtype, 3, str(tmp_path))
    reference = load_file(tmp_path / "adapter_model.safetensors")
    with AdapterClient(gpu_exporter.endpoint) as client:
        adapter = client.fetch(f"p-{dtype}")
        assert all(t.is_cuda for t in adapter.tensors.values())
        assert_same_adapter(adapter.tensors, reference)
        for t in adapter.tensors.values():  # owned: scaling in place must not reach the exporter
            t.mul_(0)
        assert_same_adapter(client.fetch(f"p-{dtype}").tensors, reference)
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
    """Item 1: 3 importing processes + 2 clients in one process, then close -> exporter back to baseline."""
    from .procs import SPAWN

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
        assert_same_adapter(a.fetch("multi").tensors, ref)
        assert_same_adapter(b.fetch("multi").tensors, ref)
        a.close()
        assert_same_adapter(b.fetch("multi").tensors, ref)  # the other client's import is intact
        b.close()
        for p, parent in children:
            parent.send("close")
            assert parent.poll(60) and parent.recv() == "closed"
            p.join(30)
        for i in range(3):  # push "multi" v1 out of keep: its slab is freed once every importer let go
            proc.call("publish_random", "other", i)
        proc.call("publish_random", "multi", 2)
        proc.call("publish_random", "multi", 3)
        torch.cuda.synchronize()
        allocated, reserved = proc.call("cuda_memory")
        print("exporter memory baseline", baseline, "after", (allocated, reserved))
        assert allocated <= baseline[0] + 8 * (64 << 10) * 4  # only the live small slabs remain
    finally:
        proc.close()


def test_allocator_settings_untouched_and_handles_plain(tmp_path):
    """Item 2: the trainer's settings string is identical after publishing; handles are cudaMalloc ('c')."""
    conf = "expandable_segments:True,max_split_size_mb:256,garbage_collection_threshold:0.7"
    proc = ExporterProcess(device="cuda", env={"PYTORCH_CUDA_ALLOC_CONF": conf})
    try:
        before = proc.call("allocator_settings")
        proc.call("publish_peft", "exp", "bfloat16", 1, str(tmp_path))
        assert proc.call("allocator_settings") == before
        assert proc.call("handle_kinds") == ["c"]
        with AdapterClient(proc.endpoint) as client:
            assert_same_adapter(client.fetch("exp").tensors, load_file(tmp_path / "adapter_model.safetensors"))
    finally:
        proc.close()


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
    from lora_ipc.backends import cuda as cuda_backend

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
    import dataclasses

    from lora_ipc import BackendError
    from lora_ipc.backends import open_slab

    proc = ExporterProcess(device="cuda")
    try:
        proc.call("publish_random", "v", 1)
        with AdapterClient(proc.endpoint) as client:
            reply_handle = None
            client.fetch("v")
            slab = next(iter(client._slabs.values()))
            reply_handle = slab.handle
        bad = dataclasses.replace(reply_handle, slab_id="bad", storage_handle=b"\xff" + reply_handle.storage_handle[1:])
        with pytest.raises(BackendError, match="torch"):
            open_slab(bad)
    finally:
        proc.close()


def test_host_fallback_when_cuda_ipc_cannot_be_imported(gpu_exporter, monkeypatch):
    """Item 6: a forced import failure -> one warning, host-staged copy (once per version), correct bytes."""
    from lora_ipc import BackendError, imports

    real = imports.open_slab

    def refuse_cuda(handle):
        if handle.TAG == "cuda":
            raise BackendError("CUDA IPC import refused (forced by the test)")
        return real(handle)

    monkeypatch.setattr(imports, "open_slab", refuse_cuda)
    gpu_exporter.call("publish_random", "fb", 2)
    with AdapterClient(gpu_exporter.endpoint) as client:
        for _ in range(3):
            adapter = client.fetch("fb", device="cuda")
            assert_same_adapter(adapter.tensors, {k: v.cuda() for k, v in models.random_adapter(2).items()})
        assert client.host_fallbacks == 3
    assert gpu_exporter.call("status")["metrics"]["host_stagings"] >= 1

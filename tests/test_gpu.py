"""The same two-process round trip on CUDA (CUDA IPC backend). Skipped without a GPU."""


import pytest
import torch
from safetensors.torch import load_file

from lora_ipc import AdapterClient

from . import models
from .conftest import assert_same_adapter
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
        want = {k: v.cuda() for k, v in models.random_adapter(299 % 3).items()}
        assert_same_adapter(client.fetch("soak").tensors, want)

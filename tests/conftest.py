import os

import pytest
import torch

from .procs import ExporterProcess


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.detach().cpu().contiguous().reshape(-1).view(torch.uint8),
                       b.detach().cpu().contiguous().reshape(-1).view(torch.uint8))


def assert_same_adapter(got: dict, want: dict) -> None:
    assert list(got) == list(want) or set(got) == set(want), (sorted(set(got) ^ set(want)))[:5]
    for k in want:
        assert bitwise_equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def exporter_proc():
    proc = ExporterProcess(keep=3)
    yield proc
    proc.close()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def shm_mappings(pid: int) -> int:
    with open(f"/proc/{pid}/maps") as f:
        return sum(1 for line in f if "/dev/shm/lora-ipc." in line)


def footprint(exporter_pid: int) -> dict:
    """What must stay flat in a steady publish/fetch loop: the exporter's shared memory and fds,
    and this (client) process's fds and shared-memory mappings."""
    from lora_ipc.backends.cpu import shm_files_of

    files = shm_files_of(exporter_pid)
    me = os.getpid()
    return {"exporter_shm_files": len(files), "exporter_shm_bytes": sum(os.path.getsize(f) for f in files),
            "exporter_fds": open_fds(exporter_pid), "client_fds": open_fds(me), "client_shm_mappings": shm_mappings(me)}

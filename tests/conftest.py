"""Fixtures and collection rules; shared helper functions live in helpers.py."""

import pytest
import torch

from .procs import ExporterProcess


@pytest.fixture(scope="module")
def exporter_proc():
    proc = ExporterProcess(keep=3)
    yield proc
    proc.close()


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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)

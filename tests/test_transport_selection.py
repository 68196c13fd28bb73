"""Issue #9, the parts that are not CUDA-specific: one import per slab per process, transport choice
(``LORA_IPC_TRANSPORT``), and the automatic host fallback when a slab cannot be imported."""

from __future__ import annotations

import logging

import pytest

from lora_ipc import AdapterClient, BackendError, LoraIpcError
from lora_ipc.core.backends import cuda_allocator
from lora_ipc.core.fetching import imports
from lora_ipc.core.fetching.client import transport_mode

from . import models
from .helpers import assert_same_adapter, shm_mappings


def test_two_clients_in_one_process_share_one_import(exporter_proc):
    import os

    exporter_proc.call("publish_random", "shared", 2)
    before = shm_mappings(os.getpid())
    a = AdapterClient(exporter_proc.endpoint)
    b = AdapterClient(exporter_proc.endpoint)
    try:
        assert_same_adapter(a.fetch("shared").tensors, models.random_adapter(2))
        assert_same_adapter(b.fetch("shared").tensors, models.random_adapter(2))
        (slab_id,) = [s for s in a._slabs]
        assert imports.REGISTRY.users(slab_id) == 2
        assert shm_mappings(os.getpid()) == before + 1  # one kept read-only mapping for the two clients
        assert slab_fds(slab_id.slab_id) == 2  # one descriptor for the two clients, and the mapping's duplicate
        a.close()
        assert imports.REGISTRY.users(slab_id) == 1
        assert_same_adapter(b.fetch("shared").tensors, models.random_adapter(2))
    finally:
        a.close()
        b.close()
    assert imports.REGISTRY.users(slab_id) == 0 and slab_fds(slab_id.slab_id) == 0


def slab_fds(slab_id: str) -> int:
    """Descriptors this process holds on the memfd of ``slab_id``."""
    import os

    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == f"/memfd:lora-ipc.{slab_id} (deleted)"
        except OSError:
            pass
    return count


def test_transport_mode_comes_from_the_environment(monkeypatch):
    assert transport_mode() == "auto"
    monkeypatch.setenv("LORA_IPC_TRANSPORT", "HOST")
    assert transport_mode() == "host"
    monkeypatch.setenv("LORA_IPC_TRANSPORT", "nvlink")
    with pytest.raises(LoraIpcError, match="LORA_IPC_TRANSPORT"):
        transport_mode()


def _failing_first_import(monkeypatch):
    real = imports.open_slab
    calls = {"n": 0}

    def open_slab(handle, *receive):  # receive: the descriptor channel (fdchannel.py)
        calls["n"] += 1
        if calls["n"] == 1:
            raise BackendError("CUDA IPC import failed: operation not permitted (simulated)")
        return real(handle, *receive)

    monkeypatch.setattr(imports, "open_slab", open_slab)
    return calls


def test_auto_falls_back_to_the_host_copy_once_with_one_warning(exporter_proc, monkeypatch, caplog):
    exporter_proc.call("publish_random", "fallback", 3)
    calls = _failing_first_import(monkeypatch)
    with (
        caplog.at_level(logging.WARNING, logger="lora_ipc.core.fetching.client"),
        AdapterClient(exporter_proc.endpoint) as client,
    ):
        assert_same_adapter(client.fetch("fallback").tensors, models.random_adapter(3))
        assert_same_adapter(client.fetch("fallback").tensors, models.random_adapter(3))
        assert client.host_fallbacks == 2 and client._host_only
    warnings = [r for r in caplog.records if "falling back to host-staged" in r.getMessage()]
    assert len(warnings) == 1 and "simulated" in warnings[0].getMessage()
    assert calls["n"] == 2


def test_forced_cuda_transport_does_not_fall_back(exporter_proc, monkeypatch):
    exporter_proc.call("publish_random", "nofallback", 4)
    _failing_first_import(monkeypatch)
    with AdapterClient(exporter_proc.endpoint, transport="cuda") as client:
        with pytest.raises(BackendError, match="simulated"):
            client.fetch("nofallback")
        assert_same_adapter(client.fetch("nofallback").tensors, models.random_adapter(4))


class _TorchAllocatorSettings:
    """torch's allocator-settings parser as c10/core/AllocatorConfig.cpp ``parseArgs`` behaves: every string
    resets max_split_size_mb / garbage_collection_threshold / roundup_power2_divisions to their defaults and
    keeps expandable_segments unless it names it; the getter returns the last string."""

    def __init__(self):
        self.last = ""
        self.effective = {"expandable_segments": False, "max_split_size_mb": None, "garbage_collection_threshold": None}

    def set(self, settings: str) -> None:
        self.last = settings
        self.effective["max_split_size_mb"] = self.effective["garbage_collection_threshold"] = None
        for part in filter(None, settings.replace(" ", "").split(",")):
            key, _, value = part.partition(":")
            self.effective[key] = value == "True" if key == "expandable_segments" else value


def test_plain_segments_forces_expandable_off_then_restores_effective_settings(monkeypatch):
    """P2: expandable_segments switched on by an earlier call, then a string that omits it: the slab's
    allocation still runs with it off, and afterwards both the effective settings and the string are as before
    (issue 18; the earlier test read the string, which is the fault)."""
    fake = _TorchAllocatorSettings()
    monkeypatch.setattr(cuda_allocator, "_set_allocator_settings", fake.set)
    monkeypatch.setattr(cuda_allocator, "allocator_settings", lambda: fake.last)
    fake.set("expandable_segments:True")
    fake.set("max_split_size_mb:256,garbage_collection_threshold:0.7")
    before = (fake.last, dict(fake.effective))
    assert before[1]["expandable_segments"] is True and "expandable" not in before[0]
    with cuda_allocator.plain_segments():
        assert fake.effective == {**before[1], "expandable_segments": False}
    assert (fake.last, fake.effective) == before

"""Two real processes: an AdapterExporter in a spawned child, the AdapterClient here (CPU backend)."""

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from lora_ipc import (
    Adapter,
    AdapterClient,
    AdapterNotFound,
    ExporterUnavailable,
    TensorSet,
    TensorSetClient,
    TensorSetNotFound,
    VersionNotFound,
)

from . import models
from .helpers import assert_same_adapter, bitwise_equal, footprint, publish_fetch_cycles, shm_fds, shm_files
from .procs import ExporterProcess


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_peft_round_trip_is_bitwise_equal_to_save_pretrained(exporter_proc, tmp_path, dtype):
    name = f"policy-{dtype}"
    version = exporter_proc.call("publish_peft", name, dtype, 3, str(tmp_path))
    reference = load_file(tmp_path / "adapter_model.safetensors")
    with AdapterClient(exporter_proc.endpoint) as client:
        adapter = client.fetch(name)
    assert (adapter.name, adapter.version) == (name, version)
    assert len(reference) == 2 * 2 * len(models.TARGET_MODULES)  # 2 layers, A and B, 7 projections
    for module in models.TARGET_MODULES:
        assert any(f".{module}.lora_B" in k for k in adapter.tensors)
    assert_same_adapter(adapter.tensors, reference)
    assert all(t.dtype == getattr(torch, dtype) for t in adapter.tensors.values())
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "peft_type", "bias", "use_dora"):
        assert adapter.peft_config[key] == saved[key]
    assert sorted(adapter.peft_config["target_modules"]) == sorted(saved["target_modules"])


def test_the_core_moves_tensor_sets_and_the_lora_layer_reads_them_as_adapters(exporter_proc):
    """A tensor set published with no config (what refit sends) and an adapter, each read by the core
    client and by the LoRA one: same bytes, same config, each under its layer's name."""
    bucket = exporter_proc.call("publish_tensor_set", "core-weights", 21)
    policy = exporter_proc.call("publish_random", "core-policy", 22)
    with TensorSetClient(exporter_proc.endpoint) as core, AdapterClient(exporter_proc.endpoint) as lora:
        fetched = core.fetch("core-weights")
        assert type(fetched) is TensorSet and (fetched.name, fetched.version, fetched.config) == (
            "core-weights",
            bucket,
            {},
        )
        assert_same_adapter(fetched.tensors, models.random_adapter(21))
        as_adapter = lora.fetch("core-weights")
        assert type(as_adapter) is Adapter and as_adapter.peft_config == {}
        assert_same_adapter(as_adapter.tensors, fetched.tensors)
        core_policy, adapter = core.fetch("core-policy", policy), lora.fetch("core-policy", policy)
        assert core_policy.config == adapter.peft_config == adapter.config == models.RANDOM_ADAPTER_CONFIG
        assert_same_adapter(adapter.tensors, models.random_adapter(22))
        assert {"core-weights", "core-policy"} <= {summary.name for summary in core.list()}
        # a name never published: the core's error for the core client, the LoRA name for the LoRA one
        with pytest.raises(TensorSetNotFound) as core_missing:
            core.fetch("never-published")
        assert type(core_missing.value) is TensorSetNotFound
        with pytest.raises(AdapterNotFound):
            lora.fetch("never-published")


def test_tensors_are_owned_not_views_of_the_slab(exporter_proc):
    exporter_proc.call("publish_random", "owned", 1)
    with AdapterClient(exporter_proc.endpoint) as client:
        a = client.fetch("owned")
        before = {k: v.clone() for k, v in a.tensors.items()}
        for t in a.tensors.values():
            t.mul_(0)  # what vLLM's in-place lora_B scaling would do to a shared view
        b = client.fetch("owned")
    assert_same_adapter(b.tensors, before)


def test_newest_by_default_and_old_versions_fetchable_while_publishing(exporter_proc):
    with AdapterClient(exporter_proc.endpoint) as client:
        v1 = exporter_proc.call("publish_random", "hist", 11)
        first = client.fetch("hist", v1).tensors
        v2 = exporter_proc.call("publish_random", "hist", 12)
        v3 = exporter_proc.call("publish_random", "hist", 13)
        assert (v1, v2, v3) == (v1, v1 + 1, v1 + 2)
        assert client.fetch("hist").version == v3
        assert client.versions("hist") == [v1, v2, v3]
        assert_same_adapter(client.fetch("hist", v1).tensors, first)
        assert_same_adapter(client.fetch("hist", v3).tensors, models.random_adapter(13))
        assert_same_adapter(client.fetch("hist", v2).tensors, models.random_adapter(12))
        v4 = exporter_proc.call("publish_random", "hist", 14)  # keep=3: v1 retires
        assert client.fetch("hist").version == v4
        with pytest.raises(VersionNotFound):
            client.fetch("hist", v1)
        with pytest.raises(AdapterNotFound):
            client.fetch("no-such-adapter")
        assert "hist" in [a.name for a in client.list()]


def test_thousand_cycles_leave_memory_and_fds_flat():
    exporter = ExporterProcess(keep=2)
    client = AdapterClient(exporter.endpoint)

    try:
        publish_fetch_cycles(exporter, client, 100)  # warm-up: slab pool and caches reach steady state
        warm = footprint(exporter.pid)
        adapter = publish_fetch_cycles(exporter, client, 900)
        after = footprint(exporter.pid)
        assert_same_adapter(adapter.tensors, models.random_adapter(899 % 5))
        growth = {k: after[k] - warm[k] for k in warm}
        print("after warm-up", warm, "growth over 900 cycles", growth)
        assert growth == {k: 0 for k in warm}
        assert warm["exporter_shm_files"] <= 4  # keep=2 versions + one recycled slab + the generation table
    finally:
        client.close()
        exporter.close()
    assert shm_fds(exporter.pid) == [] and shm_files(exporter.pid) == []  # close releases everything


def test_exporter_sigkill_mid_stream_raises_documented_error_within_timeout():
    exporter = ExporterProcess(keep=2)
    client = AdapterClient(exporter.endpoint, timeout_s=1.5)
    try:
        exporter.call("stream", "live")
        kept = None
        for _ in range(200):
            kept = client.fetch("live")
        snapshot = {k: v.clone() for k, v in kept.tensors.items()}
        exporter.kill()
        start = time.monotonic()
        with pytest.raises(ExporterUnavailable):
            client.fetch("live")
        elapsed = time.monotonic() - start
        print(f"detected a dead exporter in {elapsed:.2f}s (timeout 1.5s)")
        assert elapsed < 1.5 + 0.5
        assert_same_adapter(kept.tensors, snapshot)  # what the client owns is untouched
    finally:
        client.close()
        exporter.close()
    # the dead exporter's shared memory went with it: memfds, no file left anywhere to sweep
    assert shm_fds(exporter.pid) == [] and shm_files(exporter.pid) == []


def test_exporter_closed_mid_fetch_loop_raises_and_keeps_owned_tensors():
    exporter = ExporterProcess(keep=2)
    client = AdapterClient(exporter.endpoint, timeout_s=1.0)
    try:
        exporter.call("publish_random", "c", 5)
        got = client.fetch("c")
        exporter.close()
        with pytest.raises(ExporterUnavailable):
            client.fetch("c")
        assert bitwise_equal(next(iter(got.tensors.values())), next(iter(models.random_adapter(5).values())))
    finally:
        client.close()
        exporter.close()


def test_peft_fast_path_follows_updates_dtype_changes_and_new_adapters():
    """Publishing a PeftModel holds its live parameters (no state-dict walk per publish): in-place
    updates, ``.to(dtype)`` and a re-created adapter must all show up in what is published."""
    from peft import get_peft_model_state_dict

    from lora_ipc import AdapterExporter

    model = models.peft_model(0, torch.float32)
    with AdapterExporter() as exporter, AdapterClient(exporter.endpoint) as client:

        def published_equals_model():
            exporter.publish("m", model)
            assert_same_adapter(client.fetch("m").tensors, get_peft_model_state_dict(model))

        published_equals_model()
        models.train_step(model, 1)
        published_equals_model()
        model.to(torch.bfloat16)
        published_equals_model()
        assert next(iter(client.fetch("m").tensors.values())).dtype == torch.bfloat16
        model.delete_adapter("default")
        model.add_adapter("default", models.lora_config(4))
        published_equals_model()
        assert next(iter(client.fetch("m").tensors.values())).shape[0] == 4  # rank 4 now

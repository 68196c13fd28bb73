"""publish_sharded: an FSDP2-sharded PeftModel (DTensor parameters) on two gloo processes (CPU); rank 0
publishes, and what a client fetches equals the unsharded model's adapter bitwise."""

import os

import pytest
import torch

from lora_ipc import AdapterClient, AdapterExporter

from .helpers import assert_same_adapter
from .procs import SPAWN

fsdp = pytest.importorskip("torch.distributed.fsdp")


def _rank_main(rank: int, port: int, results) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from lora_ipc.integrations.sharded import publish_sharded

    from . import models

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = models.peft_model(0)
        models.train_step(model, 3)
        mesh = init_device_mesh("cpu", (2,))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        assert lora and all(isinstance(p, DTensor) for p in lora)
        assert any(p.to_local().numel() < p.numel() for p in lora)  # really sharded
        exporter = AdapterExporter() if rank == 0 else None
        version = publish_sharded("policy", model, publish=exporter.publish if exporter else None)
        if rank == 0:
            with AdapterClient(exporter.endpoint, timeout_s=10) as client:
                fetched = client.fetch("policy", version)
                results.put((version, {k: v.clone() for k, v in fetched.tensors.items()}, fetched.peft_config))
            exporter.close()
        else:
            results.put((version, None, None))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_sharded_adapter_published_from_rank_0_equals_the_unsharded_one():
    from lora_ipc.lora.peft import adapter_from

    from . import engine, models

    unsharded = models.peft_model(0)
    models.train_step(unsharded, 3)
    want, want_config = adapter_from(unsharded)
    results = SPAWN.Queue()
    port = engine.free_port()
    procs = [SPAWN.Process(target=_rank_main, args=(r, port, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=300) for _ in procs]
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    ((version, tensors, config),) = [g for g in got if g[1] is not None]
    assert [g[0] for g in got if g[1] is None] == [None]
    assert version == 1 and set(tensors) == set(want)
    assert_same_adapter(tensors, {k: v.detach() for k, v in want.items()})
    assert config["r"] == want_config["r"] and sorted(config["target_modules"]) == sorted(want_config["target_modules"])
    assert all(t.dtype == torch.float32 for t in tensors.values())


def test_the_gather_skips_the_base_embedding_matrices_vllm_discards(monkeypatch):
    """An ``embed_tokens`` target: PEFT's state dict carries the full base embedding matrix; the sharded
    gather never touches it (no gather of vocabulary × hidden elements per step) and publishes what
    ``adapter_from`` publishes, bitwise."""
    from peft import LoraConfig

    import lora_ipc.integrations.sharded as sharded
    from lora_ipc.lora.peft import adapter_from, vllm_discards

    from . import models

    model = models.family_peft("llama", LoraConfig(r=8, target_modules=["embed_tokens", "q_proj"]))
    from peft import get_peft_model_state_dict

    assert any(vllm_discards(k) for k in get_peft_model_state_dict(model)), "the case this test is about"
    gathered: list[tuple[int, ...]] = []
    real_full = sharded._full
    monkeypatch.setattr(sharded, "_full", lambda t: (gathered.append(tuple(t.shape)), real_full(t))[1])
    tensors, config = sharded.gather_lora_state(model)
    want, want_config = adapter_from(model)
    assert tensors is not None and not any(vllm_discards(k) for k in tensors)
    assert len(gathered) == len(want)
    assert_same_adapter(tensors, want)
    assert config == want_config

"""OpenRLHF 0.11.2's real ``create_vllm_engines`` + ``RolloutRayActor`` + ``WorkerWrap`` on the real vLLM CPU
engine, with ``lora_ipc.integrations.openrlhf`` installed: the code of docs/guides/rl-frameworks.md.

Run by tests/test_integrations.py inside a private network namespace (only ``lo``), with the Python of the
cached venv that has openrlhf (scripts/rl_frameworks.sh). Ray gets one fake GPU: ``create_vllm_engines``
asks for ``{"GPU": 1, "CPU": 1}`` bundles; the engine is vLLM's CPU build all the same.
"""

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")
pytest.importorskip("openrlhf")

from .helpers import skip_unless_loopback_only  # noqa: E402

skip_unless_loopback_only("tests/test_integrations.py")


from lora_ipc.benchmarks.cpu_engine import ENGINE_ENV  # noqa: E402

from . import ray_actors  # noqa: E402
from .engine import PROMPTS  # noqa: E402

TEXT = [" ".join(f"w{t}" for t in p[1:]) for p in PROMPTS]  # the tiny tokenizer's words for the test prompts


@pytest.fixture(scope="module")
def cluster():
    ray.init(
        num_cpus=4,
        num_gpus=1,
        object_store_memory=128 << 20,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": ENGINE_ENV},
    )
    yield
    import lora_ipc.ray

    lora_ipc.ray.stop_relays()
    ray.shutdown()


@pytest.fixture(scope="module")
def engines(cluster, model_dir):
    # ---- what an OpenRLHF user writes (docs/guides/rl-frameworks.md) ----
    from openrlhf.trainer.ray import create_vllm_engines

    import lora_ipc.integrations.openrlhf as lora_openrlhf

    lora_openrlhf.install(adapter="policy", max_lora_rank=16, max_loras=2)
    engines = create_vllm_engines(
        num_engines=1,
        tensor_parallel_size=1,
        pretrain=model_dir,
        seed=0,
        full_determinism=False,
        enable_prefix_caching=True,
        enforce_eager=True,
        max_model_len=128,
        gpu_memory_utilization=0.9,
    )
    # ----
    ray.get(engines[0].get_num_unfinished_requests.remote(), timeout=900)  # the engine is up
    yield engines
    for e in engines:
        ray.kill(e)
    lora_openrlhf.uninstall()


@pytest.fixture(scope="module")
def trainer(cluster):
    return ray.remote(ray_actors.Trainer).options(num_cpus=1).remote(0)


def rollout(engine, tokenizer) -> list[list[int]]:
    """OpenRLHF's own rollout path: generate_responses -> SingleTurnAgentExecutor -> generate."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = ray.get([engine.generate_responses.remote(t, None, params, 64, tokenizer) for t in TEXT], timeout=300)
    tokens = []
    for [out] in outs:
        start, end = out["action_ranges"][0]
        tokens.append(list(out["observation_tokens"][start:end]))
    return tokens


def disk_rollout(engine, tokenizer, path: str, lora_id: int) -> list[list[int]]:
    """The same rollout with vLLM's own disk load of the adapter ``save_pretrained`` wrote."""
    from vllm.lora.request import LoRARequest

    current = ray.get(engine.lora_ipc_current.remote())
    ray.get(engine.lora_ipc_use.remote(LoRARequest(f"disk-{lora_id}", lora_id, path)))
    try:
        return rollout(engine, tokenizer)
    finally:
        ray.get(engine.lora_ipc_use.remote(current))


def test_openrlhf_rollouts_use_each_version_lora_ipc_loads(engines, trainer, model_dir, tmp_path):
    from transformers import AutoTokenizer

    import lora_ipc.ray

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    [engine] = engines
    base = rollout(engine, tokenizer)  # before any load: the base model
    dirs, got = {}, {}
    for step in (None, 1):
        path = str(tmp_path / f"step{step}")
        version = ray.get(trainer.publish.remote("policy", step, path), timeout=120)  # lora_ipc.ray.publish
        [loaded] = lora_ipc.ray.load(engines, "policy", version)
        assert (loaded["version"], loaded["workers"]) == (version, 1)
        dirs[version] = path
        got[version] = rollout(engine, tokenizer)
    v1, v2 = sorted(dirs)
    lora_ipc.ray.load(engines, "policy", v1)  # back to v1
    again = rollout(engine, tokenizer)
    assert got[v1] == disk_rollout(engine, tokenizer, dirs[v1], 900_001) != base
    assert got[v2] == disk_rollout(engine, tokenizer, dirs[v2], 900_002) != got[v1]
    assert again == got[v1]


def test_openrlhf_worker_wrap_rpcs_are_still_there(engines):
    import lora_ipc.ray

    [engine] = engines
    [result] = lora_ipc.ray.load(engines, "policy")  # newest: loaded again if the disk loads evicted it
    [loaded] = ray.get(engine.collective_rpc.remote("lora_ipc_loaded"))
    assert result["lora_path"] in [d["lora_path"] for d in loaded]
    assert any((d["lora_path"] or "").startswith("lora-ipc://") for d in loaded)
    # OpenRLHF's WorkerWrap is in the worker: its full-weight RPC runs, up to its own dtype check
    import torch

    with pytest.raises(Exception, match="mismatch dtype: src torch.float32, dst torch.bfloat16"):
        ray.get(engine.update_weight.remote("lm_head.weight", torch.float32, (256, 128)))
    assert lora_ipc.ray.relay_endpoints()  # install() started the node relay

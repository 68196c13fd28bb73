"""What lora_ipc expects of vLLM: every vLLM name it touches, and the shapes the readers fill in.

Each constant names something of vLLM a lora_ipc module uses, private or not; :mod:`.checks` compares
what a reader found (:mod:`.runtime`, :mod:`.source`) with these. A lora_ipc module that needs a new vLLM
name declares it here first, reads it through :mod:`.runtime`, and gets a check in :mod:`.checks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# ---- the LoRA loader (plugin.py, loader.py, bounds.py) ------------------------------------------------

# What the loader passes to ``from_lora_tensors`` (by keyword) and where its value comes from in
# ``_load_adapter``'s own call to ``from_local_checkpoint``.
FROM_LORA_TENSORS_KWARGS = (
    "lora_model_id",
    "tensors",
    "peft_helper",
    "device",
    "dtype",
    "model_vocab_size",
    "weights_mapper",
    "skip_prefixes",
)
# ``from_local_checkpoint`` keywords that only concern reading files (nothing to mirror) ...
DISK_ONLY_KWARGS = frozenset({"lora_dir", "expected_lora_modules", "tensorizer_config_dict"})
# ... and those the loader handles itself (``moe_ep_spec``: it refuses expert-parallel MoE adapters;
# ``unsupported_lora_modules`` (vLLM 0.34): it refuses LoRA weights on those layers, as the disk loader does).
HANDLED_KWARGS = frozenset({"moe_ep_spec", "unsupported_lora_modules"})
# Attributes of the worker manager and of its adapter manager the loader reads; ``_load_adapter``
# must read them too, or they may have been renamed.
WORKER_ATTRS = frozenset({"_adapter_manager", "lora_config", "vocab_size", "max_position_embeddings"})
MANAGER_ATTRS = frozenset({"supported_lora_modules", "packed_modules_mapping", "model"})
# Set in ``WorkerLoRAManager.__init__`` and read by lora_ipc: the device, and the LoRAModel class
# ``_load_adapter`` builds with (``_lora_model_cls``).
WORKER_INIT_ATTRS = frozenset({"device", "_lora_model_cls"})
# Where ``_load_adapter`` passes ``moe_ep_spec``, it reads it from this attribute of its adapter manager
# (the loader reads the same one to refuse expert-parallel MoE adapters).
MOE_EP_ATTR = "moe_ep_load_spec"
PEFT_HELPER_METHODS = frozenset({"from_dict", "validate_legal"})
PEFT_HELPER_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "vllm_max_position_embeddings"})
LORA_REQUEST_FIELDS = frozenset({"lora_name", "lora_int_id", "lora_path", "load_inplace"})
RESOLVER_NAMES = frozenset({"LoRAResolver", "LoRAResolverRegistry"})
UTILS = {"parse_fine_tuned_lora_name": ("name", "weights_mapper"), "is_base_embedding_weights": ("name",)}

# ---- where requests enter: the OpenAI server's hooks (openai.py) and the worker extension (worker.py) ----

# (module, class, method) the plugin wraps in the API process (:mod:`lora_ipc.vllm.openai`).
OPENAI_HOOKS = (
    ("vllm.entrypoints.openai.models.serving", "OpenAIServingModels", "_check_load_lora_adapter_request"),
    ("vllm.entrypoints.serve.engine.serving", "BaseServing", "_check_model"),
    ("vllm.entrypoints.pooling.base.serving", "PoolingBaseServing", "_check_model"),
)
# What the hooks read of ``OpenAIServingModels`` (set in its ``__init__``), and the error response they build.
OPENAI_MODELS_MODULE, OPENAI_MODELS_CLASS = OPENAI_HOOKS[0][:2]
OPENAI_MODELS_ATTRS = frozenset({"lora_requests", "lora_id_counter", "engine_client"})
ERROR_RESPONSE = ("vllm.entrypoints.serve", "create_error_response")
# The worker extension's RPCs reach the worker's LoRA manager as ``model_runner.lora_manager``, set by
# ``LoRAModelRunnerMixin.load_lora_model``.
RUNNER_MODULE, RUNNER_CLASS, RUNNER_LORA_MANAGER = (
    "vllm.v1.worker.lora_model_runner_mixin",
    "LoRAModelRunnerMixin",
    "lora_manager",
)

# ---- the refit backend (weight_transfer/, refit_guard.py) ------------------------------------------------

# The refit backend subclasses vLLM's weight-transfer engines and is registered in its factories by
# module path. What it imports from ``vllm.distributed.weight_transfer.base``:
REFIT_BASE_NAMES = frozenset(
    {
        "TrainerInitInfo",
        "TrainerWeightTransferEngine",
        "VLLMWeightSyncClient",
        "WeightSource",
        "WeightTransferEngine",
        "WeightTransferInitInfo",
        "WeightTransferUpdateInfo",
    }
)
REFIT_ENGINE_INIT = ("config", "vllm_config", "device", "model")  # super().__init__(...), positionally
REFIT_ENGINE_METHODS = frozenset(
    {
        "parse_init_info",
        "init_transfer_engine",
        "start_weight_update",
        "receive_weights",
        "finish_weight_update",
        "shutdown",
        "abort_weight_update",  # vLLM's hook for a session it drops, where it has one
    }
)  # what the worker engine defines
REFIT_ENGINE_INHERITED = frozenset({"update_weights", "reset_weight_update_target"})  # what it relies on the base for
REFIT_TRAINER_KWARGS = ("client", "source", "is_sender")  # super().__init__(client=, source=, is_sender=[, config])
REFIT_TRAINER_METHODS = frozenset({"trainer_init", "send_weights", "shutdown"})
REFIT_FACTORIES = ("WeightTransferEngineFactory", "WeightTransferTrainerFactory")  # register_engine(name, module, cls)
REFIT_RELOAD = frozenset({"initialize_layerwise_reload", "finalize_layerwise_reload"})  # ...model_loader.reload
# vllm.model_executor.model_loader.mtp_validation (vLLM 0.32-0.33; 0.34 has no MTP completeness check, so
# there is nothing to disable and the module is gone): present module without it = a rename to look at
REFIT_MTP = "disable_mtp_completeness_check"
# The dry run of an update (refit_guard.py) and the staging limit (LAYERWISE_INFO) use vLLM's layerwise
# reload module, private helpers included, and the per-layer record it keeps.
LAYERWISE_MODULE = "vllm.model_executor.model_loader.reload.layerwise"
REFIT_LAYERWISE = frozenset(
    {"LAYERWISE_INFO", "LOADING_LAYERS", "initialize_layerwise_reload", "_layerwise_process", "_place_kernel_tensors"}
)
# ``initialize_layerwise_reload`` turns torchao's reload off on the model and keeps the old value; the dry run
# undoes it as ``finalize_layerwise_reload`` does (model attributes it assigns, by name).
LAYERWISE_INIT_SETS = frozenset({"_original_do_torchao_reload", "_do_torchao_reload"})
LAYER_INFO_MODULE, LAYER_INFO_CLASS = "vllm.model_executor.model_loader.reload.types", "LayerReloadingInfo"
LAYER_INFO_ATTRS = frozenset(
    {"restore_metadata", "load_numel", "loaded_weights", "kernel_tensors", "reset", "can_load"}
)
# vLLM's worker keeps its update session in a flag the engine cannot reach through the framework: it is
# ended only when ``update_weights`` raises or ``finish_weight_update`` returns. The engine ends it (a dead
# trainer's update, a take-over) and keeps it (a refused stray bucket) through this flag, on the worker the
# plugin records when that worker hands the engine its init info (``init_weight_transfer_engine``).
WORKER_MODULE, WORKER_CLASS = "vllm.v1.worker.gpu_worker", "Worker"
WORKER_SESSION_FLAG = "_weight_update_active"
WORKER_BIND_METHOD = "init_weight_transfer_engine"


@dataclass(frozen=True)
class Params:
    """A function's parameters, as the checks need them (``self``/``cls`` left out)."""

    names: tuple[str, ...]
    positional: tuple[str, ...]
    required: frozenset[str]
    var_keyword: bool = False

    def accepts(self, name: str) -> bool:
        return self.var_keyword or name in self.names

    def __str__(self) -> str:
        return (
            "("
            + ", ".join(n if n in self.required else f"{n}=…" for n in self.names)
            + (", **kwargs" if self.var_keyword else "")
            + ")"
        )


@dataclass
class LoadAdapterBody:
    """What ``_load_adapter`` does, read from its source."""

    checkpoint_kwargs: frozenset[str] = frozenset()  # keywords of its from_local_checkpoint call
    checkpoint_call_found: bool = False
    worker_attrs: frozenset[str] = frozenset()  # self.<attr> it reads
    manager_attrs: frozenset[str] = frozenset()  # self._adapter_manager.<attr> it reads
    validations: tuple[str, ...] = ()  # self._adapter_manager._validate_*(lora) it calls


@dataclass
class RefitSurface:
    """vLLM's weight-transfer framework, as the refit backend uses it. ``present`` is False when this vLLM
    has no such framework (then there is nothing to register and nothing to check)."""

    present: bool = False
    base_names: frozenset[str] = frozenset()
    engine_init: Params | None = None
    engine_methods: frozenset[str] = frozenset()  # methods WeightTransferEngine defines
    engine_abstract: frozenset[str] = frozenset()  # ... of which abstract
    trainer_init: Params | None = None  # TrainerWeightTransferEngine.__init__
    trainer_abstract: frozenset[str] = frozenset()
    register_engine: dict[str, Params] = field(default_factory=dict)  # factory -> register_engine params
    loader_read: bool = False  # the ones below were looked for (the worker side reads them: heavy imports)
    reload_names: frozenset[str] = frozenset()
    mtp_module: bool = False  # vllm.model_executor.model_loader.mtp_validation exists
    mtp_check: bool = False  # ... and defines REFIT_MTP
    layerwise_names: frozenset[str] = frozenset()  # of REFIT_LAYERWISE, those LAYERWISE_MODULE has
    layer_info_attrs: frozenset[str] = frozenset()  # of LAYER_INFO_ATTRS, those LayerReloadingInfo has
    layerwise_init_sets: frozenset[str] = frozenset()  # <obj>.<attr> assigned in initialize_layerwise_reload
    worker_session: bool = False  # Worker.__init__ sets WORKER_SESSION_FLAG
    worker_bind: bool = False  # Worker defines WORKER_BIND_METHOD

    def summary(self) -> dict:
        return {
            "present": self.present,
            "WeightTransferEngine.__init__": str(self.engine_init),
            "TrainerWeightTransferEngine.__init__": str(self.trainer_init),
            "abstract": sorted(self.engine_abstract | self.trainer_abstract),
            "register_engine": {k: str(v) for k, v in self.register_engine.items()},
            "layerwise": sorted(self.layerwise_names | self.layer_info_attrs | self.layerwise_init_sets),
            "worker session": [self.worker_session, self.worker_bind],
        }


@dataclass
class EntrySurface:
    """Where requests enter: the OpenAI server's hooks and the model runner's LoRA manager."""

    hooks: frozenset[str] = frozenset()  # "Class.method" of OPENAI_HOOKS found, defined by that class itself
    models_attrs: frozenset[str] = frozenset()  # self.<attr> set in OpenAIServingModels.__init__
    error_response: bool = False
    runner_lora_manager: bool = False  # LoRAModelRunnerMixin sets self.lora_manager

    def summary(self) -> dict:
        return {
            "hooks": sorted(self.hooks),
            "OpenAIServingModels": sorted(self.models_attrs & OPENAI_MODELS_ATTRS),
            "create_error_response": self.error_response,
            "model_runner.lora_manager": self.runner_lora_manager,
        }


@dataclass
class VLLMSurface:
    """The parts of vLLM lora_ipc uses. ``None`` means not found."""

    where: str
    version: str | None = None
    load_adapter: Params | None = None
    load_adapter_body: LoadAdapterBody | None = None
    add_adapter: dict[str, Params] = field(default_factory=dict)  # class name -> add_adapter params
    list_adapters: bool = False
    worker_init_attrs: frozenset[str] = frozenset()  # self.<attr> set in WorkerLoRAManager.__init__
    from_lora_tensors: Params | None = None
    lora_model_module: str | None = None
    peft_helper_methods: frozenset[str] = frozenset()
    peft_helper_fields: frozenset[str] = frozenset()
    utils: dict[str, Params] = field(default_factory=dict)
    lora_request_fields: frozenset[str] = frozenset()
    lora_request_is_struct: bool = False
    resolver_names: frozenset[str] = frozenset()
    entry: EntrySurface = field(default_factory=EntrySurface)
    refit: RefitSurface = field(default_factory=RefitSurface)

    @property
    def validations(self) -> tuple[str, ...]:
        return self.load_adapter_body.validations if self.load_adapter_body else ()

    def summary(self) -> dict:
        """A plain description, for diffs between versions and for reports."""
        body = self.load_adapter_body or LoadAdapterBody()
        return {
            "_load_adapter": str(self.load_adapter),
            "add_adapter": {k: str(v) for k, v in self.add_adapter.items()},
            "from_lora_tensors": f"{self.lora_model_module}.LoRAModel.from_lora_tensors{self.from_lora_tensors}",
            "from_local_checkpoint kwargs": sorted(body.checkpoint_kwargs),
            "_load_adapter reads": sorted(body.worker_attrs),
            "_adapter_manager reads": sorted(body.manager_attrs),
            "WorkerLoRAManager.__init__ sets": sorted(self.worker_init_attrs & WORKER_INIT_ATTRS),
            "validations": list(body.validations),
            "PEFTHelper": sorted(self.peft_helper_methods),
            "utils": {k: str(v) for k, v in self.utils.items()},
            "LoRARequest": sorted(self.lora_request_fields),
            **{f"entry {k}": v for k, v in self.entry.summary().items()},
            **{f"refit {k}": v for k, v in self.refit.summary().items()},
        }

"""Feature detection of vLLM (``lora_ipc.vllm.compat``): the installed vLLM passes; a vLLM that moved
what we hook is named precisely and refused at plugin registration, through vLLM's own plugin loader."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")

from lora_ipc.vllm import compat  # noqa: E402

from .helpers import checkout_env, run_in_checkout  # noqa: E402

VLLM_DIR = Path(vllm.__file__).parent
FROM_TENSORS_TAIL = '        {}: list[str] | None = None,\n    ) -> "LoRAModel":\n        """Create a LoRAModel from'


def test_installed_vllm_is_hookable_and_both_readings_agree():
    runtime = compat.surface_from_runtime()
    assert compat.problems(runtime) == []
    source = compat.surface_from_source(VLLM_DIR, runtime.version)
    assert compat.problems(source) == []
    assert source.summary() == runtime.summary()
    assert runtime.refit.present and compat.refit_problems(runtime.refit) == []  # the refit backend's surface too
    from vllm.lora.model_manager import LoRAModelManager

    assert runtime.validations  # 0.31+ validate after loading; the loader makes the same calls
    assert all(callable(getattr(LoRAModelManager, v, None)) for v in runtime.validations)


@pytest.fixture
def vllm_copy(tmp_path):
    """The installed vllm/lora/*.py, copied to edit (the source reading needs nothing else)."""
    root = tmp_path / "vllm"
    (root / "lora").mkdir(parents=True)
    for path in (VLLM_DIR / "lora").glob("*.py"):
        shutil.copy(path, root / "lora" / path.name)
    return root


def _edit(root: Path, module: str, old: str, new: str) -> None:
    path = root / "lora" / f"{module}.py"
    text = path.read_text()
    assert old in text, (module, old)
    path.write_text(text.replace(old, new, 1))


@pytest.mark.parametrize(
    "module, old, new, expected",
    [
        (
            "worker_manager",
            "def _load_adapter(self, lora_request: LoRARequest)",
            "def _load_adapter(self, lora_request: LoRARequest, model_config)",
            "_load_adapter(lora_request, model_config)",
        ),
        (
            "worker_manager",
            "def _load_adapter(self, lora_request: LoRARequest)",
            "def _load_lora(self, lora_request: LoRARequest)",
            "_load_adapter not found",
        ),
        (
            "worker_manager",
            "skip_prefixes=lora_skip_prefixes,",
            "skip_prefixes=lora_skip_prefixes, revision=None,",
            "['revision'] to from_local_checkpoint",
        ),
        (
            "worker_manager",
            "model_vocab_size=self.vocab_size",
            "model_vocab_size=self.vocab_size_padded",
            "no longer reads self.['vocab_size']",
        ),
        (
            "lora_model",
            FROM_TENSORS_TAIL.format("skip_prefixes"),
            FROM_TENSORS_TAIL.format("prefixes"),
            "does not accept ['skip_prefixes']",
        ),
        ("peft_helper", "def validate_legal(", "def check_legal(", "PEFTHelper lacks ['validate_legal']"),
        (
            "utils",
            "def parse_fine_tuned_lora_name(\n    name: str,",
            "def parse_fine_tuned_lora_name(\n    key: str,",
            "parse_fine_tuned_lora_name",
        ),
        ("request", "load_inplace: bool = False", "reload: bool = False", "no field(s) ['load_inplace']"),
        (  # private names lora_ipc reads outside _load_adapter's mirror: declared, so a rename is named
            "worker_manager",
            "self._lora_model_cls = lora_model_cls",
            "self._model_cls = lora_model_cls",
            "no longer sets self.['_lora_model_cls']",
        ),
        (
            "worker_manager",
            "moe_ep_spec=self._adapter_manager.moe_ep_load_spec,",
            "moe_ep_spec=self._adapter_manager.moe_ep_spec,",
            "no longer reads self._adapter_manager.moe_ep_load_spec",
        ),
    ],
)
def test_a_moved_vllm_is_named_exactly(vllm_copy, module, old, new, expected):
    assert compat.problems(compat.surface_from_source(vllm_copy)) == []
    _edit(vllm_copy, module, old, new)
    found = compat.problems(compat.surface_from_source(vllm_copy))
    assert len(found) == 1 and expected in found[0], found


def test_renamed_validations_are_followed_not_refused(vllm_copy):
    _edit(
        vllm_copy,
        "worker_manager",
        "self._adapter_manager._validate_modules_to_save(lora)",
        "self._adapter_manager._validate_classification_head_lora(lora)",
    )
    surface = compat.surface_from_source(vllm_copy)
    assert compat.problems(surface) == []
    assert "_validate_classification_head_lora" in surface.validations
    assert "_validate_modules_to_save" not in surface.validations


def test_vllm_034s_unsupported_lora_modules_is_mirrored_not_refused(vllm_copy):
    """vLLM 0.34's ``_load_adapter`` passes ``unsupported_lora_modules`` (layers that end like a LoRA target but
    are not wrapped): the loader refuses LoRA weights on them, as the disk loader does, so the check accepts it."""
    _edit(
        vllm_copy,
        "worker_manager",
        "skip_prefixes=lora_skip_prefixes,",
        "skip_prefixes=lora_skip_prefixes,\n"
        "                unsupported_lora_modules=self._adapter_manager.unsupported_lora_modules,",
    )
    surface = compat.surface_from_source(vllm_copy)
    assert "unsupported_lora_modules" in surface.load_adapter_body.checkpoint_kwargs
    assert compat.problems(surface) == []


def test_the_loader_refuses_lora_weights_on_unsupported_layers():
    from vllm.lora.peft_helper import PEFTHelper

    from lora_ipc.vllm.loader import unexpected_modules

    names = ["base_model.model.pooler.dense.lora_A.weight", "base_model.model.layers.0.mlp.dense.lora_A.weight"]
    helper = PEFTHelper.from_dict({"r": 4, "lora_alpha": 8, "target_modules": ["dense"]})
    assert unexpected_modules(names, {"dense"}, helper, None, None) == []
    found = unexpected_modules(names, {"dense"}, helper, None, None, unsupported={"pooler.dense"})
    assert found == ["pooler.dense (not a LoRA layer)"], found


def test_registration_refuses_an_incompatible_vllm_through_vllms_plugin_loader():
    """The plugin runs inside vLLM's load_general_plugins; its error must stop vLLM, not be logged and
    skipped (a lora-ipc:// path would then reach the disk loader)."""
    code = textwrap.dedent("""
        from vllm.lora import worker_manager
        def _load_adapter(self, lora_request, extra):
            raise AssertionError("never called")
        _load_adapter.__module__ = worker_manager.__name__  # stands for vLLM's own (another module's is a framework's)
        worker_manager.WorkerLoRAManager._load_adapter = _load_adapter
        from vllm.plugins import load_general_plugins
        load_general_plugins()
    """)
    proc = _run(code)
    assert proc.returncode != 0
    assert "UnsupportedVLLM" in proc.stderr and "_load_adapter(lora_request, extra)" in proc.stderr, proc.stderr[-2000:]


# ---- the refit backend's surface (vLLM's weight-transfer framework) ----------------------------------

TRAINER_INIT = (
    '    def __init__(\n        self,\n        *,\n        client: "VLLMWeightSyncClient",\n'
    '        source: "WeightSource | None" = None,'
)
REFIT_FILES = (
    "distributed/weight_transfer/base.py",
    "distributed/weight_transfer/factory.py",
    "model_executor/model_loader/reload/__init__.py",
    "model_executor/model_loader/mtp_validation.py",
    "model_executor/model_loader/reload/layerwise.py",
    "model_executor/model_loader/reload/types.py",
    "v1/worker/gpu_worker.py",
)


@pytest.fixture
def refit_copy(tmp_path):
    """The files of the installed vLLM the refit surface is read from, copied to edit."""
    root = tmp_path / "vllm"
    for rel in REFIT_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VLLM_DIR / rel, root / rel)
    return root


def _edit_file(path: Path, old: str, new: str, count: int = -1) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new, count))


@pytest.mark.parametrize(
    "rel, old, new, expected",
    [
        (
            REFIT_FILES[0],
            "    def receive_weights(self, update_info",
            "    def receive_bucket(self, update_info",
            "abstract methods ['receive_bucket'] the lora_ipc engine does not define",
        ),
        (
            REFIT_FILES[0],
            TRAINER_INIT,
            TRAINER_INIT.replace("source:", "weight_iterator:"),
            "does not accept ['source']",
        ),
        (REFIT_FILES[0], "class WeightSource(ABC):", "class WeightProducer(ABC):", "lacks ['WeightSource']"),
        (REFIT_FILES[1], "    def register_engine(", "    def add_engine(", "register_engine not found"),
        (REFIT_FILES[2], "finalize_layerwise_reload,\n", "", "lacks ['finalize_layerwise_reload']"),
    ],
)
def test_a_moved_weight_transfer_framework_is_named_exactly(refit_copy, rel, old, new, expected):
    assert compat.refit_problems(compat.refit_surface_from_source(refit_copy)) == []
    _edit_file(refit_copy / rel, old, new)
    found = compat.refit_problems(compat.refit_surface_from_source(refit_copy))
    assert expected in "\n".join(found) and len(found) <= 2, found  # register_engine: one line per factory


@pytest.mark.parametrize(
    "rel, old, new, expected",
    [  # the private names of vLLM the refit backend touches, each declared in compat and checked
        (REFIT_FILES[4], "def _layerwise_process(", "def _process_layer(", "lacks ['_layerwise_process']"),
        (REFIT_FILES[4], "def _place_kernel_tensors(", "def _put_kernel_tensors(", "lacks ['_place_kernel_tensors']"),
        (REFIT_FILES[4], "\nLOADING_LAYERS:", "\nLAYERS_LOADING:", "lacks ['LOADING_LAYERS']"),
        (
            REFIT_FILES[4],
            "model._original_do_torchao_reload =",
            "model._saved_do_torchao_reload =",
            "no longer sets ['_original_do_torchao_reload'] on the model",
        ),
        (REFIT_FILES[5], "def can_load(self)", "def loadable(self)", "LayerReloadingInfo lacks ['can_load']"),
        (
            REFIT_FILES[6],
            "self._weight_update_active = False",
            "self._update_session_open = False",
            "Worker.__init__ no longer sets self._weight_update_active",
        ),
        (
            REFIT_FILES[6],
            "    def init_weight_transfer_engine(",
            "    def init_transfer(",
            "Worker.init_weight_transfer_engine not found",
        ),
    ],
)
def test_a_moved_private_of_the_refit_path_is_named_exactly(refit_copy, rel, old, new, expected):
    """refit_guard's dry run (vLLM's layerwise-reload helpers) and the worker's update session the engine
    steers: a vLLM that moved one is refused when the worker engine is made, naming it (it used to skip the
    dry run with a warning, or walk the stack for the worker)."""
    assert compat.refit_problems(compat.refit_surface_from_source(refit_copy)) == []
    _edit_file(refit_copy / rel, old, new, count=1)
    found = compat.refit_problems(compat.refit_surface_from_source(refit_copy))
    assert len(found) == 1 and expected in found[0], found


# ---- where requests enter: the OpenAI server's hooks and the model runner's LoRA manager -------------

ENTRY_FILES = (
    "entrypoints/openai/models/serving.py",
    "entrypoints/serve/engine/serving.py",
    "entrypoints/pooling/base/serving.py",
    "entrypoints/serve/__init__.py",
    "v1/worker/lora_model_runner_mixin.py",
)


@pytest.fixture
def entry_copy(tmp_path):
    root = tmp_path / "vllm"
    for rel in ENTRY_FILES:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(VLLM_DIR / rel, root / rel)
    return root


@pytest.mark.parametrize(
    "rel, old, new, expected",
    [
        (
            ENTRY_FILES[0],
            "async def _check_load_lora_adapter_request(",
            "async def _validate_load_lora_request(",
            "OpenAIServingModels._check_load_lora_adapter_request not found",
        ),
        (ENTRY_FILES[1], "async def _check_model(", "async def _validate_model(", "BaseServing._check_model not found"),
        (
            ENTRY_FILES[2],
            "async def _check_model(",
            "async def _validate_model(",
            "PoolingBaseServing._check_model not found",
        ),
        (
            ENTRY_FILES[0],
            "self.lora_id_counter = ",
            "self.lora_ids = ",
            "OpenAIServingModels.__init__ no longer sets self.['lora_id_counter']",
        ),
        (ENTRY_FILES[4], "self.lora_manager = ", "self.lora_worker = ", "no longer sets self.lora_manager"),
    ],
)
def test_a_moved_openai_hook_or_runner_attribute_is_named_exactly(entry_copy, rel, old, new, expected):
    """The OpenAI server hooks used to be skipped silently where vLLM lacked them: each is declared now, and
    its absence is a problem at registration like any other."""
    assert compat.entry_problems(compat.entry_surface_from_source(entry_copy)) == []
    _edit_file(entry_copy / rel, old, new, count=1)
    found = compat.entry_problems(compat.entry_surface_from_source(entry_copy))
    assert len(found) == 1 and expected in found[0], found


def test_registration_refuses_a_vllm_without_an_openai_hook():
    """Through vLLM's own plugin loader, in a fresh process: a missing OpenAI hook stops vLLM with the
    typed error naming it (the request path it guards would otherwise run unchecked)."""
    proc = _run("""
        from vllm.entrypoints.serve.engine import serving
        del serving.BaseServing._check_model
        from vllm.plugins import load_general_plugins
        load_general_plugins()
    """)
    assert proc.returncode != 0
    assert "UnsupportedVLLM" in proc.stderr and "BaseServing._check_model not found" in proc.stderr, proc.stderr[-2000:]


def test_a_vllm_without_the_mtp_completeness_check_is_accepted(refit_copy):
    """vLLM 0.34 dropped ``mtp_validation`` (nothing to disable around ``load_weights``): accepted. A module that
    is still there but lost the function is a rename, named exactly."""
    mtp = refit_copy / REFIT_FILES[3]
    text = mtp.read_text()
    mtp.unlink()
    surface = compat.refit_surface_from_source(refit_copy)
    assert not surface.mtp_module and compat.refit_problems(surface) == []
    mtp.write_text(text.replace("def disable_mtp_completeness_check(", "def skip_mtp_check("))
    found = compat.refit_problems(compat.refit_surface_from_source(refit_copy))
    assert found == ["vllm.model_executor.model_loader.mtp_validation.disable_mtp_completeness_check not found"]


def test_vllm_034s_trainer_engine_rank_is_passed_on(refit_copy):
    """vLLM 0.34's ``TrainerWeightTransferEngine.__init__`` takes ``rank`` (a default): accepted."""
    with_rank = TRAINER_INIT + "\n        rank: int = 0,"
    _edit_file(refit_copy / REFIT_FILES[0], TRAINER_INIT, with_rank)
    surface = compat.refit_surface_from_source(refit_copy)
    assert "rank" in surface.trainer_init.names and compat.refit_problems(surface) == []


def test_vllms_config_first_trainer_engine_is_accepted(refit_copy):
    """Some vLLM releases' ``TrainerWeightTransferEngine.__init__`` take a ``config`` first (Generic[TConfig,
    TInitInfo]); the lora_ipc trainer engine takes it, so the check accepts it."""
    config_first = TRAINER_INIT.replace("        *,", "        config,\n        *,")
    _edit_file(refit_copy / REFIT_FILES[0], TRAINER_INIT, config_first)
    surface = compat.refit_surface_from_source(refit_copy)
    assert "config" in surface.trainer_init.required and compat.refit_problems(surface) == []


def _run(code: str) -> subprocess.CompletedProcess:
    env = checkout_env()
    env.pop("VLLM_PLUGINS", None)
    return run_in_checkout([sys.executable, "-c", textwrap.dedent(code)], timeout=600, env=env)


def test_the_refit_backend_refuses_a_vllm_whose_weight_transfer_surface_differs():
    """A vLLM whose worker engine gained an abstract method: importing the backend (what vLLM's factory does
    when it makes the engine) raises UnsupportedVLLM naming it, not a TypeError deep in a worker."""
    proc = _run("""
        from vllm.distributed.weight_transfer.base import WeightTransferEngine
        WeightTransferEngine.__abstractmethods__ = WeightTransferEngine.__abstractmethods__ | {"drain_staged"}
        import lora_ipc.vllm.weight_transfer
    """)
    assert proc.returncode != 0
    assert "UnsupportedVLLM" in proc.stderr and "['drain_staged']" in proc.stderr, proc.stderr[-2000:]


def test_the_refit_backend_is_registered_once_per_process():
    """The plugin (every vLLM process) and the backend's import (a trainer process) both ask: one
    registration per factory, no 'already registered' swallowed."""
    proc = _run("""
        import json
        from vllm.distributed.weight_transfer import factory
        calls = []
        for f in (factory.WeightTransferEngineFactory, factory.WeightTransferTrainerFactory):
            def counting(cls, name, module_path_or_cls, class_name=None, _original=f.register_engine.__func__):
                calls.append((cls.__name__, name))
                return _original(cls, name, module_path_or_cls, class_name)
            f.register_engine = classmethod(counting)
        from lora_ipc.vllm import plugin
        plugin.register()
        import lora_ipc.vllm.weight_transfer
        plugin.register()
        print(json.dumps([c for c in calls if c[1] == "lora_ipc"]))
    """)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (
        proc.stdout.strip().splitlines()[-1]
        == '[["WeightTransferEngineFactory", "lora_ipc"], ["WeightTransferTrainerFactory", "lora_ipc"]]'
    )


def test_one_lora_ipc_wrapper_per_vllm_method_on_a_requests_path():
    """A request passes at most one lora_ipc function per vLLM method, never one wrapped around another: the
    instance guard is the only lora_ipc ``_load_adapter`` (the class-level one under it is gone), and no
    wrapper wraps another lora_ipc wrapper."""
    from vllm.lora import worker_manager as wm

    from lora_ipc.vllm import plugin
    from lora_ipc.vllm.compat.expectations import OPENAI_HOOKS

    plugin.register()
    plugin.register()  # idempotent: still one layer
    methods = [(cls, "add_adapter") for cls in (wm.WorkerLoRAManager, wm.LRUCacheWorkerLoRAManager)]
    methods += [(getattr(__import__(m, fromlist=[c]), c), a) for m, c, a in OPENAI_HOOKS]
    for cls, name in methods:
        fn = cls.__dict__[name]
        assert getattr(fn, "__lora_ipc_wrapped__", False), (cls, name)
        assert not getattr(fn.__wrapped__, "__lora_ipc_wrapped__", False), (cls, name)
    for cls in (wm.WorkerLoRAManager, wm.LRUCacheWorkerLoRAManager):
        assert not getattr(cls._load_adapter, "__lora_ipc_wrapped__", False), cls
        assert getattr(cls._load_adapter, "__module__", None) == wm.__name__  # vLLM's own, untouched

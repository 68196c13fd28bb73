"""A framework that replaces ``_load_adapter`` (on ``WorkerLoRAManager``, ``LRUCacheWorkerLoRAManager``),
before or after lora_ipc's plugin, does not take ``lora-ipc://`` paths away from lora_ipc's loader.

Real vLLM CPU engine, real PEFT adapters published by a trainer process, tokens compared with vLLM's own
disk load of the same adapter (which goes through the framework's replacement, as it should). The engine
runs in its own process (tests/patched_loader_engine.py), where the patches are made before it starts.
"""

import sys

import pytest

pytest.importorskip("vllm")

from lora_ipc.core.errors import LoraIpcError  # noqa: E402
from lora_ipc.tiny import write_model_dir  # noqa: E402
from lora_ipc.vllm import plugin  # noqa: E402

from .patched_loader_engine import published_versions, run_engine  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    with published_versions(tmp_path_factory.mktemp("adapters")) as got:
        yield got


def test_lora_ipc_paths_bypass_load_adapter_replacements_made_before_and_after_the_plugin(published, tmp_path):
    endpoint, versions = published
    out = run_engine(sys.executable, "patchers", endpoint, write_model_dir(str(tmp_path / "model")), versions)
    for key in ("ipc_v1", "disk_v1", "ipc_v2", "disk_v2", "ipc_v1_again"):
        assert key in out and not isinstance(out[key], dict), (key, out.get(key))
    assert out["ipc_v1"] == out["disk_v1"] != out["base"]
    assert out["ipc_v2"] == out["disk_v2"] != out["disk_v1"]
    assert out["ipc_v1_again"] == out["disk_v1"]
    # the replacements are in force for every other path, and never saw a lora-ipc:// one
    assert out["calls"] == {"before": [versions[min(versions)]], "after": [versions[max(versions)]]}


def test_a_manager_that_cannot_be_guarded_is_refused_naming_the_replacement():
    class Patched:
        __slots__ = ()

        def _load_adapter(self, lora_request):
            raise AssertionError("never called")

    with pytest.raises(plugin.LoaderBypassed, match=r"Patched\._load_adapter") as info:
        plugin.guard(Patched())
    assert isinstance(info.value, LoraIpcError)

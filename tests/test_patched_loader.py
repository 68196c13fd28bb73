"""A framework that replaces ``_load_adapter`` (on ``WorkerLoRAManager``, ``LRUCacheWorkerLoRAManager``),
before or after lora_ipc's plugin, does not take ``lora-ipc://`` paths away from lora_ipc's loader.

Real vLLM CPU engine, real PEFT adapters published by a trainer process, tokens compared with vLLM's own
disk load of the same adapter (which goes through the framework's replacement, as it should). The engine
runs in its own process (tests/patched_loader_engine.py), where the patches are made before it starts.
"""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("vllm")

from lora_ipc.errors import LoraIpcError  # noqa: E402
from lora_ipc.tiny import write_model_dir  # noqa: E402
from lora_ipc.vllm import plugin  # noqa: E402

from .procs import ExporterProcess  # noqa: E402

pytestmark = pytest.mark.vllm
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_engine(python: str, mode: str, endpoint: str, model_dir: str, versions: dict, timeout: float = 900) -> dict:
    (v1, d1), (v2, d2) = sorted(versions.items())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([python, "-m", "tests.patched_loader_engine", mode, endpoint, model_dir, str(v1), d1,
                           str(v2), d2], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"engine script failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    proc = ExporterProcess(keep=3)
    try:
        v1 = proc.call("publish_peft", "policy", "bfloat16", 0, str(root / "v1"))
        v2 = proc.call("train_and_publish", "policy", "bfloat16", 1, str(root / "v2"))
        yield proc.endpoint, {v1: str(root / "v1"), v2: str(root / "v2")}
    finally:
        proc.close()


def test_lora_ipc_paths_bypass_load_adapter_replacements_made_before_and_after_the_plugin(published, tmp_path):
    endpoint, versions = published
    out = run_engine(sys.executable, "patchers", endpoint, write_model_dir(str(tmp_path / "model")), versions)
    for key in ("ipc_v1", "disk_v1", "ipc_v2", "disk_v2", "ipc_v1_again"):
        assert not isinstance(out[key], dict), (key, out[key])
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

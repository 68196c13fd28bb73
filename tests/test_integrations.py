"""OpenRLHF 0.11.2 and verl 0.9.1 (their real packages) with lora_ipc, on the real vLLM CPU engine.

They run in the cached venv scripts/rl_frameworks.sh builds (openrlhf and verl installed ``--no-deps`` over
the main environment); elsewhere these tests skip. The OpenRLHF suite needs Ray, which runs only in a
private network namespace (as tests/test_ray.py does).
"""

import os
import sys

import pytest

pytest.importorskip("vllm")

from . import test_ray  # noqa: E402
from .patched_loader_engine import ROOT, published_versions, run_engine  # noqa: E402

SUITE = os.path.join(ROOT, "tests", "openrlhf_suite.py")


def test_openrlhf_create_vllm_engines_with_lora_ipc_installed():
    pytest.importorskip("openrlhf")
    pytest.importorskip("ray")
    test_ray.run_suite_in_private_netns(SUITE, "OpenRLHF suite")


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    pytest.importorskip("verl")
    with published_versions(tmp_path_factory.mktemp("adapters")) as got:
        yield got


def test_verl_colocate_extension_loads_lora_ipc_despite_verls_hijack(published, tmp_path):
    pytest.importorskip("verl")
    from lora_ipc.tiny import write_model_dir

    endpoint, versions = published
    out = run_engine(sys.executable, "verl", endpoint, write_model_dir(str(tmp_path / "model")), versions)
    assert out["verl_hijack_in_place"] is True
    for key in (
        "rpc_v1",
        "ipc_v1",
        "ipc_v2",
        "ipc_v1_again",
        "rpc_fixed_v2",
        "fixed_v2",
        "fixed_v1",
        "disk_v1",
        "disk_v2",
    ):
        assert key in out and not isinstance(out[key], dict), (key, out.get(key))
    assert out["rpc_v1"][0]["version"] == min(versions)
    assert out["ipc_v1"] == out["disk_v1"] != out["base"]
    assert out["ipc_v2"] == out["disk_v2"] != out["disk_v1"]
    assert out["ipc_v1_again"] == out["disk_v1"]
    # verl's async-server request (fixed id 123, its placeholder path) serves what lora_ipc loaded into slot 123
    assert out["fixed_v2"] == out["disk_v2"] and out["fixed_v1"] == out["disk_v1"]
    assert out["rpc_fixed_v2"][0]["lora_int_id"] == 123


def test_verl_install_makes_its_http_server_start_engines_with_the_composed_extension():
    pytest.importorskip("verl")
    from verl.workers.rollout.vllm_rollout.vllm_async_server import vLLMHttpServer

    import lora_ipc.integrations.verl as lora_verl

    before = vLLMHttpServer._get_worker_extension_cls
    try:
        lora_verl.install()
        assert vLLMHttpServer._get_worker_extension_cls(object.__new__(vLLMHttpServer)) == lora_verl.EXTENSION
        assert issubclass(lora_verl.ColocateExtension, lora_verl.vLLMColocateWorkerExtension)
    finally:
        vLLMHttpServer._get_worker_extension_cls = before

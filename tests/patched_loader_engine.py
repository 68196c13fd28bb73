"""One in-process vLLM CPU engine whose ``_load_adapter`` is replaced by a framework, before and after
lora_ipc's plugin (run as a script by tests/test_patched_loader.py; prints one JSON line).

    python -m tests.patched_loader_engine patchers ENDPOINT MODEL_DIR V1 DIR1 V2 DIR2
    python -m tests.patched_loader_engine verl     ENDPOINT MODEL_DIR V1 DIR1 V2 DIR2   (verl's venv)

``patchers``: before the engine (so before the plugin registers) ``WorkerLoRAManager._load_adapter`` and
``LRUCacheWorkerLoRAManager._load_adapter`` are replaced by a function that calls vLLM's own disk loader
and never what was there (as verl's hijack does); after the engine is up, both get another one.
``verl``: the engine runs verl's real ``vLLMColocateWorkerExtension`` (its ``__new__`` runs verl's real
``VLLMHijack.hijack()``) composed with lora_ipc's, as ``lora_ipc.integrations.verl.ColocateExtension``.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the patches reach its worker.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CALLS: dict[str, list[str]] = {"before": [], "after": []}


def _patcher(tag: str, disk_loader):
    def _load_adapter(self, lora_request):  # a framework's replacement: never calls what was there
        CALLS[tag].append(lora_request.lora_path)
        return disk_loader(self, lora_request)

    return _load_adapter


class _Stop(Exception):
    pass


def _attempt(out: dict, key: str, fn) -> None:
    """``out[key] = fn()``; on an error, ``out[key] = {"error": ...}`` and the run stops (a failed step
    can leave the in-process engine unable to go on)."""
    try:
        out[key] = fn()
    except Exception as exc:
        out[key] = {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        raise _Stop from exc


def main(mode: str, endpoint: str, model_dir: str, v1: str, dir1: str, v2: str, dir2: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    v1, v2 = int(v1), int(v2)
    from vllm.lora import worker_manager as wm
    from vllm.lora.request import LoRARequest

    from lora_ipc.vllm import lora_request

    from . import engine

    disk_loader = wm.WorkerLoRAManager._load_adapter  # vLLM's own: the plugin has not registered yet
    if mode == "patchers":
        assert not getattr(disk_loader, "__lora_ipc_wrapped__", False)
        wm.WorkerLoRAManager._load_adapter = _patcher("before", disk_loader)
        wm.LRUCacheWorkerLoRAManager._load_adapter = _patcher("before", disk_loader)
        extension = "lora_ipc.vllm.WorkerExtension"
    else:
        extension = "lora_ipc.integrations.verl.ColocateExtension"
    llm = engine.make_llm(model_dir, max_loras=2, max_cpu_loras=4, worker_extension_cls=extension)
    out: dict = {"base": engine.generate(llm)}
    versions = {v1: dir1, v2: dir2}

    def ipc(version):
        return engine.generate(llm, lora_request("policy", endpoint, version))

    def disk(version, lora_id):
        return engine.generate(llm, LoRARequest(f"disk-{lora_id}", lora_id, versions[version]))

    try:
        steps(mode, out, ipc, disk, disk_loader, llm, endpoint, v1, v2)
    except _Stop:
        pass
    out["calls"] = CALLS
    return out


def steps(mode, out, ipc, disk, disk_loader, llm, endpoint, v1, v2) -> None:
    from vllm.lora import worker_manager as wm
    from vllm.lora.request import LoRARequest

    from . import engine

    if mode == "patchers":
        _attempt(out, "ipc_v1", lambda: ipc(v1))
        _attempt(out, "disk_v1", lambda: disk(v1, 900_001))
        after = _patcher("after", disk_loader)
        wm.WorkerLoRAManager._load_adapter = after
        wm.LRUCacheWorkerLoRAManager._load_adapter = after
        _attempt(out, "ipc_v2", lambda: ipc(v2))
        _attempt(out, "disk_v2", lambda: disk(v2, 900_002))
        _attempt(out, "ipc_v1_again", lambda: ipc(v1))
    else:
        from verl.utils.vllm.utils import LRUCacheWorkerLoRAManager

        hijacked = LRUCacheWorkerLoRAManager._load_adapter
        out["verl_hijack_in_place"] = hijacked.__qualname__.startswith("VLLMHijack")
        # the RPC a verl user calls (no workaround): lora_ipc_load, then generate with the same request
        _attempt(out, "rpc_v1", lambda: llm.collective_rpc("lora_ipc_load", args=("policy", endpoint, v1)))
        _attempt(out, "ipc_v1", lambda: ipc(v1))
        _attempt(out, "ipc_v2", lambda: ipc(v2))
        _attempt(out, "ipc_v1_again", lambda: ipc(v1))
        # verl's async server generates with its fixed LoRARequest("123", 123, "simon_lora_path") once id 123
        # is loaded: lora_ipc loads each version into that slot (lora_ipc.ray.load(..., lora_int_id=123))
        from verl.workers.rollout.vllm_rollout.utils import VLLM_LORA_INT_ID, VLLM_LORA_NAME, VLLM_LORA_PATH

        fixed = LoRARequest(lora_name=VLLM_LORA_NAME, lora_int_id=VLLM_LORA_INT_ID, lora_path=VLLM_LORA_PATH)
        for key, version in (("fixed_v2", v2), ("fixed_v1", v1)):
            _attempt(
                out,
                f"rpc_{key}",
                lambda version=version: llm.collective_rpc(
                    "lora_ipc_load", args=("policy", endpoint, version, VLLM_LORA_INT_ID)
                ),
            )
            llm.reset_prefix_cache()
            _attempt(out, key, lambda: engine.generate(llm, fixed))
        # the reference: vLLM's own disk loader (verl 0.9.1's hijacked one needs vLLM 0.24: under 0.32 it
        # fails on WeightsMapper.get_unstacked_mapper), put back for these two loads only
        LRUCacheWorkerLoRAManager._load_adapter = disk_loader
        try:
            _attempt(out, "disk_v1", lambda: disk(v1, 900_001))
            _attempt(out, "disk_v2", lambda: disk(v2, 900_002))
        finally:
            LRUCacheWorkerLoRAManager._load_adapter = hijacked


def run_engine(python: str, mode: str, endpoint: str, model_dir: str, versions: dict, timeout: float = 900) -> dict:
    """Run ``main`` in a new process of ``python``; its result."""
    from .helpers import run_in_checkout

    (v1, d1), (v2, d2) = sorted(versions.items())
    proc = run_in_checkout(
        [python, "-m", "tests.patched_loader_engine", mode, endpoint, model_dir, v1, d1, v2, d2], timeout
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"engine script failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("RESULT ") :])


@contextlib.contextmanager
def published_versions(root):
    """Two versions of a real PEFT adapter published by a trainer process, and saved beside: (endpoint, {v: dir})."""
    from .procs import ExporterProcess

    proc = ExporterProcess(keep=3)
    try:
        v1 = proc.call("publish_peft", "policy", "bfloat16", 0, str(root / "v1"))
        v2 = proc.call("train_and_publish", "policy", "bfloat16", 1, str(root / "v2"))
        yield proc.endpoint, {v1: str(root / "v1"), v2: str(root / "v2")}
    finally:
        proc.close()


if __name__ == "__main__":
    result = main(*sys.argv[1:])
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the in-process engine's threads would keep the interpreter alive

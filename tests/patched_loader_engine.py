"""One in-process vLLM CPU engine whose ``_load_adapter`` is replaced by a framework, before and after
lora_ipc's plugin (run as a script by tests/test_patched_loader.py; prints one JSON line).

    python -m tests.patched_loader_engine patchers ENDPOINT MODEL_DIR V1 DIR1 V2 DIR2
    python -m tests.patched_loader_engine verl     ENDPOINT MODEL_DIR V1 DIR1 V2 DIR2   (verl's venv)

``patchers``: before the engine (so before the plugin registers) ``LRUCacheWorkerLoRAManager._load_adapter``
is replaced by a function that calls vLLM's own disk loader and never what was there (as verl's hijack
does); after the engine is up, ``WorkerLoRAManager`` and ``LRUCacheWorkerLoRAManager`` get another one.
``verl``: the engine runs verl's real ``vLLMColocateWorkerExtension`` (its ``__new__`` runs verl's real
``VLLMHijack.hijack()``) composed with lora_ipc's, as ``lora_ipc.integrations.verl.ColocateExtension``.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so the patches reach its worker.
"""

from __future__ import annotations

import json
import os
import sys

CALLS: dict[str, list[str]] = {"before": [], "after": []}


def _patcher(tag: str, disk_loader):
    def _load_adapter(self, lora_request):  # a framework's replacement: never calls what was there
        CALLS[tag].append(lora_request.lora_path)
        return disk_loader(self, lora_request)

    return _load_adapter


def _attempt(fn):
    try:
        return fn()
    except Exception as exc:  # reported, compared by the test
        return {"error": f"{type(exc).__name__}: {str(exc)[:400]}"}


def main(mode: str, endpoint: str, model_dir: str, v1: str, dir1: str, v2: str, dir2: str) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm.lora import worker_manager as wm
    from vllm.lora.request import LoRARequest

    from lora_ipc.vllm import lora_request

    from . import engine

    disk_loader = wm.WorkerLoRAManager._load_adapter  # vLLM's own: the plugin has not registered yet
    if mode == "patchers":
        assert not getattr(disk_loader, "__lora_ipc_wrapped__", False)
        wm.LRUCacheWorkerLoRAManager._load_adapter = _patcher("before", disk_loader)
        extension = "lora_ipc.vllm.WorkerExtension"
    else:
        extension = "lora_ipc.integrations.verl.ColocateExtension"
    llm = engine.make_llm(model_dir, max_loras=2, max_cpu_loras=4, worker_extension_cls=extension)
    out: dict = {"base": engine.generate(llm)}
    versions = {int(v1): dir1, int(v2): dir2}

    def ipc(version):
        return engine.generate(llm, lora_request("policy", endpoint, version))

    def disk(version, lora_id):
        return engine.generate(llm, LoRARequest(f"disk-{lora_id}", lora_id, versions[version]))

    if mode == "patchers":
        out["ipc_v1"] = _attempt(lambda: ipc(int(v1)))
        out["disk_v1"] = _attempt(lambda: disk(int(v1), 900_001))
        after = _patcher("after", disk_loader)
        wm.WorkerLoRAManager._load_adapter = after
        wm.LRUCacheWorkerLoRAManager._load_adapter = after
        out["ipc_v2"] = _attempt(lambda: ipc(int(v2)))
        out["disk_v2"] = _attempt(lambda: disk(int(v2), 900_002))
        out["ipc_v1_again"] = _attempt(lambda: ipc(int(v1)))
    else:
        from verl.utils.vllm.utils import LRUCacheWorkerLoRAManager

        hijacked = LRUCacheWorkerLoRAManager._load_adapter
        out["verl_hijack_in_place"] = hijacked.__qualname__.startswith("VLLMHijack")
        # the RPC a verl user calls (no workaround): lora_ipc_load, then generate with the same request
        out["rpc_v1"] = _attempt(lambda: llm.collective_rpc("lora_ipc_load", args=("policy", endpoint, int(v1))))
        out["ipc_v1"] = _attempt(lambda: ipc(int(v1)))
        out["ipc_v2"] = _attempt(lambda: ipc(int(v2)))
        out["ipc_v1_again"] = _attempt(lambda: ipc(int(v1)))
        out["disk_v1"] = _attempt(lambda: disk(int(v1), 900_001))  # through verl's hijacked loader
        out["disk_v2"] = _attempt(lambda: disk(int(v2), 900_002))
    out["calls"] = CALLS
    return out


if __name__ == "__main__":
    result = main(*sys.argv[1:])
    print("RESULT " + json.dumps(result), flush=True)
    os._exit(0)  # the in-process engine's threads would keep the interpreter alive

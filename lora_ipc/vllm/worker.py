"""``worker_extension_cls="lora_ipc.vllm.WorkerExtension"``: explicit RPCs for ``LLM.collective_rpc``.

    llm.collective_rpc("lora_ipc_load", args=("policy", endpoint))      # newest version
    llm.collective_rpc("lora_ipc_loaded")
    llm.collective_rpc("lora_ipc_unload", args=(lora_int_id,))
    llm.collective_rpc("lora_ipc_refit_stats")                           # last full-weight update's timings

The methods are mixed into vLLM's Worker, so their names are prefixed to never clash with it.
"""

from __future__ import annotations

from .request import lora_request


class WorkerExtension:
    def _lora_ipc_manager(self):
        manager = getattr(self.model_runner, "lora_manager", None)
        if manager is None:
            raise RuntimeError("this engine was started without enable_lora=True")
        return manager

    def lora_ipc_load(self, name: str, endpoint: str | None = None, version: int | None = None,
                      lora_int_id: int | None = None) -> dict:
        """Load (or hot-swap) an adapter version into this worker; returns what was loaded."""
        request = lora_request(name, endpoint, version, lora_int_id)
        self._lora_ipc_manager().add_adapter(request)
        return {"name": request.lora_name, "lora_int_id": request.lora_int_id, "lora_path": request.lora_path}

    def lora_ipc_unload(self, lora_int_id: int) -> bool:
        return self._lora_ipc_manager().remove_adapter(lora_int_id)

    def lora_ipc_load_count(self) -> int:
        """How many times this worker has loaded an adapter through lora_ipc (each fetch + from_lora_tensors)."""
        return getattr(self._lora_ipc_manager(), "_lora_ipc_loads", 0)

    def lora_ipc_loaded(self) -> list[dict]:
        from .plugin import loaded_paths

        manager = self._lora_ipc_manager()
        paths = loaded_paths(manager)
        return [{"lora_int_id": i, "lora_path": paths.get(i)} for i in sorted(manager.list_adapters())]

    def lora_ipc_refit_stats(self) -> dict:
        """The last complete ``lora_ipc`` weight update on this worker: buckets, bytes, fetch/load/finalize ms."""
        return dict(getattr(getattr(self, "weight_transfer_engine", None), "last_update", {}) or {})

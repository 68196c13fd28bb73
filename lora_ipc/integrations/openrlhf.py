"""OpenRLHF 0.11: LoRA adapters from the policy actor to OpenRLHF's own vLLM engines, through lora_ipc.

    import lora_ipc.ray, lora_ipc.integrations.openrlhf as lora_openrlhf
    lora_openrlhf.install(adapter="policy", max_lora_rank=16, max_loras=2)  # driver, before create_vllm_engines
    engines = create_vllm_engines(...)                                       # OpenRLHF's own, unchanged
    version = lora_ipc.ray.publish("policy", model)                          # policy actor, rank 0, after the step
    lora_ipc.ray.load(engines, "policy", version)                            # driver, instead of broadcast_to_vllm

``install`` changes nothing on disk. At runtime it replaces ``openrlhf.trainer.ray.vllm_engine.RolloutRayActor``
(which ``create_vllm_engines`` looks up when called) by a subclass of its actor class (Ray refuses subclasses
of the actor handle class itself) whose engine

- is started with ``enable_lora``, ``max_lora_rank``, ``max_loras`` (``max_cpu_loras``), with
  :class:`WorkerWrap` (lora_ipc's worker extension composed with OpenRLHF's ``WorkerWrap``, whose
  full-weight RPCs keep working) and ``LORA_IPC_ENDPOINT`` set to its node's relay;
- has ``collective_rpc`` (what :func:`lora_ipc.ray.load` calls);
- generates, on OpenRLHF's own rollout path (``generate_responses`` -> ``generate``), with the version of
  ``adapter`` that ``lora_ipc.ray.load`` loaded into it last: the base model before any load.
"""

from __future__ import annotations

import os
from typing import Any

import ray
from openrlhf.trainer.ray import vllm_engine
from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap as OpenRLHFWorkerWrap

from ..vllm.worker import WorkerExtension

OPENRLHF_EXTENSION = "openrlhf.trainer.ray.vllm_worker_wrap.WorkerWrap"
EXTENSION = f"{__name__}.WorkerWrap"
_ORIGINAL = vllm_engine.RolloutRayActor


class WorkerWrap(WorkerExtension, OpenRLHFWorkerWrap):
    """OpenRLHF's worker RPCs (``init_process_group``, ``update_weight``, ...) plus ``lora_ipc_load`` & co."""


class _GenerateWithAdapter:
    """The actor's engine, whose ``generate`` uses the actor's current adapter when none is given."""

    def __init__(self, engine, actor):
        self._engine = engine
        self._actor = actor

    def generate(self, *args, **kwargs):
        if kwargs.get("lora_request") is None:
            kwargs["lora_request"] = self._actor._lora_ipc_request
        return self._engine.generate(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


def _actor_class(adapter: str, engine_args: dict[str, Any]):
    base: Any = _ORIGINAL.__ray_actor_class__

    class LoraRolloutActor(base):
        """OpenRLHF's ``RolloutRayActor`` with lora_ipc (see :mod:`lora_ipc.integrations.openrlhf`)."""

        async def __init__(self, *args, **kwargs):
            import lora_ipc.ray

            extension = kwargs.get("worker_extension_cls", OPENRLHF_EXTENSION)
            if extension not in (OPENRLHF_EXTENSION, EXTENSION):
                raise ValueError(f"lora_ipc composes with OpenRLHF's WorkerWrap, not {extension!r}")
            kwargs.update(engine_args, worker_extension_cls=EXTENSION)
            os.environ["LORA_IPC_ENDPOINT"] = lora_ipc.ray.local_endpoint()  # inherited by vLLM's processes
            self._lora_ipc_adapter = adapter
            self._lora_ipc_request = None
            await super().__init__(*args, **kwargs)
            self.llm: Any = _GenerateWithAdapter(self.llm, self)

        async def collective_rpc(
            self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
        ):
            result = await self.llm.collective_rpc(method, timeout, args, kwargs)
            if method == "lora_ipc_load" and args and args[0] == self._lora_ipc_adapter and result:
                from vllm.lora.request import LoRARequest

                first = result[0]
                self._lora_ipc_request = LoRARequest(
                    lora_name=first["name"], lora_int_id=first["lora_int_id"], lora_path=first["lora_path"]
                )
            return result

        def lora_ipc_use(self, lora_request=None) -> None:
            """Roll out with ``lora_request`` from now on (None: the base model) until the next load."""
            self._lora_ipc_request = lora_request

        def lora_ipc_current(self):
            """The ``LoRARequest`` rollouts use now (None: the base model)."""
            return self._lora_ipc_request

    LoraRolloutActor.__name__ = LoraRolloutActor.__qualname__ = "RolloutRayActor"
    return LoraRolloutActor


def install(
    adapter: str, max_lora_rank: int, max_loras: int = 1, max_cpu_loras: int | None = None, **engine_args: Any
) -> None:
    """Make OpenRLHF's ``create_vllm_engines`` build LoRA engines served by lora_ipc (driver, before it).

    ``adapter`` is the name the policy publishes under (``lora_ipc.ray.publish``); extra keyword
    arguments go to vLLM's engine arguments. Starts the node relays (:func:`lora_ipc.ray.start_relays`)
    when Ray is initialized. Calling it again replaces the previous settings.
    """
    if not adapter or not isinstance(adapter, str):
        raise ValueError("adapter must be the name the policy publishes under")
    if int(max_lora_rank) <= 0 or int(max_loras) <= 0:
        raise ValueError("max_lora_rank and max_loras must be positive")
    args = dict(engine_args, enable_lora=True, max_lora_rank=int(max_lora_rank), max_loras=int(max_loras))
    if max_cpu_loras is not None:
        args["max_cpu_loras"] = int(max_cpu_loras)
    vllm_engine.RolloutRayActor = ray.remote(_actor_class(adapter, args))
    if ray.is_initialized():
        import lora_ipc.ray

        lora_ipc.ray.start_relays()


def uninstall() -> None:
    """Put OpenRLHF's own ``RolloutRayActor`` back."""
    vllm_engine.RolloutRayActor = _ORIGINAL

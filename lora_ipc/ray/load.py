"""``load``: every engine actor loads one adapter version, concurrently, through ``collective_rpc``."""

from __future__ import annotations

import time
from collections.abc import Sequence

import ray

from .. import errors
from ..errors import AdapterNotFound
from .errors import EngineLoadError
from .relay import alive_node_ids, relay_handle


def served_version(name: str) -> int:
    """The newest version of ``name`` that every relay on an alive node serves."""
    handles = [h for h in (relay_handle(n) for n in alive_node_ids()) if h is not None]
    kept = [set(v.get(name, ())) for v in ray.get([h.versions.remote() for h in handles])]
    common = set.intersection(*kept) if kept else set()
    if not common:
        raise AdapterNotFound(f"no version of {name!r} is served by every relay")
    return max(common)


def load(engines: Sequence, name: str, version: int | None = None, lora_int_id: int | None = None,
         *, timeout_s: float | None = None) -> list[dict]:
    """Load ``name`` (``version``, default the newest every relay serves) into every engine actor.

    Each engine actor must forward ``collective_rpc(method, args=...)`` to its ``LLM``/``AsyncLLM``
    started with ``worker_extension_cls`` containing :class:`lora_ipc.vllm.WorkerExtension`, and have
    ``LORA_IPC_ENDPOINT`` set to its node's relay (:func:`lora_ipc.ray.local_endpoint`). All engines
    load at once; the result has one entry per engine, in order: what its first worker loaded, plus
    ``engine`` (index), ``workers`` and ``wall_ms`` (call to answer, seen from here). If an engine
    fails, :class:`EngineLoadError` names the first failing one after the others have finished; those
    keep what they loaded.
    """
    if version is None:
        version = served_version(name)
    started = time.perf_counter()
    pending = {e.collective_rpc.remote("lora_ipc_load", args=(name, None, version, lora_int_id)): i
               for i, e in enumerate(engines)}
    results: list[dict | None] = [None] * len(engines)
    failures: dict[int, BaseException] = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
        if not ready:
            for i in pending.values():
                failures[i] = TimeoutError(f"no answer within {timeout_s:g}s")
            break
        for ref in ready:
            i = pending.pop(ref)
            try:
                workers = ray.get(ref)
            except Exception as exc:
                failures[i] = exc
                continue
            results[i] = {**workers[0], "engine": i, "workers": len(workers),
                          "wall_ms": round((time.perf_counter() - started) * 1e3, 3)}
    if failures:
        i = min(failures)
        actor = engines[i]._actor_id.hex()
        error_type, why = _why(failures[i])
        raise EngineLoadError(f"engine {i} (actor {actor}) failed to load {name} v{version}: {why}", i, actor,
                              [r for r in results if r is not None], error_type) from failures[i]
    return results  # type: ignore[return-value]


_ERROR_NAMES = [n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, errors.LoraIpcError)]


def _why(exc: BaseException) -> tuple[str, str]:
    """(the lora_ipc error type named in a worker's failure, else the exception's type; its last line).

    vLLM hands a worker's exception back as a plain ``Exception`` carrying only its text, and Ray
    wraps that with a traceback; the WorkerExtension puts the lora_ipc type's name into the text.
    """
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else type(exc).__name__
    named = [n for n in _ERROR_NAMES if f"{n}: " in text]
    return (max(named, key=text.rfind) if named else type(exc).__name__), last

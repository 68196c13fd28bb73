"""``load``: every engine actor loads one adapter version, concurrently, through ``collective_rpc``."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import ray

from ..core.protocol import carried
from ..lora.adapters import AdapterNotFound
from .errors import EngineLoadError
from .relay_actor import alive_node_ids, relay_handle


def served_version(name: str) -> int:
    """The newest version of ``name`` that every relay on an alive node serves."""
    handles = [h for h in (relay_handle(n) for n in alive_node_ids()) if h is not None]
    kept = [set(v.get(name, ())) for v in ray.get([h.versions.remote() for h in handles])]
    common = set.intersection(*kept) if kept else set()
    if not common:
        raise AdapterNotFound(f"no version of {name!r} is served by every relay")
    return max(common)


def load(
    engines: Sequence,
    name: str,
    version: int | None = None,
    lora_int_id: int | None = None,
    *,
    timeout_s: float | None = None,
    rpc: str | Callable = "collective_rpc",
) -> list[dict]:
    """Load ``name`` (``version``, default the newest every relay serves) into every engine actor.

    Each engine actor must forward ``collective_rpc(method, args=...)`` to its ``LLM``/``AsyncLLM``
    started with ``worker_extension_cls`` containing :class:`lora_ipc.vllm.WorkerExtension`, and have
    ``LORA_IPC_ENDPOINT`` set to its node's relay (:func:`lora_ipc.ray.local_endpoint`). An actor whose
    method has another name: ``rpc="its_name"`` (same arguments), or ``rpc=lambda engine, method, args:
    engine.whatever.remote(...)`` returning an ``ObjectRef``. All engines load at once; the result has
    one entry per engine, in order: what its first worker loaded, plus ``engine`` (index), ``workers``
    and ``wall_ms`` (call to answer, seen from here). An engine whose RPC answers ``None`` (verl's
    ``collective_rpc`` does) loaded without saying what: its entry has ``name``, ``version``,
    ``lora_int_id`` (None when the id was derived), ``workers=None``. If an engine fails, or answers
    something that is neither None nor one dict per worker (``error_type="UnreadableResult"``),
    :class:`EngineLoadError` names the first such one after the others have finished; those keep
    what they loaded.
    """
    if version is None:
        version = served_version(name)
    started = time.perf_counter()
    results: list[dict | None] = [None] * len(engines)
    failures: dict[int, BaseException] = {}
    pending = {}
    for i, e in enumerate(engines):
        try:
            pending[_call(e, rpc, ("lora_ipc_load", (name, None, version, lora_int_id)))] = i
        except NoSuchMethod as exc:
            failures[i] = exc
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=timeout_s)
        if not ready:
            for i in pending.values():
                failures[i] = TimeoutError(f"no answer within {timeout_s:g}s")
            break
        for ref in ready:
            i = pending.pop(ref)
            try:
                entry = _entry(ray.get(ref), name, version, lora_int_id)
            except Exception as exc:  # Ray's error for that engine (its worker's, typed: protocol.carried) or ours
                failures[i] = exc
                continue
            entry.update(engine=i, wall_ms=round((time.perf_counter() - started) * 1e3, 3))
            results[i] = entry
    if failures:
        i = min(failures)
        actor = _actor_id(engines[i])
        cause = failures[i]
        typed = carried(cause)
        error_type = type(typed).__name__ if typed is not None else type(cause).__name__
        why = str(typed) if typed is not None else _last_line(cause)
        raise EngineLoadError(
            f"engine {i} (actor {actor}) failed to load {name} v{version}: {error_type}: {why}",
            i,
            actor,
            [r for r in results if r is not None],
            error_type,
            typed,
        ) from typed or cause
    return results  # type: ignore[return-value]


class NoSuchMethod(AttributeError):
    pass


class UnreadableResult(Exception):
    """An engine's RPC answered something that is neither None nor one dict per worker."""


def _call(engine, rpc, call):
    method, args = call
    if callable(rpc):
        return rpc(engine, method, args)
    remote = getattr(engine, rpc, None)
    if remote is None or not hasattr(remote, "remote"):
        raise NoSuchMethod(
            f"the engine actor has no method {rpc!r} to reach its workers "
            "(pass rpc='its name' or rpc=callable to lora_ipc.ray.load)"
        )
    return remote.remote(method, args=args)


def _entry(answer, name: str, version: int, lora_int_id: int | None) -> dict:
    if answer is None:  # the RPC ran on every worker (no exception) but hands nothing back
        return {"name": name, "version": version, "lora_int_id": lora_int_id, "workers": None}
    if (
        isinstance(answer, (list, tuple))
        and answer
        and all(isinstance(w, dict) for w in answer)
        and {"name", "version", "lora_int_id"} <= set(answer[0])
    ):
        return {**answer[0], "workers": len(answer)}
    raise UnreadableResult(
        f"the engine's RPC answered {type(answer).__name__} "
        f"{str(answer)[:120]!r}, not None nor one lora_ipc_load result per worker"
    )


def _actor_id(engine) -> str:
    actor_id = getattr(engine, "_actor_id", None)
    return actor_id.hex() if actor_id is not None else repr(engine)[:80]


def _last_line(exc: BaseException) -> str:
    """The last line of an error that carries no lora_ipc type (Ray puts the remote traceback first)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__

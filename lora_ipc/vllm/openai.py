"""OpenAI server: ``lora-ipc`` checks in the API process, before anything reaches the engine.

- ``POST /v1/load_lora_adapter`` with an unknown adapter or version is the client's mistake, so it
  gets 404 (a malformed URI 400, an unreachable exporter 503) with the reason — not a 500 from deep
  inside a worker. Wraps ``OpenAIServingModels._check_load_lora_adapter_request``.
- Every request whose model is a ``lora-ipc`` adapter (``_check_model``): vLLM caches a name's
  ``LoRARequest`` forever and reloads it inside an engine step after evicting it, where an error
  kills the engine. So before the request is admitted, :func:`refresh` makes the entry mean what its
  name means now (docs/guides/naming.md), loading into the engine now whatever it must (a failure there is
  this request's error):

  - a bare name (its entry's path is marked ``&follow=1``) moves to the newest version;
  - ``name@vN`` is version N of the exporter's current epoch: after the exporter restarted, the entry
    moves to the new run's version N, or the request gets a 404 (the name is forgotten) — never the
    previous run's bytes;
  - a path loaded through ``/v1/load_lora_adapter`` names its exact (epoch, version): a version the
    exporter no longer keeps (or an earlier epoch's) is loaded or touched now, which the worker serves
    from what it keeps (:mod:`.kept`); if it cannot, this request alone gets a 404 and the name is forgotten.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from ..core.errors import (
    BadAdapterURI,
    ExporterUnavailable,
    LoraIpcError,
    StaleEpoch,
    TensorSetNotFound,
    VersionNotFound,
)
from ..core.protocol import carried
from ..lora.uri import AdapterURI
from . import api_io
from .request import resolve
from .resolver import parse_model_name

STATUS_OF = {
    TensorSetNotFound: HTTPStatus.NOT_FOUND,  # AdapterNotFound too
    VersionNotFound: HTTPStatus.NOT_FOUND,
    BadAdapterURI: HTTPStatus.BAD_REQUEST,
    ExporterUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}


def status_of(exc: LoraIpcError) -> HTTPStatus:
    return next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), HTTPStatus.BAD_REQUEST)


async def check_lora_ipc_path(lora_path: str) -> tuple[HTTPStatus, str] | None:
    """(status, reason) when ``lora_path`` names nothing the exporter serves; None when it does."""
    try:
        uri = AdapterURI.parse(lora_path)
        await api_io.call(uri.endpoint, resolve, uri.name, uri.endpoint, uri.version, uri.epoch)
    except LoraIpcError as exc:
        return status_of(exc), f"{type(exc).__name__}: {exc}"
    return None


def _error(status: HTTPStatus, reason: str, param: str | None = None):
    from vllm.entrypoints.serve import create_error_response

    err_type = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "InvalidUserInput"
    return create_error_response(message=reason, err_type=err_type, status_code=status, param=param)


def check_wrapper(original):
    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        if error is not None or not AdapterURI.matches(getattr(request, "lora_path", None)):
            return error
        problem = await check_lora_ipc_path(request.lora_path)
        if problem is None:
            return None
        return _error(*problem)

    return _check_load_lora_adapter_request


async def _add_to_engine(models, lora_request) -> tuple[HTTPStatus, str] | None:
    """Load (or touch) ``lora_request`` in the engine now; (status, reason) when it cannot be."""
    try:
        await models.engine_client.add_lora(lora_request)
    except Exception as exc:  # the engine's utility call reports the worker's error; the engine lives on
        typed = carried(exc)
        return (HTTPStatus.BAD_REQUEST if typed is None else status_of(typed)), f"{type(exc).__name__}: {exc}"
    return None


_refreshing: dict[tuple[int, str], asyncio.Future] = {}


async def refresh(models, model_name: str):
    """Make ``models.lora_requests[model_name]`` (a lora-ipc entry) servable now; an error response if it is not.

    Concurrent requests for one name share one refresh (one exporter round trip, at most one load)."""
    key = (id(models), model_name)
    task = _refreshing.get(key)
    if task is None:
        task = _refreshing[key] = asyncio.ensure_future(_refresh(models, model_name))
        task.add_done_callback(lambda _: _refreshing.pop(key, None))
    return await asyncio.shield(task)  # a cancelled request does not cancel the others' refresh


async def _refresh(models, model_name: str):
    entry = models.lora_requests.get(model_name)
    if entry is None or not AdapterURI.matches(entry.lora_path):
        return None
    try:
        uri = AdapterURI.parse(entry.lora_path)
    except LoraIpcError:
        return None
    if uri.follow:
        return await _follow(models, model_name, entry, uri)
    try:
        await api_io.call(uri.endpoint, resolve, uri.name, uri.endpoint, uri.version, uri.epoch)
        return None  # at the exporter: a reload in a step can fetch it (or use the kept copy)
    except StaleEpoch:
        if uri.version is not None and parse_model_name(model_name) == (uri.name, uri.version):
            return await _repin(models, model_name, entry, uri)
    except LoraIpcError:
        pass
    return await _serve_entry(models, model_name, entry)


FOLLOW_TRIES = 3


async def _follow(models, model_name: str, entry, uri: AdapterURI):
    """A bare name: the newest version the exporter keeps now, or this request's error (never an older one
    while the exporter serves a newer). A newest version that is gone before it loaded (a publisher
    outpacing the exporter's ``keep``) is looked up again, ``FOLLOW_TRIES`` times in all."""
    problem = None
    for _ in range(FOLLOW_TRIES):
        try:
            version, epoch = await api_io.call(uri.endpoint, resolve, uri.name, uri.endpoint, None)
        except TensorSetNotFound as exc:  # AdapterNotFound: e.g. a restarted exporter that has not published it yet
            return _error(HTTPStatus.NOT_FOUND, f"{type(exc).__name__}: {exc}", "model")
        except LoraIpcError:  # the exporter cannot say: the version the name has, if the engine can still serve it
            return await _serve_entry(models, model_name, entry)
        if (version, epoch or None) == (uri.version, uri.epoch):
            return None
        target = AdapterURI(uri.name, version, uri.endpoint, epoch or None, follow=True)
        problem = await _move(models, model_name, entry, target)
        if problem is None or problem[0] != HTTPStatus.NOT_FOUND:
            break
    return None if problem is None else _error(*problem, "model")


async def _repin(models, model_name: str, entry, uri: AdapterURI):
    """``name@vN`` after its exporter restarted: version N of the new run, or 404 (and the name is forgotten)."""
    try:
        version, epoch = await api_io.call(uri.endpoint, resolve, uri.name, uri.endpoint, uri.version)
    except LoraIpcError as exc:
        _forget(models, model_name, entry)
        reason = f"{model_name!r} was v{uri.version} of epoch {uri.epoch}, and the exporter restarted: {exc}"
        return _error(status_of(exc), f"{type(exc).__name__}: {reason}", "model")
    problem = await _move(models, model_name, entry, AdapterURI(uri.name, version, uri.endpoint, epoch or None))
    return None if problem is None else _error(*problem, "model")


async def _move(models, model_name: str, entry, target: AdapterURI) -> tuple[HTTPStatus, str] | None:
    """Point ``model_name`` at ``target``, loaded into the engine now under a new ``lora_int_id`` (requests
    already admitted keep what they were admitted with); (status, reason) if it cannot be loaded."""
    from vllm.lora.request import LoRARequest

    newer = LoRARequest(lora_name=model_name, lora_int_id=models.lora_id_counter.inc(1), lora_path=str(target))
    problem = await _add_to_engine(models, newer)
    if problem is not None:
        return problem[0], f"{model_name!r} ({target}) could not be loaded: {problem[1]}"
    if models.lora_requests.get(model_name) is entry:  # not replaced meanwhile by a concurrent request
        models.lora_requests[model_name] = newer
    return None


async def _serve_entry(models, model_name: str, entry):
    """The exact version the entry names, which the exporter no longer serves: the worker's kept copy, or 404."""
    problem = await _add_to_engine(models, entry)
    if problem is None:
        return None
    _forget(models, model_name, entry)
    return _error(
        HTTPStatus.NOT_FOUND, f"{model_name!r} ({entry.lora_path}) can no longer be served: {problem[1]}", "model"
    )


def _forget(models, model_name: str, entry) -> None:
    if models.lora_requests.get(model_name) is entry:
        models.lora_requests.pop(model_name, None)


def check_model_wrapper(original):
    async def _check_model(self, request):
        models = getattr(self, "models", None)
        model_name = getattr(request, "model", None)
        lora_requests = getattr(models, "lora_requests", None)
        if isinstance(model_name, str) and isinstance(lora_requests, dict) and model_name in lora_requests:
            error = await refresh(models, model_name)
            if error is not None:
                return error
        return await original(self, request)

    return _check_model

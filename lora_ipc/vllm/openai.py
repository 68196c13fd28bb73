"""OpenAI server: ``lora-ipc`` checks in the API process, before anything reaches the engine.

- ``POST /v1/load_lora_adapter`` with an unknown adapter or version is the client's mistake, so it
  gets 404 (a malformed URI 400, an unreachable exporter 503) with the reason — not a 500 from deep
  inside a worker. Wraps ``OpenAIServingModels._check_load_lora_adapter_request``.
- Every request whose model is a ``lora-ipc`` adapter (``_check_model``): vLLM caches a name's
  ``LoRARequest`` forever and reloads it inside an engine step after evicting it, where an error
  kills the engine. So before the request is admitted, :func:`refresh` makes sure what it will use
  can be served: a bare adapter name moves to the newest version (loaded into the engine now, where
  a failure is this request's error), and a pinned version the exporter no longer keeps is loaded
  (or touched) now, which the worker serves from what it keeps (:mod:`.kept`); if it cannot, this
  request alone gets a 404 and the name is forgotten.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from ..errors import AdapterNotFound, BadAdapterURI, ExporterUnavailable, LoraIpcError, VersionNotFound
from . import api_io
from .request import resolve
from .resolver import FOLLOWING
from .uri import AdapterURI

STATUS_OF = {
    AdapterNotFound: HTTPStatus.NOT_FOUND,
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


async def _add_to_engine(models, lora_request) -> str | None:
    """Load (or touch) ``lora_request`` in the engine now; the reason when it cannot be."""
    try:
        await models.engine_client.add_lora(lora_request)
    except Exception as exc:  # the engine's utility call reports the worker's error; the engine lives on
        return f"{type(exc).__name__}: {exc}"
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
    follows = FOLLOWING.get(entry.lora_path) == model_name  # a bare name: the newest version
    try:
        version, epoch = await api_io.call(
            uri.endpoint,
            resolve,
            uri.name,
            uri.endpoint,
            None if follows else uri.version,
            None if follows else uri.epoch,
        )
        at_exporter = True
    except LoraIpcError as exc:
        if follows and isinstance(exc, AdapterNotFound):
            return _error(HTTPStatus.NOT_FOUND, f"{type(exc).__name__}: {exc}", "model")
        version, epoch, at_exporter = uri.version, uri.epoch, False
    if follows and at_exporter and (version, epoch or None) != (uri.version, uri.epoch):
        from vllm.lora.request import LoRARequest

        path = str(AdapterURI(uri.name, version, uri.endpoint, epoch or None))
        newer = LoRARequest(lora_name=model_name, lora_int_id=models.lora_id_counter.inc(1), lora_path=path)
        reason = await _add_to_engine(models, newer)
        if reason is None:
            FOLLOWING.put(path, model_name)
            if models.lora_requests.get(model_name) is entry:  # not replaced meanwhile by a concurrent request
                models.lora_requests[model_name] = newer
            return None
        # the newest could not be loaded: keep serving the entry the name has, checked below
    if at_exporter and (not follows or (version, epoch or None) == (uri.version, uri.epoch)):
        return None  # the entry's version is at the exporter: a reload in a step can fetch it (or use the kept copy)
    reason = await _add_to_engine(models, entry)  # the worker still has it (kept), or this request fails here
    if reason is None:
        return None
    if models.lora_requests.get(model_name) is entry:
        models.lora_requests.pop(model_name, None)
    return _error(
        HTTPStatus.NOT_FOUND, f"{model_name!r} ({entry.lora_path}) can no longer be served: {reason}", "model"
    )


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

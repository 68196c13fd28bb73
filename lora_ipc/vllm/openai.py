"""OpenAI server: check a ``lora-ipc://`` load request in the API process, before it reaches the workers.

``POST /v1/load_lora_adapter`` with an unknown adapter or version is the client's mistake, so it gets
404 (a malformed URI 400, an unreachable exporter 503) with the reason — not a 500 from deep inside a
worker. Wraps ``OpenAIServingModels._check_load_lora_adapter_request``; other paths are untouched.
"""

from __future__ import annotations

import asyncio
from http import HTTPStatus

from ..errors import AdapterNotFound, BadAdapterURI, ExporterUnavailable, LoraIpcError, VersionNotFound
from .request import resolve_version
from .uri import AdapterURI

STATUS_OF = {AdapterNotFound: HTTPStatus.NOT_FOUND, VersionNotFound: HTTPStatus.NOT_FOUND,
             BadAdapterURI: HTTPStatus.BAD_REQUEST, ExporterUnavailable: HTTPStatus.SERVICE_UNAVAILABLE}


async def check_lora_ipc_path(lora_path: str) -> tuple[HTTPStatus, str] | None:
    """(status, reason) when ``lora_path`` names nothing the exporter serves; None when it does."""
    try:
        uri = AdapterURI.parse(lora_path)
        await asyncio.to_thread(resolve_version, uri.name, uri.endpoint, uri.version)
    except LoraIpcError as exc:
        status = next((s for cls, s in STATUS_OF.items() if isinstance(exc, cls)), HTTPStatus.BAD_REQUEST)
        return status, f"{type(exc).__name__}: {exc}"
    return None


def check_wrapper(original):
    async def _check_load_lora_adapter_request(self, request):
        error = await original(self, request)
        if error is not None or not AdapterURI.matches(getattr(request, "lora_path", None)):
            return error
        problem = await check_lora_ipc_path(request.lora_path)
        if problem is None:
            return None
        from vllm.entrypoints.serve import create_error_response

        status, reason = problem
        err_type = "NotFoundError" if status == HTTPStatus.NOT_FOUND else "InvalidUserInput"
        return create_error_response(message=reason, err_type=err_type, status_code=status)

    return _check_load_lora_adapter_request

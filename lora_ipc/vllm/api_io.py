"""Blocking lora_ipc calls made from vLLM's API process (asyncio), each endpoint isolated from the others.

Endpoints come from request bodies (``lora_path``), so one may be dead, stuck or hostile. Its calls
must cost only its own requests:

- at most ``MAX_PENDING_PER_ENDPOINT`` calls per endpoint wait or run at once (``MAX_PENDING_OWN``
  for the resolver's endpoint, which every request naming an adapter uses); one more fails at once
  with ``ExporterUnavailable`` (HTTP 503) instead of queueing behind a stuck exporter;
- the resolver's endpoint (``$LORA_IPC_ENDPOINT``) has its own threads: requests naming other
  endpoints can never take them (they share ``SHARED_THREADS`` threads among themselves);
- nothing listening on an endpoint fails at once (see :func:`lora_ipc.lora.adapters.shared_client`), and
  no lock is held across any call (the counters below are taken and dropped around it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..core import settings
from ..core.channels.endpoint import ENV_ENDPOINT
from ..core.errors import ExporterUnavailable

MAX_PENDING_PER_ENDPOINT = 4
MAX_PENDING_OWN = 256
SHARED_THREADS = 16
OWN_THREADS = 4

_lock = threading.Lock()  # guards the counters and executors only
_pending: dict[str, int] = {}
_executors: dict[str, ThreadPoolExecutor] = {}


def _executor_for(endpoint: str) -> ThreadPoolExecutor:
    own = endpoint == settings.value(ENV_ENDPOINT)
    key = "own" if own else "shared"
    with _lock:
        pool = _executors.get(key)
        if pool is None:
            pool = _executors[key] = ThreadPoolExecutor(
                OWN_THREADS if own else SHARED_THREADS, thread_name_prefix=f"lora-ipc-{key}"
            )
        return pool


def _take(endpoint: str) -> None:
    with _lock:
        pending = _pending.get(endpoint, 0)
        cap = MAX_PENDING_OWN if endpoint == settings.value(ENV_ENDPOINT) else MAX_PENDING_PER_ENDPOINT
        if pending >= cap:
            raise ExporterUnavailable(f"{endpoint}: {pending} requests to it are still pending; try again later")
        _pending[endpoint] = pending + 1


def _give(endpoint: str) -> None:
    with _lock:
        left = _pending.get(endpoint, 1) - 1
        if left > 0:
            _pending[endpoint] = left
        else:
            _pending.pop(endpoint, None)


def pending(endpoint: str) -> int:
    with _lock:
        return _pending.get(endpoint, 0)


async def call(endpoint: str, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on a thread of ``endpoint``'s executor, counted against its pending cap."""
    _take(endpoint)

    def run():
        try:
            return fn(*args)
        finally:
            _give(endpoint)  # in the thread: a cancelled request's call still counts until it ends

    try:
        future = asyncio.get_running_loop().run_in_executor(_executor_for(endpoint), run)
    except BaseException:
        _give(endpoint)
        raise
    return await future

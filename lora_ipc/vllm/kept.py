"""What a vLLM worker keeps of the ``lora-ipc://`` versions it loaded, so that a reload never needs
an exporter that has moved on.

vLLM drops adapters from its CPU cache (``--max-cpu-loras``) and reloads them inside an engine step
when a request names one again; an error there kills the engine. The exporter keeps only its newest
``keep`` versions, so by then the version may be gone. The worker therefore keeps the owned tensors of
every pinned version (name, version, epoch, endpoint) it loaded, least recently used first out, within
both bounds:

- entries: ``$LORA_IPC_WORKER_KEEP``, default ``4 * max_cpu_loras`` (at least 8): every adapter vLLM
  holds, plus as many it evicted and may be asked for again;
- bytes: ``$LORA_IPC_WORKER_KEEP_BYTES``, default 4 GiB (an entry larger than that is not kept).

Kept tensors live in host memory (a GPU worker keeps a host copy, outside the GPU memory vLLM
budgets). A reload of a kept version copies the kept tensors onto the worker's device (vLLM scales
``lora_b`` in place) instead of fetching. Touching an adapter in vLLM (a request for it) marks it used here too.
"""

from __future__ import annotations

import threading
from typing import cast

from ..core import settings
from ..core.lru import BoundedLRU
from ..lora.adapters import Adapter
from ..lora.uri import AdapterURI

DEFAULT_KEEP_BYTES = 4 << 30
ENV_KEEP = "LORA_IPC_WORKER_KEEP"
ENV_KEEP_BYTES = "LORA_IPC_WORKER_KEEP_BYTES"

Key = tuple[str, str, int, str]


def key_of(uri: AdapterURI) -> Key | None:
    """Only a version pinned with its epoch names one set of bytes forever; others are never kept."""
    if uri.version is None or uri.epoch is None:
        return None
    return uri.endpoint, uri.name, uri.version, uri.epoch


def _nbytes(adapter: Adapter) -> int:
    return sum(t.numel() * t.element_size() for t in adapter.tensors.values())


class KeptAdapters:
    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._lock = threading.Lock()
        self._items: BoundedLRU[Key, Adapter] = BoundedLRU(max_entries, self._evicted)

    def _evicted(self, _key: Key, adapter: Adapter) -> None:
        self.nbytes -= _nbytes(adapter)

    def get(self, key: Key | None) -> Adapter | None:
        if key is None:
            return None
        with self._lock:
            return self._items.get(key)

    def put(self, key: Key | None, adapter: Adapter) -> None:
        size = _nbytes(adapter)
        if key is None or size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                self._items.get(key)
                return
            self._items.put(key, adapter)
            self.nbytes += size
            while self.nbytes > self.max_bytes and len(self._items) > 1:
                old = self._items.keys()[0]
                evicted = self._items.pop(old)
                if evicted is not None:  # always: it is keys()[0]
                    self._evicted(old, evicted)

    def keys(self) -> list[Key]:
        with self._lock:
            return self._items.keys()

    def __len__(self) -> int:
        return len(self._items)


_kept: KeptAdapters | None = None
_kept_lock = threading.Lock()


def kept_adapters(lora_config=None) -> KeptAdapters:
    """This process's cache, sized from vLLM's LoRA config the first time."""
    global _kept
    with _kept_lock:
        if _kept is None:
            max_cpu = getattr(lora_config, "max_cpu_loras", None) or getattr(lora_config, "max_loras", None) or 2
            entries = cast(int | None, settings.value(ENV_KEEP)) or max(8, 4 * int(max_cpu))
            max_bytes = cast(int, settings.value(ENV_KEEP_BYTES))
            _kept = KeptAdapters(max(1, entries), max_bytes)
        return _kept

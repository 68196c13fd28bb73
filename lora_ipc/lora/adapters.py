"""The LoRA layer of the core: tensor sets whose config is a LoRA config, under the names PEFT and vLLM
users know. ``AdapterExporter.publish`` takes a ``PeftModel`` (or a dict of tensors and its LoRA config),
``AdapterClient.fetch`` returns an :class:`Adapter`, and the vLLM loader fetches through
:func:`shared_client`. The moving (store, wire, slabs) is the core's: exporter.py and client.py."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..core import settings
from ..core.errors import ClientClosed, StaleEpoch, TensorSetNotFound, VersionNotFound, wire_error
from ..core.fetching.client import TensorSet, TensorSetClient
from ..core.lru import BoundedLRU
from ..core.serving.exporter import RemoteTensorSetExporter, TensorSetExporter
from .peft import adapter_from
from .uri import AdapterURI

MAX_SHARED_CLIENTS = 8


@wire_error
class AdapterNotFound(TensorSetNotFound):
    """No adapter of that name has been published: the core's ``TensorSetNotFound``, as the LoRA layer raises
    it (:class:`AdapterClient`, :func:`resolve`). Its own code on the wire, so it keeps its name across a
    vLLM RPC; ``except TensorSetNotFound`` catches it too."""


@dataclass
class Adapter(TensorSet):
    """A fetched LoRA adapter: ``tensors`` as ``save_pretrained`` writes them, ``config`` (also
    ``peft_config``) its adapter_config.json."""

    @property
    def peft_config(self) -> dict:
        return self.config


class AdapterExporter(TensorSetExporter):
    """Publish LoRA adapter versions from this process; engines fetch them with :class:`AdapterClient` or
    a ``lora-ipc://`` URI. The options are :class:`~lora_ipc.core.serving.exporter.TensorSetExporter`'s."""

    def publish(self, name: str, adapter: Any, peft_config: Any = None) -> int:
        """Pack ``adapter`` (a PeftModel, or a dict of tensors with ``peft_config``) as the next version of ``name``."""
        tensors, config = adapter_from(adapter, peft_config)
        return super().publish(name, tensors, config)

    def uri(self, name: str, version: int) -> str:
        """The pinned ``lora-ipc://`` URI of ``version`` of ``name`` published here, with this store's epoch
        (a ``LoRARequest.lora_path``, or ``/v1/load_lora_adapter``'s ``lora_path``). A version this exporter
        never gave out raises ``VersionNotFound``; one it no longer keeps is refused by the engine's loader."""
        _check_name_version(name, version)
        if version > self.store.newest_version(name):
            raise VersionNotFound(f"{name!r} version {version} was never published here")
        return _pinned_uri(name, version, self.endpoint, self.store.epoch)


class RemoteExporter(RemoteTensorSetExporter):
    """Publish LoRA adapter versions into a ``lora-ipc serve`` daemon: ``publish`` as :class:`AdapterExporter`'s."""

    def publish(self, name: str, adapter: Any, peft_config: Any = None) -> int:
        tensors, config = adapter_from(adapter, peft_config)
        return super().publish(name, tensors, config)

    def uri(self, name: str, version: int) -> str:
        """The pinned ``lora-ipc://`` URI of ``version`` of ``name``, kept by the daemon now, with the daemon's
        epoch (asked of the daemon: one round trip). ``VersionNotFound`` when the daemon does not keep it."""
        _check_name_version(name, version)
        _, epoch = resolve(name, self.endpoint, version)
        return _pinned_uri(name, version, self.endpoint, epoch)


def _check_name_version(name: Any, version: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r:.60}")
    if type(version) is not int or version <= 0:
        raise ValueError(f"version must be a positive int, got {version!r:.60}")


def _pinned_uri(name: str, version: int, endpoint: str, epoch: str) -> str:
    return str(AdapterURI(name, version, endpoint, epoch))


class AdapterClient(TensorSetClient):
    """Fetch LoRA adapters: :meth:`fetch` as :class:`~lora_ipc.core.fetching.client.TensorSetClient`'s, returning
    an :class:`Adapter`."""

    fetched_as = Adapter

    def fetch(
        self,
        name: str,
        version: int | None = None,
        device: torch.device | str | None = None,
        epoch: str | None = None,
        *,
        max_bytes: int | None = None,
    ) -> Adapter:
        """:meth:`TensorSetClient.fetch <lora_ipc.core.fetching.client.TensorSetClient.fetch>`; a name never
        published raises ``AdapterNotFound``."""
        try:
            return cast(Adapter, super().fetch(name, version, device, epoch, max_bytes=max_bytes))
        except TensorSetNotFound as exc:
            if type(exc) is not TensorSetNotFound:
                raise
            raise AdapterNotFound(str(exc)) from None


_shared: BoundedLRU[str, AdapterClient] = BoundedLRU(MAX_SHARED_CLIENTS)
_shared_lock = threading.Lock()  # guards the dict only: never held across I/O or a close()


def shared_client(endpoint: str) -> AdapterClient:
    """One client per endpoint per process, so slab mappings and validated layouts are reused.

    At most ``MAX_SHARED_CLIENTS`` stay open (least recently used closed first, after the cache's lock
    is released): endpoints come from ``lora_path`` strings, which API users may choose. A client
    closed by eviction while a caller still holds it raises ``ClientClosed`` (an ``ExporterUnavailable``);
    :func:`with_shared_client` retries such a call once with a fresh client. Nothing listening on an
    endpoint fails at once (``$LORA_IPC_CONNECT_WAIT_S``, default 0): these clients serve requests
    that users name, and a dead endpoint must cost only its own requests.
    """
    evicted: list[AdapterClient] = []
    with _shared_lock:
        client = _shared.get(endpoint)
        if client is None or client._closed:
            timeout_s = cast(float, settings.value("LORA_IPC_TIMEOUT_S"))
            wait_s = cast(float, settings.value("LORA_IPC_CONNECT_WAIT_S"))
            client = AdapterClient(endpoint, timeout_s=timeout_s, connect_wait_s=wait_s)
            _shared.on_evict = lambda _, old: evicted.append(old)
            try:
                _shared.put(endpoint, client)
            finally:
                _shared.on_evict = None
    for old in evicted:
        old.close()
    return client


def with_shared_client(endpoint: str, call):
    """``call(shared_client(endpoint))``, once more with a fresh client if that one was closed under it."""
    try:
        return call(shared_client(endpoint))
    except ClientClosed:
        return call(shared_client(endpoint))


def resolve(name: str, endpoint: str, version: int | None, epoch: str | None = None) -> tuple[int, str]:
    """(version, epoch) the exporter serves now: the newest when ``version`` is None. A pinned
    ``version`` must be kept, and of ``epoch`` when that is given (else ``StaleEpoch``)."""
    catalog = with_shared_client(endpoint, lambda client: client.catalog(name))  # never cut, unlike a full list
    versions: list[int] = next((a.versions for a in catalog.sets if a.name == name), [])
    if epoch is not None and version is not None and catalog.epoch != epoch:
        raise StaleEpoch(
            f"{name!r} v{version} of epoch {epoch} is gone: {endpoint} now serves epoch "
            f"{catalog.epoch or '?'} (it restarted; its version numbers started again)"
        )
    if not versions:
        raise AdapterNotFound(f"no adapter named {name!r} at {endpoint}")
    if version is None:
        return versions[-1], catalog.epoch
    if version not in versions:
        raise VersionNotFound(f"{name!r} version {version} is not kept at {endpoint} (kept: {versions})")
    return version, catalog.epoch

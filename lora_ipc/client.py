"""AdapterClient: fetch a published adapter into tensors this process owns.

One fetch is one round trip: ``FetchRequest`` -> ``FetchReply`` (a lease). The slab is imported the
first time and kept open; the layout is validated the first time and cached by digest, so a steady
state reply carries neither. Then the used bytes are copied into owned memory in one copy, the
lease is released (sent, not waited for) and the owned buffer is cut into per-tensor views.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import zmq

from . import protocol as p
from .backends import ImportedSlab
from .connection import Connection
from .endpoint import daemon_endpoint
from .errors import BackendError, LoraIpcError, ProtocolError, SlabRecycled
from .fdchannel import FdReceiver
from .imports import REGISTRY
from .layout import SlabLayout
from .lru import BoundedLRU

MAX_CACHED_LAYOUTS = 32
MAX_CACHED_SLABS = 32
MAX_SHARED_CLIENTS = 8
ENV_TRANSPORT = "LORA_IPC_TRANSPORT"
TRANSPORTS = ("auto", "cuda", "host")
log = logging.getLogger("lora_ipc.client")


def transport_mode(value: str | None = None) -> str:
    """``auto`` (CUDA IPC, falling back to a host-staged copy where it cannot be imported), ``cuda``
    (never fall back) or ``host`` (always the host copy); default ``$LORA_IPC_TRANSPORT`` or auto."""
    mode = (value or os.environ.get(ENV_TRANSPORT) or "auto").lower()
    if mode not in TRANSPORTS:
        raise LoraIpcError(f"transport {mode!r}: expected one of {TRANSPORTS} (${ENV_TRANSPORT})")
    return mode


FETCH_ATTEMPTS = 3  # a copy invalidated by a slab reuse is retried (newest version only) this many times


class _DeviceImportFailed(Exception):
    """Internal: a device (CUDA IPC) slab could not be imported; carries the BackendError."""

    def __init__(self, error: BackendError):
        super().__init__(str(error))
        self.error = error


@dataclass
class Adapter:
    """A fetched adapter. ``tensors`` are owned by this process (views of one owned buffer)."""

    name: str
    version: int
    tensors: dict[str, torch.Tensor]
    peft_config: dict


class AdapterClient:
    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, context: zmq.Context | None = None,
                 trusted_uids: set[int] | None = None, transport: str | None = None):
        self.endpoint = endpoint or daemon_endpoint()
        self.transport = transport_mode(transport)
        self.host_fallbacks = 0  # fetches served by the host-staged copy because CUDA IPC import failed
        self._fell_back = False
        self.client_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._conn = Connection(self.endpoint, timeout_s, context, trusted_uids)
        self._receive_fds = FdReceiver(self.endpoint, trusted_uids, timeout_s)  # slabs' descriptors (fdchannel.py)
        self._lock = threading.Lock()
        self._slabs: BoundedLRU[str, ImportedSlab] = BoundedLRU(
            MAX_CACHED_SLABS, lambda slab_id, _: REGISTRY.release(slab_id))  # this client's holds on imports
        self._layouts: BoundedLRU[bytes, SlabLayout] = BoundedLRU(MAX_CACHED_LAYOUTS)
        self._configs: BoundedLRU[bytes, dict] = BoundedLRU(16)

    # ---- API -------------------------------------------------------------------------------

    def list(self) -> list[p.AdapterSummary]:
        with self._lock:
            return self._conn.request(p.ListRequest(), p.ListReply).adapters

    def versions(self, name: str) -> list[int]:
        for summary in self.list():
            if summary.name == name:
                return summary.versions
        return []

    def status(self) -> dict:
        with self._lock:
            return self._conn.request(p.StatusRequest(), p.StatusReply).report

    def fetch(self, name: str, version: int | None = None, device: torch.device | str | None = None) -> Adapter:
        """Lease ``version`` (newest if None), copy it into owned memory on ``device``, release the lease.

        Returns exactly the bytes of one version or raises: if the slab was reused while it was being
        copied (the lease expired or was revoked), the copy is discarded and the newest version is
        fetched again; a pinned ``version`` raises ``SlabRecycled`` instead.
        On CUDA, ``device`` defaults to the local GPU that is the exporter's (matched by UUID).
        """
        for attempt in range(FETCH_ATTEMPTS):
            try:
                return self._fetch_once(name, version, device)
            except _DeviceImportFailed as failed:
                if self.transport != "auto":
                    raise failed.error from None
                if not self._host_only:
                    log.warning("lora-ipc: CUDA IPC import from %s failed (%s); falling back to host-staged copies "
                                "for this client (set %s=host to skip the attempt)", self.endpoint, failed.error,
                                ENV_TRANSPORT)
                self._fell_back = True
                return self._fetch_once(name, version, device)
            except SlabRecycled:
                if version is not None or attempt == FETCH_ATTEMPTS - 1:
                    raise
        raise AssertionError("unreachable")

    @property
    def _host_only(self) -> bool:
        return self.transport == "host" or self._fell_back

    def _fetch_once(self, name: str, version: int | None, device: torch.device | str | None) -> Adapter:
        with self._lock:
            started = time.perf_counter()
            host = self._host_only
            reply = self._conn.request(
                p.FetchRequest(name, version, self.client_id, REGISTRY.known(list(reversed(self._slabs.keys()))),
                               self._layouts.keys(), self._configs.keys(), "host" if host else "device"),
                p.FetchReply)
            fetch_ms = 0.0
            try:
                config = self._config_for(reply)
                try:
                    slab = self._slab_for(reply)
                except BackendError as exc:
                    if host or reply.slab is None:
                        raise
                    raise _DeviceImportFailed(exc) from None
                if host and self.transport == "auto":
                    self.host_fallbacks += 1
                layout = self._layout_for(reply, slab)
                owned = slab.copy_out(layout.used_bytes, device)
                now = slab.generation_now()
                if now is not None and now != reply.generation:
                    raise SlabRecycled(f"{name!r} v{reply.version}: slab {reply.slab_id} was reused during the copy "
                                       f"(generation {reply.generation} -> {now}); copy discarded")
                fetch_ms = (time.perf_counter() - started) * 1e3
            finally:
                try:
                    self._conn.send(p.ReleaseRequest(reply.lease_id, fetch_ms))
                except LoraIpcError:
                    pass  # the lease expires on its own
            self._forget_dead_slabs(reply.live_slabs)
        return Adapter(reply.name, reply.version, layout.unpack(owned), dict(config))

    def close(self) -> None:
        with self._lock:
            self._slabs.clear()  # releases this client's hold on each import
            self._conn.close()

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- caches ----------------------------------------------------------------------------

    def _slab_for(self, reply: p.FetchReply) -> ImportedSlab:
        slab = self._slabs.get(reply.slab_id)
        if slab is not None:
            if reply.slab is not None:
                slab.consume(reply.slab)  # a surplus export must still be accounted for
            return slab
        return self._slabs.put(reply.slab_id, REGISTRY.acquire(reply.slab_id, reply.slab, self._receive_fds))

    def _config_for(self, reply: p.FetchReply) -> dict:
        config = self._configs.get(reply.config_digest)
        if config is None:
            if reply.peft_config is None:
                raise ProtocolError("reply omits a LoRA config this client does not have")
            if p.digest_of(reply.peft_config) != reply.config_digest:
                raise ProtocolError("config digest does not match the config")
            config = self._configs.put(reply.config_digest, reply.peft_config)
        return config

    def _layout_for(self, reply: p.FetchReply, slab: ImportedSlab) -> SlabLayout:
        layout = self._layouts.get(reply.layout_digest)
        if layout is None:
            if reply.entries is None:
                raise ProtocolError("reply omits a layout this client does not have")
            layout = SlabLayout.from_wire(reply.entries, reply.used_bytes, slab.nbytes)
            if layout.digest != reply.layout_digest:
                raise ProtocolError("layout digest does not match its entries")
            self._layouts.put(layout.digest, layout)
        if layout.used_bytes != reply.used_bytes or layout.used_bytes > slab.nbytes:
            raise ProtocolError(f"layout of {layout.used_bytes} bytes does not fit slab {slab.slab_id} ({slab.nbytes})")
        return layout

    def _forget_dead_slabs(self, live: list[str]) -> None:
        live_set = set(live)
        for slab_id in [s for s in self._slabs if s not in live_set]:
            self._slabs.pop(slab_id)
            REGISTRY.release(slab_id)


_shared: BoundedLRU[str, AdapterClient] = BoundedLRU(MAX_SHARED_CLIENTS, lambda _, client: client.close())
_shared_lock = threading.Lock()


def shared_client(endpoint: str) -> AdapterClient:
    """One client per endpoint per process, so slab mappings and validated layouts are reused.

    At most ``MAX_SHARED_CLIENTS`` stay open (least recently used closed first): endpoints come from
    ``lora_path`` strings, which API users may choose.
    """
    with _shared_lock:
        client = _shared.get(endpoint)
        if client is None:
            timeout_s = float(os.environ.get("LORA_IPC_TIMEOUT_S", 10))
            client = _shared.put(endpoint, AdapterClient(endpoint, timeout_s=timeout_s))
        return client

"""AdapterClient: fetch a published adapter into tensors this process owns.

One fetch is one round trip: ``FetchRequest`` -> ``FetchReply`` (a lease). The slab is imported the
first time and kept open; the layout is validated the first time and cached by digest, so a steady
state reply carries neither. Then the used bytes are copied into owned memory in one copy, the
lease is released (sent, not waited for) and the owned buffer is cut into per-tensor views.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass

import torch
import zmq

from . import protocol as p
from .backends import ImportedSlab, open_slab
from .endpoint import daemon_endpoint
from .errors import ExporterUnavailable, ProtocolError
from .layout import SlabLayout

MAX_CACHED_LAYOUTS = 32
MAX_CACHED_SLABS = 32


@dataclass
class Adapter:
    """A fetched adapter. ``tensors`` are owned by this process (views of one owned buffer)."""

    name: str
    version: int
    tensors: dict[str, torch.Tensor]
    peft_config: dict


class Connection:
    """A DEALER socket speaking the protocol: one request, one matching reply, typed errors, a deadline.

    Replies are matched by request id, so a late reply (to a fire-and-forget release, or to a request
    that timed out) is dropped instead of being mistaken for the current one.
    """

    def __init__(self, endpoint: str, timeout_s: float, context: zmq.Context | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
        self._sock.connect(endpoint)
        self._request_ids = itertools.count(1)

    def send(self, message: p.Message) -> int:
        request_id = next(self._request_ids)
        self._sock.send_multipart([b"", p.encode(message, request_id)])
        return request_id

    def request(self, message: p.Message, reply_type: type) -> p.Message:
        request_id = self.send(message)
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms):
                raise ExporterUnavailable(
                    f"no reply from {self.endpoint} within {self.timeout_s:g}s (exporter gone, closed or stuck)")
            frame = p.decode(self._sock.recv_multipart()[-1], p.REPLY_TYPES)
            if frame.request_id != request_id:
                continue
            if isinstance(frame.message, p.ErrorReply):
                raise frame.message.to_exception()
            if not isinstance(frame.message, reply_type):
                raise ProtocolError(f"expected {reply_type.TYPE}, got {frame.message.TYPE}")
            return frame.message

    def close(self) -> None:
        self._sock.close(0)


class AdapterClient:
    def __init__(self, endpoint: str | None = None, *, timeout_s: float = 10.0, context: zmq.Context | None = None):
        self.endpoint = endpoint or daemon_endpoint()
        self.client_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._conn = Connection(self.endpoint, timeout_s, context)
        self._lock = threading.Lock()
        self._slabs: OrderedDict[str, ImportedSlab] = OrderedDict()
        self._layouts: OrderedDict[bytes, SlabLayout] = OrderedDict()

    # ---- API -------------------------------------------------------------------------------

    def list(self) -> list[p.AdapterSummary]:
        with self._lock:
            return self._conn.request(p.ListRequest(), p.ListReply).adapters  # type: ignore[attr-defined]

    def versions(self, name: str) -> list[int]:
        for summary in self.list():
            if summary.name == name:
                return summary.versions
        return []

    def status(self) -> dict:
        with self._lock:
            return self._conn.request(p.StatusRequest(), p.StatusReply).report  # type: ignore[attr-defined]

    def fetch(self, name: str, version: int | None = None, device: torch.device | str | None = None) -> Adapter:
        """Lease ``version`` (newest if None), copy it into owned memory on ``device``, release the lease.

        On CUDA, ``device`` defaults to the local GPU that is the exporter's (matched by UUID).
        """
        with self._lock:
            started = time.perf_counter()
            reply: p.FetchReply = self._conn.request(  # type: ignore[assignment]
                p.FetchRequest(name, version, self.client_id, list(self._slabs), list(self._layouts)),
                p.FetchReply)
            fetch_ms = 0.0
            try:
                slab = self._slab_for(reply)
                layout = self._layout_for(reply, slab)
                owned = slab.copy_out(layout.used_bytes, device)
                fetch_ms = (time.perf_counter() - started) * 1e3
            finally:
                self._conn.send(p.ReleaseRequest(reply.lease_id, fetch_ms))
            self._forget_dead_slabs(reply.live_slabs)
        return Adapter(reply.name, reply.version, layout.unpack(owned), reply.peft_config)

    def close(self) -> None:
        with self._lock:
            for slab in self._slabs.values():
                slab.close()
            self._slabs.clear()
            self._conn.close()

    def __enter__(self) -> AdapterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- caches ----------------------------------------------------------------------------

    def _slab_for(self, reply: p.FetchReply) -> ImportedSlab:
        slab = self._slabs.get(reply.slab_id)
        if slab is not None:
            self._slabs.move_to_end(reply.slab_id)
            return slab
        if reply.slab is None or reply.slab.slab_id != reply.slab_id:
            raise ProtocolError(f"reply names slab {reply.slab_id!r} but carries no handle for it")
        slab = self._slabs[reply.slab_id] = open_slab(reply.slab)
        while len(self._slabs) > MAX_CACHED_SLABS:
            self._slabs.popitem(last=False)[1].close()
        return slab

    def _layout_for(self, reply: p.FetchReply, slab: ImportedSlab) -> SlabLayout:
        layout = self._layouts.get(reply.layout_digest)
        if layout is None:
            if reply.entries is None:
                raise ProtocolError("reply omits a layout this client does not have")
            layout = SlabLayout.from_wire(reply.entries, reply.used_bytes, slab.nbytes)
            if layout.digest != reply.layout_digest:
                raise ProtocolError("layout digest does not match its entries")
            self._layouts[layout.digest] = layout
            while len(self._layouts) > MAX_CACHED_LAYOUTS:
                self._layouts.popitem(last=False)
        else:
            self._layouts.move_to_end(reply.layout_digest)
        if layout.used_bytes != reply.used_bytes or layout.used_bytes > slab.nbytes:
            raise ProtocolError(f"layout of {layout.used_bytes} bytes does not fit slab {slab.slab_id} ({slab.nbytes})")
        return layout

    def _forget_dead_slabs(self, live: list[str]) -> None:
        live_set = set(live)
        for slab_id in [s for s in self._slabs if s not in live_set]:
            self._slabs.pop(slab_id).close()


_shared: dict[str, AdapterClient] = {}
_shared_lock = threading.Lock()


def shared_client(endpoint: str) -> AdapterClient:
    """One client per endpoint per process, so slab mappings and validated layouts are reused."""
    with _shared_lock:
        client = _shared.get(endpoint)
        if client is None:
            client = _shared[endpoint] = AdapterClient(endpoint, timeout_s=float(os.environ.get("LORA_IPC_TIMEOUT_S", 10)))
        return client

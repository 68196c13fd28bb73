"""The client end of the socket: one request, one matching reply, typed errors, a deadline, a trusted peer."""

from __future__ import annotations

import itertools
import os
import time
from typing import TypeVar

import zmq

from . import protocol as p
from .endpoint import ipc_path, server_uid
from .errors import ExporterUnavailable, LoraIpcError, ProtocolError

T = TypeVar("T", bound=p.Message)
TRUST_POLL_S = 0.01


def make_socket(context: zmq.Context | None, kind: int) -> zmq.Socket:
    """A socket with the options both ends share: no linger, a frame-size cap enforced by libzmq."""
    try:
        sock = (context or zmq.Context.instance()).socket(kind)
    except zmq.ZMQError as exc:  # EMFILE (out of fds) or the context's socket limit: typed, not raw
        raise LoraIpcError(f"cannot create a ZeroMQ socket: {exc}") from None
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, p.MAX_FRAME_BYTES)
    return sock


class Connection:
    """A DEALER socket speaking the protocol.

    Before the first request (and again after a timeout, when the server may have been replaced) it
    checks who serves the endpoint (:func:`.endpoint.server_uid`): only a server of this uid, or of
    ``trusted_uids``, ever sees a request. Replies are matched by request id, so a late reply (to a
    fire-and-forget release, or to a request that timed out) is dropped instead of being mistaken
    for the current one.
    """

    def __init__(self, endpoint: str, timeout_s: float, context: zmq.Context | None = None,
                 trusted_uids: set[int] | None = None):
        ipc_path(endpoint)  # tcp:// and friends are refused here too, not only by servers
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.trusted_uids = {os.getuid()} if trusted_uids is None else set(trusted_uids)
        self._sock = make_socket(context, zmq.DEALER)
        self._request_ids = itertools.count(1)
        self._connected = False

    def _ensure_trusted(self, deadline: float) -> None:
        while server_uid(self.endpoint, self.trusted_uids) is None:  # raises EndpointNotTrusted
            if time.monotonic() >= deadline:
                raise ExporterUnavailable(f"nothing serves {self.endpoint} (waited {self.timeout_s:g}s)")
            time.sleep(TRUST_POLL_S)
        self._sock.connect(self.endpoint)
        self._connected = True

    def send(self, message: p.Message) -> int:
        request_id = next(self._request_ids)
        try:
            self._sock.send_multipart([b"", p.encode(message, request_id)], zmq.NOBLOCK)
        except zmq.Again:
            raise ExporterUnavailable(f"cannot send to {self.endpoint}: not connected or its queue is full") from None
        return request_id

    def request(self, message: p.Message, reply_type: type[T]) -> T:
        deadline = time.monotonic() + self.timeout_s
        if not self._connected:
            self._ensure_trusted(deadline)
        request_id = self.send(message)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._sock.poll(remaining_ms):
                self._reconnect_later()
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

    def _reconnect_later(self) -> None:
        """After a timeout the server may be gone or replaced: vet the endpoint again before the next request."""
        if self._connected:
            try:
                self._sock.disconnect(self.endpoint)
            except zmq.ZMQError:
                pass
            self._connected = False

    def close(self) -> None:
        self._sock.close(0)

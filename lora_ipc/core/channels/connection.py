"""The client end of the socket: one request, one matching reply, typed errors, a deadline, a trusted peer."""

from __future__ import annotations

import itertools
import os
import time
from typing import TypeVar

import zmq

from .. import protocol as p
from ..errors import ClientClosed, EndpointNotTrusted, ExporterUnavailable, LoraIpcError, ProtocolError
from .endpoint import ServerIdentity, ipc_path, server_identity

T = TypeVar("T", bound=p.Message)
TRUST_POLL_S = 0.01
MAX_DISCARDED = 64  # replies one notify drops at most (each later request skips what is left)


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
    checks who serves the endpoint (:func:`.endpoint.server_identity`): only a server of this uid, or
    of ``trusted_uids``, ever sees a request. Replies are matched by request id, so a late reply (to a
    fire-and-forget release, or to a request that timed out) is dropped instead of being mistaken
    for the current one.

    ``server`` is who sent the last accepted reply: the pid and uid the kernel reports for the very
    connection it came on (libzmq's ``Peer-Address`` metadata of an ipc peer is ``…:uid:gid:pid`` from
    ``SO_PEERCRED``), so a server that libzmq reconnected to behind our back is seen as what it is. A
    reply from an untrusted uid is refused. Where that metadata is missing, the listener's pid from the
    probe before connecting stands in.
    """

    def __init__(
        self,
        endpoint: str,
        timeout_s: float,
        context: zmq.Context | None = None,
        trusted_uids: set[int] | None = None,
        connect_wait_s: float | None = None,
    ):
        ipc_path(endpoint)  # tcp:// and friends are refused here too, not only by servers
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.connect_wait_s = timeout_s if connect_wait_s is None else min(connect_wait_s, timeout_s)
        self.closed = False
        self.trusted_uids = {os.getuid()} if trusted_uids is None else set(trusted_uids)
        try:
            self._sock = make_socket(context, zmq.DEALER)
        except LoraIpcError as exc:  # e.g. EMFILE: out of descriptors
            raise ExporterUnavailable(f"cannot open a socket for {endpoint}: {exc}") from None
        self._request_ids = itertools.count(1)
        self._connected = False
        self._probed: ServerIdentity | None = None
        self.server: ServerIdentity | None = None

    def vet(self) -> None:
        """Check who serves the endpoint now, as the first request would (``EndpointNotTrusted``,
        ``ExporterUnavailable``), if no request has yet: before anything is handed to it by another way."""
        if not self._connected:
            self._ensure_trusted()

    def _ensure_trusted(self) -> None:
        wait_until = time.monotonic() + self.connect_wait_s
        while (probed := server_identity(self.endpoint, self.trusted_uids)) is None:  # raises EndpointNotTrusted
            if time.monotonic() >= wait_until:
                raise ExporterUnavailable(f"nothing serves {self.endpoint} (waited {self.connect_wait_s:g}s)")
            time.sleep(TRUST_POLL_S)
        self._probed = probed
        self._zmq(self._sock.connect, self.endpoint)
        self._connected = True

    def _zmq(self, call, *args):
        """``call(*args)`` with ZeroMQ's errors as typed ones."""
        if self.closed:
            raise ClientClosed(f"the connection to {self.endpoint} is closed")
        try:
            return call(*args)
        except zmq.Again:
            raise ExporterUnavailable(f"cannot send to {self.endpoint}: not connected or its queue is full") from None
        except zmq.ZMQError as exc:
            if self.closed or exc.errno == zmq.ENOTSOCK:
                raise ClientClosed(f"the connection to {self.endpoint} was closed while in use") from None
            raise ExporterUnavailable(f"{self.endpoint}: {exc}") from None

    def _sender_of(self, frame: zmq.Frame) -> ServerIdentity | None:
        """The kernel's pid/uid of the process that sent ``frame`` (see the class docstring)."""
        try:
            address = str(frame.get("Peer-Address"))  # zmq types properties int | str
            _, uid, _gid, pid = address.rsplit(":", 3)
            server = ServerIdentity(self.endpoint, int(pid), int(uid))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            return self._probed
        if server.uid not in self.trusted_uids:
            self._reconnect_later()
            raise EndpointNotTrusted(
                f"{self.endpoint} is now served by uid {server.uid}, not {sorted(self.trusted_uids)}; reply refused"
            )
        return server

    def send(self, message: p.Message) -> int:
        request_id = next(self._request_ids)
        self._zmq(self._sock.send_multipart, [b"", p.encode(message, request_id)], zmq.NOBLOCK)
        return request_id

    def notify(self, message: p.Message) -> None:
        """Send ``message`` without waiting for its reply, and drop the replies already here: a client that only
        notifies never asks, so nothing else would read them, and a server drops a peer whose replies pile up."""
        self.send(message)
        for _ in range(MAX_DISCARDED):
            try:
                self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.ZMQError:  # Again: nothing more is here; anything else: closed, the next request reports it
                return

    def request(self, message: p.Message, reply_type: type[T], deadline: float | None = None) -> T:
        """One request and its reply, within ``timeout_s`` (and by ``deadline``, a ``time.monotonic()``
        value, when given: a fetch's whole time)."""
        own = time.monotonic() + self.timeout_s
        deadline = own if deadline is None else min(own, deadline)
        if not self._connected:
            self._ensure_trusted()
        request_id = self.send(message)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0 or not self._zmq(self._sock.poll, remaining_ms):
                self._reconnect_later()
                raise ExporterUnavailable(
                    f"no reply from {self.endpoint} within {self.timeout_s:g}s (exporter gone, closed or stuck)"
                )
            last = self._zmq(lambda: self._sock.recv_multipart(copy=False))[-1]
            frame = p.decode(last.bytes, p.REPLY_TYPES)
            if frame.request_id != request_id:
                continue
            self.server = self._sender_of(last)
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
            except zmq.ZMQError:  # not connected any more (libzmq dropped it): nothing to undo
                pass
            self._connected = False

    def close(self) -> None:
        self.closed = True
        self._sock.close(0)

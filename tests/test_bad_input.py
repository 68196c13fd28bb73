"""Hostile and broken peers: every bad message gets a typed error and both sides keep serving."""

import re

import msgpack
import pytest
import torch
import zmq

from lora_ipc import AdapterClient, LayoutError, ProtocolError
from lora_ipc.core import protocol as p
from lora_ipc.core.backends.cpu import CpuBackend
from lora_ipc.core.memory.layout import SlabLayout

from . import models
from .helpers import assert_same_adapter


class RawPeer:
    """A bare DEALER socket that sends whatever bytes a test wants."""

    def __init__(self, endpoint):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send_raw(self, payload: bytes) -> p.Frame:
        self.sock.send_multipart([b"", payload])
        assert self.sock.poll(5000), "server did not answer"
        return p.decode(self.sock.recv_multipart()[-1])

    def expect_error(self, payload: bytes, error: str, *needles: str) -> p.ErrorReply:
        frame = self.send_raw(payload)
        assert isinstance(frame.message, p.ErrorReply), frame.message
        assert frame.message.error == error, frame.message
        for needle in needles:
            assert needle in frame.message.message, frame.message.message
        return frame.message

    def close(self):
        self.sock.close(0)


@pytest.fixture(scope="module")
def served(exporter_proc):
    exporter_proc.call("publish_random", "good", 7)
    peer = RawPeer(exporter_proc.endpoint)
    yield exporter_proc, peer
    peer.close()


def fetch_frame(**overrides) -> bytes:
    body = {"name": "good", "version": None, "client_id": "raw", "known_slabs": [], "known_layouts": []}
    body.update(overrides)
    return msgpack.packb([p.PROTOCOL_VERSION, "fetch", 5, body])


def still_serving(exporter_proc):
    with AdapterClient(exporter_proc.endpoint, timeout_s=5) as client:
        assert_same_adapter(client.fetch("good").tensors, models.random_adapter(7))


@pytest.mark.parametrize(
    "payload, needle",
    [
        (b"\xc1\xc1\xc1", "undecodable"),  # 0xc1 is never valid msgpack
        (b"", "undecodable"),
        (fetch_frame()[:-7], "undecodable"),  # truncated
        (msgpack.packb({"not": "a frame"}), "frame must be"),
        (
            msgpack.packb(
                [p.PROTOCOL_VERSION, "fetch", 1, {"name": "good", "version": None, "client_id": "c", "sneaky": 1}]
            ),
            "unknown key",
        ),
        (fetch_frame(name=msgpack.ExtType(5, b"x")), "undecodable"),
        (msgpack.packb([p.PROTOCOL_VERSION, "list", 1, {"x": [[]] * p.ListRequest.MAX_FRAME}]), "exceeds its limit"),
        (msgpack.packb([p.PROTOCOL_VERSION + 1, "fetch", 1, {}]), "protocol version"),
        (msgpack.packb([p.PROTOCOL_VERSION, "exec", 1, {}]), "unknown message type"),
        (msgpack.packb([p.PROTOCOL_VERSION, "fetch", -1, {}]), "request_id"),
        (fetch_frame(name=7), "'name'"),
        (fetch_frame(version="latest"), "'version'"),
        (fetch_frame(known_layouts=[b"short"]), "known_layouts"),
        (msgpack.packb([p.PROTOCOL_VERSION, "fetch", 1, {"name": "good"}]), "missing"),
        (msgpack.packb([p.PROTOCOL_VERSION, "fetch_reply", 1, {}]), "not accepted"),
        (b"\xd4\x05\x00", "undecodable"),  # msgpack ext type
    ],
)
def test_malformed_frames_get_protocol_errors(served, payload, needle):
    exporter_proc, peer = served
    peer.expect_error(payload, "ProtocolError", needle)
    still_serving(exporter_proc)


def test_unknown_adapter_and_version(served):
    exporter_proc, peer = served
    peer.expect_error(fetch_frame(name="nope"), "TensorSetNotFound", "nope")
    peer.expect_error(fetch_frame(version=999), "VersionNotFound", "999")
    peer.expect_error(msgpack.packb([p.PROTOCOL_VERSION, "release", 9, {"lease_id": 123456}]), "LeaseError")
    still_serving(exporter_proc)


@pytest.fixture
def staged():
    """A real exported CPU slab holding a valid adapter, as a RemoteExporter would send it."""
    tensors = models.random_adapter(3)
    layout = SlabLayout.plan(tensors)
    slab = CpuBackend().allocate(1 << 16)
    layout.pack(slab.destination_views(layout), tensors)
    yield tensors, layout, slab
    slab.close()


def publish_frame(slab, entries, used_bytes, name="pushed") -> bytes:
    return p.encode(p.PublishRequest(name, models.RANDOM_ADAPTER_CONFIG, slab.handle, entries, used_bytes), 3)


def corrupt(layout, index, field, value):
    entries = [list(e) for e in layout.to_wire()]
    entries[index][field] = value
    return entries


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda L, s: (corrupt(L, 0, 3, s.nbytes + 4096), L.used_bytes), "outside"),  # offset past the slab
        (lambda L, s: (corrupt(L, 0, 3, 100), L.used_bytes), "aligned"),
        (lambda L, s: (corrupt(L, 0, 1, "complex128"), L.used_bytes), "allow-list"),
        (lambda L, s: (corrupt(L, 0, 1, "torch.storage"), L.used_bytes), "allow-list"),
        (lambda L, s: (corrupt(L, 0, 4, 12), L.used_bytes), "do not match"),  # shape/bytes mismatch
        (lambda L, s: (corrupt(L, 1, 3, 0), L.used_bytes), "overlaps"),
        (lambda L, s: (corrupt(L, 1, 0, L.to_wire()[0][0]), L.used_bytes), "unique"),
        (lambda L, s: (L.to_wire(), s.nbytes * 2), "within the slab"),
        (lambda L, s: ([], L.used_bytes), "1.."),
    ],
)
def test_bad_layouts_are_rejected_by_the_server(served, staged, mutate, needle):
    exporter_proc, peer = served
    tensors, layout, slab = staged
    entries, used = mutate(layout, slab)
    peer.expect_error(publish_frame(slab, entries, used), "LayoutError", needle)
    still_serving(exporter_proc)


def test_layout_field_of_the_wrong_type_is_refused_by_the_schema(served, staged):
    exporter_proc, peer = served
    tensors, layout, slab = staged
    peer.expect_error(
        publish_frame(slab, corrupt(layout, 0, 2, [8, -1]), layout.used_bytes), "ProtocolError", "entries[0][2][1]"
    )
    still_serving(exporter_proc)


def test_good_publish_request_is_copied_into_the_exporter(served, staged):
    exporter_proc, peer = served
    tensors, layout, slab = staged
    frame = peer.send_raw(publish_frame(slab, layout.to_wire(), layout.used_bytes))
    assert isinstance(frame.message, p.PublishReply), frame.message
    slab.tensor.zero_()  # the exporter owns its copy: our staging buffer can change
    with AdapterClient(exporter_proc.endpoint) as client:
        assert_same_adapter(client.fetch("pushed").tensors, tensors)


def test_a_handle_naming_something_else_than_a_slab_is_rejected(served, staged):
    """A handle pointing at an open regular file (not a sealed lora-ipc memfd) is refused on the opened fd."""
    import os

    import msgspec

    exporter_proc, peer = served
    tensors, layout, slab = staged
    with open("/etc/hostname", "rb") as f:
        handle = msgspec.structs.replace(slab.handle, fd=f.fileno())
        frame = p.encode(p.PublishRequest("x", {}, handle, layout.to_wire(), layout.used_bytes), 4)
        peer.expect_error(frame, "BackendError", "not lora-ipc shared memory")
        gone = msgspec.structs.replace(slab.handle, pid=os.getpid(), fd=999_999)
        frame = p.encode(p.PublishRequest("x", {}, gone, layout.to_wire(), layout.used_bytes), 5)
        peer.expect_error(frame, "BackendError", "gone")
    still_serving(exporter_proc)


class FakeExporter:
    """A malicious or broken exporter: answers every fetch with a reply the test crafts."""

    def __init__(self, tmp_path, staged):
        self.endpoint = f"ipc://{tmp_path}/fake.sock"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.tensors, self.layout, self.slab = staged
        # like a store's: a handle carries the exporter's generation counter (clients refuse one without)
        import os

        import msgspec

        from lora_ipc.core.memory.shm import GenerationTable

        self.table = GenerationTable(4)
        slot = p.GenerationSlot(os.getpid(), self.table.fd, self.table.take_slot(), self.table.name)
        self.handle = msgspec.structs.replace(self.slab.handle, generation=slot)

    def answer(self, **overrides):
        identity, _, payload = self.sock.recv_multipart()
        frame = p.decode(payload)
        body = dict(
            name="x",
            version=1,
            lease_id=1,
            config_digest=p.digest_of({}),
            config={},
            slab_id=self.slab.slab_id,
            slab=self.handle,
            generation=0,
            layout_digest=self.layout.digest,
            entries=self.layout.to_wire(),
            used_bytes=self.layout.used_bytes,
            live_slabs=[self.slab.slab_id],
            epoch="0f",
        )
        body.update(overrides)
        self.sock.send_multipart([identity, b"", p.encode(p.FetchReply(**body), frame.request_id)])
        identity, _, payload = self.sock.recv_multipart()  # the client releases its lease even on failure
        assert isinstance(p.decode(payload).message, p.ReleaseRequest)


@pytest.mark.parametrize(
    "overrides, error",
    [
        (lambda L, s: dict(entries=corrupt(L, 0, 3, s.nbytes)), LayoutError),
        (lambda L, s: dict(entries=corrupt(L, 0, 1, "object")), LayoutError),
        (lambda L, s: dict(layout_digest=b"\0" * 16), ProtocolError),
        (lambda L, s: dict(slab=None, slab_id="unknown"), ProtocolError),
        (lambda L, s: dict(entries=None, layout_digest=b"\1" * 16), ProtocolError),
    ],
)
def test_client_validates_replies_and_keeps_working(tmp_path, staged, overrides, error):
    import threading

    fake = FakeExporter(tmp_path, staged)
    client = AdapterClient(fake.endpoint, timeout_s=5)
    try:
        bad = threading.Thread(target=fake.answer, kwargs=overrides(fake.layout, fake.slab))
        bad.start()
        with pytest.raises(error):
            client.fetch("x")
        bad.join()
        good = threading.Thread(target=fake.answer)
        good.start()
        assert_same_adapter(client.fetch("x").tensors, fake.tensors)
        good.join()
    finally:
        client.close()
        fake.sock.close(0)
        fake.table.close()


def test_layout_validator_unit():
    t = {"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(3, 5, dtype=torch.float16), "c": torch.ones(2)}
    layout = SlabLayout.plan(t)
    assert [e.offset % 256 for e in layout.entries] == [0, 0, 0]
    again = SlabLayout.from_wire(layout.to_wire(), layout.used_bytes, layout.used_bytes)
    assert again.digest == layout.digest
    assert len(again.groups) == 2  # a and b are one group
    with pytest.raises(LayoutError):
        SlabLayout.from_wire(layout.to_wire(), layout.used_bytes, layout.used_bytes - 256)


def test_large_frames_take_the_streaming_path_with_the_same_rules():
    """Frames over 64 KiB are walked as a stream: the same refusals, without building the frame first."""
    from lora_ipc.core.protocol import SMALL_FRAME

    big_name = "x" * 500
    entries = [[f"{big_name}{i}", "float32", [4], i * 256, 16] for i in range(200)]
    body = {
        "name": "p",
        "config": {},
        "entries": entries,
        "used_bytes": 200 * 256,
        "slab": {"backend": "cpu", "slab_id": "s", "nbytes": 1 << 20, "pid": 1, "fd": 3},
    }
    frame = msgpack.packb([p.PROTOCOL_VERSION, "publish", 3, body], use_bin_type=True)
    assert len(frame) > SMALL_FRAME
    assert isinstance(p.decode(frame).message, p.PublishRequest)
    for bad, needle in [
        ({**body, "sneaky": 1}, "6 keys, at most 5"),
        ({**body, "used_bytes": -1}, "used_bytes"),
        ({**body, "entries": entries + [[1, 2]]}, "entries[200]"),
        ({**body, "slab": {**body["slab"], "backend": "tpu"}}, "unknown backend"),
    ]:
        with pytest.raises(ProtocolError, match=re.escape(needle)) as info:
            p.decode(msgpack.packb([p.PROTOCOL_VERSION, "publish", 3, bad], use_bin_type=True))
        assert info.value.request_id == 3

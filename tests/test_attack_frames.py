"""Attacks by frames (security.md, *Frames*; the contract is docs/reference/wire.md): hostile bytes
on the wire, both ways. Every bad request gets a typed error (echoing its request id where it could be
read) and both sides keep serving; a hostile frame costs no more than the frame; the client validates
every reply; every arithmetic failure of a received layout is a ``LayoutError``; nothing decodes peer
bytes with pickle.
"""

from __future__ import annotations

import os
import pathlib
import random
import re
import time

import msgpack
import msgspec
import pytest
import torch
import zmq

from lora_ipc import AdapterClient, LayoutError, ProtocolError
from lora_ipc.core import protocol as p
from lora_ipc.core.channels.fdchannel import FdServer, push_fd
from lora_ipc.core.memory.layout import SlabLayout

from . import models
from .helpers import assert_same_adapter, still_serving

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "lora_ipc"


# ---- requests: every bad message gets a typed error, and the server serves on ------------------------


def fetch_frame(**overrides) -> bytes:
    body = {"name": "good", "version": None, "client_id": "raw", "known_slabs": [], "known_layouts": []}
    body.update(overrides)
    return msgpack.packb([p.PROTOCOL_VERSION, "fetch", 5, body])


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


def publish_frame(slab, entries, used_bytes, name="pushed", endpoint: str | None = None) -> bytes:
    """A publish of ``slab``: its memfd pushed to ``endpoint``'s descriptor channel first, the only way it
    reaches a server; without ``endpoint`` the token names nothing pushed (refused after the checks before)."""
    token = os.urandom(16)
    if endpoint is not None:
        fd = slab.descriptor()
        try:
            token = push_fd(endpoint, fd)
        finally:
            os.close(fd)
    handle = msgspec.structs.replace(slab.handle, token=token)
    return p.encode(p.PublishRequest(name, models.RANDOM_ADAPTER_CONFIG, handle, entries, used_bytes), 3)


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
    frame = peer.send_raw(publish_frame(slab, layout.to_wire(), layout.used_bytes, endpoint=exporter_proc.endpoint))
    assert isinstance(frame.message, p.PublishReply), frame.message
    slab.tensor.zero_()  # the exporter owns its copy: our staging buffer can change
    with AdapterClient(exporter_proc.endpoint) as client:
        assert_same_adapter(client.fetch("pushed").tensors, tensors)


def test_version_mismatch_errors_echo_the_request_id(exporter_proc):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter_proc.endpoint)
    sock.send_multipart([b"", msgpack.packb([p.PROTOCOL_VERSION + 7, "list", 4242, {}])])
    assert sock.poll(5000)
    frame = p.decode(sock.recv_multipart()[-1])
    assert frame.request_id == 4242 and "protocol version" in frame.message.message
    sock.close(0)


# ---- replies: the client validates what a server answers ---------------------------------------------


class FakeExporter:
    """A malicious or broken exporter: answers every fetch with a reply the test crafts."""

    def __init__(self, tmp_path, staged):
        self.endpoint = f"ipc://{tmp_path}/fake.sock"
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(self.endpoint)
        self.tensors, self.layout, self.slab = staged
        # like a store's: a handle carries the exporter's generation counter (clients refuse one without), and
        # the slab's memfd and the table travel by the descriptor channel (the only way they reach a client)
        from lora_ipc.core.memory.shm import GenerationTable

        self.table = GenerationTable(4)
        slot = p.GenerationSlot(self.table.take_slot(), self.table.name)
        self.handle = msgspec.structs.replace(self.slab.handle, generation=slot)
        self.slab.generation_fd = self.table.fd
        self.fds = FdServer(self.endpoint, {os.getuid()}).start()

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
            slab=self.fds.attach(self.slab, self.handle),
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
        fake.fds.stop()
        fake.table.close()


# ---- layouts: every arithmetic failure is a LayoutError ----------------------------------------------


def test_layout_validator_unit():
    t = {"a": torch.zeros(3, 5, dtype=torch.float16), "b": torch.zeros(3, 5, dtype=torch.float16), "c": torch.ones(2)}
    layout = SlabLayout.plan(t)
    assert [e.offset % 256 for e in layout.entries] == [0, 0, 0]
    again = SlabLayout.from_wire(layout.to_wire(), layout.used_bytes, layout.used_bytes)
    assert again.digest == layout.digest
    assert len(again.groups) == 2  # a and b are one group
    with pytest.raises(LayoutError):
        SlabLayout.from_wire(layout.to_wire(), layout.used_bytes, layout.used_bytes - 256)


def test_a_layout_whose_numel_overflows_is_a_layout_error():
    wire = [["a", "float32", [1 << 20, 1 << 20, 1 << 20, 1 << 20, 0], 0, 0]]
    with pytest.raises(LayoutError):
        SlabLayout.from_wire(wire, 1 << 16, 1 << 20).unpack(torch.zeros(1 << 16, dtype=torch.uint8))


def test_fuzzed_overflowing_layouts_raise_layout_error_or_unpack():
    rng = random.Random(15)
    big = [0, 1, 2, 3, 255, 256, 1 << 16, (1 << 20) - 1, 1 << 20, 1 << 31, (1 << 62) - 1, 1 << 62]
    used, slab = 1 << 16, 1 << 20
    buf = torch.zeros(used, dtype=torch.uint8)
    accepted = 0
    for _ in range(3000):
        entries = []
        for i in range(rng.randint(1, 4)):
            shape = [rng.choice(big) for _ in range(rng.randint(0, 8))]
            dtype = rng.choice(["float32", "bfloat16", "int8", "float64"])
            itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
            numel = 1
            for d in shape:
                numel *= d
            nbytes = rng.choice([numel * itemsize, rng.choice(big)])
            entries.append([f"t{i}", dtype, shape, rng.choice([0, 256, 512, rng.choice(big)]), nbytes])
        try:
            layout = SlabLayout.from_wire(entries, used, slab)
        except LayoutError:
            continue
        tensors = layout.unpack(buf)  # whatever was accepted unpacks
        assert set(tensors) == {e[0] for e in entries}
        accepted += 1
    assert accepted > 0


# ---- the codec: large frames, memory amplification, no pickle ----------------------------------------


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
        "slab": {"backend": "cpu", "slab_id": "s", "nbytes": 1 << 20, "token": b"t" * 16},
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


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith("VmRSS"))


@pytest.mark.parametrize("kind", ["list", "publish", "fetch"])
def test_a_hostile_frame_costs_little(exporter_proc, kind):
    nested = b"\x91" * (16 << 20)  # 16 MiB of one-element arrays nested in each other
    empties = b"\xdd" + (8 << 20).to_bytes(4, "big") + b"\x90" * (8 << 20)  # 8M empty arrays
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(exporter_proc.endpoint)
    before = rss(exporter_proc.pid)
    for i, body in enumerate((nested, empties)):
        frame = (
            b"\x94"
            + msgpack.packb(p.PROTOCOL_VERSION)
            + msgpack.packb(kind)
            + msgpack.packb(7 + i)
            + b"\x81\xa7entries"
            + body
        )
        started = time.perf_counter()
        sock.send_multipart([b"", frame])
        assert sock.poll(10_000)
        reply = p.decode(sock.recv_multipart()[-1])
        assert isinstance(reply.message, p.ErrorReply) and reply.request_id == 7 + i, reply
        print(f"{kind}: {len(frame) >> 20} MiB hostile frame refused in {(time.perf_counter() - started) * 1e3:.1f} ms")
    grown = rss(exporter_proc.pid) - before
    print(f"{kind}: exporter RSS +{grown >> 10} KiB")
    assert grown < 48 << 20  # the frames themselves are 16 MiB; nothing built from them
    sock.close(0)


def test_no_pickle_where_peer_bytes_are_decoded():
    forbidden = re.compile(
        r"\b(import pickle|from pickle|cPickle|cloudpickle|dill|recv_pyobj|send_pyobj|"
        r"pickle\.loads?|torch\.load|ForkingPickler|marshal\.loads?)\b"
    )
    hits = [
        f"{path.relative_to(PACKAGE.parent)}:{n}: {line.strip()}"
        for path in PACKAGE.rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if forbidden.search(line)
    ]
    assert hits == []
    assert len(list(PACKAGE.rglob("*.py"))) > 10  # the scan really looked at the package


def test_a_release_of_an_unknown_lease_is_answered_and_counted_but_logged_only_at_debug(caplog):
    """A release that lost the race with a publish revoking its lease is routine: the peer still gets a typed
    ``LeaseError``, the store counts it, and the server's log does not warn (a flood of such releases cannot
    fill the log); any other rejected request still warns."""
    import logging

    import zmq

    from lora_ipc import AdapterExporter
    from lora_ipc.core.serving import server as server_module

    with AdapterExporter() as exporter, caplog.at_level(logging.DEBUG, logger=server_module.log.name):
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(exporter.endpoint)
            for request_id, message in (
                (7, p.ReleaseRequest(lease_id=123456)),
                (8, p.FetchRequest(name="nope", version=None, client_id="t")),
            ):
                sock.send_multipart([b"", p.encode(message, request_id)])
                assert sock.poll(10_000)
                reply = p.decode(sock.recv_multipart()[-1])
                assert reply.request_id == request_id and isinstance(reply.message, p.ErrorReply)
        finally:
            sock.close(0)
            ctx.term()
        assert exporter.store.metrics.errors_by_type.get("LeaseError") == 1
    levels = {r.getMessage().split(":")[0]: r.levelno for r in caplog.records if "rejected" in r.getMessage()}
    assert levels == {"request 7 rejected": logging.DEBUG, "request 8 rejected": logging.WARNING}

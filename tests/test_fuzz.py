"""Fuzzing the control-message decoder and the layout validator (hypothesis).

Every input must either decode to a validated message or raise ProtocolError (LayoutError is one):
no other exception, no hang. CI runs a bounded number of cases; LORA_IPC_LONG=1 runs >= 100,000.
"""

import os
import time

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_ipc.core import protocol as p
from lora_ipc.core.errors import LayoutError, ProtocolError
from lora_ipc.core.memory.layout import DTYPES, SlabLayout

LONG = os.environ.get("LORA_IPC_LONG") == "1"
CASES = (
    {"bytes": 30_000, "frames": 30_000, "mutated": 20_000, "layouts": 25_000}
    if LONG
    else {"bytes": 1_500, "frames": 1_500, "mutated": 1_000, "layouts": 1_000}
)
SLOW_CASE_S = 5.0  # a "hang": one decode taking this long fails the test (generous: CI machines are shared)


def fuzz_settings(kind):
    return settings(max_examples=CASES[kind], deadline=None, database=None, suppress_health_check=list(HealthCheck))


CASES_RUN = {"decoded": 0, "rejected": 0, "layouts accepted": 0, "layouts rejected": 0}


@pytest.fixture(scope="module", autouse=True)
def report_cases():
    yield
    print(f"\nfuzz cases run: {CASES_RUN} (total {sum(CASES_RUN.values())}), crashes 0, hangs 0")


def must_decode_or_reject(data, accept=None):
    started = time.perf_counter()
    try:
        frame = p.decode(data, accept)
    except ProtocolError:
        frame = None
    assert time.perf_counter() - started < SLOW_CASE_S
    CASES_RUN["rejected" if frame is None else "decoded"] += 1
    if frame is not None:  # what decodes must encode again, decode again, and encode to the same bytes
        again = p.encode(frame.message, frame.request_id)
        assert p.encode(p.decode(again, accept).message, frame.request_id) == again


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
    st.floats(),
    st.text(max_size=20),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=6),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)),
            inner,
            max_size=6,
        ),
    ),
    max_leaves=30,
)
FIELD_NAMES = sorted(
    {f for cls in p.MESSAGE_TYPES.values() for f in cls.__struct_fields__}
    | {
        "backend",
        "pid",
        "fd",
        "slot",
        "table",
        "generation",
        "slab_id",
        "nbytes",
        "device_uuid",
        "storage_handle",
        "ready_event",
    }
)


@fuzz_settings("bytes")
@given(st.binary(max_size=512))
def test_random_bytes(data):
    must_decode_or_reject(data)


@pytest.mark.slow  # 100-240 s on 2 cores: the full suite and CI run it; `-m "not slow"` leaves it out
@fuzz_settings("frames")
@given(
    st.sampled_from([p.PROTOCOL_VERSION, p.PROTOCOL_VERSION, 0, 2, -1, "1"]),
    st.sampled_from(sorted(p.MESSAGE_TYPES) + ["", "nope"]),
    st.one_of(st.integers(min_value=-5, max_value=(1 << 64) - 1), st.text(max_size=3)),
    st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=12),
)
def test_structured_frames(version, type_name, request_id, body):
    must_decode_or_reject(msgpack.packb([version, type_name, request_id, body], use_bin_type=True))
    must_decode_or_reject(msgpack.packb([version, type_name, request_id, body], use_bin_type=True), p.REQUEST_TYPES)


def _valid_frames():
    layout = SlabLayout.plan({"a": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.zeros(8, 4)})
    slab = p.CpuSlabHandle("1.ab.1", 4096, b"t" * 16, generation=p.GenerationSlot(3, "gen.77.ab"))
    return [
        p.encode(p.FetchRequest("policy", 3, "c", ["s1"], [b"\0" * 16]), 7),
        p.encode(
            p.FetchReply(
                "policy",
                3,
                9,
                b"c" * 16,
                {"r": 8, "target_modules": ["q_proj"]},
                slab.slab_id,
                slab,
                4,
                layout.digest,
                layout.to_wire(),
                layout.used_bytes,
                [slab.slab_id],
                "0f",
            ),
            7,
        ),
        p.encode(p.PublishRequest("policy", {"r": 8}, slab, layout.to_wire(), layout.used_bytes), 2),
        p.encode(p.ReleaseRequest(5, 0.25), 3),
        p.encode(p.ErrorReply("LayoutError", "x"), 1),
    ]


VALID = _valid_frames()


@fuzz_settings("frames")
@given(st.sampled_from(range(len(VALID))), st.sampled_from(FIELD_NAMES), values)
def test_valid_frames_with_one_field_replaced(which, field, value):
    version, type_name, request_id, body = msgpack.unpackb(VALID[which], raw=False)
    body[field] = value
    must_decode_or_reject(msgpack.packb([version, type_name, request_id, body], use_bin_type=True))
    del body[field]
    must_decode_or_reject(msgpack.packb([version, type_name, request_id, body], use_bin_type=True))


@fuzz_settings("mutated")
@given(
    st.sampled_from(range(len(VALID))),
    st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(min_value=0),
)
def test_mutated_valid_frames(which, flips, cut):
    data = bytearray(VALID[which])
    for pos, byte in flips:
        data[pos % len(data)] = byte
    must_decode_or_reject(bytes(data))
    must_decode_or_reject(bytes(data[: cut % (len(data) + 1)]))


int64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)
entry = st.tuples(
    st.one_of(st.text(min_size=0, max_size=8), int64),
    st.one_of(st.sampled_from(sorted(DTYPES)), st.text(max_size=10)),
    st.one_of(st.lists(st.integers(min_value=-2, max_value=70), max_size=4), scalars),
    st.one_of(st.integers(min_value=-256, max_value=1 << 20).map(lambda x: x - x % 64), scalars),
    st.one_of(st.integers(min_value=-1, max_value=1 << 16), scalars),
).map(list)


@st.composite
def near_valid_layouts(draw):
    """A valid layout (what a real exporter sends), then sometimes one field bent out of shape."""
    tensors = {}
    for i in range(draw(st.integers(1, 6))):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 9), max_size=3))
        tensors[f"t{i}"] = torch.zeros(shape, dtype=DTYPES[dtype])
    layout = SlabLayout.plan(tensors)
    wire = [list(e) for e in layout.to_wire()]
    used, slab = layout.used_bytes, layout.used_bytes + draw(st.sampled_from([0, 256, 4096]))
    if draw(st.booleans()):
        i, field = draw(st.integers(0, len(wire) - 1)), draw(st.integers(0, 4))
        wire[i][field] = draw(
            st.one_of(
                scalars,
                st.integers(-512, 1 << 14),
                st.sampled_from(sorted(DTYPES)),
                st.lists(st.integers(-1, 9), max_size=3),
                st.just(wire[0][field]),
            )
        )
    if draw(st.integers(0, 9)) == 0:
        used = draw(st.one_of(st.integers(-256, slab + 512), scalars))
    return wire, used, slab


@fuzz_settings("layouts")
@given(
    st.one_of(
        near_valid_layouts(),
        st.tuples(
            st.one_of(st.lists(entry, max_size=10), values),
            st.one_of(st.integers(min_value=-256, max_value=1 << 21).map(lambda x: x - x % 256), scalars),
            st.integers(min_value=1, max_value=1 << 21),
        ),
    )
)
def test_layout_validator(case):
    wire, used_bytes, slab_nbytes = case
    try:
        layout = SlabLayout.from_wire(wire, used_bytes, slab_nbytes)
    except LayoutError:
        CASES_RUN["layouts rejected"] += 1
        return
    CASES_RUN["layouts accepted"] += 1
    # accepted: every entry lies inside the used bytes, aligned, without overlap, and unpacks
    buf = torch.zeros(layout.used_bytes, dtype=torch.uint8)
    tensors = layout.unpack(buf)
    assert len(tensors) == len(layout.entries) and layout.used_bytes <= slab_nbytes
    spans = sorted((e.offset, e.offset + e.nbytes) for e in layout.entries)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))
    for e in layout.entries:
        assert e.offset % 256 == 0 and e.offset + e.nbytes <= layout.used_bytes
        assert tensors[e.name].dtype == DTYPES[e.dtype] and tuple(tensors[e.name].shape) == e.shape


def test_live_server_survives_fuzzed_frames(exporter_proc):
    """A smaller run against a real exporter process: every frame gets a reply, the exporter keeps serving."""
    import random

    import zmq

    from lora_ipc import AdapterClient

    exporter_proc.call("publish_random", "fz", 1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(exporter_proc.endpoint)
    rng = random.Random(0)
    n = 3000 if LONG else 300
    for i in range(n):
        data = bytearray(rng.choice(VALID))
        for _ in range(rng.randint(1, 6)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        sock.send_multipart([b"", bytes(data[: rng.randint(0, len(data))])])
        assert sock.poll(5000), f"no reply to fuzzed frame {i}"
        sock.recv_multipart()
    sock.close(0)
    with AdapterClient(exporter_proc.endpoint, timeout_s=5) as client:
        assert client.fetch("fz").name == "fz"
    print(f"\nlive exporter answered {n} fuzzed frames and kept serving")

"""The wire contract (lora_ipc.core.protocol's msgspec Structs): msgpack on the wire, bounds applied before anything is
built, one set of limits. ``msgpack`` (the reference codec) checks that any msgpack peer can speak it."""

import os
import tracemalloc

import msgpack
import msgspec
import pytest
import torch

from lora_ipc import refit
from lora_ipc.core import protocol as p
from lora_ipc.core.errors import ProtocolError
from lora_ipc.core.fetching import imports
from lora_ipc.core.memory import layout
from lora_ipc.core.memory.layout import SlabLayout

EPOCH = "e90c4a1f"


def sample_messages():
    """One or more of every message type, every slab handle backend, optional fields set and not."""
    lay = SlabLayout.plan({"a": torch.zeros(4, 8, dtype=torch.bfloat16), "b": torch.zeros(8, 4)})
    slot = p.GenerationSlot(3, "gen.77.ab")
    cpu = p.CpuSlabHandle("1.ab.1", 4096, generation=slot, token=b"t" * 16)
    cuda = p.CudaSlabHandle(
        "1.cd.2", 8192, "GPU-1234", b"h" * 64, 8192, 0, b"r" * 32, 5, b"e" * 64, True, b"v" * 64, slot, b"g" * 16
    )
    vmm = p.VmmSlabHandle("1.vm.3", 1 << 21, "GPU-1234", b"v" * 64, slot, b"k" * 16)
    config = {
        "r": 8,
        "lora_alpha": 16.5,
        "target_modules": ["q_proj", "v_proj"],
        "bias": "none",
        "use_dora": False,
        "rank_pattern": {"x": 4},
        "layers": None,
        "big": 1 << 63,
    }
    return [
        p.ListRequest(),
        p.ListReply([p.TensorSetSummary("policy", [1, 2], 4096)], EPOCH, 3),
        p.FetchRequest("policy", 3, "c", ["s1"], [b"\0" * 16], [b"\1" * 16], "host", EPOCH),
        p.FetchRequest("policy", None, "c"),
        p.FetchReply(
            "policy",
            3,
            9,
            b"c" * 16,
            config,
            cpu.slab_id,
            cpu,
            4,
            lay.digest,
            lay.to_wire(),
            lay.used_bytes,
            [cpu.slab_id],
            EPOCH,
            32768 + 256,
        ),
        p.FetchReply("policy", 3, 9, b"c" * 16, None, cuda.slab_id, cuda, 4, lay.digest, None, 512, [], EPOCH),
        p.FetchReply(
            "policy", 3, 9, b"c" * 16, None, vmm.slab_id, None, 4, lay.digest, None, 512, [vmm.slab_id], EPOCH
        ),
        p.ReleaseRequest(5, 0.25),
        p.ReleaseRequest(6),
        p.ReleaseReply(5),
        p.PublishRequest("policy", config, vmm, lay.to_wire(), lay.used_bytes),
        p.PublishReply("policy", 4),
        p.FetchNote(EPOCH, [p.BoardFetch("policy", 3, 0.4), p.BoardFetch("value", 4, 0.0)]),
        p.FetchNoteReply(2),
        p.StatusRequest(),
        p.StatusReply(status_report()),
        p.ErrorReply("LayoutError", "bad layout"),
    ]


def status_report() -> p.StatusReport:
    """A real store's report (one adapter, one lease) with what a server adds."""
    from lora_ipc.core.serving.store import TensorSetStore

    store = TensorSetStore()
    try:
        store.publish("a", {"w": torch.ones(4, 4)}, {"r": 4})
        store.lease("a", None, b"\x00k", client="c1")
        return msgspec.structs.replace(
            store.status(),
            endpoint="ipc:///tmp/x.sock",
            pid=42,
            server=p.ServerStatus(
                connections=1, connection_cap=64, peak_connections=2, dropped_connections=0, requests=9
            ),
        )
    finally:
        store.close()


def plain(message) -> dict:
    """What a msgpack peer sees: maps, arrays, str, bin, numbers (handles tagged by ``backend`` first)."""
    return msgspec.to_builtins(message, builtin_types=(bytes,))


def test_every_message_type_speaks_plain_msgpack_both_ways():
    messages = sample_messages()
    assert {type(m) for m in messages} == set(p.MESSAGE_TYPES.values())
    for request_id, message in enumerate(messages, 1):
        ours = p.encode(message, request_id)
        # ours, read by the reference codec: [version, type, request id, body map]
        version, type_name, rid, body = msgpack.unpackb(ours, raw=False, strict_map_key=True)
        assert (version, type_name, rid) == (p.PROTOCOL_VERSION, message.TYPE, request_id)
        assert body == plain(message)
        if isinstance(body.get("slab"), dict):
            assert next(iter(body["slab"])) == "backend"
        # the reference codec's frame, read by ours: the same message; and the same bytes as ours
        theirs = msgpack.packb([p.PROTOCOL_VERSION, message.TYPE, request_id, body], use_bin_type=True)
        assert theirs == ours
        frame = p.decode(theirs)
        assert frame.request_id == request_id and type(frame.message) is type(message)
        assert p.encode(frame.message, request_id) == ours


def test_every_wire_struct_refuses_unknown_keys():
    structs = [
        *p.MESSAGE_TYPES.values(),
        p.CpuSlabHandle,
        p.CudaSlabHandle,
        p.VmmSlabHandle,
        p.GenerationSlot,
        p.TensorSetSummary,
        p.LayoutEntry,
    ]
    for cls in structs:
        assert issubclass(cls, msgspec.Struct) and cls.__struct_config__.forbid_unknown_fields, cls
    frame = msgpack.packb(
        [
            p.PROTOCOL_VERSION,
            "publish",
            4,
            {**plain(sample_messages()[10]), "slab": {**plain(sample_messages()[10].slab), "extra": 1}},
        ]
    )
    with pytest.raises(ProtocolError, match="unknown key 'extra'") as info:
        p.decode(frame)
    assert info.value.request_id == 4


def frame_with(type_name: str, field: str, raw_value: bytes, request_id: int = 9) -> bytes:
    key = msgpack.packb(field)
    return (
        b"\x94"
        + msgpack.packb(p.PROTOCOL_VERSION)
        + msgpack.packb(type_name)
        + msgpack.packb(request_id)
        + b"\x81"
        + key
        + raw_value
    )


def refused_cheaply(frame: bytes, needle: str = "", request_id: int = 9) -> ProtocolError:
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError) as info:
            p.decode(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.request_id == request_id, info.value
    assert needle in str(info.value), info.value
    assert peak < (1 << 20) + len(frame), f"refusing a {len(frame)}-byte frame allocated {peak} bytes"
    return info.value


@pytest.mark.parametrize(
    "type_name, field",
    [
        ("publish", "entries"),
        ("fetch_reply", "live_slabs"),
        ("fetch", "known_slabs"),
        ("list_reply", "sets"),
        ("fetch_reply", "entries"),
    ],
)
def test_a_huge_declared_array_length_is_refused_before_anything_is_allocated(type_name, field):
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdc\xff\xff"):  # array32 / array16 headers, no items follow
        refused_cheaply(frame_with(type_name, field, header))
    refused_cheaply(frame_with(type_name, "name", b"\xdb\xff\xff\xff\xff"))  # a 4 GiB string that is not there


@pytest.mark.parametrize(
    "type_name, field",
    [("publish", "config"), ("fetch_reply", "config"), ("status_reply", "report"), ("publish", "entries")],
)
@pytest.mark.parametrize("depth", [12, 5000, 4 << 20])
def test_deep_nesting_is_refused_cheaply(type_name, field, depth):
    nested = b"\x81\xa1k" * depth + b"\xc0" if field != "entries" else b"\x91" * depth + b"\xc0"
    refused_cheaply(frame_with(type_name, field, nested))


@pytest.mark.parametrize("index", [4, 10])  # a fetch reply, a publish request
def test_a_tree_of_empty_arrays_in_a_large_frame_is_refused_before_it_is_built(index):
    """1 byte of msgpack is a 56-byte Python list: in a large frame, a tree's encoded size is bounded first."""
    message = sample_messages()[index]
    body = plain(message)
    n = 4 << 20
    tree = b"\x81\xa1k\xdd" + n.to_bytes(4, "big") + b"\x90" * n
    encoded = b"".join(msgpack.packb(k) + (tree if k == "config" else msgpack.packb(v)) for k, v in body.items())
    frame = (
        b"\x94"
        + msgpack.packb(p.PROTOCOL_VERSION)
        + msgpack.packb(message.TYPE)
        + msgpack.packb(9)
        + bytes([0x80 | len(body)])
        + encoded
    )
    refused_cheaply(frame, "'config': 4194312 bytes, at most")


def test_limits_are_declared_once():
    assert layout.MAX_ENTRIES is p.MAX_ENTRIES and layout.MAX_DIMS is p.MAX_DIMS
    assert refit.MAX_PIECES_PER_BUCKET == p.MAX_ENTRIES
    assert imports.MAX_KNOWN_SENT == p.MAX_KNOWN
    with pytest.raises(ProtocolError, match="known_slabs"):
        p.decode(p.encode(p.FetchRequest("a", None, "c", [f"s{i}" for i in range(p.MAX_KNOWN + 1)]), 1))


def test_descriptor_passing_is_declared_by_every_handle_and_slab_kind():
    """Who may use the descriptor channel is a declared capability, not probed with hasattr: every member of
    the handle union has a channel token (every descriptor comes by the channel: a slab's own where its
    memory travels as one, the generation table's for any slab) and says whether its memory travels that
    way; the backends' exported slabs say whether they have a descriptor to pass (a slab that declares none
    refuses to give one, typed)."""
    import typing

    from lora_ipc.core.backends.base import ExportedSlab
    from lora_ipc.core.backends.cpu import CpuBackend, CpuExportedSlab
    from lora_ipc.core.backends.cuda import CudaExportedSlab
    from lora_ipc.core.backends.vmm import VmmExportedSlab
    from lora_ipc.core.errors import BackendError

    kinds = typing.get_args(p.SlabHandle)
    assert {k.TAG for k in kinds} == {"cpu", "cuda", "vmm"}
    for kind in kinds:
        assert "token" in kind.__struct_fields__, kind
    assert [k.TAG for k in kinds if k.PASSES_DESCRIPTOR] == ["cpu", "vmm"]
    slot = p.GenerationSlot(0, "gen.77.ab")
    cpu = p.CpuSlabHandle("1.ab.1", 4096, generation=slot, token=b"t" * 16)
    assert cpu.channel_token == b"t" * 16 and msgspec.structs.replace(cpu, token=p.NO_TOKEN).channel_token is None
    cuda = p.CudaSlabHandle("c.1", 4096, "GPU-0", b"h", 4096, 0, b"r", 0, b"e", False, b"x", slot)
    assert cuda.channel_token is None
    assert msgspec.structs.replace(cuda, token=b"g" * 16).channel_token == b"g" * 16
    assert (CpuExportedSlab.passes_descriptor, VmmExportedSlab.passes_descriptor) == (True, True)
    assert CudaExportedSlab.passes_descriptor is False  # torch's CUDA IPC: a memory handle, no descriptor
    slab = CpuBackend().allocate(4096)
    try:
        assert type(slab.handle).PASSES_DESCRIPTOR
        fd = slab.descriptor()
        os.close(fd)
    finally:
        slab.close()

    class NoDescriptor(ExportedSlab):
        def mark_ready(self) -> None:
            pass

        def close(self) -> None:
            pass

    with pytest.raises(BackendError, match="no descriptor to pass"):
        NoDescriptor().descriptor()


def test_refit_buckets_never_hold_more_tensors_than_a_layout_may_carry():
    params = [(f"p{i}", torch.float32, (1,)) for i in range(p.MAX_ENTRIES + 100)]
    plans = refit.plan_buckets(params, 1 << 30)
    assert len(plans) == 2 and all(len(plan.pieces) <= p.MAX_ENTRIES for plan in plans)


def test_relay_metadata_is_checked_like_a_message():
    pytest.importorskip("ray")
    import numpy as np

    from lora_ipc.ray.replica import ReplicaMeta

    lay = SlabLayout.plan({"a": torch.zeros(4, 8)})
    data = np.zeros(lay.used_bytes, dtype=np.uint8)
    assert ReplicaMeta("p", 1, lay.to_wire(), lay.used_bytes, {"r": 8}).layout_for(data).digest == lay.digest
    for bad in [
        dict(version=0),
        dict(name=""),
        dict(name=7),
        dict(config={"r": float("nan")}),
        dict(config={"x": b"bytes"}),
        dict(used_bytes=-1),
    ]:
        fields = dict(name="p", version=1, entries=lay.to_wire(), used_bytes=lay.used_bytes, config={}) | bad
        with pytest.raises(ProtocolError):
            ReplicaMeta(**fields).layout_for(data)


@pytest.mark.parametrize("tensors", [8, 3000])  # one frame under SMALL_FRAME, one over (its trees sized first)
def test_configs_decode_alike_in_small_and_large_frames(tensors):
    lay = SlabLayout.plan({f"layer.{i}.lora_A.weight": torch.zeros(4, 4) for i in range(tensors)})
    handle = sample_messages()[10].slab
    config = {"r": 8, "target_modules": ["q_proj", "v_proj"], "rank_pattern": {"a": [1, 2.5, None, True]}}
    message = p.PublishRequest("policy", config, handle, lay.to_wire(), lay.used_bytes)
    frame = p.encode(message, 3)
    assert (len(frame) > p.SMALL_FRAME) == (tensors > 8)
    decoded = p.decode(frame).message
    assert decoded.config == config and p.encode(decoded, 3) == frame
    for bad, needle in [
        ({"x": list(range(p.MAX_CONFIG_NODES))}, "more than 4096 values"),
        ({"x": float("nan")}, "'config"),
        ({"x": b"raw"}, "'config"),
    ]:
        with pytest.raises(ProtocolError, match=needle) as info:
            p.decode(msgpack.packb([p.PROTOCOL_VERSION, "publish", 3, plain(message) | {"config": bad}]))
        assert info.value.request_id == 3


def test_version_3_keys_are_the_field_names_and_version_2_is_refused():
    """Protocol 3 has no aliases: every key on the wire is the Python field's name, and version 2's names for
    a config and a listing (``peft_config``, ``adapters``, ``adapters_left_out``) are unknown keys."""
    assert p.PROTOCOL_VERSION == 3
    for message in sample_messages():
        for cls in (type(message), p.StatusReport, p.CpuSlabHandle, p.CudaSlabHandle, p.VmmSlabHandle):
            assert all(f.encode_name == f.name for f in msgspec.structs.fields(cls)), cls
    fetch_reply, list_reply, status = sample_messages()[4], sample_messages()[1], sample_messages()[-2]
    v2 = [
        (
            "fetch_reply",
            {k if k != "config" else "peft_config": v for k, v in plain(fetch_reply).items()},
            "peft_config",
        ),
        ("list_reply", {k if k != "sets" else "adapters": v for k, v in plain(list_reply).items()}, "adapters"),
        (
            "status_reply",
            {
                "report": {
                    k if k != "versions_left_out" else "adapters_left_out": v for k, v in plain(status.report).items()
                }
            },
            "adapters_left_out",
        ),
    ]
    for type_name, body, key in v2:
        with pytest.raises(ProtocolError, match=f"unknown key '{key}'"):
            p.decode(msgpack.packb([p.PROTOCOL_VERSION, type_name, 5, body]))
    with pytest.raises(ProtocolError, match="protocol version 2 not supported") as info:
        p.decode(msgpack.packb([2, "list_reply", 5, plain(list_reply)]))
    assert info.value.request_id == 5


@pytest.mark.parametrize("epoch", ["", "EPOCH", "e90c4a1f0", "e90c4a1f" * 3, None])
def test_a_reply_names_its_store_epoch_in_the_uri_grammar(epoch):
    """A store's epoch is 1-16 lowercase hex digits (as in a ``lora-ipc://`` URI); a reply without one, or with
    anything else, is refused (version 2's "" from a server that named none is gone)."""
    list_reply = plain(sample_messages()[1])
    if epoch is None:
        del list_reply["epoch"]
    else:
        list_reply["epoch"] = epoch
    if epoch == "e90c4a1f0":  # 9 hex digits: legal
        assert p.decode(msgpack.packb([p.PROTOCOL_VERSION, "list_reply", 5, list_reply])).message.epoch == epoch
        return
    with pytest.raises(ProtocolError, match="epoch") as info:
        p.decode(msgpack.packb([p.PROTOCOL_VERSION, "list_reply", 5, list_reply]))
    assert info.value.request_id == 5

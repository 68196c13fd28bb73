"""The wires other than the ZeroMQ messages, as lora_ipc.core.protocol declares them (docs/reference/wire.md):
what the modules write is read back with an independent reader (``struct``, a raw socket, a regex written
from the grammar), byte for byte."""

import fcntl
import os
import re
import socket
import struct
from urllib.parse import quote

import msgspec
import pytest

from lora_ipc.core import protocol as p
from lora_ipc.core.channels.fdchannel import FdServer, fd_socket_path
from lora_ipc.core.errors import LoraIpcError, TensorSetNotFound, VersionNotFound
from lora_ipc.core.memory import shm
from lora_ipc.core.protocol import descriptors, tables, tags
from lora_ipc.core.protocol import uri as grammar
from lora_ipc.lora.adapters import AdapterNotFound
from lora_ipc.lora.uri import AdapterURI

pytestmark = pytest.mark.unit


# ---- the generation table -------------------------------------------------------------------------------


def test_the_generation_table_is_little_endian_int64_counters_one_per_slot():
    table = shm.GenerationTable(8)
    try:
        assert re.fullmatch(r"gen\.[0-9]+\.[0-9a-f]{8}", table.name) and table.name.startswith(f"gen.{os.getpid()}.")
        assert os.fstat(table.fd).st_size == 8 * 8
        for _ in range(3):
            table.bump(3)
        table.bump(5)
        table.bump(7)
        raw = os.pread(table.fd, 64, 0)
        assert struct.unpack("<8q", raw) == (0, 0, 0, 3, 0, 1, 0, 1)
        # only the table's own mapping writes (F_SEAL_FUTURE_WRITE): a write through the file is refused
        if fcntl.fcntl(table.fd, fcntl.F_GET_SEALS) & shm.F_SEAL_FUTURE_WRITE:  # Linux 5.1 and later
            writable = os.open(f"/proc/self/fd/{table.fd}", os.O_RDWR)
            try:
                with pytest.raises(PermissionError):
                    os.pwrite(writable, struct.pack("<q", 1), 6 * 8)
            finally:
                os.close(writable)
        # the reader reads what the declared layout says is there: slot 6's bytes packed with struct (through
        # the table's mapping, the one writer), read back by the table and by an importer's reader
        memoryview(table._counters).cast("B")[48:56] = struct.pack("<q", -(1 << 40) - 5)
        assert table.read(6) == -(1 << 40) - 5
        reader = shm.GenerationReader(os.dup(table.fd), table.name)  # as the descriptor channel delivers it
        try:
            assert [reader.read(slot) for slot in range(8)] == [0, 0, 0, 3, 0, 1, -(1 << 40) - 5, 1]
            with pytest.raises(LoraIpcError, match="outside"):
                reader.read(8)
        finally:
            reader.close()
    finally:
        table.close()
    assert (tables.GENERATION_COUNTER.format, tables.generation_offset(6)) == ("<q", 48)
    assert p.GenerationSlot.__struct_fields__ == ("slot", "table")


# ---- the CPU slab handle ----------------------------------------------------------------------------------


def _fetch_reply_body(handle) -> dict:
    reply = p.FetchReply(
        name="policy",
        version=1,
        lease_id=9,
        config_digest=b"c" * 16,
        config=None,
        slab_id=handle.slab_id,
        slab=handle,
        generation=4,
        layout_digest=b"d" * 16,
        entries=None,
        used_bytes=4096,
        live_slabs=[],
        epoch="0f",
    )
    return msgspec.msgpack.decode(msgspec.msgpack.encode(reply))  # plain maps, bytes kept


def test_the_board_entries_follow_the_counters_as_the_diagram_says():
    from lora_ipc.core.memory.board import BOARD_SUPPORTED, NewestEntry

    if not BOARD_SUPPORTED:
        pytest.skip("the board is written on x86-64 only")
    table = shm.GenerationTable(40, board_entries=3)  # 320 bytes of counters: the board starts at 512
    try:
        assert os.fstat(table.fd).st_size == 512 + 3 * 256
        assert table.board_entry_offset(2) == 512 + 2 * 256 and table.board_entry_offset(3) is None
        table.board.post(2, NewestEntry(9, 4, 8192, b"L" * 16, b"C" * 16, "77.beef.3"))
        raw = os.pread(table.fd, 256, 512 + 2 * 256)
        seq, version, generation, used, layout, config, length = struct.unpack_from("<QQqQ16s16sB", raw)
        assert (seq, version, generation, used, layout, config) == (2, 9, 4, 8192, b"L" * 16, b"C" * 16)
        assert raw[65 : 65 + length] == b"77.beef.3" and raw[65 + length :] == bytes(256 - 65 - length)
        assert os.pread(table.fd, 512 + 2 * 256, 0) == bytes(512 + 2 * 256)  # nothing else written
        table.board.withdraw()  # what closing the table does first: every seq odd
        assert [struct.unpack("<Q", os.pread(table.fd, 8, 512 + i * 256))[0] for i in range(3)] == [1, 1, 3]
    finally:
        table.close()


def test_a_cpu_handle_is_name_size_token_and_slot_and_nothing_that_names_a_process():
    """The CPU handle's map (wire.md): ``backend``, ``slab_id``, ``nbytes``, ``token`` (required, 16 bytes),
    ``generation`` {``slot``, ``table``}. Its memfd comes only by the descriptor channel: a handle without its
    token, or with the ``pid``/``fd`` that once named ``/proc/<pid>/fd/<fd>``, is refused at decode."""
    handle = p.CpuSlabHandle("1.ab.1", 4096, b"t" * 16, p.GenerationSlot(3, "gen.77.ab"))
    body = _fetch_reply_body(handle)
    assert list(body["slab"]) == ["backend", "slab_id", "nbytes", "token", "generation"]
    assert body["slab"]["token"] == b"t" * 16 and body["slab"]["generation"] == {"slot": 3, "table": "gen.77.ab"}
    assert p.decode(msgspec.msgpack.encode([p.PROTOCOL_VERSION, "fetch_reply", 5, body])).message.slab == handle

    def refused(mutate, needle: str) -> None:
        bad = _fetch_reply_body(handle)
        mutate(bad["slab"])
        with pytest.raises(LoraIpcError, match=needle):
            p.decode(msgspec.msgpack.encode([p.PROTOCOL_VERSION, "fetch_reply", 5, bad]))

    refused(lambda s: s.pop("token"), "missing required field `token`")
    refused(lambda s: s.update(token=b""), "slab.token")
    refused(lambda s: s.update(token=b"t" * 15), "slab.token")
    refused(lambda s: s.update(token=None), "slab.token")
    refused(lambda s: s.update(pid=77), "unknown key 'pid'")
    refused(lambda s: s.update(fd=12), "unknown key 'fd'")
    refused(lambda s: s["generation"].update(pid=77, fd=11), "unknown key")
    # a handle that was never given a token (an exported slab's own) cannot be sent as a valid one
    unattached = msgspec.structs.replace(handle, token=p.NO_TOKEN)
    assert unattached.channel_token is None
    with pytest.raises(LoraIpcError, match="slab.token"):
        p.decode(p.encode(p.PublishRequest("x", {}, unattached, [["w", "uint8", [8], 0, 8]], 8), 1))


# ---- torch's CUDA IPC ref counters ---------------------------------------------------------------------


def test_the_ref_counters_are_int64_slots_after_a_64_byte_header():
    """refcount.py changes the slot the declared layout names, in torch's own file (read here with struct)."""
    torch = pytest.importorskip("torch")
    import torch.multiprocessing as mp

    from lora_ipc.core.backends import refcount

    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        storage = torch.UntypedStorage(8 * 16).share_memory_()
        _, handle, _ = storage._share_filename_cpu_()
    finally:
        mp.set_sharing_strategy(previous)
    path = "/dev/shm/" + handle.decode().lstrip("/")
    assert refcount.add(handle, 9, 41) is not None
    with open(path, "rb") as f:
        data = f.read()
    assert len(data) >= tables.refcount_offset(16)
    slots = [struct.unpack_from("<q", data, 64 + i * 8)[0] for i in range(16)]
    assert slots == [refcount.read(handle, i) for i in range(16)]
    assert refcount.add(handle, 9, 1) == slots[9] + 1
    assert tables.REFCOUNT_HEADER_BYTES == 64 and tables.REFCOUNT_SLOT.format == "<q"


# ---- the descriptor channel -----------------------------------------------------------------------------


def test_the_descriptor_datagrams_are_the_declared_ones():
    token = bytes(range(16))
    assert descriptors.fetch_request(token) == b"F" + token and len(b"F" + token) == descriptors.REQUEST_BYTES == 17
    assert descriptors.push_request(token) == b"P" + token
    assert descriptors.ok_reply(2) == b"K\x02" and descriptors.ok_reply(0) == b"K\x00"
    assert descriptors.refusal("no") == b"Eno" and descriptors.refusal("x" * 999, gone=True) == b"G" + b"x" * 511
    assert descriptors.read_request(b"F" + token, 0) == (b"F", token)
    assert descriptors.read_request(b"P" + token, 1) == (b"P", token)
    for data, fds in [
        (b"F" + token, 1),
        (b"P" + token, 0),
        (b"P" + token, 2),
        (b"F" + token[:15], 0),
        (b"X" + token, 0),
    ]:
        assert descriptors.read_request(data, fds) is None, (data, fds)
    assert descriptors.read_ok(b"K\x02", 2) and not descriptors.read_ok(b"K\x02", 1)
    assert not descriptors.read_ok(b"K\x00", 0) and not descriptors.read_ok(b"K\x03", 3)
    with pytest.raises(ValueError):
        descriptors.fetch_request(token[:8])
    assert p.Token.__metadata__[0].max_length == descriptors.TOKEN_BYTES  # a handle's token is the channel's


def test_a_raw_peer_speaking_the_diagram_gets_its_descriptors(tmp_path):
    """A client written from the byte diagram alone (no lora_ipc code on its side) fetches, pushes, and is
    refused as the declaration says."""
    endpoint = f"ipc://{tmp_path}/e.sock"
    server = FdServer(endpoint, {os.getuid()}).start()
    slab = shm.create_sealed("s.1", 4096)
    try:
        assert fd_socket_path(endpoint) == f"{tmp_path}/e.sock.fd"
        token = server.offer(lambda: [os.dup(slab)])

        def exchange(data: bytes, fds: list[int] = ()) -> tuple[bytes, list[int]]:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
                sock.settimeout(10)
                sock.connect(f"{tmp_path}/e.sock.fd")
                if fds:
                    socket.send_fds(sock, [data], list(fds))
                else:
                    sock.send(data)
                reply, got, _, _ = socket.recv_fds(sock, 512, 4)
                return reply, got

        reply, got = exchange(b"F" + token)
        try:
            assert reply == b"K\x01" and len(got) == 1
            assert os.readlink(f"/proc/self/fd/{got[0]}") == os.readlink(f"/proc/self/fd/{slab}")
        finally:
            for fd in got:
                os.close(fd)
        reply, got = exchange(b"F" + token)  # single use
        assert reply[:1] == b"E" and got == []
        r, w = os.pipe()
        try:
            reply, got = exchange(b"P" + b"p" * 16, [r])
            assert (reply, got) == (b"K\x00", [])
            reply, got = exchange(b"Z" + b"p" * 16)
            assert reply[:1] == b"E" and b"malformed" in reply and got == []
        finally:
            os.close(r)
            os.close(w)
    finally:
        server.stop()
        os.close(slab)


def test_the_peer_credentials_are_struct_ucred():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        pid, uid, gid = descriptors.UCRED.unpack(
            a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, descriptors.UCRED.size)
        )
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


# ---- error tags and codes -------------------------------------------------------------------------------

#: the grammar as docs/reference/errors.md writes it, independently of tags.TAG
_DOC_TAG = re.compile(r"\[lora_ipc:([A-Za-z][A-Za-z0-9_]*):([0-9]+)\] ")


def test_a_tag_is_the_code_and_the_message_length():
    message = "version 7 is not kept (kept: [8, 9]) ]"
    text = tags.tag(VersionNotFound, message)
    m = _DOC_TAG.match(text)
    assert m and m.group(1) == "VersionNotFound" and int(m.group(2)) == len(message) and text[m.end() :] == message
    assert tags.tag(VersionNotFound, text) == text  # tagged once
    wrapped = RuntimeError(f"Call to collective_rpc failed: {text} (and then some)")
    found = tags.carried(wrapped)
    assert type(found) is VersionNotFound and str(found) == message


def test_a_missing_tensor_set_has_the_cores_code_and_an_adapter_its_own():
    """The core knows no adapters: the store's error is TensorSetNotFound; the LoRA layer's AdapterNotFound (a
    subclass) has its own code, so each keeps its class across the socket and across a tag."""
    core, lora = TensorSetNotFound("nothing named 'w'"), AdapterNotFound("no adapter named 'a'")
    assert (p.ErrorReply.from_error(core).error, p.ErrorReply.from_error(lora).error) == (
        "TensorSetNotFound",
        "AdapterNotFound",
    )
    for exc in (core, lora):
        back = msgspec.msgpack.decode(msgspec.msgpack.encode(p.ErrorReply.from_error(exc)), type=p.ErrorReply)
        assert type(back.to_exception()) is type(exc) and str(back.to_exception()) == str(exc)
        assert type(tags.carried(Exception(f"x: {tags.tag(type(exc), str(exc))}"))) is type(exc)
    assert isinstance(lora, TensorSetNotFound)

    class Unregistered(VersionNotFound):
        pass

    assert p.ErrorReply.from_error(Unregistered("x")).error == "VersionNotFound"  # its nearest registered base
    assert type(p.ErrorReply("NoSuchCode", "x").to_exception()) is LoraIpcError


# ---- the lora-ipc:// URI --------------------------------------------------------------------------------


def test_the_uri_and_the_messages_share_one_epoch_grammar():
    """A store's epoch is what a reply's ``epoch`` field and a URI's ``epoch=`` accept; a URI AdapterURI
    writes is the declared grammar (read here with a regex written from it)."""
    from lora_ipc.core.serving.store import new_epoch

    epoch = new_epoch()
    assert msgspec.convert(epoch, p.Epoch) == epoch
    for bad in ("", "E1", "0" * 17, "g", "0f\n"):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, p.Epoch)
    text = str(AdapterURI("pol icy/é", 12, "ipc:///tmp/x.sock", epoch, follow=True))
    m = re.fullmatch(r"lora-ipc://([^/?]+)/v([1-9][0-9]*)\?endpoint=([^&]+)&epoch=([0-9a-f]{1,16})&follow=1", text)
    assert m and m.groups() == (quote("pol icy/é", safe=""), "12", quote("ipc:///tmp/x.sock", safe=""), epoch)
    assert AdapterURI.parse(text) == AdapterURI("pol icy/é", 12, "ipc:///tmp/x.sock", epoch, True)
    assert grammar.SCHEME == "lora-ipc" and set(grammar.QUERY_KEYS) == {"endpoint", "epoch", "follow"}
    with pytest.raises(LoraIpcError, match="query"):
        AdapterURI.parse(f"lora-ipc://a?endpoint={quote('ipc:///tmp/x.sock', safe='')}&color=red")

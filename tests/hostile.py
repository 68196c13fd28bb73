"""A hostile exporter: a real server process of the same uid that answers fetches with what an attacker
chooses (issue 15, items 4 and 9). Started with the spawn method; driven over a control pipe. Its memory
reaches the client as every exporter's does: by the descriptor channel beside its endpoint (a real
``FdServer`` in the hostile process, handing out the attacker's memfd and generation table for each token).

Modes:
- ``impersonate``: fetch from ``legit`` once, then answer every fetch with the legit reply's slab id,
  layout and config but the attacker's own sealed memfd, named like the legit slab, full of 0x41;
  ``generation`` says whether the handle carries a generation slot of the attacker's own.
- ``sparse``: a sealed but unreserved (sparse) memfd of ``nbytes``, one uint8 entry covering it.
- ``reserved``: the same, reserved (``posix_fallocate``), as our exporters do.
- ``wrong_name``: a small reserved slab, but the reply names ``someone-else`` v99.
- ``hidden_holes``: a reserved slab full of 0x41 with its second quarter punched out before sealing, the hole's
  blocks made up by pages reserved past the end (``st_blocks`` looks complete), sealed with every seal an
  importer needs before it copies through a mapping (``F_SEAL_FUTURE_WRITE`` included).
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import multiprocessing as mp
import os

import zmq

from lora_ipc.core import protocol as p

ATTACKER_BYTE = 0x41
FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
FAKE_EPOCH = "0badc0de"  # the store epoch a hostile exporter names when the client pins none


def _not_a_fetch(msg):
    """What the hostile servers answer to anything but a fetch: a release is acknowledged, the rest refused."""
    from lora_ipc.core import protocol as p

    if isinstance(msg, p.ReleaseRequest):
        return p.ReleaseReply(msg.lease_id)
    return p.ErrorReply("LoraIpcError", "no")


def _fill(fd: int, nbytes: int) -> None:
    mm = mmap.mmap(fd, nbytes)
    mm[:] = bytes([ATTACKER_BYTE]) * nbytes
    mm.close()


def _sealed(name: str, nbytes: int, reserve: bool) -> int:
    from lora_ipc.core.memory.shm import MEMFD_PREFIX, SEALS, create_sealed

    if reserve:
        return create_sealed(name, nbytes)
    fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    return fd


def fallocate(fd: int, mode: int, offset: int, nbytes: int) -> None:
    """fallocate(2) with a ``mode`` (os.posix_fallocate has none); OSError with the errno."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
    if libc.fallocate(fd, mode, offset, nbytes) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"fallocate(mode {mode}): {os.strerror(errno)}")


def punch_holes(fd: int, nbytes: int, offset: int = 0) -> None:
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, nbytes)


def _hidden_holes(name: str, nbytes: int) -> int:
    """A memfd that passes an importer's checks, reserved blocks included, with a hole in its second quarter."""
    from lora_ipc.core.memory.shm import MAPPABLE_SEALS, MEMFD_PREFIX

    fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    os.posix_fallocate(fd, 0, nbytes)
    _fill(fd, nbytes)
    punch_holes(fd, nbytes // 4, offset=nbytes // 4)
    fallocate(fd, FALLOC_FL_KEEP_SIZE, nbytes, nbytes // 4)  # blocks past the end, where no one reads
    assert os.fstat(fd).st_blocks * 512 >= nbytes
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MAPPABLE_SEALS)
    return fd


def _legit_reply(legit: str):
    from lora_ipc.core import protocol as p

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(legit)
    sock.send_multipart([b"", p.encode(p.FetchRequest("policy", None, "attacker"), 1)])
    assert sock.poll(20_000), "legit exporter did not answer"
    reply = p.decode(sock.recv_multipart()[-1]).message
    sock.send_multipart([b"", p.encode(p.ReleaseRequest(reply.lease_id), 2)])
    sock.close(1000)
    return reply


class _Memfd:
    """What a hostile server's descriptor channel hands out for a token (fdchannel.DescriptorSource): its
    own memfd ``fd``, and its generation table."""

    passes_descriptor = True

    def __init__(self, fd: int, generation_fd: int):
        self.fd, self.generation_fd = fd, generation_fd

    def descriptor(self) -> int:
        return os.dup(self.fd)


def hostile_main(
    conn, endpoint: str, mode: str, nbytes: int = 0, legit: str | None = None, generation: bool = True
) -> None:
    from lora_ipc.core import protocol as p
    from lora_ipc.core.channels.fdchannel import FdServer
    from lora_ipc.core.memory.layout import SlabLayout
    from lora_ipc.core.memory.shm import GenerationTable

    table = GenerationTable(16)
    slot = table.take_slot()
    table.bump(slot)
    gen = p.GenerationSlot(slot, table.name)
    if mode == "impersonate":
        base = _legit_reply(legit)
        slab_id, nbytes = base.slab_id, base.slab.nbytes
        fd = _sealed(slab_id, nbytes, True)
        _fill(fd, nbytes)
        entries, used, config = base.entries, base.used_bytes, base.config
        name, version = base.name, base.version
    else:
        slab_id = f"{os.getpid()}.hostile.1"
        if mode == "hidden_holes":
            fd = _hidden_holes(slab_id, nbytes)
        else:
            fd = _sealed(slab_id, nbytes, mode != "sparse")
            if mode != "sparse":
                _fill(fd, nbytes)
        entries, used, config = [["w", "uint8", [nbytes], 0, nbytes]], nbytes, CONFIG
        name, version = ("someone-else", 99) if mode == "wrong_name" else (None, None)
    layout = SlabLayout.from_wire(entries, used, nbytes)
    handle = p.CpuSlabHandle(slab_id, nbytes, p.NO_TOKEN, gen if generation else None)
    source = _Memfd(fd, table.fd)

    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    channel = FdServer(endpoint, {os.getuid()}).start()
    conn.send(("ready", os.getpid(), slab_id))
    while True:
        if conn.poll(0):
            cmd = conn.recv()
            if cmd == "punch":  # give back every page of the slab (its size and seals stay)
                punch_holes(fd, nbytes)
                conn.send(os.fstat(fd).st_blocks * 512)
            elif cmd == "blocks":
                conn.send(os.fstat(fd).st_blocks * 512)
            elif cmd == "stop":
                sock.close(0)
                channel.stop()
                conn.send("stopped")
                return
        if not sock.poll(20):
            continue
        identity, *_, payload = sock.recv_multipart()
        frame = p.decode(payload, p.REQUEST_TYPES)
        msg = frame.message
        if isinstance(msg, p.FetchRequest):
            reply = p.FetchReply(
                name=name or msg.name,
                version=version or msg.version or 1,
                lease_id=7,
                config_digest=p.digest_of(config),
                config=config,
                slab_id=slab_id,
                slab=None if slab_id in msg.known_slabs else channel.attach(source, handle),
                generation=table.read(slot) if generation else 0,
                layout_digest=layout.digest,
                entries=entries,
                used_bytes=used,
                live_slabs=[slab_id],
                epoch=msg.epoch or FAKE_EPOCH,
            )
        else:
            reply = _not_a_fetch(msg)
        sock.send_multipart([identity, b"", p.encode(reply, frame.request_id)])


class HostileServer:
    def __init__(self, endpoint: str, mode: str, **kw):
        from .procs import SPAWN

        self.endpoint = endpoint
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=hostile_main, args=(child, endpoint, mode), kwargs=kw, daemon=True)
        self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("hostile server did not start")
        _, self.pid, self.slab_id = self._conn.recv()

    def call(self, cmd: str):
        self._conn.send(cmd)
        assert self._conn.poll(60), f"hostile server did not answer {cmd}"
        return self._conn.recv()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


# ---- the daemon's publish path (item 5) --------------------------------------------------------


def trainer_main(conn, endpoint: str) -> None:
    """A trainer publishing through ``RemoteExporter``: ``("publish", v)`` publishes an adapter whose every
    value is ``v`` and answers the daemon's version number."""
    from lora_ipc import RemoteExporter

    from . import models

    with RemoteExporter(endpoint, timeout_s=30) as remote:
        conn.send(os.getpid())
        while True:
            cmd, *args = conn.recv()
            if cmd == "stop":
                conn.send("stopped")
                return
            (value,) = args
            conn.send(remote.publish("policy", models.constant_adapter(value), models.RANDOM_ADAPTER_CONFIG))


def staging_ids(pid: int) -> list[str]:
    """Slab ids of the lora-ipc memfds process ``pid`` holds, read from /proc as an attacker would."""
    from lora_ipc.core.memory.shm import MEMFD_PREFIX, memfds_of

    prefix = f"/memfd:{MEMFD_PREFIX}"
    return sorted({m[len(prefix) :].removesuffix(" (deleted)") for m in memfds_of(pid)})


def attacker_publish_main(conn, endpoint: str, victim_id: str, evictions: int) -> None:
    """Publish ``evictions`` adapters from slabs of our own, then one from a memfd of ours named like the
    victim's staging slab; every value 0x41 as float32 (65.0). Reports the daemon's answers."""
    import torch

    from lora_ipc.core import protocol as p
    from lora_ipc.core.channels.fdchannel import push_fd
    from lora_ipc.core.memory.layout import SlabLayout
    from lora_ipc.core.memory.shm import create_sealed, map_fd

    from . import models

    tensors = {k: torch.full_like(v, float(ATTACKER_BYTE)) for k, v in models.constant_adapter(0).items()}
    layout = SlabLayout.plan(tensors)
    size = -(-layout.used_bytes // (64 << 10)) * (64 << 10)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.connect(endpoint)
    answers, keep = [], []
    for i, slab_id in enumerate([f"{os.getpid()}.evict.{i}" for i in range(evictions)] + [victim_id]):
        fd = create_sealed(slab_id, size)
        keep.append(fd)
        layout.pack(layout.destination_views(map_fd(fd, size, writable=True)), tensors)
        handle = p.CpuSlabHandle(slab_id, size, push_fd(endpoint, fd))  # its memfd, by the daemon's channel
        request = p.PublishRequest("evil", models.RANDOM_ADAPTER_CONFIG, handle, layout.to_wire(), layout.used_bytes)
        sock.send_multipart([b"", p.encode(request, i + 1)])
        assert sock.poll(30_000), "daemon did not answer"
        answers.append(type(p.decode(sock.recv_multipart()[-1]).message).__name__)
    conn.send(answers)
    conn.recv()  # hold the memfds until told
    sock.close(0)


# ---- a hostile descriptor channel (issue 23, items 10, 11, 16) ----------------------------------


def _channel_listener(endpoint: str, mode: str, fds: list[int], conn) -> None:
    """The hostile server's descriptor channel: ``fifo_table`` answers every request with a real sealed
    slab and a FIFO as its generation table, ``fifo_slab`` with a FIFO as the slab, ``silent`` accepts and
    never answers (each accept is reported on ``conn``)."""
    import socket
    import threading

    from lora_ipc.core.channels.fdchannel import fd_socket_path
    from lora_ipc.core.protocol.descriptors import OK

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(fd_socket_path(endpoint))
    os.chmod(fd_socket_path(endpoint), 0o600)
    listener.listen(64)
    held = []

    def serve():
        while True:
            sock, _ = listener.accept()
            held.append(sock)  # never closed: a silent channel keeps its peers waiting
            conn.send(("accepted", len(held)))
            if mode != "silent":
                sock.recv(512)
                socket.send_fds(sock, [OK + bytes([len(fds)])], fds)

    threading.Thread(target=serve, daemon=True).start()


def channel_main(conn, endpoint: str, mode: str, fifo_path: str) -> None:
    """A same-uid server whose every fetch reply names one slab of its own, delivered by its descriptor
    channel (a token; modes of ``_channel_listener``)."""
    from lora_ipc.core import protocol as p
    from lora_ipc.core.memory.layout import SlabLayout
    from lora_ipc.core.memory.shm import GenerationTable

    table = GenerationTable(16)
    slot = table.take_slot()
    table.bump(slot)
    gen = p.GenerationSlot(slot, table.name)
    nbytes = 64 << 10
    slab_id = f"{os.getpid()}.hostile.1"
    slab = _sealed(slab_id, nbytes, True)
    os.mkfifo(fifo_path, 0o600)
    fifo = os.open(fifo_path, os.O_RDONLY | os.O_NONBLOCK)  # no writer, ever
    _channel_listener(endpoint, mode, {"fifo_table": [slab, fifo], "fifo_slab": [fifo]}.get(mode, []), conn)
    entries = [["w", "uint8", [nbytes], 0, nbytes]]
    layout = SlabLayout.from_wire(entries, nbytes, nbytes)
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.bind(endpoint)
    conn.send(("ready", os.getpid(), slab_id))
    while True:
        identity, *_, payload = sock.recv_multipart()
        frame = p.decode(payload, p.REQUEST_TYPES)
        msg = frame.message
        if isinstance(msg, p.FetchRequest):
            handle = p.CpuSlabHandle(slab_id, nbytes, os.urandom(16), gen)
            reply = p.FetchReply(
                name=msg.name,
                version=msg.version or 1,
                lease_id=7,
                config_digest=p.digest_of(CONFIG),
                config=CONFIG,
                slab_id=slab_id,
                slab=handle,
                generation=table.read(slot),
                layout_digest=layout.digest,
                entries=entries,
                used_bytes=nbytes,
                live_slabs=[slab_id],
                epoch=msg.epoch or FAKE_EPOCH,
            )
        else:
            reply = _not_a_fetch(msg)
        sock.send_multipart([identity, b"", p.encode(reply, frame.request_id)])


class HostileChannel:
    """``channel_main`` in a process of its own; ``accepted()`` waits for its channel's next accept."""

    def __init__(self, endpoint: str, mode: str, fifo_path: str):
        from .procs import SPAWN

        self.endpoint = endpoint
        self._conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=channel_main, args=(child, endpoint, mode, fifo_path), daemon=True)
        self.proc.start()
        if not self._conn.poll(120):
            raise RuntimeError("hostile server did not start")
        _, self.pid, self.slab_id = self._conn.recv()

    def accepted(self, timeout: float = 60) -> int:
        assert self._conn.poll(timeout), "the hostile channel saw no connection"
        return self._conn.recv()[1]

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)


# ---- attackers of another uid, and raw peers ---------------------------------------------------


FORK = mp.get_context("fork")


def run_as(user, target, *args):
    """Fork a process that drops to ``user`` and runs ``target(conn, *args)``; returns (process, conn)."""
    parent, child = FORK.Pipe()

    def main():
        os.setgroups([])
        os.setgid(user[1])
        os.setuid(user[0])
        target(child, *args)

    proc = FORK.Process(target=main, daemon=True)
    proc.start()
    return proc, parent


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

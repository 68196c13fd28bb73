"""A fetch's copy out of a kept read-only mapping of the exporter's memfd (Note [a copy out of a mapping], shm.py).

Only a memfd sealed against every other write (``F_SEAL_FUTURE_WRITE`` beside the size seals), on shmem,
without holes in the copied range, is copied through a mapping, kept as long as the importer holds the
slab. A same-uid process can then neither truncate, punch, fill nor map it writable, so an importer
copying from it cannot fault and cannot accept bytes other than the exporter's; everything else is read
with ``pread`` as before. Real processes, the kernel's own answers; no timing (the speed is
benchmarks/destinations.py's and breakdown.py's).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import time

import pytest
import torch

import lora_ipc.core.backends.cpu as cpu
from lora_ipc import AdapterClient
from lora_ipc.core.backends.cpu import CpuBackend
from lora_ipc.core.memory import shm
from lora_ipc.core.memory.shm import (
    MAPPABLE_SEALS,
    SEALS,
    GenerationTable,
    SlabMapping,
    first_hole,
    mappable,
    memfds_of,
    on_shmem,
)

from . import models
from .helpers import TOKEN, assert_same_adapter, delivered
from .hostile import ATTACKER_BYTE, FALLOC_FL_KEEP_SIZE, HostileServer, fallocate, punch_holes
from .procs import SPAWN, ExporterProcess

ATTACKS = ("punch_hole", "shrink", "grow", "fallocate_grow", "pwrite", "map_writable", "mprotect_writable")


def _try_attacks(path: str) -> dict[str, str]:
    """Every way a same-uid process could change the memfd at ``path`` (a /proc/<pid>/fd link) under a
    reader's mapping: 'refused' or 'DONE' per attack."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    out: dict[str, str] = {}

    def attempt(name, action):
        try:
            action()
        except OSError:
            out[name] = "refused"
        else:
            out[name] = "DONE"

    def mprotect_writable():
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        try:
            if libc.mprotect(addr, size, mmap.PROT_READ | mmap.PROT_WRITE) != 0:
                raise OSError(ctypes.get_errno(), "mprotect")
        finally:
            libc.munmap(addr, size)

    try:
        attempt("punch_hole", lambda: punch_holes(fd, size))
        attempt("shrink", lambda: os.ftruncate(fd, 0))
        attempt("grow", lambda: os.ftruncate(fd, size * 2))
        attempt("fallocate_grow", lambda: fallocate(fd, 0, size, 1 << 20))
        attempt("pwrite", lambda: os.pwrite(fd, bytes([ATTACKER_BYTE]) * 4096, 0))
        attempt("map_writable", lambda: mmap.mmap(fd, size).close())
        attempt("mprotect_writable", mprotect_writable)
    finally:
        os.close(fd)
    return out


def _attacker_main(conn, path: str) -> None:
    conn.send(_try_attacks(path))


def _attack_from_another_process(path: str) -> dict[str, str]:
    here, there = SPAWN.Pipe()
    proc = SPAWN.Process(target=_attacker_main, args=(there, path), daemon=True)
    proc.start()
    try:
        assert here.poll(120), "attacker did not answer"
        return here.recv()
    finally:
        proc.join(30)


def _besieger_main(conn, pid: int, stop) -> None:
    """Attack every lora-ipc memfd of process ``pid`` (slabs and generation tables) until ``stop`` is set;
    report how many attacks were tried and which succeeded."""
    tried, done, told = 0, [], False
    while not stop.is_set():
        for link in list(memfds_of(pid).values()):
            try:
                outcome = _try_attacks(link)
            except OSError:  # the memfd went away between the listing and the open
                continue
            tried += len(outcome)
            done += [name for name, result in outcome.items() if result == "DONE"]
        if tried and not told:
            conn.send("attacking")
            told = True
        time.sleep(0.001)  # pacing (2 cores): not synchronisation
    conn.send((tried, done))


@pytest.fixture
def counted_map_copies(monkeypatch):
    """Counts the host copies of this process made through a slab's kept mapping (the sizes copied)."""
    made: list[int] = []
    original = SlabMapping.copy_into

    def counting(self, dst, offset):
        original(self, dst, offset)
        made.append(dst.numel())

    monkeypatch.setattr(SlabMapping, "copy_into", counting)
    return made


def _mapped_memfds(pid: int) -> list[str]:
    """This process's mappings of memfds of process ``pid`` (its slabs ``<pid>.…`` and table ``gen.<pid>.…``);
    slabs this process exported in earlier tests, not yet collected, are not counted."""
    names = (f"/memfd:lora-ipc.{pid}.", f"/memfd:lora-ipc.gen.{pid}.")
    with open("/proc/self/maps") as f:
        return [line.split(maxsplit=5)[-1].strip() for line in f if any(n in line for n in names)]


# ---- what the seals stop, asked of the kernel --------------------------------------------------------


def test_what_a_peer_does_to_a_new_memfd_before_its_seals_does_not_stay(monkeypatch):
    """Note [a new memfd is open to its owner's peers before it is sealed]: a same-uid process that opens a
    slab's memfd the moment it exists (the besieger below does, through /proc/<pid>/fd) resizes it before its
    size is sealed, or punches a hole before ``F_SEAL_FUTURE_WRITE``. Here that process's moves are made at
    exactly those moments: the resized memfd is dropped for a fresh one, the hole is filled again once no
    hole can be punched, and the slab an importer checks is whole (before: "not reserved", a failed fetch)."""
    nbytes = 1 << 20
    real_ftruncate, real_fcntl = os.ftruncate, fcntl.fcntl
    moves: list[str] = []

    def ftruncate(fd, size):
        real_ftruncate(fd, size)
        if not moves:  # the peer's resize, right after ours
            moves.append("grew")
            fallocate(fd, 0, size, 1 << 20)

    def fcntl_(fd, cmd, arg=0):
        if cmd == fcntl.F_ADD_SEALS and arg == MAPPABLE_SEALS:  # the peer's hole, just before the last seals
            moves.append("punched")
            punch_holes(fd, nbytes // 2, offset=nbytes // 4)
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(shm.os, "ftruncate", ftruncate)
    monkeypatch.setattr(shm.fcntl, "fcntl", fcntl_)
    fd, mm = shm.create_mapped("race.1", nbytes)
    monkeypatch.undo()
    try:
        assert moves == ["grew", "punched"]
        st = os.fstat(fd)
        assert st.st_size == nbytes and st.st_blocks * 512 >= nbytes
        seals = shm.check_sealed(fd, "race.1", nbytes)
        assert seals & MAPPABLE_SEALS == MAPPABLE_SEALS
        with pytest.raises(OSError):
            punch_holes(fd, 4096)  # and none can be punched now
    finally:
        mm.close()
        os.close(fd)


def test_a_slab_is_written_only_through_its_exporters_own_mapping():
    slab = CpuBackend().allocate(1 << 20)
    table = GenerationTable(16)
    try:
        assert fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS) & MAPPABLE_SEALS == MAPPABLE_SEALS
        outcome = _attack_from_another_process(f"/proc/{os.getpid()}/fd/{slab.fd}")
        assert outcome == dict.fromkeys(ATTACKS, "refused")
        # the generation counters, too: no other process can set one back under a torn copy
        outcome = _attack_from_another_process(f"/proc/{os.getpid()}/fd/{table.fd}")
        assert outcome == dict.fromkeys(ATTACKS, "refused")
        # the exporter itself can neither map it writable again nor give pages back through the mapping it
        # holds (MADV_REMOVE punches a hole) ...
        with pytest.raises(PermissionError):
            mmap.mmap(slab.fd, 1 << 20)
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        assert libc.madvise(slab.tensor.data_ptr(), 1 << 20, mmap.MADV_REMOVE) == -1
        assert ctypes.get_errno() == errno.EPERM
        # ... and publishes as ever through the mapping it held before the seal
        slab.tensor[:4096].fill_(0x5A)
        table.bump(3)
        assert os.pread(slab.fd, 4096, 0) == b"\x5a" * 4096 and table.read(3) == 1
        assert os.fstat(slab.fd).st_blocks * 512 >= 1 << 20
    finally:
        slab.close()
        table.close()


def test_a_kernel_without_the_write_seal_gets_the_plain_seals_and_its_importers_pread(monkeypatch):
    monkeypatch.setattr(shm, "MAPPABLE_SEALS", SEALS | 0x4000)  # a seal this kernel does not know: EINVAL
    fd, mm = shm.create_mapped("no-future-write", 1 << 16)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        assert seals & SEALS == SEALS and not seals & shm.F_SEAL_FUTURE_WRITE
        assert not mappable(fd, seals)
        mm[:4] = b"abcd"  # the exporter's mapping still works
        assert os.pread(fd, 4, 0) == b"abcd"
    finally:
        mm.close()
        os.close(fd)


def test_only_memfds_on_shmem_with_every_seal_are_mappable(tmp_path):
    slab = CpuBackend().allocate(1 << 16)
    try:
        assert mappable(slab.fd, fcntl.fcntl(slab.fd, fcntl.F_GET_SEALS))
        assert not mappable(slab.fd, SEALS)  # without F_SEAL_FUTURE_WRITE: pread
    finally:
        slab.close()
    regular = tmp_path / "file"
    regular.write_bytes(b"x" * 4096)
    with open(regular, "rb") as f:
        assert not on_shmem(f.fileno())
    try:
        huge = os.memfd_create("lora-ipc.huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError:
        pytest.skip("no hugetlbfs memfds on this kernel")
    try:
        assert not on_shmem(huge)  # a fault on a hole there is a SIGBUS when the pool is empty
    finally:
        os.close(huge)


def test_first_hole_counts_reserved_pages_never_written_as_holes():
    page = mmap.PAGESIZE
    fd = os.memfd_create("lora-ipc.holes", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 16 * page)
        os.posix_fallocate(fd, 0, 16 * page)
        assert first_hole(fd, 0) == 0  # reserved but never written: a read fault would clear it, not map it
        os.pwrite(fd, b"x" * (3 * page), 0)
        assert first_hole(fd, 0) == 3 * page
        os.pwrite(fd, b"x" * (13 * page), 3 * page)
        assert first_hole(fd, 0) == 16 * page
        fallocate(fd, 2 | FALLOC_FL_KEEP_SIZE, 5 * page, page)  # punched
        assert first_hole(fd, 0) == 5 * page and first_hole(fd, 6 * page) == 16 * page
    finally:
        os.close(fd)


# ---- fetches ------------------------------------------------------------------------------------------


def test_a_fetch_copies_through_a_kept_mapping_released_with_the_slab(counted_map_copies):
    """One read-only mapping per imported slab, made by the first fetch and kept by the later ones (no mapping
    per copy); it goes when the client lets go of the slab."""
    exporter = ExporterProcess()
    try:
        version = exporter.call("publish_random", "policy", 3)
        with AdapterClient(exporter.endpoint, timeout_s=30) as client:
            for _ in range(3):
                adapter = client.fetch("policy")
                assert adapter.version == version
                assert_same_adapter(adapter.tensors, models.random_adapter(3))
                mapped = _mapped_memfds(exporter.pid)
                assert len(mapped) == 1 and f"lora-ipc.{exporter.pid}." in mapped[0]
            assert len(counted_map_copies) == 3
        assert _mapped_memfds(exporter.pid) == []  # closing the client released the import and its mapping
    finally:
        exporter.close()


def test_a_share_without_the_write_seal_is_read_with_pread(counted_map_copies, short_dir):
    """A memfd sealed only against resizing (an older exporter, or a peer's) is copied with pread."""
    hostile = HostileServer(f"ipc://{short_dir}/plain.sock", "reserved", nbytes=4 << 20)
    try:
        with AdapterClient(hostile.endpoint, timeout_s=30) as client:
            (tensor,) = client.fetch("policy").tensors.values()
            assert bool((tensor == ATTACKER_BYTE).all())
        assert counted_map_copies == []
    finally:
        hostile.kill()


def test_holes_hidden_from_st_blocks_are_read_with_pread_never_mapped(counted_map_copies, short_dir):
    """A hostile exporter's memfd carries every seal and looks fully reserved, but a quarter of it is a hole
    (its blocks moved past the end). Read through a mapping, each page of the hole would be allocated for the
    reader; read with pread, the hole reads as zeros and costs nothing."""
    nbytes = 4 << 20
    hostile = HostileServer(f"ipc://{short_dir}/holes.sock", "hidden_holes", nbytes=nbytes)
    try:
        before = hostile.call("blocks")
        with AdapterClient(hostile.endpoint, timeout_s=30) as client:
            for _ in range(2):
                (tensor,) = client.fetch("policy").tensors.values()
                quarter = nbytes // 4
                assert bool((tensor[:quarter] == ATTACKER_BYTE).all())
                assert bool((tensor[quarter : 2 * quarter] == 0).all())
                assert bool((tensor[2 * quarter :] == ATTACKER_BYTE).all())
        assert counted_map_copies == []
        assert hostile.call("blocks") == before  # nothing allocated on the exporter's behalf
    finally:
        hostile.kill()


def test_attacks_while_an_importer_copies_neither_succeed_nor_tear(counted_map_copies):
    """An exporter publishes continuously (version v: every value v); another same-uid process attacks each of
    its memfds over and over (truncate, grow, punch, fill, map writable) while this process fetches through
    mappings: every attack is refused, no fetch faults, every fetched adapter is one whole version."""
    exporter = ExporterProcess(keep=2)
    here, there = SPAWN.Pipe()
    stop = SPAWN.Event()
    besieger = SPAWN.Process(target=_besieger_main, args=(there, exporter.pid, stop), daemon=True)
    try:
        exporter.call("stream_constant", "policy")
        besieger.start()
        assert here.poll(120) and here.recv() == "attacking"
        with AdapterClient(exporter.endpoint, timeout_s=60) as client:
            versions = []
            for _ in range(40):
                adapter = client.fetch("policy")
                versions.append(adapter.version)
                for name, t in adapter.tensors.items():
                    assert bool((t == adapter.version).all()), f"v{adapter.version} {name} is torn"
        stop.set()
        assert here.poll(120), "the attacker did not report"
        tried, done = here.recv()
        assert tried > 0 and done == []
        assert len(counted_map_copies) >= 40 and len(set(versions)) > 1  # a copy lost to a reuse is made again
    finally:
        stop.set()
        besieger.join(30)
        if besieger.is_alive():
            besieger.kill()
        exporter.kill()


def test_a_staged_copy_into_other_memory_maps_each_chunk(counted_map_copies):
    """copy_staged (the host fallback into device memory; here into host memory) reads through the same
    path: one copy out of the kept mapping per bounce chunk."""
    slab = CpuBackend().allocate(3 << 20)
    try:
        slab.tensor.copy_(torch.arange(3 << 20, dtype=torch.int64).remainder(251).to(torch.uint8))
        from lora_ipc.core.backends import open_slab
        from lora_ipc.core.protocol import CpuSlabHandle

        imported = open_slab(CpuSlabHandle(slab.slab_id, slab.nbytes, TOKEN), delivered(slab.fd))
        try:
            dst = torch.zeros(3 << 20, dtype=torch.uint8)
            cpu.copy_staged(imported.read_into, dst, chunk=1 << 20)
            assert torch.equal(dst, slab.tensor)
            assert counted_map_copies == [1 << 20] * 3
        finally:
            imported.close()
    finally:
        slab.close()

"""Sealed shared memory: memfds that cannot shrink, reserved up front, handed to peers as descriptors.

Note [why memfds, not files in /dev/shm]
    A mapping of a file that another process truncates faults with SIGBUS on the next access, and a
    sparse file on a full tmpfs faults the same way on first write. Both killed processes when slabs
    were files in /dev/shm. A memfd created here is sized, reserved with ``posix_fallocate`` (a full
    machine shows up as an error at allocation, never as a fault later) and sealed with
    ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``: nobody, not even its creator, can change its size
    again, so every mapping of it stays valid for its whole life. An importer checks the seals, the
    owner, the size, the memfd's name and that every byte of it is reserved (``st_blocks``) on the
    descriptor it opened, and reads it with ``pread`` or through a read-only mapping of it it keeps
    (Note [a copy out of a mapping]).
    A memfd has no path another user could pre-create, replace by a symlink or leave behind: it goes
    away with the last process that holds it, however that process exits.

    Peers receive its descriptor by the descriptor channel (``SCM_RIGHTS``, channels/fdchannel.py), never
    by a path: nothing here opens another process's descriptor through ``/proc``.

Note [the reader never pays for the exporter's memory]
    A read fault through a mapping of a hole in a memfd allocates the page, charged to the reader:
    a hostile exporter's sparse 1 GiB slab cost its importer 1 GiB of shared memory on top of its own
    copy. Our exporters reserve every page (``posix_fallocate``), so an importer refuses a memfd whose
    allocated blocks do not cover its size, and it copies with ``pread``, which reads a hole (one
    punched after that check, say) as zeros without allocating anything. A fetch costs the reader
    its own copy and nothing else.

Note [a copy out of a mapping]
    ``pread`` out of shmem costs the kernel's per-4-KiB-page work on top of the copy (1.2-2.5x a
    user-space memcpy on a 2-core VM); a mapping made for one copy costs a fault per 16 pages
    (fault-around) and, at the end, the unmap of every page instead, which is no better. An importer
    therefore maps a slab once, read-only, and keeps that mapping as long as it keeps the slab's
    descriptor (:class:`SlabMapping`): its first copy faults the pages in, every later copy is a plain
    ``copy_`` split across torch's threads, as fast as a copy between two warm buffers (measured in
    docs/development/benchmarks.md, "The CPU copy at its floor").
    Its risks and their answers:

    - SIGBUS: an access past the end of the file (a truncation) or of a page another process freed (a hole
      punched with ``fallocate``/``MADV_REMOVE``). ``F_SEAL_SHRINK`` stops the first; the second is stopped
      by ``F_SEAL_FUTURE_WRITE``, which our exporter adds once it holds its own writable mapping
      (:func:`create_mapped`): shmem then refuses hole punching (EPERM), ``write(2)``, ``ftruncate`` and any
      new writable mapping, to every process, the exporter included (tests/test_map_copy.py attacks each
      from a same-uid process). With ``F_SEAL_SEAL`` the set is final, so seals read once hold for the
      descriptor's life; :func:`check_sealed` reads them *before* it reads the size and blocks.
    - the reader paying for the exporter's memory (Note above): a read fault on a hole allocates a page.
      A hostile exporter could leave holes before sealing, hidden from ``st_blocks`` by pages allocated past
      the end, so the range is checked with ``SEEK_HOLE`` (:func:`first_hole`) before it is first mapped:
      hole-free stays true once the seals forbid punching (a fallocated page never written also reads as a
      hole there: refused, the copy falls back to ``pread``).
    - a hugetlbfs memfd (``MFD_HUGETLB`` reads back the same ``/memfd:`` name): a fault on a hole there is a SIGBUS when
      the pool is empty. Only a memfd on the same internal shmem mount as one this process creates is mapped
      (:func:`on_shmem`).
    - bytes changing under the copy: only the exporter's own writable mapping can still write, which is how
      it publishes; it bumps the slab's generation before each write, and the importer compares the
      generation after its copy (client.py), exactly as for ``pread``, which reads the same page-cache
      pages. A mapping makes no torn read acceptable that ``pread`` did not.

    The mapping is read-only and kept no longer than the descriptor, which holds the same pages alive on
    its own: mapping them allocates nothing and charges nothing to the reader (the pages are the
    exporter's, written before the reader first faults them). Nothing the mapping holds is handed out:
    every view of it lives inside one copy. Without every one of these seals (a peer's memfd, a kernel
    without ``F_SEAL_FUTURE_WRITE``) or if the mapping fails, the copy is a ``pread``.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..errors import BackendError
from ..protocol.tables import (
    GENERATION_COUNTER,
    GENERATION_PREFIX,
    GENERATION_SLOTS,
    board_offset,
    generation_offset,
    generation_table_bytes,
    generation_table_name,
)
from .board import BOARD_SUPPORTED, BoardWriter, NewestEntry, read_entry

MEMFD_PREFIX = "lora-ipc."
SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)  # Linux 5.1; Python names it from 3.9
# what an importer needs before it copies through a mapping (Note [a copy out of a mapping])
MAPPABLE_SEALS = SEALS | F_SEAL_FUTURE_WRITE


RESIZED_TRIES = 4  # fresh memfds tried when another process resizes each one before its size is sealed


def _reserved(name: str, nbytes: int) -> int:
    """A new memfd named ``lora-ipc.<name>`` of exactly ``nbytes``, every page reserved, sealed against
    resizing (``F_SEAL_SHRINK | F_SEAL_GROW``) but not yet with ``F_SEAL_SEAL``.

    Note [a new memfd is open to its owner's peers before it is sealed]
        A same-uid process can open any memfd of ours through ``/proc/<pid>/fd`` the moment it exists
        (tests/test_map_copy.py's besieger does, in a loop). Its size is therefore sealed right after it is
        set, and checked once sealed (a resize that came in between is refused here); a hole punched before
        ``F_SEAL_FUTURE_WRITE`` is filled again by :func:`create_mapped` once that seal is on. Bytes written
        before then are overwritten by the exporter's pack, which is the only writer afterwards."""
    for _ in range(RESIZED_TRIES):
        try:
            fd = os.memfd_create(MEMFD_PREFIX + name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except OSError as exc:
            raise BackendError(f"cannot create shared memory {name!r}: {exc}") from None
        try:
            os.ftruncate(fd, nbytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            if os.fstat(fd).st_size != nbytes:  # resized by another process in between: a fresh one
                os.close(fd)
                continue
            os.posix_fallocate(fd, 0, nbytes)  # reserve every page now: ENOSPC/ENOMEM here, never SIGBUS later
        except OSError as exc:
            os.close(fd)
            raise BackendError(f"cannot reserve {nbytes} bytes of shared memory for {name!r}: {exc}") from None
        return fd
    raise BackendError(
        f"shared memory {name!r} was resized by another process before it was sealed, {RESIZED_TRIES} times"
    )


def _seal(fd: int, name: str, seals: int) -> None:
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    except OSError as exc:
        os.close(fd)
        raise BackendError(f"cannot seal shared memory {name!r}: {exc}") from None


def create_sealed(name: str, nbytes: int) -> int:
    """A new memfd named ``lora-ipc.<name>`` of exactly ``nbytes``, reserved and sealed; returns its fd."""
    fd = _reserved(name, nbytes)
    _seal(fd, name, SEALS)
    return fd


def create_mapped(name: str, nbytes: int) -> tuple[int, mmap.mmap]:
    """:func:`create_sealed`, and a writable shared mapping of it that stays the only way to write it: sealed
    with ``F_SEAL_FUTURE_WRITE`` too once mapped, so no other process (and no later call of this one) can
    write, punch or map it writable, and importers may copy through a mapping (Note [a copy out of a
    mapping]). A kernel without that seal gets the plain seals (its importers ``pread``)."""
    fd = _reserved(name, nbytes)
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError) as exc:
        os.close(fd)
        raise BackendError(f"cannot map {nbytes} bytes of shared memory: {exc}") from None
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, MAPPABLE_SEALS)
    except OSError:  # EINVAL: a kernel before 5.1 does not know the seal
        _seal(fd, name, SEALS)
        return fd, mm
    try:  # no hole can be punched from now on: fill any punched before (Note [a new memfd is open ...])
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        mm.close()
        os.close(fd)
        raise BackendError(f"cannot reserve {nbytes} bytes of shared memory for {name!r}: {exc}") from None
    return fd, mm


def map_fd(fd: int, nbytes: int, *, writable: bool) -> torch.Tensor:
    """A uint8 tensor over ``nbytes`` of ``fd`` (shared mapping; read-only unless ``writable``)."""
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
    except (OSError, ValueError) as exc:
        raise BackendError(f"cannot map {nbytes} bytes of shared memory: {exc}") from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": we never write through a read-only map
        return torch.frombuffer(mm, dtype=torch.uint8)


def open_regular(path: str, flags: int = os.O_RDONLY, *, follow: bool = True) -> int:
    """Open ``path`` only if it is a regular file of this user; never blocks.

    Note [open nothing a peer chose before knowing what it is]
        ``open`` of a FIFO without a writer blocks for ever, and opening a device runs its driver. A path
        a peer named (a CUDA ref-counter file, refcount.py), or our own ``/proc/self/fd/<n>`` entry of a
        descriptor a peer sent (:func:`reopen_sealed`), is therefore first opened with ``O_PATH`` (which
        opens nothing: no driver, no FIFO wait), checked with ``fstat`` (a regular file owned by this
        user), and only then reopened through our own ``/proc/self/fd`` entry of that very inode, with
        ``O_NONBLOCK`` as a second guard. BackendError for anything else. ``follow=False``: a symlink is
        refused too (``/proc/self/fd`` entries are links that must be followed)."""
    try:
        pinned = os.open(path, os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW))
    except OSError as exc:
        raise BackendError(f"{path} is gone or not ours: {exc}") from None
    try:
        check_regular(pinned, path)
        try:
            return os.open(f"/proc/self/fd/{pinned}", flags | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendError(f"cannot open {path}: {exc}") from None
    finally:
        os.close(pinned)


def check_regular(fd: int, what: str) -> None:
    """``fd`` is a regular file (a memfd is one) owned by this user: never a FIFO, socket or device."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise BackendError(f"cannot inspect {what}: {exc}") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackendError(f"{what} is not a regular file ({stat.filemode(st.st_mode)[0]!r}): refused")
    if st.st_uid != os.getuid():
        raise BackendError(f"{what} is not owned by this user (uid {st.st_uid})")


def reopen_sealed(fd: int, name: str, min_bytes: int) -> int:
    """A read-only descriptor of the memfd ``fd`` (one that came by SCM_RIGHTS, possibly writable), after
    checking that ``fd`` is our sealed memfd ``lora-ipc.<name>``: nothing is opened before that. ``fd``
    is closed once this worked (left to the caller otherwise)."""
    check_sealed(fd, name, min_bytes)
    read_only = open_regular(f"/proc/self/fd/{fd}")
    try:
        check_sealed(read_only, name, min_bytes)
    except BaseException:
        os.close(read_only)
        raise
    os.close(fd)
    return read_only


def check_sealed(opened: int, name: str, min_bytes: int) -> int:
    """The checks an importer makes on a descriptor it received by SCM_RIGHTS (fdchannel.py): our memfd
    ``lora-ipc.<name>``, owned by this user, sealed, large enough, every byte reserved.
    Returns its seals (final: ``F_SEAL_SEAL`` is among them)."""
    expected = f"/memfd:{MEMFD_PREFIX}{name} (deleted)"
    try:
        target = os.readlink(f"/proc/self/fd/{opened}")
    except OSError as exc:
        raise BackendError(f"cannot inspect the descriptor of shared memory {name!r}: {exc}") from None
    # what we hold, read back from our own descriptor (a recycled pid cannot fool this)
    if target != expected:
        raise BackendError(f"descriptor {target[:200]!r} is not lora-ipc shared memory {name!r}")
    try:
        # seals first: a set that includes F_SEAL_SEAL is final, so the size and blocks read below cannot
        # have been changed by a seal added after they were read (Note [a copy out of a mapping])
        seals = fcntl.fcntl(opened, fcntl.F_GET_SEALS)
        st = os.fstat(opened)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise BackendError(f"shared memory {name!r} is not owned by this user (uid {st.st_uid})")
        if seals & SEALS != SEALS:
            raise BackendError(f"shared memory {name!r} is not sealed against resizing")
        if st.st_size < min_bytes:
            raise BackendError(f"shared memory {name!r} has {st.st_size} bytes, the handle says {min_bytes}")
        if st.st_blocks * 512 < st.st_size:
            raise BackendError(
                f"shared memory {name!r} is not reserved ({st.st_blocks * 512} of {st.st_size} "
                "bytes allocated): its reader would pay for the exporter's pages"
            )
    except OSError as exc:
        raise BackendError(f"cannot check shared memory {name!r}: {exc}") from None
    return seals


READ_CHUNK = 1 << 30  # a single read(2) returns at most ~2 GiB
# reads this large are split across threads (pread releases the GIL). A fetch reads into a recycled, warm
# buffer (host_buffers.py): at 20 MB one thread was as fast or faster on a busy 2-core machine (the hand-off
# costs what it saves), at 80 MB two threads took 66 ms p50 against one thread's 90 ms
PARALLEL_READ_BYTES = 48 << 20
_read_pool: ThreadPoolExecutor | None = None
_read_pool_lock = threading.Lock()


def _read_range(fd: int, dst: memoryview, offset: int) -> None:
    done = 0
    while done < len(dst):
        try:
            n = os.preadv(fd, [dst[done : done + READ_CHUNK]], offset + done)
        except OSError as exc:
            raise BackendError(f"cannot read shared memory: {exc}") from None
        if n <= 0:
            raise BackendError(f"shared memory ended after {offset + done} bytes; {len(dst) - done} more expected")
        done += n


def read_exact(fd: int, dst: memoryview, offset: int) -> None:
    """Fill ``dst`` (a writable byte view) from ``fd`` at ``offset`` with ``pread``; a short file is a BackendError.

    A large read is split across a few threads: most of its time goes to faulting in ``dst``'s fresh pages
    (the kernel's copy into newly allocated memory), which parallelises; measured on 2 cores for 80 MiB
    into a fresh buffer, 53 ms on one thread, 31 ms on two."""
    parts = min(4, os.cpu_count() or 1)
    if len(dst) < PARALLEL_READ_BYTES or parts < 2:
        _read_range(fd, dst, offset)
        return
    global _read_pool
    with _read_pool_lock:
        if _read_pool is None:
            _read_pool = ThreadPoolExecutor(parts, thread_name_prefix="lora-ipc-read")
    step = -(-len(dst) // parts)
    futures = [
        _read_pool.submit(_read_range, fd, dst[start : start + step], offset + start)
        for start in range(0, len(dst), step)
    ]
    for future in futures:
        future.result()  # the first failure (BackendError) is raised once every part has finished


_shmem_dev: int | None = None


def on_shmem(fd: int) -> bool:
    """``fd`` lives on the kernel's internal shmem mount, as a memfd this process creates does (a hugetlbfs
    memfd, ``MFD_HUGETLB``, does not: a fault on a hole there can SIGBUS)."""
    global _shmem_dev
    try:
        if _shmem_dev is None:
            probe = os.memfd_create(MEMFD_PREFIX + "probe", os.MFD_CLOEXEC)
            try:
                _shmem_dev = os.fstat(probe).st_dev
            finally:
                os.close(probe)
        return os.fstat(fd).st_dev == _shmem_dev
    except OSError:
        return False


def mappable(fd: int, seals: int) -> bool:
    """Whether copies out of ``fd`` (with the final ``seals`` :func:`check_sealed` returned) may go through
    a kept mapping (Note [a copy out of a mapping]); the caller still checks each range with
    :func:`first_hole`."""
    return seals & MAPPABLE_SEALS == MAPPABLE_SEALS and on_shmem(fd)


def first_hole(fd: int, start: int) -> int:
    """Where the first hole (or reserved page never written) of ``fd`` at or after ``start`` begins: bytes
    before it read through a mapping allocate nothing. Only lasting once ``F_SEAL_FUTURE_WRITE`` forbids
    punching new holes (Note [a copy out of a mapping]); ``start`` where that cannot be told."""
    try:
        return os.lseek(fd, start, os.SEEK_HOLE)
    except OSError:  # ENXIO (start at or past the end), or no SEEK_HOLE here
        return start


class SlabMapping:
    """A read-only shared mapping of a sealed memfd, kept for the life of the reader's import of it (Note [a copy
    out of a mapping]). :meth:`copy_into` copies a range out of it; only ranges before :func:`first_hole` may be
    asked (the caller checks). Nothing it maps is handed out: every view of it lives inside one copy."""

    def __init__(self, fd: int, nbytes: int):
        self.nbytes = nbytes
        self._mm: mmap.mmap | None = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        # numpy holds a buffer export of the mapping (torch.frombuffer does not): close() cannot unmap it while
        # the array (and the tensor over it) is alive, so no tensor ever points at unmapped memory
        array = np.frombuffer(self._mm, dtype=np.uint8)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "non-writable array": only read
            self._source: torch.Tensor | None = torch.from_numpy(array)

    def copy_into(self, dst: torch.Tensor, offset: int) -> None:
        """Fill ``dst`` (uint8, 1-D, contiguous, host memory) with the bytes at ``offset``: torch's ``copy_``,
        split across its threads; the mapping's pages are faulted in by the first copy and stay mapped."""
        source = self._source
        if source is None:
            raise BackendError("copy out of a closed mapping")
        if offset < 0 or offset + dst.numel() > self.nbytes:
            raise BackendError(f"bytes [{offset}, {offset + dst.numel()}) lie outside a {self.nbytes}-byte mapping")
        dst.copy_(source[offset : offset + dst.numel()])

    def close(self) -> None:
        """Unmap (at once, or when the last view made by a copy in flight on another thread goes)."""
        self._source = None  # the tensor, then the array: the mapping's only exports
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a copy on another thread still holds a view: unmapped when it lets go
                pass


def map_slab(fd: int, nbytes: int) -> SlabMapping | None:
    """A :class:`SlabMapping` of ``fd`` (a descriptor :func:`mappable`), or None if the mapping was refused
    (the copies are then ``pread``)."""
    if nbytes <= 0:
        return None
    try:
        return SlabMapping(fd, nbytes)
    except (OSError, ValueError):
        return None


def memfds_of(pid: int) -> dict[str, str]:
    """The lora-ipc memfds (slabs and generation tables) process ``pid`` holds, for leak checks (the tests):
    ``{memfd name as /proc shows it: a /proc/<pid>/fd/<fd> path to it}``, one entry per memfd however many
    descriptors point at it (Python's mmap holds a dup). Empty once the process is gone. It reads the links'
    names only and opens nothing: no import goes through these paths (the descriptor channel, fdchannel.py)."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(f"/memfd:{MEMFD_PREFIX}"):
                    found.setdefault(target, f"/proc/{pid}/fd/{fd}")
    return found


# --------------------------------------------------------------------------------------------
# generation counters: how an importer learns that a slab was reused under its copy
# --------------------------------------------------------------------------------------------


class GenerationTable:
    """Exporter side: one 8-byte reuse counter per slab in a sealed memfd (``slots`` counters; the layout is
    ``lora_ipc.core.protocol.tables``'s).

    The store bumps a slab's counter *before* it writes a new version into the slab, and a fetch
    reply carries the counter's value for the version it leases. The importer reads the counter
    again after its copy is complete: unchanged means no new write had started when the copy ended.
    """

    def __init__(self, slots: int = GENERATION_SLOTS, board_entries: int = 0):
        self.slots = slots
        self.name = generation_table_name(os.getpid(), os.urandom(4))
        # the newest-version board after the counters (board.py), where this machine can post one
        self.board_entries = board_entries if BOARD_SUPPORTED else 0
        # only this mapping can write the counters: a same-uid process that opens the table cannot set one back
        counters_end = generation_table_bytes(slots)
        board_start = board_offset(slots, 0)
        size = board_offset(slots, self.board_entries) if self.board_entries else counters_end
        self.fd, mm = create_mapped(self.name, size)
        # native int64 ("q"): GENERATION_COUNTER's little-endian on every machine lora_ipc runs on (x86-64, aarch64)
        self._counters = memoryview(mm)[:counters_end].cast("q")
        self.board = BoardWriter(memoryview(mm)[board_start:], self.board_entries) if self.board_entries else None
        self._free = list(range(slots - 1, -1, -1))
        self._lock = threading.Lock()

    def board_entry_offset(self, index: int) -> int | None:
        """Where board entry ``index`` lies in the table (None: this table has no such entry)."""
        return board_offset(self.slots, index) if 0 <= index < self.board_entries else None

    def take_slot(self) -> int:
        with self._lock:
            if not self._free:
                raise BackendError(f"all {self.slots} slab generation counters are in use")
            return self._free.pop()

    def free_slot(self, slot: int) -> None:
        with self._lock:
            self._free.append(slot)

    def bump(self, slot: int) -> int:
        self._counters[slot] += 1
        return self._counters[slot]

    def read(self, slot: int) -> int:
        return self._counters[slot]

    def close(self) -> None:
        if self.board is not None:
            self.board.withdraw()  # readers of the board ask the server from now on (which says it is closed)
        os.close(self.fd)  # the mapping stays valid until the memoryview is collected


class GenerationReader:
    """Importer side: reads counters of one exporter's table with ``pread`` (no mapping at all), through the
    table's descriptor that came by the descriptor channel with a slab (fdchannel.py). Owns ``received``
    from the start: it is closed here if the checks refuse it."""

    def __init__(self, received: int, table_name: str):
        try:
            if not table_name.startswith(GENERATION_PREFIX):
                raise BackendError(f"{table_name!r} is not a lora-ipc generation table")
            check_sealed(received, table_name, GENERATION_COUNTER.size)
            self.nbytes = os.fstat(received).st_size
        except BaseException:
            os.close(received)
            raise
        self.fd = received

    def read(self, slot: int) -> int:
        at = generation_offset(slot)
        if at + GENERATION_COUNTER.size > self.nbytes:
            raise BackendError(f"generation slot {slot} lies outside the exporter's table")
        return GENERATION_COUNTER.unpack(os.pread(self.fd, GENERATION_COUNTER.size, at))[0]

    def newest_at(self, offset: int) -> NewestEntry | None:
        """The board entry at byte ``offset`` of the table, if complete and well formed (board.py)."""
        return read_entry(self.fd, offset, self.nbytes) if self.fd >= 0 else None

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # a later read finds no descriptor, never a reused fd number
        if fd >= 0:
            os.close(fd)

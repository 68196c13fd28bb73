"""The newest-version board: one entry per name saying where its newest version lies, in shared memory.

The exporter's store writes a name's entry each time it adds a version (store.py); a client reads it instead
of asking when it already holds everything the entry names (Note [a fetch without a request], client.py).
The entries live after the generation counters in the generation table's memfd (byte layout:
``lora_ipc.core.protocol.tables``), so they reach an importer with the table, by the descriptor channel,
sealed against every writer but the exporter's own mapping.

Note [the board's sequence lock]
    An entry is a sequence lock: :meth:`BoardWriter.post` makes ``seq`` odd, writes the fields, makes it
    even again; :func:`read_entry` reads ``seq``, the fields and ``seq`` again, each with its own ``pread``,
    and takes the entry only if both are the same even, non-zero number. x86-64 keeps stores in program
    order and loads in program order (TSO), and every step here is a separate store or syscall, so a reader
    that sees the second ``seq`` unchanged has seen the fields of that one write. Other architectures (aarch64)
    may reorder the exporter's stores without a fence, which Python cannot issue: there no board is written
    (:data:`BOARD_SUPPORTED`), every entry stays 0 and every fetch asks, as before.
    An entry that names a version says nothing on its own about the slab's bytes: the client copies, then
    checks the slab's generation against the entry's, exactly as it checks a fetch reply's.
"""

from __future__ import annotations

import os
import platform
import struct
from dataclasses import dataclass

from ..protocol.tables import BOARD_ENTRY, BOARD_ENTRY_BYTES, BOARD_SEQ, BOARD_SLAB_ID_BYTES

#: where the exporter's plain stores reach other processes in program order (Note [the board's sequence lock])
BOARD_SUPPORTED = platform.machine().lower() in ("x86_64", "amd64")


@dataclass(frozen=True)
class NewestEntry:
    """Where a name's newest version lies: ``slab_id`` at reuse count ``generation``, ``used_bytes`` long, laid
    out and configured as the digests say."""

    version: int
    generation: int
    used_bytes: int
    layout_digest: bytes
    config_digest: bytes
    slab_id: str


class BoardWriter:
    """Exporter side: the board region of the generation table's writable mapping (``entries`` entries)."""

    def __init__(self, region: memoryview, entries: int):
        if len(region) < entries * BOARD_ENTRY_BYTES:
            raise ValueError(f"a board of {entries} entries needs {entries * BOARD_ENTRY_BYTES} bytes")
        self.entries = entries
        self._region = region
        self._seqs = region.cast("Q")  # native uint64: little-endian on x86-64, the only place a board is written

    def post(self, index: int, entry: NewestEntry) -> None:
        """Entry ``index`` names ``entry`` (Note [the board's sequence lock]); a slab id too long for the entry
        leaves it withdrawn (the reader asks)."""
        at = index * BOARD_ENTRY_BYTES
        slot = at // BOARD_SEQ.size
        seq = self._seqs[slot]
        self._seqs[slot] = seq | 1  # odd: being written (or withdrawn)
        slab_id = entry.slab_id.encode()
        if len(slab_id) > BOARD_SLAB_ID_BYTES:
            return
        fields = BOARD_ENTRY.pack(
            0,
            entry.version,
            entry.generation,
            entry.used_bytes,
            entry.layout_digest,
            entry.config_digest,
            len(slab_id),
            slab_id,
        )
        self._region[at + BOARD_SEQ.size : at + BOARD_ENTRY.size] = fields[BOARD_SEQ.size :]
        self._seqs[slot] = (seq | 1) + 1  # even again: complete

    def withdraw(self) -> None:
        """Every entry odd for good: readers ask the server (the store closed)."""
        for index in range(self.entries):
            slot = index * BOARD_ENTRY_BYTES // BOARD_SEQ.size
            self._seqs[slot] |= 1


def read_entry(fd: int, offset: int, table_bytes: int) -> NewestEntry | None:
    """The entry at ``offset`` of the table ``fd`` (``table_bytes`` long) if it is complete and well formed;
    None if it is being written, withdrawn, never written, out of the table or malformed (the caller asks)."""
    if offset < 0 or offset % BOARD_ENTRY_BYTES or offset + BOARD_ENTRY_BYTES > table_bytes:
        return None
    try:
        (first,) = BOARD_SEQ.unpack(os.pread(fd, BOARD_SEQ.size, offset))
        body = os.pread(fd, BOARD_ENTRY.size, offset)
        (second,) = BOARD_SEQ.unpack(os.pread(fd, BOARD_SEQ.size, offset))
    except (OSError, struct.error):  # a closed descriptor, a short read: ask
        return None
    if first != second or first & 1 or first == 0 or len(body) != BOARD_ENTRY.size:
        return None
    _, version, generation, used_bytes, layout_digest, config_digest, length, slab_id = BOARD_ENTRY.unpack(body)
    if version <= 0 or used_bytes <= 0 or not 0 < length <= BOARD_SLAB_ID_BYTES:
        return None
    try:
        name = slab_id[:length].decode()
    except UnicodeDecodeError:
        return None
    return NewestEntry(version, generation, used_bytes, layout_digest, config_digest, name)

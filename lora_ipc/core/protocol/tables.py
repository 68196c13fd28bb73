"""Shared-memory tables two processes read and write: their layouts, byte for byte.

The generation table (``lora_ipc.core.memory.shm.GenerationTable`` writes it, ``GenerationReader`` reads it)
is a sealed memfd named ``gen.<pid>.<8 hex digits>`` (:data:`GENERATION_PREFIX`), holding one little-endian
int64 reuse counter per slab; a handle's ``GenerationSlot`` names the memfd (``pid``, ``fd``, ``table``) and
the slot. The exporter adds 1 before it writes a slab; the importer ``pread``s the slot after its copy::

    offset  0        8        16                    8*slot        8*(slots-1)   8*slots
            +--------+--------+-------- ... --------+--------+ ... +--------+
            | slot 0 | slot 1 |                     | slot   |     | last   |
            +--------+--------+-------- ... --------+--------+ ... +--------+
              int64 little-endian, the slab's reuse count (0 before first use)

After the counters, the same memfd holds the *newest-version board* (``lora_ipc.core.memory.board``): one
256-byte entry per name the store has published (``board_entries`` of them, the store's ``max_names``),
saying where that name's newest version is. A fetch reply names its entry by byte offset in the table
(``FetchReply.board_entry``); a client that holds the slab, layout and config an entry names copies the
version without asking (Note [a fetch without a request], client.py)::

    offset  board + 256*i          (board: 8*slots rounded up to a multiple of 256)
            +--------+---------+------------+------------+---------------+---------------+-----+---------+-------+
            | seq    | version | generation | used_bytes | layout digest | config digest | len | slab id | 0 ... |
            +--------+---------+------------+------------+---------------+---------------+-----+---------+-------+
              uint64   uint64    int64        uint64       16 bytes        16 bytes        u8    len bytes  to 256
              (all little-endian)

``seq`` is a sequence lock: the exporter makes it odd, writes the rest, makes it even again. A reader reads
``seq``, the rest, then ``seq`` again, and uses the entry only if both reads are the same even, non-zero
number. 0 is an entry never written; an entry left odd is withdrawn (the store closed).

torch's CUDA IPC ref counters (``lora_ipc.core.backends.refcount`` reads and changes them) are the file
``/dev/shm/<ref_counter_handle>`` that ``at::RefcountedMapAllocator`` writes (torch/csrc/CudaIPCTypes.cpp):
a 64-byte header of torch's own (:data:`REFCOUNT_HEADER_BYTES`, ``kDataOffset``), then int64 slots; a
``CudaSlabHandle``'s ``ref_counter_offset`` is a slot index. A slot starts at 1 per export, the importer
subtracts 1 when its storage dies, and the exporter frees its block once every slot of it reads 0::

    offset  0                64        72        80                  64+8*i
            +----------------+---------+---------+------- ... -------+---------+
            | torch's header | slot 0  | slot 1  |                   | slot i  |
            +----------------+---------+---------+------- ... -------+---------+
                              int64 little-endian, outstanding imports of one export
"""

from __future__ import annotations

import struct

#: one generation counter: an int64, little-endian
GENERATION_COUNTER = struct.Struct("<q")
GENERATION_PREFIX = "gen."  # the memfd's name (after the memfd prefix): gen.<pid>.<8 hex digits>
GENERATION_SLOTS = 4096  # counters in one exporter's table (one per live slab)
MAX_GENERATION_SLOT = 1 << 20  # the largest slot a handle may name
MAX_TABLE_NAME_CHARS = 64

#: one entry of the newest-version board after the counters: seq, version, generation, used_bytes, layout
#: digest, config digest, slab id length, slab id (zero-padded); the entry is BOARD_ENTRY_BYTES long
BOARD_ENTRY = struct.Struct("<QQqQ16s16sB128s")
BOARD_SEQ = struct.Struct("<Q")
BOARD_ENTRY_BYTES = 256
BOARD_SLAB_ID_BYTES = 128

#: one torch CUDA IPC ref counter: an int64, little-endian
REFCOUNT_SLOT = struct.Struct("<q")
REFCOUNT_HEADER_BYTES = 64  # at::RefcountedMapAllocator's header (checked on CPU by tests/test_refcount.py)


def generation_table_name(pid: int, salt: bytes) -> str:
    """The name of process ``pid``'s generation table; ``salt``: 4 random bytes (8 hex digits)."""
    return f"{GENERATION_PREFIX}{pid}.{salt.hex()}"


def generation_offset(slot: int) -> int:
    """Where counter ``slot`` starts in a generation table."""
    return slot * GENERATION_COUNTER.size


def generation_table_bytes(slots: int) -> int:
    return slots * GENERATION_COUNTER.size


def board_offset(slots: int, index: int) -> int:
    """Where board entry ``index`` starts in a generation table of ``slots`` counters: the board begins at the
    first multiple of ``BOARD_ENTRY_BYTES`` after the counters, so every entry is aligned to its size."""
    start = -(-generation_table_bytes(slots) // BOARD_ENTRY_BYTES) * BOARD_ENTRY_BYTES
    return start + index * BOARD_ENTRY_BYTES


def refcount_offset(slot: int) -> int:
    """Where ref counter ``slot`` starts in torch's ref-counter file."""
    return REFCOUNT_HEADER_BYTES + slot * REFCOUNT_SLOT.size

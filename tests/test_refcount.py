"""lora_ipc reads and changes torch's CUDA IPC ref counters itself (backends/refcount.py), so a consumer
without CUDA can release an export it could not import. The file layout (a 64-byte header, then int64
slots) is torch's ``at::RefcountedMapAllocator``, which CPU file-system sharing uses too: checked here."""

import torch
import torch.multiprocessing as mp

from lora_ipc.core.backends import refcount


def _shared_counters(slots: int):
    previous = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    try:
        storage = torch.UntypedStorage(8 * slots).share_memory_()
        _, handle, _ = storage._share_filename_cpu_()
    finally:
        mp.set_sharing_strategy(previous)
    view = torch.empty(0, dtype=torch.int64).set_(
        torch.storage.TypedStorage(wrap_storage=storage, dtype=torch.int64, _internal=True)
    )
    return storage, handle, view


def test_slots_are_torchs_refcounted_file_layout():
    storage, handle, view = _shared_counters(10_000)
    view.zero_()
    view[5] = 1  # an export's slot as torch leaves it
    assert refcount.read(handle, 5) == 1
    assert refcount.add(handle, 5, 1) == 2  # sent unconfirmed
    assert int(view[5]) == 2
    assert refcount.add(handle, 5, -2) == 0
    assert int(view[5]) == 0 and int(view[4]) == 0 and int(view[6]) == 0
    assert storage.nbytes() == 80_000


def test_missing_file_or_slot_is_not_an_error():
    _, handle, _ = _shared_counters(4)
    assert refcount.read(handle, 4) is None  # past the end
    assert refcount.read(b"/torch_no_such_counter_file", 0) is None
    assert refcount.add(b"/../../etc/passwd", 0, -1) is None
    assert refcount.add(b"", 0, -1) is None

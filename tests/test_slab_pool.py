"""The slab pool under a store (lora_ipc/core/serving/slab_pool.py): recycling, generation slots, byte
accounting, caps."""

import os

import pytest
import torch

from lora_ipc import LimitExceeded, Limits
from lora_ipc.core.backends import Backend
from lora_ipc.core.backends.cpu import CpuBackend
from lora_ipc.core.protocol import SlabStatus
from lora_ipc.core.serving.slab_pool import SlabCounts, SlabPool
from lora_ipc.core.serving.store import TensorSetStore

from . import models
from .helpers import open_fds

CPU = torch.device("cpu")
GRANULE = Backend.GRANULE


def pool(**kw) -> SlabPool:
    return SlabPool(**{"max_bytes": 64 << 20, "max_slabs": 16, "max_free": 2, **kw})


def test_a_free_slab_that_fits_is_recycled_and_its_generation_bumped_again():
    p = pool()
    try:
        slab, first = p.take(CPU, 1000)
        p.give_back(slab)
        again, second = p.take(CPU, 2000)  # fits: 2000 <= 64 KiB <= 2 * 2000 + GRANULE
        assert again is slab and second == first + 1
        assert p.counts().allocated == 1
    finally:
        p.close()


def test_a_free_slab_much_larger_than_asked_is_not_recycled():
    p = pool()
    try:
        big, _ = p.take(CPU, 1 << 20)
        p.give_back(big)
        small, _ = p.take(CPU, 1000)
        assert small is not big and p.counts().allocated == 2
        assert p.free_slabs() == [big]
    finally:
        p.close()


def test_generation_slots_are_recycled_and_their_counters_only_grow():
    p = pool(max_slabs=2, max_free=0)  # a table of two counters; every give_back closes the slab
    try:
        seen: dict[int, list[int]] = {}
        held, _ = p.take(CPU, 1000)
        for i in range(10):
            slab, generation = p.take(CPU, 1000 + i)
            seen.setdefault(slab.handle.generation.slot, []).append(generation)
            p.give_back(held)  # closed: its slot goes back to the table
            held = slab
        assert set(seen) <= {0, 1} and p.counts().allocated == 11
        for generations in seen.values():  # a reused slot never repeats a value an old reader may hold
            assert generations == sorted(set(generations))
        p.take(CPU, 1000)  # the second slot
        with pytest.raises(LimitExceeded, match="max_slabs"):
            p.take(CPU, 1000)
    finally:
        p.close()


def test_a_closed_slab_has_no_generation():
    p = pool(max_free=0)
    slab, generation = p.take(CPU, 1000)
    assert p.generation_of(slab) == generation
    p.give_back(slab)
    assert p.generation_of(slab) is None
    p.close()


def test_byte_accounting_under_reuse_and_close():
    fds = open_fds(os.getpid())
    p = pool(max_free=1)
    a, _ = p.take(CPU, 1000)
    b, _ = p.take(CPU, 200_000)
    assert (p.counts().live, p.counts().bytes) == (2, GRANULE + (256 << 10))
    p.give_back(b)
    p.give_back(a)  # past max_free=1: the oldest free slab (b) is closed
    assert p.counts() == SlabCounts(live=1, free=1, bytes=GRANULE, allocated=2)
    c, _ = p.take(CPU, 900)
    assert c is a and p.counts().bytes == GRANULE and p.counts().free == 0
    p.close()
    assert p.counts().live == p.counts().bytes == 0
    assert open_fds(os.getpid()) == fds  # every slab and the generation table closed


def test_room_is_made_from_free_slabs_before_a_slab_is_refused():
    p = pool(max_bytes=2 * GRANULE, max_free=2)
    try:
        small, _ = p.take(CPU, 1000)
        p.give_back(small)
        big, _ = p.take(CPU, GRANULE + 1)  # 2 granules: the free small slab is closed to make room
        assert p.counts() == SlabCounts(live=1, free=0, bytes=2 * GRANULE, allocated=2)
        with pytest.raises(LimitExceeded, match="max_slab_bytes"):
            p.take(CPU, 1000)
        p.give_back(big)
        p.take(CPU, 1000)  # the free big slab is closed to make room for it
        assert p.counts().bytes == GRANULE
    finally:
        p.close()


def test_a_failed_allocation_leaves_no_reservation_or_slot(monkeypatch):
    p = pool(max_bytes=GRANULE, max_slabs=1)
    real = CpuBackend._allocate
    monkeypatch.setattr(CpuBackend, "_allocate", lambda self, n: (_ for _ in ()).throw(OSError("no memory")))
    with pytest.raises(OSError):
        p.take(CPU, 1000)
    monkeypatch.setattr(CpuBackend, "_allocate", real)
    slab, _ = p.take(CPU, 1000)  # the byte budget and the only generation slot are free again
    assert p.counts().bytes == GRANULE
    p.close()


def test_slab_bytes_stay_exact_when_the_backend_rounds_sizes_up_further(monkeypatch):
    """A backend may round a slab up past Backend.GRANULE (VMM: the device's allocation granularity, 2 MiB).
    The cap must count what was allocated: counting the requested size in and the real size out let the
    total drift below zero, and max_slab_bytes stopped refusing anything."""
    granule = 1 << 20
    monkeypatch.setattr(CpuBackend, "allocate", lambda self, n: self._allocate(-(-n // granule) * granule))
    store = TensorSetStore(keep=1, max_free_slabs=0, limits=Limits(max_slab_bytes=4 * granule))
    try:
        for i in range(8):  # each version closes the one before: one slab live at the end
            store.publish("churn", {"w": torch.full((1000,), float(i))}, models.RANDOM_ADAPTER_CONFIG)
        assert store.status().slabs == SlabStatus(live=1, free=0, bytes=granule)
        for i in range(3):
            store.publish(f"kept{i}", {"w": torch.zeros(1000)}, models.RANDOM_ADAPTER_CONFIG)
        with pytest.raises(LimitExceeded, match="max_slab_bytes"):
            store.publish("one-too-many", {"w": torch.zeros(1000)}, models.RANDOM_ADAPTER_CONFIG)
        assert store.status().slabs.bytes == 4 * granule
    finally:
        store.close()


def test_a_store_reports_the_pool_and_intact_follows_the_slab():
    store = TensorSetStore(keep=1, max_free_slabs=0)
    try:
        store.publish("a", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
        lease, first = store.lease("a", None, b"reader")
        store.release(lease.lease_id, b"reader")
        assert store.intact(first)
        store.publish("a", models.random_adapter(2), models.RANDOM_ADAPTER_CONFIG)  # v1's slab closed
        assert not store.intact(first)
        status = store.status()
        assert status.slabs.live == 1 and status.metrics.slabs_allocated == 2
        assert store.live_slab_ids() == [s.slab_id for s in store.pool.slabs()]
    finally:
        store.close()


def test_a_closed_pool_refuses_to_publish_with_a_typed_error_and_stays_closed(monkeypatch):
    """After close(), a publish is StoreClosed (before: a new generation table was made: the store reopened
    itself); a close() that lands while a slab is being allocated closes that slab too (before: AttributeError
    on the table that close() had dropped, and the new slab leaked)."""
    from lora_ipc.core.errors import StoreClosed

    p = pool()
    slab, _ = p.take(CPU, 1000)
    p.give_back(slab)
    p.close()
    with pytest.raises(StoreClosed):
        p.take(CPU, 1000)
    assert p.counts().live == 0

    q = pool()
    q.take(CPU, 1000)  # the table exists
    made = []
    real_allocate = CpuBackend.allocate

    def allocate_while_closing(self, nbytes):
        slab = real_allocate(self, nbytes)
        made.append(slab)
        q.close()  # lands between the reservation and the slab's joining the pool
        return slab

    monkeypatch.setattr(CpuBackend, "allocate", allocate_while_closing)
    with pytest.raises(StoreClosed):
        q.take(CPU, 200_000)  # too large to recycle: allocated
    assert len(made) == 1 and made[0].fd == -1, "the slab allocated during close() leaked"
    assert q.counts().live == 0

"""The host copy's destinations (lora_ipc/core/memory/host_buffers.py) and the host-staged copy into other memory
(backends/cpu.py copy_staged): recycled only once no tensor reaches them, bounded, private to the reader."""

import gc

import msgspec
import pytest
import torch

from lora_ipc.core.backends.cpu import CpuBackend, CpuImportedSlab, copy_staged
from lora_ipc.core.memory.host_buffers import GRANULE, HostBufferPool, pinned_bounce, size_class, thp_mode


def test_a_buffer_comes_back_only_when_its_last_view_is_freed():
    pool = HostBufferPool()
    owned = pool.take(3 * GRANULE // 2)
    base = owned.data_ptr()
    views = owned[:4096].view(torch.bfloat16).view(2, 1024).unbind(0)  # what unpack hands out
    del owned
    gc.collect()
    assert pool.idle_bytes == 0  # the views still reach the buffer
    other = pool.take(3 * GRANULE // 2)
    assert other.data_ptr() != base  # so a second fetch of that size gets other memory
    del views
    assert pool.idle_bytes == size_class(3 * GRANULE // 2)
    again = pool.take(3 * GRANULE // 2)
    assert again.data_ptr() == base and (pool.hits, pool.misses) == (1, 2)
    assert again.numel() == 3 * GRANULE // 2 and again.is_contiguous() and again.dtype == torch.uint8
    del other, again


def test_the_pool_keeps_no_more_than_its_bounds():
    pool = HostBufferPool(max_bytes=3 * GRANULE, max_per_size=2)
    held = [pool.take(GRANULE) for _ in range(4)]
    del held
    assert pool.idle_bytes == 2 * GRANULE  # max_per_size
    big = pool.take(2 * GRANULE)
    del big
    assert pool.idle_bytes == 2 * GRANULE  # another 2 granules would pass max_bytes: unmapped instead
    pool.clear()
    assert pool.idle_bytes == 0
    none_kept = HostBufferPool(max_bytes=0)
    first = none_kept.take(10)
    ptr = first.data_ptr()
    del first
    assert none_kept.idle_bytes == 0 and none_kept.take(10).numel() == 10 and ptr  # a fresh mapping each time
    with pytest.raises(ValueError):
        pool.take(-1)


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert thp_mode(str(path)) == "madvise"
    path.write_text("[never] madvise\n")
    assert thp_mode(str(path)) == "never"
    assert thp_mode(str(tmp_path / "absent")) is None


def test_a_fetch_copies_into_private_memory_of_the_reader():
    """copy_out fills a pooled buffer with pread: the bytes are the slab's, the memory is not the exporter's
    (a write into the slab afterwards does not show), and recycled buffers come back with the new bytes."""
    exported = CpuBackend().allocate(3 << 20)
    handle = msgspec.structs.replace(exported.handle, token=b"t" * 16)
    imported = CpuImportedSlab(handle, lambda token: [exported.descriptor()])  # as the channel delivers it
    try:
        exported.tensor.copy_(torch.randint(0, 256, (exported.nbytes,), dtype=torch.uint8))
        owned = imported.copy_out(2 << 20)
        assert torch.equal(owned, exported.tensor[: 2 << 20])
        lo, hi = exported.tensor.data_ptr(), exported.tensor.data_ptr() + exported.nbytes
        assert not lo <= owned.data_ptr() < hi
        exported.tensor[:16].fill_(0)
        exported.tensor[16:32].fill_(255)
        assert not torch.equal(owned[:32], exported.tensor[:32])
        del owned
        again = imported.copy_out(2 << 20)  # likely the same buffer: it must hold the slab's bytes now
        assert torch.equal(again, exported.tensor[: 2 << 20])
    finally:
        imported.close()
        exported.close()


@pytest.mark.parametrize("chunk", [1 << 10, 5000, 1 << 20])
def test_a_staged_copy_is_exact_over_chunks(chunk):
    source = torch.randint(0, 256, (70_000,), dtype=torch.uint8)

    def read_into(part, offset):
        part.copy_(source[offset : offset + part.numel()])

    wide = torch.zeros(70_000, 2, dtype=torch.uint8)
    dst = wide[:, 0]  # not contiguous: pread cannot fill it in place, so it is staged
    copy_staged(read_into, dst, chunk)
    assert torch.equal(dst, source) and not wide[:, 1].any()


def test_a_bounce_is_page_locked_only_where_cuda_is(monkeypatch):
    assert not pinned_bounce(1024, torch.device("cpu")).is_pinned()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CUDA node whose driver is gone
    plain = pinned_bounce(1024, torch.device("cuda", 0))
    assert plain.device.type == "cpu" and plain.numel() == 1024 and not plain.is_pinned()

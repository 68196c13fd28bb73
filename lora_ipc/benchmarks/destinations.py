"""Where a host fetch's bytes should land and how they should be read: fresh or recycled destinations,
``pread`` or a mapping, measured.

    python -m lora_ipc.benchmarks.destinations --mb 20,80 --iters 20

A copy of N MB out of a sealed memfd, interleaved, ``pread`` into the first three and through a mapping
into the next two:

  fresh_empty     a fresh ``torch.empty`` (a page fault per 4 KiB on first touch)
  fresh_thp       a fresh anonymous mapping advised ``MADV_HUGEPAGE`` (one fault per 2 MiB where THP is
                  ``madvise``)
  pooled          a buffer of ``host_buffers.HostBufferPool`` returned by the previous fetch's tensors (its
                  pages are warm): what a fetch uses for a memfd without ``F_SEAL_FUTURE_WRITE``
  pooled_map_once the same buffer, filled through a read-only mapping of the memfd made for that copy and
                  unmapped after it (torch's ``copy_``)
  pooled_map_kept the same buffer, filled through one read-only mapping kept across copies
                  (``shm.SlabMapping``): what a fetch does now (Note [a copy out of a mapping])
  copy_warm       ``copy_`` between two warm buffers (memcpy, the floor beside them)
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any, cast

from .breakdown import hardware, summary
from .timing import save_json

VARIANTS = ("fresh_empty", "fresh_thp", "pooled", "pooled_map_once", "pooled_map_kept", "copy_warm")


def run(mbs: list[int], iters: int, warmup: int) -> dict:
    import torch

    from ..core.memory.host_buffers import HostBufferPool, map_anonymous
    from ..core.memory.shm import SlabMapping, create_mapped, read_exact

    results: dict = {"date": time.strftime("%Y-%m-%d"), "hardware": hardware(), "iters": iters, "sizes": {}}
    for mb in mbs:
        n = mb << 20
        fd, mm = create_mapped(f"bench-dst-{mb}", n)
        src = torch.frombuffer(mm, dtype=torch.uint8)
        src.fill_(7)
        pool = HostBufferPool()
        warm_src, warm_dst = torch.ones(n, dtype=torch.uint8), torch.ones(n, dtype=torch.uint8)
        kept = SlabMapping(fd, n)
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for i in range(warmup + iters):
            for variant in VARIANTS if i % 2 else VARIANTS[::-1]:
                t0 = time.perf_counter()
                if variant == "copy_warm":
                    warm_dst.copy_(warm_src)
                else:
                    if variant == "pooled_map_once":
                        dst = pool.take(n)
                        once = SlabMapping(fd, n)
                        once.copy_into(dst, 0)
                        once.close()
                    elif variant == "pooled_map_kept":
                        dst = pool.take(n)
                        kept.copy_into(dst, 0)
                    elif variant == "fresh_empty":
                        dst = torch.empty(n, dtype=torch.uint8)
                    elif variant == "fresh_thp":
                        dst = torch.frombuffer(map_anonymous(n, True), dtype=torch.uint8)
                    else:
                        dst = pool.take(n)
                    if not variant.startswith("pooled_map"):
                        read_exact(fd, memoryview(cast(Any, dst.numpy())), 0)
                    del dst  # the pooled buffer goes back, as a fetch's tensors do once freed
                if i >= warmup:
                    samples[variant].append((time.perf_counter() - t0) * 1e3)
        kept.close()
        del src
        os.close(fd)
        results["sizes"][mb] = {v: summary(s) for v, s in samples.items()} | {"pool_hits": pool.hits}
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", default="20,80")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    results = run([int(m) for m in args.mb.split(",")], args.iters, args.warmup)
    print(f"a copy out of a sealed memfd, p50 (p10-p90) ms, {args.iters} interleaved iterations")
    for mb, per in results["sizes"].items():
        cells = "  ".join(
            f"{v} {per[v]['p50_ms']:.2f} ({per[v]['p10_ms']:.1f}-{per[v]['p90_ms']:.1f})" for v in VARIANTS
        )
        print(f"{mb:>4} MB  {cells}")
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()

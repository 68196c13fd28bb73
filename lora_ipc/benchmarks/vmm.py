"""CUDA export paths side by side in one run: torch's CUDA IPC (``LORA_IPC_CUDA_EXPORT=torch``) and the
native VMM slabs (``vmm``), at Llama-7B LoRA shapes. Per path: publish, steady fetch (slab already
mapped), first fetch of a new client (import + map), and torch's ``memory_allocated`` on both sides.

    python benches/bench_vmm.py --ranks 16,64 --layers 32 --iters 30 --json out.json

Needs a GPU and the native extension with a driver; without them it says why and exits 0 (the
results file then records the reason).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

import torch

from .shapes import llama7b_lora, lora_config
from .timing import save_json

MODES = ("torch", "vmm")


def _consumer(conn) -> None:
    from .. import AdapterClient

    clients: dict[str, AdapterClient] = {}
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            return
        _, endpoint, name, fresh = msg
        if fresh and endpoint in clients:
            clients.pop(endpoint).close()
        client = clients.get(endpoint) or clients.setdefault(endpoint, AdapterClient(endpoint))
        t0 = time.perf_counter()
        tensors = client.fetch(name).tensors
        torch.cuda.synchronize()
        conn.send(((time.perf_counter() - t0) * 1e3, len(tensors), torch.cuda.memory_allocated()))


def run(ranks: list[int], layers: int, iters: int, warmup: int) -> dict:
    from .. import AdapterExporter
    from ..core.memory import native

    results: dict = {
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(),
        "vmm": native.status()[1],
        "layers": layers,
        "iters": iters,
        "ranks": {},
    }
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_consumer, args=(child,), daemon=True)
    proc.start()
    try:
        for rank in ranks:
            tensors = llama7b_lora(rank, layers, torch.bfloat16, "cuda")
            config = lora_config(rank)
            per_rank: dict[str, Any] = {"bytes": sum(t.numel() * t.element_size() for t in tensors.values())}
            results["ranks"][rank] = per_rank
            for mode in MODES:
                os.environ["LORA_IPC_CUDA_EXPORT"] = mode  # read when the store makes its backend
                torch.cuda.synchronize()
                exporter_before = torch.cuda.memory_allocated()
                publish: list[float] = []
                fetch: list[float] = []
                first: list[float] = []
                with AdapterExporter(keep=2) as exporter:
                    for i in range(warmup + iters):
                        torch.cuda.synchronize()
                        t0 = time.perf_counter()
                        exporter.publish(f"r{rank}", tensors, config)
                        torch.cuda.synchronize()
                        t1 = time.perf_counter()
                        parent.send(("fetch", exporter.endpoint, f"r{rank}", i % 10 == 0))
                        ms, count, importer_allocated = parent.recv()
                        assert count == len(tensors)
                        if i >= warmup:
                            publish.append((t1 - t0) * 1e3)
                            (first if i % 10 == 0 else fetch).append(ms)
                    torch.cuda.synchronize()
                    exporter_growth = torch.cuda.memory_allocated() - exporter_before
                per_rank[mode] = {
                    "publish_p50_ms": statistics.median(publish),
                    "fetch_p50_ms": statistics.median(fetch),
                    "first_fetch_p50_ms": statistics.median(first) if first else None,
                    "exporter_allocated_growth": exporter_growth,
                    "importer_allocated_last": importer_allocated,
                }
                print(
                    f"r{rank} {mode:5s} publish {per_rank[mode]['publish_p50_ms']:.3f} ms  fetch "
                    f"{per_rank[mode]['fetch_p50_ms']:.3f} ms  first fetch {per_rank[mode]['first_fetch_p50_ms']}"
                    f" ms  exporter allocated +{exporter_growth}",
                    flush=True,
                )
            del tensors
    finally:
        parent.send(("stop",))
        proc.join(30)
    return results


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from ..core.memory import native

    ok, why = native.status()
    if not torch.cuda.is_available() or not ok:
        results = {"skipped": why if torch.cuda.is_available() else "no CUDA device"}
        print("bench_vmm skipped:", results["skipped"])
    else:
        results = run([int(r) for r in args.ranks.split(",")], args.layers, args.iters, args.warmup)
    save_json(args.json, results, indent=1)
    return results


if __name__ == "__main__":
    main()

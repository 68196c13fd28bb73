"""Publish -> consumer owns the tensors, three ways, same run, two processes.

    python benches/bench_transport.py                      # CUDA if available, 7B shapes, r16 and r64
    python benches/bench_transport.py --device cpu --layers 8
    python -m lora_ipc.benchmarks.transport --device cpu   # the same from a wheel install
    lora-ipc bench                                         # several sizes, plus a JSON file and a PNG plot

Paths:
  lora_ipc      AdapterExporter.publish in the trainer, AdapterClient.fetch in the consumer
  disk_shm      safetensors save_file to /dev/shm + config json, load_file in the consumer (the usual workaround)
  ipc_per_tensor  torch IPC, one handle per tensor, pickled over a pipe (what several peers do)

Floors, timed in the trainer's process between the paths (warm buffers, no hand-off):
  copy_floor      one copy of the adapter's bytes into a warm buffer (``copy_``; CUDA: device to device)
  two_copy_floor  the floor of a two-copy design: pack into a warm slab (the same ``_foreach_copy_``
                  lora_ipc's pack is) + one copy of the used bytes out into another warm buffer
``ratio_to_two_copies`` (lora_ipc p50 / two_copy_floor p50, same run) is printed per rank.

Latency is measured from the trainer starting to publish to the consumer holding its own copy (CUDA:
after the copy has completed), on CLOCK_MONOTONIC, which both processes share. Reports p50/p90 and
each path's speed-up over disk_shm measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
from typing import Any

import torch

from .shapes import llama7b_lora, lora_config
from .timing import now, percentile, save_json, sync

PATHS = ("lora_ipc", "disk_shm", "ipc_per_tensor")
FLOORS = ("copy_floor", "two_copy_floor")


def consumer(conn, device: str) -> None:
    import torch.multiprocessing  # noqa: F401  (registers torch's reductions for the per-tensor path)
    from safetensors.torch import load_file
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    from lora_ipc import AdapterClient

    clients: dict[str, AdapterClient] = {}
    while True:
        msg = conn.recv()
        kind = msg[0]
        if kind == "stop":
            return
        if kind == "lora_ipc":
            _, endpoint, name = msg
            client = clients.get(endpoint) or clients.setdefault(endpoint, AdapterClient(endpoint))
            tensors = client.fetch(name, device=device).tensors
        elif kind == "disk_shm":
            _, path = msg
            with open(os.path.join(path, "adapter_config.json")) as f:
                json.load(f)
            tensors = load_file(os.path.join(path, "adapter_model.safetensors"), device=device)
            sync(device)
        elif kind == "ipc_per_tensor":
            _, payload = msg
            if device.startswith("cuda"):
                tensors = {k: rebuild_cuda_tensor(*args).clone() for k, args in payload.items()}
                sync(device)
            else:
                tensors = {k: v.clone() for k, v in payload.items()}
        else:
            raise ValueError(kind)
        conn.send((now(), len(tensors)))


def run(device: str, ranks: list[int], layers: int, iters: int, warmup: int, dtype=torch.bfloat16) -> dict:
    from safetensors.torch import save_file
    from torch.multiprocessing.reductions import reduce_tensor

    from lora_ipc import AdapterExporter
    from lora_ipc.core.memory.layout import SlabLayout

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=consumer, args=(child, device), daemon=True)
    proc.start()
    results: dict[str, Any] = {
        "device": device,
        "layers": layers,
        "iters": iters,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
        "ranks": {},
    }
    shm_dir = tempfile.mkdtemp(prefix="lora-bench-", dir="/dev/shm")
    exporter = AdapterExporter(keep=2)
    try:
        for rank in ranks:
            tensors = llama7b_lora(rank, layers, dtype, device)
            config = lora_config(rank)
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            paths = PATHS + FLOORS
            per_path: dict[str, list[float]] = {p: [] for p in paths}
            layout = SlabLayout.plan(tensors)
            floor_slab = torch.ones(layout.used_bytes, dtype=torch.uint8, device=device)  # warm: written once
            floor_dst = torch.ones(layout.used_bytes, dtype=torch.uint8, device=device)
            floor_views = layout.destination_views(floor_slab)
            for i in range(warmup + iters):
                for path in paths:
                    # one export per import: every per-tensor round exports fresh storages (re-exporting the
                    # same ones nests torch's ref-counted wrappers and slows the baseline down over the run)
                    fresh = {k: v.clone() for k, v in tensors.items()} if path == "ipc_per_tensor" else None
                    sync(device)
                    t0 = now()
                    if path in FLOORS:
                        if path == "two_copy_floor":
                            layout.pack(floor_views, tensors)
                        floor_dst.copy_(floor_slab)
                        sync(device)
                        if i >= warmup:
                            per_path[path].append((now() - t0) * 1e3)
                        continue
                    if path == "lora_ipc":
                        exporter.publish(f"r{rank}", tensors, config)
                        parent.send(("lora_ipc", exporter.endpoint, f"r{rank}"))
                    elif path == "disk_shm":
                        out = os.path.join(shm_dir, f"v{i}")
                        os.makedirs(out, exist_ok=True)
                        save_file(tensors, os.path.join(out, "adapter_model.safetensors"))
                        with open(os.path.join(out, "adapter_config.json"), "w") as f:
                            json.dump(config, f)
                        parent.send(("disk_shm", out))
                    else:
                        assert fresh is not None
                        payload: Any
                        if device.startswith("cuda"):
                            payload = {k: reduce_tensor(v)[1] for k, v in fresh.items()}
                        else:
                            payload = fresh
                        parent.send(("ipc_per_tensor", payload))
                    t1, count = parent.recv()
                    assert count == len(tensors), (path, count)
                    if path == "disk_shm":
                        shutil.rmtree(out)
                    if i >= warmup:
                        per_path[path].append((t1 - t0) * 1e3)
            disk_p50 = statistics.median(per_path["disk_shm"])
            results["ranks"][rank] = {
                "tensors": len(tensors),
                "bytes": nbytes,
                "ratio_to_two_copies": statistics.median(per_path["lora_ipc"])
                / statistics.median(per_path["two_copy_floor"]),
                "paths": {
                    p: {
                        "p50_ms": statistics.median(v),
                        "p90_ms": percentile(v, 90),
                        "p10_ms": percentile(v, 10),
                        "speedup_vs_disk": disk_p50 / statistics.median(v),
                    }
                    for p, v in per_path.items()
                },
            }
            del tensors
    finally:
        exporter.close()
        parent.send(("stop",))
        proc.join(30)
        shutil.rmtree(shm_dir, ignore_errors=True)
    return results


def table(results: dict) -> str:
    lines = [
        f"device={results['device']} gpu={results['gpu']} torch={results['torch']} layers={results['layers']} "
        f"iters={results['iters']}",
        f"{'rank':>4} {'tensors':>7} {'MB':>7}  {'path':<15} {'p50 ms':>9} {'p90 ms':>9} {'x disk':>8}",
    ]
    for rank, r in results["ranks"].items():
        for path, s in r["paths"].items():
            lines.append(
                f"{rank:>4} {r['tensors']:>7} {r['bytes'] / 1e6:>7.1f}  {path:<15} {s['p50_ms']:>9.3f} "
                f"{s['p90_ms']:>9.3f} {s['speedup_vs_disk']:>8.1f}"
            )
        if "ratio_to_two_copies" in r:
            lines.append(f"{rank:>4} lora_ipc / two_copy_floor (p50s, this run): {r['ratio_to_two_copies']:.2f}x")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--json", help="write results here")
    ap.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = ap.parse_args(argv)
    results = run(args.device, [int(r) for r in args.ranks.split(",")], args.layers, args.iters, args.warmup)
    if not args.quiet:
        print(table(results), flush=True)
    save_json(args.json, results)
    return results


if __name__ == "__main__":
    main()

"""Full-weight bucket transport throughput (GB/s) against the device's own copy floor, two processes.

    python benches/bench_bucket_transport.py --device cuda --layers 8 --bucket-mib 256 1024
    python benches/bench_bucket_transport.py --device cpu --layers 2 --bucket-mib 64
    python benches/bench_bucket_transport.py --device cpu --layers 1 --scale 16 --bucket-mib 1 --iters 1  # CI

The trainer (this process) streams Llama-7B-shaped full weights (bf16, 7 matrices per layer) with
``lora_ipc.refit.WeightSender``; a consumer process receives each bucket with ``WeightReceiver`` into
memory it owns on the same device, as an inference worker does before ``load_weights``. Throughput is
the weights' bytes over the wall time of one whole update (pack, hand-off, fetch and copy, pipelined
bucket by bucket). The floor is one device-to-device copy of the same bytes in one process (CPU:
memcpy), the bound any transport that ends in memory the receiver owns must pay at least once.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch

from .shapes import llama7b_full_weights
from .timing import save_json, sync


def checksum(t: torch.Tensor) -> int:
    """An exact integer digest of a bf16 tensor's bits (same on both sides iff the bytes match, modulo collisions)."""
    bits = t.contiguous().view(-1).view(torch.int16).to(torch.int64)
    return int((bits * (torch.arange(bits.numel(), device=bits.device) % 251 + 1)).sum())


def consumer(conn, device: str) -> None:
    from ..refit import WeightReceiver

    endpoint, stream = conn.recv()
    receiver = WeightReceiver(endpoint, stream, timeout_s=120)
    conn.send("ready")
    verify = False
    while True:
        msg = conn.recv()
        if msg in ("begin", "begin-verify"):
            receiver.begin()
            verify = msg == "begin-verify"
            conn.send("ok")
        elif msg == "end":
            conn.send(receiver.end())
        elif msg is None:
            receiver.close()
            return
        else:
            got = receiver.receive(msg, device)  # a BucketRef
            sync(device)  # owned copies complete, as load_weights would need
            if verify:
                conn.send({name: checksum(t) for name, t in got})
            else:
                conn.send(sum(t.numel() * t.element_size() for _, t in got))


def copy_floor(weights: dict[str, torch.Tensor], device: str, iters: int) -> float:
    """Seconds for one copy of all the weights' bytes into a second buffer on the same device."""
    total = sum(t.numel() * t.element_size() for t in weights.values())
    src = torch.empty(total, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(iters + 1):
        sync(device)
        started = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bucket-mib", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--scale", type=int, default=1, help="divide every dimension by this (CPU rehearsal)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from ..refit import WeightSender

    device = args.device if args.device != "cuda" else f"cuda:{torch.cuda.current_device()}"
    weights = llama7b_full_weights(args.layers, device, args.scale)
    params = [(n, t.dtype, tuple(t.shape)) for n, t in weights.items()]
    total = sum(t.numel() * t.element_size() for t in weights.values())
    floor_s = copy_floor(weights, device, args.iters)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "bytes": total,
        "tensors": len(weights),
        "copy_floor_gbps": round(total / floor_s / 1e9, 2),
        "buckets": [],
    }
    print(
        f"{len(weights)} tensors, {total / 2**30:.2f} GiB bf16 on {report['device']}; "
        f"same-device copy floor {report['copy_floor_gbps']} GB/s"
    )

    ctx = mp.get_context("spawn")
    for mib in args.bucket_mib:
        conn, child = ctx.Pipe()
        proc = ctx.Process(target=consumer, args=(child, device), daemon=True)
        proc.start()
        sender = WeightSender(bucket_bytes=mib << 20, device=device)
        conn.send((sender.endpoint, sender.stream))
        assert conn.recv() == "ready"
        received: list = []

        def deliver(ref, conn=conn, received=received):
            conn.send(ref)
            received.append(conn.recv())

        times = []
        for _ in range(args.iters + 1):  # the first update maps the slabs: reported apart
            received.clear()
            conn.send("begin")
            conn.recv()
            sync(device)
            started = time.perf_counter()
            sender.send(params, iter(weights.items()), deliver)
            times.append(time.perf_counter() - started)
            conn.send("end")
            buckets = conn.recv()
            assert sum(received) == total, (sum(received), total)
        received.clear()  # one more update, checked tensor by tensor against the trainer's bytes
        conn.send("begin-verify")
        conn.recv()
        sender.send(params, iter(weights.items()), deliver)
        conn.send("end")
        conn.recv()
        got = {k: v for part in received for k, v in part.items()}
        assert got == {n: checksum(t) for n, t in weights.items()}, "received weights differ from the trainer's"
        status = sender.exporter.store.status()
        conn.send(None)
        proc.join(30)
        sender.close()
        median = statistics.median(times[1:])
        row = {
            "bucket_mib": mib,
            "buckets": buckets,
            "first_s": round(times[0], 4),
            "median_s": round(median, 4),
            "gbps": round(total / median / 1e9, 2),
            "fraction_of_floor": round(floor_s / median, 3),
            "slabs_live": status.slabs.live,
            "slab_bytes": status.slabs.bytes,
        }
        report["buckets"].append(row)
        print(
            f"bucket {mib:5d} MiB: {buckets:3d} buckets, first {times[0] * 1e3:8.1f} ms, median "
            f"{median * 1e3:8.1f} ms = {row['gbps']:6.2f} GB/s ({row['fraction_of_floor']:.2f} of the copy floor), "
            f"trainer slabs {row['slabs_live']} ({row['slab_bytes'] / 2**20:.0f} MiB)"
        )
    save_json(args.json, report)
    return report


if __name__ == "__main__":
    main()

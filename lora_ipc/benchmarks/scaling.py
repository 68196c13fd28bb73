"""How the cost of a hand-off grows: ``lora-ipc bench --scaling``.

    python -m lora_ipc.benchmarks.scaling --device cpu --json s.json --png s.png

Three sweeps, one run, Llama-7B LoRA shapes (bf16), publish -> every consumer owns the tensors:

  bytes      ranks r4 ... r256 at 8 layers (112 tensors): latency against adapter MB, a least-squares
             slope in ms per MB, beside the slope of one ``copy_`` into a warm buffer (memcpy) of the same
             sizes, timed in the trainer in the same run
  tensors    8 ... 64 layers at r4 (112 ... 896 tensors): the per-tensor cost (slope in µs per tensor)
  consumers  1, 2, 4 consumer processes fetching one version at once (TP workers): time until the last
             one owns its copy

Each point is the median of ``--iters`` (p10/p90 kept), its hand-offs interleaved with the memcpy beside them;
the points of a sweep run one after the other (one adapter republished, as a trainer does).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

from .breakdown import hardware, summary
from .timing import now, save_json, sync


def _consumer(conn, device: str) -> None:
    from lora_ipc import AdapterClient

    clients: dict[str, Any] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            return
        endpoint, name, version = msg
        client = clients.get(endpoint) or clients.setdefault(endpoint, AdapterClient(endpoint))
        tensors = client.fetch(name, version, device=device).tensors
        sync(device)
        conn.send((now(), len(tensors)))
        del tensors


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ``ys`` over ``xs``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def run(args) -> dict:
    import torch

    from .. import AdapterExporter
    from .shapes import llama7b_lora, lora_config

    device = args.device
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(max(args.consumers)):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_consumer, args=(child, device), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    results: dict[str, Any] = {"device": device, "iters": args.iters, "date": time.strftime("%Y-%m-%d")}
    results["hardware"] = hardware()
    exporter = AdapterExporter(keep=2)

    def hand_off(name: str, tensors, config, readers: int) -> float:
        t0 = now()
        version = exporter.publish(name, tensors, config)
        for conn in pipes[:readers]:
            conn.send((exporter.endpoint, name, version))
        done = [conn.recv() for conn in pipes[:readers]]
        assert all(n == len(tensors) for _, n in done)
        return (max(t for t, _ in done) - t0) * 1e3

    def sweep(points: list[tuple[Any, dict, dict, int]]) -> dict:
        """``points``: (key, tensors, config, readers), one after the other, each hand-off beside a memcpy of
        its bytes. Points are not interleaved with each other: a trainer republishes one adapter, whose slab
        the exporter recycles; many sizes in turn would outrun its two free slabs and time fresh allocations."""
        samples: dict[Any, list[float]] = {key: [] for key, *_ in points}
        memcpy: dict[Any, list[float]] = {key: [] for key, *_ in points}
        bufs = {}
        for key, tensors, _, _ in points:
            nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
            bufs[key] = (
                torch.ones(nbytes, dtype=torch.uint8, device=device),
                torch.ones(nbytes, dtype=torch.uint8, device=device),
            )
        for key, tensors, config, readers in points:
            for i in range(args.warmup + args.iters):
                ms = hand_off(f"s-{key}", tensors, config, readers)
                src, dst = bufs[key]
                sync(device)
                t = time.perf_counter()
                dst.copy_(src)
                sync(device)
                if i >= args.warmup:
                    samples[key].append(ms)
                    memcpy[key].append((time.perf_counter() - t) * 1e3)
        return {key: (summary(samples[key]), summary(memcpy[key])) for key in samples}

    try:
        # bytes
        points = []
        for rank in args.ranks:
            tensors = llama7b_lora(rank, args.layers, torch.bfloat16, device)
            points.append((rank, tensors, lora_config(rank), 1))
        sizes = {rank: sum(t.numel() * t.element_size() for t in ts.values()) / 1e6 for rank, ts, _, _ in points}
        measured = sweep(points)
        del points
        rows = [{"rank": r, "mb": sizes[r], "lora_ipc": measured[r][0], "memcpy": measured[r][1]} for r in args.ranks]
        xs = [row["mb"] for row in rows]
        results["bytes"] = {
            "layers": args.layers,
            "points": rows,
            "slope_ms_per_mb": slope(xs, [row["lora_ipc"]["p50_ms"] for row in rows]),
            "memcpy_slope_ms_per_mb": slope(xs, [row["memcpy"]["p50_ms"] for row in rows]),
        }
        print(
            f"bytes: lora_ipc {results['bytes']['slope_ms_per_mb']:.4f} ms/MB, one warm memcpy "
            f"{results['bytes']['memcpy_slope_ms_per_mb']:.4f} ms/MB (same run)",
            flush=True,
        )
        # tensor count
        points = []
        for layers in args.tensor_layers:
            tensors = llama7b_lora(args.tensor_rank, layers, torch.bfloat16, device)
            points.append((layers, tensors, lora_config(args.tensor_rank), 1))
        counts = {
            layers: (len(ts), sum(t.numel() * t.element_size() for t in ts.values()) / 1e6)
            for layers, ts, _, _ in points
        }
        measured = sweep(points)
        del points
        rows = [
            {
                "layers": n,
                "tensors": counts[n][0],
                "mb": counts[n][1],
                "lora_ipc": measured[n][0],
                "memcpy": measured[n][1],
            }
            for n in args.tensor_layers
        ]
        results["tensors"] = {
            "rank": args.tensor_rank,
            "points": rows,
            "slope_us_per_tensor": 1e3 * slope([r["tensors"] for r in rows], [r["lora_ipc"]["p50_ms"] for r in rows]),
        }
        print(f"tensors: {results['tensors']['slope_us_per_tensor']:.2f} µs per tensor (bytes grow too)", flush=True)
        # consumers
        tensors = llama7b_lora(args.consumer_rank, args.layers, torch.bfloat16, device)
        config = lora_config(args.consumer_rank)
        measured = sweep([(n, tensors, config, n) for n in args.consumers])
        results["consumers"] = {
            "rank": args.consumer_rank,
            "mb": sum(t.numel() * t.element_size() for t in tensors.values()) / 1e6,
            "points": [{"consumers": n, "lora_ipc": measured[n][0]} for n in args.consumers],
        }
        print(
            "consumers: " + ", ".join(f"{n}: {measured[n][0]['p50_ms']:.2f} ms" for n in args.consumers),
            flush=True,
        )
    finally:
        exporter.close()
        for conn in pipes:
            conn.send(None)
        for proc in procs:
            proc.join(30)
    return results


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), dpi=120)
    b = results["bytes"]
    xs = [p["mb"] for p in b["points"]]
    for key, label in (("lora_ipc", "lora_ipc publish → owned"), ("memcpy", "one warm memcpy")):
        p50 = [p[key]["p50_ms"] for p in b["points"]]
        lo = [p50[i] - p[key]["p10_ms"] for i, p in enumerate(b["points"])]
        hi = [p[key]["p90_ms"] - p50[i] for i, p in enumerate(b["points"])]
        slope_ = b["slope_ms_per_mb"] if key == "lora_ipc" else b["memcpy_slope_ms_per_mb"]
        axes[0].errorbar(xs, p50, yerr=[lo, hi], marker="o", capsize=3, label=f"{label} ({slope_:.3f} ms/MB)")
    for x, p in zip(xs, b["points"]):
        axes[0].annotate(
            f"r{p['rank']}", (x, p["lora_ipc"]["p50_ms"]), fontsize=7, xytext=(3, -10), textcoords="offset points"
        )
    axes[0].set(xscale="log", yscale="log", xlabel="adapter MB (8 layers)", ylabel="ms (p50, bars p10-p90)")
    axes[0].set_title("latency vs bytes", fontsize=9)
    t = results["tensors"]
    axes[1].errorbar(
        [p["tensors"] for p in t["points"]],
        [p["lora_ipc"]["p50_ms"] for p in t["points"]],
        yerr=[
            [p["lora_ipc"]["p50_ms"] - p["lora_ipc"]["p10_ms"] for p in t["points"]],
            [p["lora_ipc"]["p90_ms"] - p["lora_ipc"]["p50_ms"] for p in t["points"]],
        ],
        marker="o",
        capsize=3,
        label=f"lora_ipc, r{t['rank']} ({t['slope_us_per_tensor']:.1f} µs/tensor)",
    )
    axes[1].plot(
        [p["tensors"] for p in t["points"]],
        [p["memcpy"]["p50_ms"] for p in t["points"]],
        "o--",
        label="memcpy of the same bytes",
    )
    axes[1].set(xlabel="tensors (8 ... 64 layers)", ylabel="ms (p50)")
    axes[1].set_title("latency vs tensor count", fontsize=9)
    c = results["consumers"]
    axes[2].bar(
        [str(p["consumers"]) for p in c["points"]],
        [p["lora_ipc"]["p50_ms"] for p in c["points"]],
        yerr=[
            [p["lora_ipc"]["p50_ms"] - p["lora_ipc"]["p10_ms"] for p in c["points"]],
            [p["lora_ipc"]["p90_ms"] - p["lora_ipc"]["p50_ms"] for p in c["points"]],
        ],
        capsize=4,
        color="tab:green",
    )
    axes[2].set(
        xlabel=f"consumers fetching one version (r{c['rank']}, {c['mb']:.0f} MB)",
        ylabel="ms until the last owns it (p50, bars p10-p90)",
    )
    axes[2].set_title("concurrent consumers", fontsize=9)
    for ax in axes[:2]:
        ax.legend(fontsize=7)
    for ax in axes:
        ax.grid(True, alpha=0.3)
    hw = results["hardware"]
    fig.suptitle(
        f"lora_ipc scaling, {hw['gpu'] or hw['cpu']} ({hw['cores']} cores), torch {hw['torch']}, {results['date']}",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    import torch

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ranks", default="4,16,64,256", help="the bytes sweep")
    ap.add_argument("--layers", type=int, default=8, help="layers of the bytes and consumers sweeps")
    ap.add_argument("--tensor-layers", default="8,16,32,64", help="the tensor-count sweep")
    ap.add_argument("--tensor-rank", type=int, default=4)
    ap.add_argument("--consumers", default="1,2,4")
    ap.add_argument("--consumer-rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--png")
    args = ap.parse_args(argv)
    args.ranks = [int(x) for x in args.ranks.split(",")]
    args.tensor_layers = [int(x) for x in args.tensor_layers.split(",")]
    args.consumers = [int(x) for x in args.consumers.split(",")]
    results = run(args)
    save_json(args.json, results)
    if args.png:
        plot(results, args.png)
    return results


if __name__ == "__main__":
    main()

"""``lora-ipc bench``: :mod:`.transport` over several adapter sizes, written as JSON and a PNG plot."""

from __future__ import annotations

import json
import os
import sys
import time

LABELS = {
    "lora_ipc": "lora_ipc (one slab, kept mapping)",
    "disk_shm": "safetensors via /dev/shm",
    "ipc_per_tensor": "torch IPC, one handle per tensor",
    "copy_floor": "one copy into a warm buffer (floor)",
    "two_copy_floor": "pack + copy out, warm buffers (two-copy floor)",
}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    ranks = sorted(results["ranks"], key=lambda r: results["ranks"][r]["bytes"])
    for key in [k for k in LABELS if k in results["ranks"][ranks[0]]["paths"]]:
        xs = [results["ranks"][r]["bytes"] / 1e6 for r in ranks]
        p50 = [results["ranks"][r]["paths"][key]["p50_ms"] for r in ranks]
        p90 = [results["ranks"][r]["paths"][key]["p90_ms"] for r in ranks]
        ax.errorbar(
            xs, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], marker="o", capsize=3, label=LABELS[key]
        )
        for x, y, r in zip(xs, p50, ranks):
            if key == "lora_ipc":
                ax.annotate(f"r{r}", (x, y), textcoords="offset points", xytext=(4, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    for axis in (ax.xaxis, ax.yaxis):  # plain numbers at 1-2-5 steps, not 10^x notation
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("adapter size (MB, Llama-7B LoRA shapes, bf16)")
    ax.set_ylabel("publish → consumer owns tensors (ms, p50; bar to p90)")
    where = results["gpu"] or "CPU"
    ax.set_title(
        f"Adapter hand-off latency, {where}, {results['layers']} layers\n"
        f"torch {results['torch']}, {results.get('date', '')}",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_bench(args) -> int:
    import subprocess

    import torch

    from .timing import OMP_ENV
    from .transport import table

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_gpu = device.startswith("cuda")
    ranks = args.ranks or ("4,8,16,32,64" if on_gpu else "4,16,64")
    layers = int(args.layers or (32 if on_gpu else 8))
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, "bench.json"), os.path.join(args.out, "bench.png")
    # a fresh interpreter, so OpenMP settings the benchmark needs apply before torch loads
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lora_ipc.benchmarks.transport",
            "--device",
            device,
            "--ranks",
            ranks,
            "--layers",
            str(layers),
            "--iters",
            str(args.iters),
            "--warmup",
            str(args.warmup),
            "--json",
            json_path,
            "--quiet",
        ],
        check=True,
        env={**os.environ, **OMP_ENV},
    )
    with open(json_path) as f:
        results = json.load(f)
    results["date"] = time.strftime("%Y-%m-%d")
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    plot(results, png_path)
    print(table(results))
    print(f"wrote {json_path} and {png_path}")
    return 0


def run_breakdown(args) -> int:
    """``lora-ipc bench --breakdown`` (:mod:`.breakdown`; breakdown.json and .png) or ``--scaling``
    (:mod:`.scaling`; scaling.json and .png), in a fresh interpreter."""
    import subprocess

    import torch

    from .timing import OMP_ENV

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    what = "scaling" if args.scaling else "breakdown"
    os.makedirs(args.out, exist_ok=True)
    json_path, png_path = os.path.join(args.out, f"{what}.json"), os.path.join(args.out, f"{what}.png")
    argv = [sys.executable, "-m", f"lora_ipc.benchmarks.{what}", "--device", device]
    argv += ["--iters", str(args.iters), "--warmup", str(args.warmup), "--json", json_path, "--png", png_path]
    if args.ranks:
        argv += ["--ranks", args.ranks]
    if what == "breakdown":
        argv += ["--engine", args.engine, "--hidden", str(args.hidden)]
        if args.layers:
            argv += ["--layers", str(args.layers)]
    elif args.layers:  # the tensor-count sweep; its first count is the other sweeps' layers
        argv += ["--tensor-layers", str(args.layers), "--layers", str(args.layers).split(",")[0]]
    subprocess.run(argv, check=True, env={**os.environ, **OMP_ENV})
    print(f"wrote {json_path} and {png_path}")
    return 0

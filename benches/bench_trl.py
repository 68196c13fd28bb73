"""TRL server mode, sync time per step: lora_ipc.integrations.trl against TRL's own disk path, same run.

    ~/.cache/lora-ipc/rl-frameworks/bin/python benches/bench_trl.py [--iters 20] [--hidden 512 --layers 4 --rank 16]

(the venv scripts/rl_frameworks.sh builds: TRL installed there). One ``trl vllm-serve`` with LoRA on a tiny
local Llama; each iteration is one optimizer step's adapter (seeded noise on the LoRA weights), synced two
ways, interleaved:

  lora_ipc  the integration's own sync (``AdapterSync.sync``, what ``VLLMGeneration.sync_weights`` runs after
            ``install``): publish into the exporter, ``/v1/load_lora_adapter`` with the pinned lora-ipc:// URI,
            unload the previous version; "publish" and "load" are its two phases
  disk      AsyncGRPO's adapter path (TRL 1.16 ``_sync_weight_lora``): TRL's ``save_lora_adapter`` into
            ``output_dir/.vllm_lora/trl-policy-v{N}`` (safetensors + atomic rename), TRL's
            ``VLLMClient.load_lora_adapter``, unload of the previous version; "save" and "load" its phases

Both end when the server has loaded the adapter (``load_lora_adapter`` returns after vLLM's ``add_lora``).
Prints p50/p90 in ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from contextlib import nullcontext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)


def _serve(model_dir: str, port: int, rank: int, log_path: str) -> subprocess.Popen:
    trl_cli = os.path.join(os.path.dirname(sys.executable), "trl")
    cmd = [trl_cli, "vllm-serve", "--model", model_dir, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max_model_len", "128", "--enforce_eager", "--enable-lora", "--max-lora-rank", str(rank)]
    cmd += ["--max-loras", "2", "--max-num-seqs", "8"]
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    proc = subprocess.Popen(cmd, env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("trl vllm-serve exited: " + open(log_path).read()[-3000:])
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2)
            return proc
        except Exception:
            time.sleep(1)
    proc.kill()
    raise RuntimeError("trl vllm-serve did not start")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--json")
    args = ap.parse_args(argv)

    from lora_ipc.benchmarks.cpu_engine import cpu_engine_env, perturb
    from lora_ipc.benchmarks.timing import percentile, save_json

    cpu_engine_env()
    import warnings

    warnings.simplefilter("ignore")
    from accelerate import Accelerator
    from peft import get_peft_model
    from trl.experimental.async_grpo.async_grpo_trainer import save_lora_adapter
    from trl.experimental.async_grpo.vllm_client import VLLMClient as AsyncVLLMClient
    from trl.generation.vllm_client import VLLMClient

    import lora_ipc.integrations.trl as lora_trl
    from lora_ipc.tiny import lora_config, tiny_llama, write_model_dir

    work = tempfile.mkdtemp(prefix="bench-trl-")
    model_dir = write_model_dir(os.path.join(work, "model"), args.hidden, args.layers)
    port = _port()
    server = _serve(model_dir, port, args.rank, os.path.join(work, "server.log"))
    try:
        base = f"http://127.0.0.1:{port}"
        model = get_peft_model(tiny_llama(0, hidden=args.hidden, layers=args.layers), lora_config(args.rank))
        lora_trl.install(adapter="policy")
        sync = lora_trl.AdapterSync(lora_trl.installed(), "server")
        sync._server = VLLMClient(base_url=base)
        gen = types.SimpleNamespace(
            model=model,
            accelerator=types.SimpleNamespace(is_main_process=True, num_processes=1),
            _dist=types.SimpleNamespace(gather_params=lambda params: nullcontext()),
        )
        accelerator = Accelerator(cpu=True)
        disk_client = AsyncVLLMClient(base)
        lora_dir = os.path.join(work, "out", ".vllm_lora")
        rows: dict[str, list[float]] = {k: [] for k in ("lora_ipc", "publish", "load", "disk", "save", "disk_load")}
        for i in range(args.warmup + args.iters):
            perturb(model, i, 0.01, only="lora_")
            t0 = time.perf_counter()
            sync.sync(gen)
            t1 = time.perf_counter()
            version = i + 1
            name = f"trl-policy-v{version}"
            path = os.path.join(lora_dir, name)
            save_lora_adapter(model, accelerator, "default", path)
            t2 = time.perf_counter()
            disk_client.load_lora_adapter(name, path)
            if version > 1:
                disk_client.unload_lora_adapter(f"trl-policy-v{version - 1}")
            t3 = time.perf_counter()
            if i >= args.warmup:
                timing = sync.timings[-1]
                rows["lora_ipc"].append((t1 - t0) * 1e3)
                rows["publish"].append(timing.publish_s * 1e3)
                rows["load"].append(timing.load_s * 1e3)
                rows["disk"].append((t3 - t1) * 1e3)
                rows["save"].append((t2 - t1) * 1e3)
                rows["disk_load"].append((t3 - t2) * 1e3)
        lora_trl.uninstall()
    finally:
        server.terminate()
        server.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    nbytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" in n)
    results = {
        "what": "TRL server-mode sync per step (ms): lora_ipc publish + load vs AsyncGRPO's save + load",
        "hidden": args.hidden,
        "layers": args.layers,
        "rank": args.rank,
        "adapter_bytes": nbytes,
        "iters": args.iters,
    }
    shape = f"hidden {args.hidden}, {args.layers} layers, r={args.rank}"
    print(f"adapter {nbytes / 1e6:.2f} MB ({shape}), {args.iters} steps")
    for key, xs in rows.items():
        results[key] = {"p50_ms": statistics.median(xs), "p90_ms": percentile(xs, 90)}
        print(f"  {key:10s} p50 {statistics.median(xs):8.1f} ms   p90 {percentile(xs, 90):8.1f} ms")
    save_json(args.json, results)
    return results


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()

"""Full refit of a ~100M-parameter Llama into a running vLLM engine: the ``lora_ipc`` weight-transfer
backend against saving to /dev/shm and letting vLLM reload from disk, same run, same engine.

    python benches/bench_refit.py                       # CPU engine, ~100M parameters, bf16
    python benches/bench_refit.py --iters 5 --bucket-mib 32 256 --json refit.json

Paths, each timed from "the trainer's weights changed" to "the engine serves them":
  lora_ipc   trainer_init once, then send_weights(): start_weight_update, one update_weights per bucket
             (fetched by the worker from a lora_ipc slab), finish_weight_update
  disk_shm   model.save_pretrained(/dev/shm/...) then vLLM's reload_weights(weights_path=...)
             (vLLM's own disk loader, in place, same engine)

After each path the engine's greedy tokens are checked against the other path's for the same weights.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from .cpu_engine import cpu_engine_env, greedy, perturb, scratch_dirs
from .timing import save_json


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=16000)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--bucket-mib", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    cpu_engine_env()

    import torch
    from transformers import LlamaForCausalLM
    from vllm import LLM
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from ..tiny import tiny_engine_kwargs, tiny_llama_config, write_tokenizer
    from ..vllm.weight_transfer import LoraIpcTrainerInitInfo, OfflineLLMClient

    torch.manual_seed(0)
    # a Llama-like MLP, 8/3 as wide as the hidden size (rounded down to 64)
    config = tiny_llama_config(args.vocab, args.hidden, args.layers, intermediate=int(args.hidden * 8 / 3) // 64 * 64)
    model: Any = LlamaForCausalLM(config)
    model = model.to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in model.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with scratch_dirs("bench-refit-") as (base_dir, shm_dir):
        model.save_pretrained(base_dir)
        write_tokenizer(base_dir, args.vocab)
        print(
            f"model: {n_params / 1e6:.1f}M parameters, {n_bytes / 2**20:.0f} MiB bf16, "
            f"{len(list(model.parameters()))} tensors"
        )
        started = time.perf_counter()
        llm = LLM(
            **tiny_engine_kwargs(
                base_dir,
                lora_rank=None,
                max_num_seqs=4,
                weight_transfer_config={"backend": "lora_ipc"},
                worker_extension_cls="lora_ipc.vllm.WorkerExtension",
            )
        )
        print(f"engine started in {time.perf_counter() - started:.1f} s")
        client: Any = OfflineLLMClient(llm)  # offline LLM: vLLM's client protocol, duck-typed
        step = 0
        results = {
            "model_params": n_params,
            "model_bytes": n_bytes,
            "torch_threads": torch.get_num_threads(),
            "disk_shm": [],
            "lora_ipc": {},
        }
        for mib in args.bucket_mib:
            transfer: Any = WeightTransferTrainerFactory.trainer_init(  # ours: LoraIpcTrainerEngine
                LoraIpcTrainerInitInfo(rank=0, bucket_bytes=mib << 20), client=client, source=ModuleSource(model)
            )
            times_ipc, worker = [], []
            for _ in range(args.iters + 1):  # the first update maps slabs and plans: dropped from the median
                step += 1
                perturb(model, step, 0.01)
                t0 = time.perf_counter()
                transfer.send_weights(weight_version=f"step-{step}")
                times_ipc.append(time.perf_counter() - t0)
                worker.append(llm.collective_rpc("lora_ipc_refit_stats")[0])
                via_ipc = greedy(llm)

                step += 1  # the disk path, same engine, on the next weights
                perturb(model, step, 0.01)
                t0 = time.perf_counter()
                model.save_pretrained(shm_dir)
                t1 = time.perf_counter()
                llm.collective_rpc("reload_weights", kwargs={"weights_path": shm_dir})
                llm.reset_prefix_cache()
                t2 = time.perf_counter()
                results["disk_shm"].append({"save_s": t1 - t0, "reload_s": t2 - t1, "total_s": t2 - t0})
                via_disk = greedy(llm)
                transfer.send_weights()  # same weights again through lora_ipc: tokens must not move
                assert greedy(llm) == via_disk, "lora_ipc and disk reload disagree on the same weights"
                assert via_ipc != via_disk
            buckets = transfer.sender.plan([(m.name, m.dtype, tuple(m.shape)) for m in transfer.source.metadata()])
            status = transfer.sender.exporter.store.status()
            results["lora_ipc"][mib] = {
                "buckets": len(buckets),
                "first_s": times_ipc[0],
                "median_s": statistics.median(times_ipc[1:]),
                "worker": {
                    k: statistics.median(w[k] for w in worker[1:])
                    for k in ("fetch_ms", "load_weights_ms", "finalize_ms")
                },
                "slabs_live": status.slabs.live,
                "slab_bytes": status.slabs.bytes,
            }
            transfer.shutdown()
        disk = statistics.median(r["total_s"] for r in results["disk_shm"][1:] or results["disk_shm"])
        results["disk_shm_median_s"] = disk
        print(
            f"disk_shm: save_pretrained + vLLM reload_weights, median {disk * 1e3:.0f} ms "
            f"(save {statistics.median(r['save_s'] for r in results['disk_shm']) * 1e3:.0f} ms, "
            f"reload {statistics.median(r['reload_s'] for r in results['disk_shm']) * 1e3:.0f} ms)"
        )
        for mib, r in results["lora_ipc"].items():
            r["speedup_vs_disk_shm"] = disk / r["median_s"]
            print(
                f"lora_ipc bucket {mib:4d} MiB: {r['buckets']:3d} buckets, median {r['median_s'] * 1e3:.0f} ms "
                f"(first {r['first_s'] * 1e3:.0f} ms), {r['speedup_vs_disk_shm']:.2f}x faster than disk_shm, "
                f"trainer slabs {r['slabs_live']} ({r['slab_bytes'] / 2**20:.0f} MiB); in the worker: "
                + ", ".join(f"{k} {v:.0f}" for k, v in r["worker"].items())
            )
        save_json(args.json, results)
        llm.llm_engine.engine_core.shutdown()
        return results


if __name__ == "__main__":
    main()

"""An OpenRLHF-shaped LoRA RL loop on Ray: a trainer actor, vLLM engine actors on two nodes, lora_ipc between.

    python examples/ray_rl_loop.py                 # simulated 2-node cluster on this machine (CPU is fine)
    python examples/ray_rl_loop.py --address auto  # your running Ray cluster, as you configured it

Each step the trainer actor takes an AdamW step on a tiny Llama's LoRA, then
  lora_ipc:  ``lora_ipc.ray.publish`` (shared memory into its node's relay, Ray's object store to the
             other node's relay) and ``lora_ipc.ray.load`` on every engine actor, concurrently;
  disk:      ``save_pretrained`` into a shared directory and every engine loads it (vLLM's own loader),
and the table shows both, end to end as the driver sees them, and checks that every engine generates the
same tokens from both.

The simulated cluster (``ray.cluster_utils.Cluster``: two raylets on this machine) is started inside a
private network namespace that has only loopback (``unshare -n``, needs root), so nothing binds the
machine's network address; pass --no-netns to skip that.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

NAME = "policy"
PROMPTS = [[1, 17, 42, 99, 7, 8], [1, 200, 3, 150, 23]]


def loopback_only() -> bool:
    return [name for _, name in socket.if_nameindex()] == ["lo"]


def reexec_in_private_netns() -> None:
    """Run this script again in a network namespace with only loopback (Ray then binds 127.0.0.1)."""
    import shlex

    cmd = "ip link set lo up && exec " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    os.execvp("unshare", ["unshare", "-n", "sh", "-c", cmd])


def engine_environment() -> None:
    from lora_ipc.benchmarks.cpu_engine import cpu_engine_env

    cpu_engine_env()
    # the engine core runs inside the actor's process: one process per engine, not two
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class Trainer:
    """The policy trainer: a tiny Llama with LoRA, AdamW, and lora_ipc.ray.publish after each step."""

    def __init__(self, hidden: int, layers: int, rank: int, seed: int = 0):
        import torch
        from peft import get_peft_model

        from lora_ipc.tiny import VOCAB, lora_config, tiny_llama

        torch.manual_seed(seed)
        self.model = get_peft_model(
            tiny_llama(0, torch.float32, VOCAB, hidden, layers), lora_config(r=rank, random_init=False)
        )
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-3)
        g = torch.Generator().manual_seed(seed)
        self.batch = torch.randint(4, 256, (8, 24), generator=g)  # the "rollouts" it learns from

    def adapter_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if "lora_" in n)

    def step(self) -> float:
        self.model.train()
        out = self.model(input_ids=self.batch, labels=self.batch)
        out.loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(out.loss)

    def publish(self) -> tuple[int, float]:
        import lora_ipc.ray

        t0 = time.perf_counter()
        version = lora_ipc.ray.publish(NAME, self.model)  # returns once every node's relay serves it
        return version, (time.perf_counter() - t0) * 1e3

    def save(self, path: str) -> float:
        t0 = time.perf_counter()
        self.model.save_pretrained(path)
        return (time.perf_counter() - t0) * 1e3


class Engine:
    """A vLLM engine actor as RL frameworks build them: ``LLM`` inside, ``collective_rpc`` forwarded."""

    def __init__(self, model_dir: str, rank: int):
        import lora_ipc.ray

        os.environ["LORA_IPC_ENDPOINT"] = lora_ipc.ray.local_endpoint()  # this node's relay
        engine_environment()
        from vllm import LLM

        from lora_ipc.tiny import tiny_engine_kwargs

        self.llm = LLM(
            **tiny_engine_kwargs(model_dir, rank, max_num_seqs=4, worker_extension_cls="lora_ipc.vllm.WorkerExtension")
        )

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        return self.llm.collective_rpc(method, timeout=timeout, args=args, kwargs=kwargs)

    def load_from_disk(self, path: str, lora_int_id: int) -> None:
        from vllm.lora.request import LoRARequest

        self.llm.llm_engine.add_lora(LoRARequest(f"disk-{lora_int_id}", lora_int_id, path))

    def generate(self, lora_name: str, lora_int_id: int, lora_path: str) -> list[list[int]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in PROMPTS],
            params,
            use_tqdm=False,
            lora_request=LoRARequest(lora_name, lora_int_id, lora_path),
        )
        return [list(o.outputs[0].token_ids) for o in outs]


def start_simulated_cluster(nodes: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=3 if nodes == 1 else 2, object_store_memory=128 << 20, include_dashboard=False),
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=2, object_store_memory=128 << 20)
    return cluster


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=128, help="tiny Llama width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (all 7 projections)")
    parser.add_argument("--nodes", type=int, default=2, help="simulated nodes (1: both engines beside the trainer)")
    parser.add_argument("--address", help="connect to this Ray cluster instead of simulating nodes")
    parser.add_argument("--no-netns", action="store_true", help="do not move into a private network namespace")
    args = parser.parse_args()
    if args.address is None and not args.no_netns and not loopback_only():
        reexec_in_private_netns()
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    import lora_ipc.ray
    from lora_ipc.tiny import write_model_dir

    started = time.perf_counter()
    cluster = None
    if args.address:
        ray.init(address=args.address)
    else:
        cluster = start_simulated_cluster(args.nodes)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    relays = lora_ipc.ray.start_relays(keep=2)
    print(f"{len(nodes)} node(s), relays: " + ", ".join(f"{n[:8]}→{e}" for n, e in relays.items()))

    shared = tempfile.mkdtemp(prefix="ray-rl-loop-")  # the "shared filesystem" of the disk path
    model_dir = write_model_dir(os.path.join(shared, "base"), args.hidden, args.layers)

    def on(i):
        return NodeAffinitySchedulingStrategy(node_id=nodes[i % len(nodes)], soft=False)

    trainer = (
        ray.remote(Trainer).options(num_cpus=1, scheduling_strategy=on(0)).remote(args.hidden, args.layers, args.rank)
    )
    engines = [
        ray.remote(Engine).options(num_cpus=1, scheduling_strategy=on(i)).remote(model_dir, args.rank) for i in range(2)
    ]
    adapter_mb = ray.get(trainer.adapter_bytes.remote()) / 2**20
    engine_nodes = ray.get([e.node_id.remote() for e in engines])
    print(
        f"trainer on {nodes[0][:8]}, engines on {[n[:8] for n in engine_nodes]} "
        f"(ready after {time.perf_counter() - started:.0f} s); adapter {adapter_mb:.2f} MB "
        f"(hidden {args.hidden}, {args.layers} layers, r{args.rank}, float32)"
    )

    rows = []
    header = (
        f"{'step':>4} {'loss':>7} {'ver':>4} | {'lora_ipc: publish→all loaded':>28} {'(publish, load)':>16} | "
        f"{'disk: save_pretrained + load':>28} {'(save, load)':>16} | {'ratio':>6} | tokens"
    )
    print(header + "\n" + "-" * len(header))
    for step in range(1, args.steps + 1):
        loss = ray.get(trainer.step.remote())

        t0 = time.perf_counter()
        version, publish_ms = ray.get(trainer.publish.remote())
        t1 = time.perf_counter()
        loaded = lora_ipc.ray.load(engines, NAME, version)
        t2 = time.perf_counter()
        ipc_ms, ipc_load_ms = (t2 - t0) * 1e3, (t2 - t1) * 1e3

        path = os.path.join(shared, f"step{step}")
        t0 = time.perf_counter()
        save_ms = ray.get(trainer.save.remote(path))
        t1 = time.perf_counter()
        ray.get([e.load_from_disk.remote(path, 10_000 + step) for e in engines])
        t2 = time.perf_counter()
        disk_ms, disk_load_ms = (t2 - t0) * 1e3, (t2 - t1) * 1e3

        same = all(
            ray.get(e.generate.remote(got["name"], got["lora_int_id"], got["lora_path"]))
            == ray.get(e.generate.remote(f"disk-{10_000 + step}", 10_000 + step, path))
            for e, got in zip(engines, loaded)
        )
        rows.append((ipc_ms, disk_ms))
        split = f"({publish_ms:.1f}, {ipc_load_ms:.1f})"
        print(
            f"{step:>4} {loss:>7.3f} {version:>4} | {ipc_ms:>25.1f} ms {split:>16} | "
            f"{disk_ms:>25.1f} ms {f'({save_ms:.1f}, {disk_load_ms:.1f})':>16} | "
            f"{disk_ms / ipc_ms:>5.1f}x | {'same' if same else 'DIFFERENT'}",
            flush=True,
        )
        if not same:
            print("engines generated different tokens from lora_ipc and from disk", file=sys.stderr)
            return 1

    steady = rows[1:] or rows  # the first step also opens the slabs and plans the layout
    ipc, disk = statistics.median(r[0] for r in steady), statistics.median(r[1] for r in steady)
    print(
        f"median after step 1: lora_ipc {ipc:.1f} ms, disk {disk:.1f} ms, disk/lora_ipc = {disk / ipc:.1f}x "
        f"({len(engines)} engines on {len(set(engine_nodes))} node(s)); total {time.perf_counter() - started:.0f} s"
    )
    lora_ipc.ray.stop_relays()
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

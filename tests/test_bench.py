"""``lora-ipc bench``: the transport benchmark's command writes its JSON and PNG."""

import json

from .helpers import cli


def test_bench_writes_png_and_json(tmp_path):
    out = cli(
        "bench",
        "--device",
        "cpu",
        "--layers",
        "2",
        "--ranks",
        "4,8",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--out",
        str(tmp_path),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "bench.json").read_text())
    assert set(results["ranks"]) == {"4", "8"}
    for r in results["ranks"].values():
        assert set(r["paths"]) == {"lora_ipc", "disk_shm", "ipc_per_tensor"}
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "lora_ipc" in out.stdout


def test_vllm_bench_floor_client_takes_every_fetch_argument():
    """The vLLM bench's floor stands in for AdapterClient in lora_ipc's loader: it must accept whatever
    the real fetch accepts (it fell behind once, ``max_bytes``, and the bench failed in the worker)."""
    import inspect

    from lora_ipc import AdapterClient
    from lora_ipc.benchmarks.vllm_lora import HeldClient

    real = inspect.signature(AdapterClient.fetch).parameters
    stand_in = inspect.signature(HeldClient.fetch).parameters
    assert [(p.name, p.kind) for p in real.values()] == [(p.name, p.kind) for p in stand_in.values()]

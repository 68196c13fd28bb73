"""``lora-ipc bench``: the benchmarks' commands run and write the JSON fields and PNGs the docs are made of.
Speed is never asserted here (benches/, docs/development/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from .helpers import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _positive(summary):
    assert summary["n"] >= 1 and 0 <= summary["p10_ms"] <= summary["p50_ms"] <= summary["p90_ms"], summary


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
        assert set(r["paths"]) == {"lora_ipc", "disk_shm", "ipc_per_tensor", "copy_floor", "two_copy_floor"}
        ratio = r["paths"]["lora_ipc"]["p50_ms"] / r["paths"]["two_copy_floor"]["p50_ms"]
        assert r["ratio_to_two_copies"] == pytest.approx(ratio)
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == PNG and len(png) > 20_000
    assert "lora_ipc" in out.stdout and "two_copy_floor (p50s, this run)" in out.stdout


def test_breakdown_without_an_engine_times_every_transport_stage(tmp_path):
    out = cli(
        *("bench", "--breakdown", "--engine", "none", "--device", "cpu", "--layers", "1,2", "--ranks", "4"),
        *("--iters", "3", "--warmup", "1", "--out", str(tmp_path)),
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "breakdown.json").read_text())
    assert results["mode"] == "transport" and results["date"]
    assert {"cpu", "cores", "torch", "vllm", "thp"} <= set(results["hardware"])
    assert [(c["layers"], c["rank"], c["tensors"]) for c in results["configs"]] == [(1, 4, 14), (2, 4, 28)]
    for c in results["configs"]:
        ipc, floor = c["paths"]["lora_ipc"], c["paths"]["two_copy_floor"]
        stages = {"publish_ms", "request_ms", "import_ms", "copy_ms", "release_ms", "unpack_ms", "handoff_ms"}
        assert stages | {"total_ms"} == set(ipc)
        assert {"pack_ms", "copy_out_ms", "total_ms"} == set(floor)
        for summary in (*ipc.values(), *floor.values()):
            _positive(summary)
        assert c["first_fetch_import_ms"] and all(ms > 0 for ms in c["first_fetch_import_ms"])  # the slabs' imports
        assert c["ratio_to_two_copies"] > 0
        total, two = ipc["total_ms"]["p50_ms"], c["ratio_to_two_copies"]
        assert c["above_floor_ms"] == pytest.approx(total - total / two)  # the same floor as the ratio's
    assert (tmp_path / "breakdown.png").read_bytes()[:8] == PNG
    assert "ratio to the two-copy floor" in out.stdout


def test_scaling_sweeps_bytes_tensors_and_consumers(tmp_path):
    argv = [sys.executable, "-m", "lora_ipc.benchmarks.scaling", "--device", "cpu", "--ranks", "4,8"]
    argv += ["--layers", "1", "--tensor-layers", "1,2", "--consumers", "1,2", "--iters", "2", "--warmup", "1"]
    argv += ["--json", str(tmp_path / "s.json"), "--png", str(tmp_path / "s.png")]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    results = json.loads((tmp_path / "s.json").read_text())
    assert [p["rank"] for p in results["bytes"]["points"]] == [4, 8]
    assert results["bytes"]["points"][0]["mb"] < results["bytes"]["points"][1]["mb"]
    for key in ("slope_ms_per_mb", "memcpy_slope_ms_per_mb"):
        assert isinstance(results["bytes"][key], float)
    assert [p["tensors"] for p in results["tensors"]["points"]] == [14, 28]
    assert [p["consumers"] for p in results["consumers"]["points"]] == [1, 2]
    for sweep in ("bytes", "tensors", "consumers"):
        for point in results[sweep]["points"]:
            _positive(point["lora_ipc"])
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG


@pytest.mark.vllm
def test_breakdown_into_a_vllm_engine_times_every_stage_beside_disk_and_the_floor(tmp_path):
    pytest.importorskip("vllm")
    out = cli(
        *("bench", "--breakdown", "--engine", "vllm", "--device", "cpu", "--layers", "1", "--ranks", "4"),
        *("--hidden", "128", "--iters", "2", "--warmup", "1", "--out", str(tmp_path)),
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads((tmp_path / "breakdown.json").read_text())
    assert results["mode"] == "engine" and results["hardware"]["vllm"]
    (config,) = results["configs"]
    assert (config["rank"], config["layers"], config["tensors"]) == (4, 1, 14)
    paths = config["paths"]
    assert set(paths) == {"lora_ipc", "disk", "floor", "lora_ipc_e2e", "disk_e2e"}
    from lora_ipc.benchmarks.breakdown import STAGES

    for path, stages in STAGES.items():
        assert set(stages) | {"total_ms"} <= set(paths[path]), path
        for summary in paths[path].values():
            _positive(summary)
    for path in ("lora_ipc_e2e", "disk_e2e"):
        _positive(paths[path]["total_ms"])
    assert config["first_fetch_import_ms"]  # the first fetch imported its slab (descriptor passing)
    assert (tmp_path / "breakdown.png").read_bytes()[:8] == PNG


def test_vllm_bench_floor_client_takes_every_fetch_argument():
    """The vLLM bench's floor stands in for AdapterClient in lora_ipc's loader: it must accept whatever
    the real fetch accepts (it fell behind once, ``max_bytes``, and the bench failed in the worker)."""
    import inspect

    from lora_ipc import AdapterClient
    from lora_ipc.benchmarks.vllm_lora import HeldClient

    real = inspect.signature(AdapterClient.fetch).parameters
    stand_in = inspect.signature(HeldClient.fetch).parameters
    assert [(p.name, p.kind) for p in real.values()] == [(p.name, p.kind) for p in stand_in.values()]


def test_destinations_compares_fresh_huge_page_and_recycled_buffers(tmp_path):
    from lora_ipc.benchmarks import destinations

    results = destinations.main(["--mb", "1,3", "--iters", "3", "--warmup", "1", "--json", str(tmp_path / "d.json")])
    assert json.loads((tmp_path / "d.json").read_text())["sizes"].keys() == {"1", "3"}
    for per in results["sizes"].values():
        for variant in destinations.VARIANTS:
            _positive(per[variant])
        assert per["pool_hits"] >= 3  # every timed pooled read reused the buffer the previous one gave back


def test_ray_nodes_times_lora_ipc_beside_disk_and_both_floors_across_two_nodes(tmp_path):
    """Two Ray nodes on loopback in a private network namespace (the benchmark moves itself there): every path
    is timed per stage and the consumer on node B got the producer's bytes on every path."""
    pytest.importorskip("ray")
    pytest.importorskip("safetensors")
    from .helpers import private_netns_unavailable, run_in_checkout

    why_not = private_netns_unavailable()
    if why_not:
        pytest.skip(f"the Ray benchmark needs a private network namespace: {why_not}")
    from lora_ipc.benchmarks import ray_nodes

    out_json = tmp_path / "ray-nodes.json"
    argv = [sys.executable, "-m", "lora_ipc.benchmarks.ray_nodes", "--ranks", "4,8", "--layers", "1"]
    out = run_in_checkout([*argv, "--iters", "2", "--warmup", "1", "--json", out_json], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    results = json.loads(out_json.read_text())
    assert results["date"] and results["hardware"]["ray"] and results["cluster"]["nodes"] == 2
    assert [(s["rank"], s["layers"], s["tensors"]) for s in results["sizes"]] == [(4, 1, 14), (8, 1, 14)]
    assert results["sizes"][0]["mb"] < results["sizes"][1]["mb"]
    stages = {
        "lora_ipc": {"publish_ms", "local_publish_ms", "replica_put_ms", "transfer_accept_ms", "fetch_ms"},
        "disk": {"save_ms", "load_ms", "fault_in_ms", "lazy_total_ms"},
        "ray_floor": {"put_ms", "get_ms"},
        "tcp_floor": set(),
    }
    for size in results["sizes"]:
        assert size["bytes_equal"] == dict.fromkeys(ray_nodes.PATHS, True), size["bytes_equal"]
        assert set(size["paths"]) == set(ray_nodes.PATHS) == set(stages)
        for path, names in stages.items():
            assert set(size["paths"][path]) == names | {"total_ms", "e2e_ms"}, path
            for summary in size["paths"][path].values():
                _positive(summary)
                assert summary["n"] == 2
        disk = size["paths"]["disk"]["total_ms"]["p50_ms"]
        assert size["disk_over_lora_ipc"] == pytest.approx(disk / size["paths"]["lora_ipc"]["total_ms"]["p50_ms"])
    assert "disk/lora_ipc" in out.stdout

"""The GPU machine's run script, rehearsed on CPU: every step it runs there runs here on CPU tensors at tiny
sizes (``benches/device_check.sh --cpu``), so an import error or a broken bench cannot reach the device."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, out, timeout):
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    return subprocess.run(
        ["bash", "benches/device_check.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_device_script_runs_every_step_on_cpu(tmp_path):
    done = _run(["--cpu"], tmp_path, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["mode"] == "cpu"
    assert set(summary["steps"]) == {"deps", "gpu_tests", "bench", "bucket", "breakdown"}
    assert all(step["rc"] == 0 for step in summary["steps"].values()), summary
    assert "skipped" in (tmp_path / "device_check.log").read_text()  # the GPU tests were collected, and skipped here
    assert json.loads((tmp_path / "bench.json").read_text())["ranks"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "breakdown.json").read_text())["configs"][0]["ratio_to_two_copies"] > 0
    assert (tmp_path / "breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bucket = json.loads((tmp_path / "bucket.json").read_text())
    assert bucket["buckets"] and bucket["buckets"][0]["gbps"] > 0
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) <= 8  # what comes back from the device


def test_device_script_stops_at_once_on_a_missing_dependency(tmp_path):
    done = _run(["--cpu", "--require", "torch", "no_such_module_lora_ipc"], tmp_path, timeout=120)
    assert done.returncode == 3
    assert "MISSING DEPENDENCY: no_such_module_lora_ipc" in done.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["steps"]) == ["deps"]  # nothing ran after it

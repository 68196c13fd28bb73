"""The GPU machine's one run (issue 18), as steps with a hard timeout each and a deadline for all.

    python3 benches/device_check.py                # on the GPU machine (via benches/device_check.sh)
    python3 benches/device_check.py --cpu          # the same steps, same modules, CPU tensors, tiny sizes

Steps: ``deps`` (every module the later steps import; stops the run at once, exit 3, naming what is missing),
``gpu_tests`` (``pytest -m gpu``: every GPU test; collected and skipped on CPU), ``bench`` (``lora-ipc
bench``: lora_ipc against /dev/shm safetensors, torch IPC per tensor and the one- and two-copy floors; JSON +
PNG), ``bucket`` (full-weight refit buckets against the device's own copy floor), ``breakdown`` (``lora-ipc
bench --breakdown --engine none``: each transport stage of a swap beside the two-copy floor; the stages inside a
vLLM engine need vLLM and an engine start, more than this run's minutes). Each later step runs even if an
earlier one failed.
Writes under ``--out`` (default $OUT, else bench-results), at most 8 files:
``summary.json`` (every step's exit code and seconds), ``device_check.log`` (all output),
``bench.json``, ``bench.png``, ``bucket.json``, ``breakdown.json``, ``breakdown.png``. Exit 0 iff every step
passed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED = (
    "torch",
    "zmq",
    "msgpack",
    "safetensors",
    "matplotlib",
    "peft",
    "pytest",
    "lora_ipc",
    "lora_ipc.core.backends.cuda",
    "lora_ipc.refit",
    "lora_ipc.benchmarks.transport",
    "lora_ipc.benchmarks.breakdown",
    "tests.models",
)
BUDGET_S = 350  # every step's timeout together (the run's limit: 6 device-minutes with the wheel install)
MISSING_EXIT = 3


# each device's sizes: ``lora-ipc bench``'s and benches/bench_bucket_transport.py's options
SIZES = {
    "cpu": {
        "bench": ["--ranks", "4", "--layers", "1", "--iters", "2", "--warmup", "1"],
        "bucket": ["--layers", "1", "--scale", "16", "--bucket-mib", "1", "--iters", "1"],
        "breakdown": ["--engine", "none", "--ranks", "4", "--layers", "1", "--iters", "2", "--warmup", "1"],
    },
    "cuda": {
        "bench": ["--ranks", "16,64", "--layers", "32", "--iters", "20", "--warmup", "3"],
        "bucket": ["--layers", "8", "--bucket-mib", "256", "1024", "--iters", "5"],
        "breakdown": ["--engine", "none", "--ranks", "16,64", "--layers", "32", "--iters", "20", "--warmup", "3"],
    },
}


# each step's timeout (s) per device; each device's together stay within BUDGET_S. The CPU rehearsal's GPU tests are
# only collected and skipped, and its benches run on a loaded 2-core machine: its time goes to them instead.
TIMEOUTS = {
    "cpu": {"gpu_tests": 150, "bench": 75, "bucket": 45, "breakdown": 80},
    "cuda": {"gpu_tests": 220, "bench": 60, "bucket": 40, "breakdown": 30},
}


def steps(cpu: bool, out: str) -> list[tuple[str, list[str], int]]:
    """(name, argv, timeout_s) of each step after ``deps``."""
    py = sys.executable
    device = "cpu" if cpu else "cuda"
    size = SIZES[device]
    bench = [py, "-m", "lora_ipc", "bench", "--device", device, *size["bench"], "--out", out]
    bucket_json = os.path.join(out, "bucket.json")
    bucket = [py, "benches/bench_bucket_transport.py", "--device", device, *size["bucket"], "--json", bucket_json]
    breakdown = [py, "-m", "lora_ipc", "bench", "--breakdown", "--device", device, *size["breakdown"], "--out", out]
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", "-m", "gpu", "tests"]
    timeout = TIMEOUTS[device]
    plan = [("gpu_tests", tests), ("bench", bench), ("bucket", bucket), ("breakdown", breakdown)]
    return [(name, argv, timeout[name]) for name, argv in plan]


def check_deps(modules, log) -> list[str]:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure to import is "missing" here
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    for line in missing:
        log(f"MISSING DEPENDENCY: {line}")
    return missing


def run_step(argv, timeout_s, log_file, stdout_path=None) -> tuple[int, float]:
    """Run ``argv`` in its own process group; kill the group at ``timeout_s``. (rc, seconds); rc 124 on timeout."""
    started = time.monotonic()
    out = open(stdout_path, "w") if stdout_path else None  # noqa: SIM115 - closed below
    try:
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            bufsize=1,
        )
        deadline = started + timeout_s

        def kill_group(*_):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        import threading

        timer = threading.Timer(timeout_s, kill_group)
        timer.start()
        try:
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                sys.stdout.write(line)
                if out is not None and line.startswith("{"):
                    out.write(line)
            proc.wait()
        finally:
            timer.cancel()
            kill_group()  # children a step left behind (spawned consumers) end with it
        rc = 124 if time.monotonic() >= deadline and proc.returncode < 0 else proc.returncode
        return rc, round(time.monotonic() - started, 1)
    finally:
        if out is not None:
            out.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="CPU tensors, tiny sizes (CI proves the script with this)")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "bench-results"))
    ap.add_argument("--only", nargs="*", help="run only these steps (after deps)")
    ap.add_argument("--require", nargs="*", default=list(REQUIRED), help="modules the deps step checks")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, ROOT)
    log_file = open(os.path.join(args.out, "device_check.log"), "a")  # noqa: SIM115 - closed at exit
    summary = {"mode": "cpu" if args.cpu else "gpu", "python": sys.version.split()[0], "steps": {}}

    def log(text):
        print(text, flush=True)
        log_file.write(text + "\n")
        log_file.flush()

    def write_summary():
        with open(os.path.join(args.out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)

    started = time.monotonic()
    missing = check_deps(args.require, log)
    summary["steps"]["deps"] = {"rc": MISSING_EXIT if missing else 0, "missing": missing}
    if missing:
        log(
            "device_check: stopping before any step: a dependency is missing (on the GPU machine pyzmq comes "
            "from the wheels in .whl/: run scripts/device_wheels.sh here and carry .whl)"
        )
        write_summary()
        return MISSING_EXIT
    import torch

    summary |= {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    if not args.cpu and not torch.cuda.is_available():
        log("device_check: torch sees no CUDA device; use --cpu for the CPU rehearsal")
        summary["steps"]["deps"]["rc"] = MISSING_EXIT
        write_summary()
        return MISSING_EXIT
    log(
        f"device_check ({summary['mode']}): python {summary['python']}, torch {summary['torch']}, "
        f"gpu {summary['gpu']}, out {args.out}"
    )
    plan = steps(args.cpu, args.out)
    assert sum(t for _, _, t in plan) <= BUDGET_S
    failed = False
    for name, step_argv, timeout_s in plan:
        if args.only is not None and name not in args.only:
            continue
        log(f"==== {name} (timeout {timeout_s} s): {' '.join(step_argv[1:])}")
        rc, seconds = run_step(step_argv, timeout_s, log_file)
        summary["steps"][name] = {"rc": rc, "seconds": seconds, "timed_out": rc == 124}
        log(f"==== {name}: rc {rc} in {seconds} s")
        failed |= rc != 0
        write_summary()
    summary["seconds"] = round(time.monotonic() - started, 1)
    write_summary()
    log(f"device_check: {'FAILED' if failed else 'ok'} in {summary['seconds']} s; results in {args.out}")
    log_file.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

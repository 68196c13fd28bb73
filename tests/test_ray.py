"""Runs the Ray tests (tests/ray_cluster_suite.py) inside a private network namespace.

Left alone, Ray binds the machine's network address. Here it must only ever bind loopback, so the
suite runs in a fresh network namespace that has nothing but ``lo`` (``unshare -n``, root as in CI),
as its own pytest process; this test passes when that run passes, and shows its report. Where the
namespace cannot be made (not root, no ``unshare``), it skips and says so. One two-node cluster is
shared by the whole suite.
"""

import os
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("vllm")

from .helpers import private_netns_unavailable, run_in_checkout  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SUITE = os.path.join(HERE, "ray_cluster_suite.py")
AUTHORITY_SUITE = os.path.join(HERE, "ray_authority_suite.py")


def run_suite_in_private_netns(suite: str, label: str) -> None:
    """Run the pytest module ``suite`` in its own process inside a fresh network namespace (loopback only);
    skip with the reason where that namespace cannot be made; fail, with its report, when the suite fails."""
    why_not = private_netns_unavailable()
    if why_not:
        pytest.skip(f"Ray tests not run: {why_not}")
    cmd = f"ip link set lo up && exec {sys.executable} -m pytest -q -rA -p no:cacheprovider {suite}"
    proc = run_in_checkout(["unshare", "-n", "sh", "-c", cmd], timeout=1500)
    report = proc.stdout[-20000:]
    print(report)
    assert proc.returncode == 0, f"{label} failed (rc {proc.returncode}):\n{report}\n{proc.stderr[-5000:]}"
    assert " passed" in report and " skipped" not in report.splitlines()[-1], report[-2000:]


def test_ray_suite_in_private_network_namespace():
    run_suite_in_private_netns(SUITE, "Ray suite")


def test_ray_authority_suite_in_private_network_namespace():
    """Version numbers and relay directories across nodes (no engine: a cluster of two relays, ~15 s)."""
    run_suite_in_private_netns(AUTHORITY_SUITE, "Ray authority suite")

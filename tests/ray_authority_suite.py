"""One authority per name across nodes, and relay sockets no other user can pre-empt (issue 23: 17, 18, 21).

Run by tests/test_ray.py inside a private network namespace (only ``lo``): Ray binds loopback only. A
two-node cluster with one relay per node and no engine. The cluster runs with ``TMPDIR`` set to a fresh
directory in which the old predictable relay directory ``lora-ipc-ray-<uid>`` was made first, writable by
everyone: a directory another user made there first is refused the same way (the trust check refuses
any directory another user could write), so relays that used that path could not start at all.
"""

import os
import stat
import tempfile
import time

import pytest

ray = pytest.importorskip("ray")

from .helpers import assert_same_adapter, skip_unless_loopback_only  # noqa: E402

skip_unless_loopback_only("tests/test_ray.py")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import lora_ipc.ray  # noqa: E402
from lora_ipc.ray.naming import NAMESPACE, relay_actor_name  # noqa: E402


def on(node_id: str):
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


@pytest.fixture(scope="module")
def cluster():
    tmp = tempfile.mkdtemp(prefix="lr", dir="/tmp")  # short: Ray's own sockets go under it too
    squatted = os.path.join(tmp, f"lora-ipc-ray-{os.getuid()}")
    os.mkdir(squatted)
    os.chmod(squatted, 0o777)  # pre-empted: the old fixed relay directory, writable by anyone
    saved = {k: os.environ.get(k) for k in ("TMPDIR", "XDG_RUNTIME_DIR")}
    os.environ["TMPDIR"] = tmp
    os.environ.pop("XDG_RUNTIME_DIR", None)
    tempfile.tempdir = None
    c = Cluster(
        initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=96 << 20, include_dashboard=False)
    )
    b = c.add_node(num_cpus=2, object_store_memory=96 << 20)
    try:
        ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
        c.wait_for_nodes()
        relays = lora_ipc.ray.start_relays(keep=4)
        yield {"A": c.head_node.node_id, "B": b.node_id, "relays": relays, "tmp": tmp, "squatted": squatted}
        lora_ipc.ray.stop_relays()
        ray.shutdown()
    finally:
        c.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        tempfile.tempdir = None


def relay_of(node_id: str):
    return ray.get_actor(relay_actor_name(node_id), namespace=NAMESPACE)


@ray.remote(num_cpus=0)
def publish_here(name: str, seed: int):
    """Publish into this node's relay only (no replication yet): what each node's trainer does first."""
    from lora_ipc import RemoteExporter
    from lora_ipc.ray.relay_fleet import local_relay
    from tests import models

    tensors = models.random_adapter(seed)
    with RemoteExporter(local_relay()[1]["endpoint"], timeout_s=20) as exporter:
        version = exporter.publish(name, tensors, models.RANDOM_ADAPTER_CONFIG)
    return version, tensors


@ray.remote(num_cpus=0)
def served_here(endpoint: str, name: str, version: int):
    from lora_ipc import AdapterClient

    with AdapterClient(endpoint, timeout_s=10) as client:
        adapter = client.fetch(name, version)
        return adapter.version, {k: v.clone() for k, v in adapter.tensors.items()}


def test_relay_sockets_live_in_private_directories_found_through_the_relays(cluster):
    relays = cluster["relays"]
    assert len(set(relays.values())) == 2
    for node, endpoint in relays.items():
        directory = os.path.dirname(endpoint[len("ipc://") :])
        assert directory != cluster["squatted"]
        st = os.lstat(directory)
        assert stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
        assert ray.get(relay_of(node).info.remote())["endpoint"] == endpoint
    assert lora_ipc.ray.local_endpoint() == relays[cluster["A"]]


def test_two_publishers_of_one_name_on_two_nodes_never_share_a_number(cluster):
    a, b = cluster["A"], cluster["B"]
    (va, ta), (vb, tb) = ray.get(
        [
            publish_here.options(scheduling_strategy=on(a)).remote("shared", 1),
            publish_here.options(scheduling_strategy=on(b)).remote("shared", 2),
        ]
    )
    assert va != vb, f"two byte sets were both numbered {va} under one epoch"
    reports = {
        node: ray.get(relay_of(node).replicate.remote("shared", version, 30.0)) for node, version in ((a, va), (b, vb))
    }
    older, newer = (a, b) if va < vb else (b, a)
    assert reports[newer].failed == {}  # the newer number reached the other node
    assert reports[older].failed == {newer: f"serves newer version {max(va, vb)}"}  # said, never "served"
    bytes_of = {va: ta, vb: tb}
    for node, endpoint in cluster["relays"].items():
        for version in ray.get(relay_of(node).versions.remote())["shared"]:
            fetch = served_here.options(scheduling_strategy=on(node))
            got, tensors = ray.get(fetch.remote(endpoint, "shared", version))
            assert got == version
            assert_same_adapter(tensors, bytes_of[version])  # one number, one byte set, on every node


def test_a_restarted_relay_never_issues_a_number_again(cluster):
    b = cluster["B"]
    handle = relay_of(b)
    before = ray.get(handle.info.remote())
    first, _ = ray.get(publish_here.options(scheduling_strategy=on(b)).remote("restart", 3))  # never replicated
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + 120
    while True:
        try:
            info = ray.get(handle.info.remote(), timeout=5)
            if info["pid"] != before["pid"] and info["ready"]:
                break
        except ray.exceptions.RayError:
            pass
        assert time.monotonic() < deadline, "relay B not back within 120 s"
        time.sleep(0.05)
    assert info["restarted"] and info["endpoint"] == before["endpoint"]  # same socket, found through its info
    assert info["epoch"] == before["epoch"]
    second, tensors = ray.get(publish_here.options(scheduling_strategy=on(b)).remote("restart", 4))
    assert second > first, f"the restarted relay issued version {second} again under epoch {info['epoch']}"
    got, served = ray.get(served_here.options(scheduling_strategy=on(b)).remote(before["endpoint"], "restart", second))
    assert got == second
    assert_same_adapter(served, tensors)

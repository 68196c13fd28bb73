"""lora_ipc.ray on a real two-node Ray cluster (separate raylets) with the real vLLM CPU engine.

Run by tests/test_ray.py inside a private network namespace (only ``lo``): Ray binds loopback only.
Node A holds the trainer actor, node B the AsyncLLM engine actor; each node has its relay. Tokens are
compared with vLLM's own disk load of the same adapter (``save_pretrained`` by the trainer), bytes
bitwise with the trainer's tensors.
"""

import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("vllm")

from .helpers import assert_same_adapter, skip_unless_loopback_only  # noqa: E402

skip_unless_loopback_only("tests/test_ray.py")

from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: E402

import lora_ipc.ray  # noqa: E402
from lora_ipc.ray import EngineLoadError  # noqa: E402
from lora_ipc.ray.naming import NAMESPACE, relay_actor_name  # noqa: E402

from . import ray_actors  # noqa: E402

NAME = "policy"
ENGINE_TIMEOUT_S = 3.0  # the engine workers' lora_ipc client timeout (LORA_IPC_TIMEOUT_S)
DETECTED: dict[str, float] = {}


def on(node_id: str):
    return NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(
        initialize_head=True, head_node_args=dict(num_cpus=2, object_store_memory=128 << 20, include_dashboard=False)
    )
    b = c.add_node(num_cpus=2, object_store_memory=128 << 20)
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False)
    c.wait_for_nodes()
    relays = lora_ipc.ray.start_relays(keep=8)
    yield {"A": c.head_node.node_id, "B": b.node_id, "relays": relays}
    print("detection times (s):", {k: round(v, 3) for k, v in DETECTED.items()})
    lora_ipc.ray.stop_relays()
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def trainer(cluster):
    actor = ray.remote(ray_actors.Trainer).options(num_cpus=1, scheduling_strategy=on(cluster["A"])).remote(0)
    assert ray.get(actor.node_id.remote(), timeout=120) == cluster["A"]
    return actor


@pytest.fixture(scope="module")
def engine(cluster, model_dir):
    actor = (
        ray.remote(ray_actors.AsyncEngine)
        .options(num_cpus=1, scheduling_strategy=on(cluster["B"]))
        .remote(model_dir, timeout_s=ENGINE_TIMEOUT_S)
    )
    info = ray.get(actor.info.remote(), timeout=600)
    assert info == {"node_id": cluster["B"], "endpoint": cluster["relays"][cluster["B"]]}
    return actor


@pytest.fixture(scope="module")
def published(cluster, trainer, tmp_path_factory):
    """Per version: the trainer's directory written by save_pretrained and its tensors."""
    return {}


def publish(trainer, published, root, step=None, wait=True):
    save_dir = str(root / f"step{step}")
    version = ray.get(trainer.publish.remote(NAME, step, save_dir, wait), timeout=120)
    published[version] = {"dir": save_dir, "tensors": ray.get(trainer.adapter.remote())}
    return version


def served_on(node_id: str, endpoint: str, version=None):
    fetch = ray.remote(ray_actors.fetch).options(num_cpus=0, scheduling_strategy=on(node_id))
    return ray.get(fetch.remote(endpoint, NAME, version), timeout=60)


def disk_tokens(engine, published, version):
    return ray.get(engine.generate.remote(("disk", published[version]["dir"], 900_000 + version)), timeout=120)


def relay_of(node_id: str):
    return ray.get_actor(relay_actor_name(node_id), namespace=NAMESPACE)


# ---- acceptance 1: trainer on A, engine on B, three versions -------------------------------------


def test_one_relay_per_node_on_loopback(cluster):
    relays = cluster["relays"]
    assert set(relays) == {cluster["A"], cluster["B"]}
    assert len(set(relays.values())) == 2
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    assert lora_ipc.ray.start_relays() == relays  # idempotent
    epochs = set()
    for node, endpoint in relays.items():
        info = ray.get(relay_of(node).info.remote())
        assert (info["node_id"], info["endpoint"], info["ready"]) == (node, endpoint, True)
        epochs.add(info["epoch"])
    assert len(epochs) == 1  # one epoch for the set: a pinned URI names the same bytes on every node


def test_three_versions_from_node_a_generate_like_disk_on_node_b(cluster, trainer, engine, published, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    base = ray.get(engine.generate.remote())
    seen = []
    for step in (None, 1, 2):
        version = publish(trainer, published, root, step)
        [loaded] = lora_ipc.ray.load([engine], NAME)  # newest every relay serves
        assert (loaded["version"], loaded["endpoint"]) == (version, cluster["relays"][cluster["B"]])
        got_version, served = served_on(cluster["B"], cluster["relays"][cluster["B"]], version)
        assert got_version == version
        assert_same_adapter(served, published[version]["tensors"])  # bitwise, node B's relay vs trainer
        tokens = ray.get(engine.generate.remote(("ipc", NAME, version)))
        assert tokens == disk_tokens(engine, published, version)
        seen.append(tokens)
    assert len({str(t) for t in seen}) == 3 and base not in seen
    assert sorted(published)[-3:] == [1, 2, 3]


def test_composed_worker_extension_keeps_both_rpcs(engine):
    [other] = ray.get(engine.collective_rpc.remote("other_extension_ping"))
    assert other["has_model_runner"] is True
    [loaded] = ray.get(engine.collective_rpc.remote("lora_ipc_loaded"))
    assert any(d["lora_path"] and d["lora_path"].startswith("lora-ipc://") for d in loaded)


def test_load_failure_names_the_engine_and_it_keeps_serving(cluster, engine, published):
    newest = max(published)
    with pytest.raises(EngineLoadError, match=r"engine 0 .*VersionNotFound") as info:
        lora_ipc.ray.load([engine], NAME, version=newest + 100)
    assert (info.value.engine, info.value.error_type) == (0, "VersionNotFound")
    assert ray.get(engine.generate.remote(("ipc", NAME, newest))) == disk_tokens(engine, published, newest)


def test_a_workers_typed_error_reaches_the_driver_as_its_class_with_its_own_message(cluster, engine, published):
    """A vLLM worker's lora_ipc error crosses vLLM's text-only RPC and Ray as a typed code: the driver gets
    the worker's class with the worker's message (``EngineLoadError.error``, also its ``__cause__``)."""
    from lora_ipc.core.errors import ExporterUnavailable, VersionNotFound

    missing = max(published) + 100
    with pytest.raises(EngineLoadError) as info:
        lora_ipc.ray.load([engine], NAME, version=missing)
    error = info.value.error
    assert type(error) is VersionNotFound and info.value.__cause__ is error, repr(error)
    assert str(error).startswith(f"{NAME!r} version {missing} is not kept at ipc://"), str(error)
    assert "[lora_ipc:" not in str(error) and "Call to" not in str(error)
    broken = ray.remote(ray_actors.BrokenEngine).options(num_cpus=0, scheduling_strategy=on(cluster["A"])).remote()
    try:
        with pytest.raises(EngineLoadError) as info:
            lora_ipc.ray.load([broken], NAME, max(published))
        assert type(info.value.error) is ExporterUnavailable
        assert str(info.value.error) == "no reply from ipc:///nowhere within 3s"
    finally:
        ray.kill(broken)


def test_one_broken_engine_is_named_and_the_others_keep_the_new_version(
    cluster, trainer, engine, published, tmp_path_factory
):
    broken = ray.remote(ray_actors.BrokenEngine).options(num_cpus=0, scheduling_strategy=on(cluster["A"])).remote()
    version = publish(trainer, published, tmp_path_factory.mktemp("broken"), step=5)
    with pytest.raises(EngineLoadError) as info:
        lora_ipc.ray.load([engine, broken], NAME, version)
    assert (info.value.engine, info.value.error_type) == (1, "ExporterUnavailable")
    assert [(r["engine"], r["version"]) for r in info.value.loaded] == [(0, version)]
    assert ray.get(engine.generate.remote(("ipc", NAME, version))) == disk_tokens(engine, published, version)
    ray.kill(broken)


def test_publish_without_waiting_reaches_every_relay(cluster, trainer, published, tmp_path_factory):
    version = publish(trainer, published, tmp_path_factory.mktemp("nowait"), step=6, wait=False)
    deadline = time.monotonic() + 60
    while lora_ipc.ray.served_version(NAME) != version:
        assert time.monotonic() < deadline, "the other relay never served the version"
        time.sleep(0.05)
    _, served = served_on(cluster["B"], cluster["relays"][cluster["B"]], version)
    assert_same_adapter(served, published[version]["tensors"])


# ---- acceptance 2: AsyncLLM serving a stream while 5 versions are published and loaded ------------


def wait_started(engine, version, count=2, timeout_s=300.0) -> dict:
    """Until ``count`` requests pinned to ``version`` have started; returns the stream's state."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = ray.get(engine.stream_state.remote())
        if state["started"].get(version, 0) >= count:
            return state
        time.sleep(0.1)
    raise AssertionError(f"no requests started on version {version} within {timeout_s}s")


def test_async_stream_while_five_versions_load(cluster, trainer, engine, published, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    first = max(published)
    ray.get(engine.set_version.remote(NAME, first))
    ray.get(engine.start_stream.remote())
    versions, in_flight_at_load = [], []
    wait_started(engine, first)
    for step in range(10, 15):
        version = publish(trainer, published, root, step)
        in_flight_at_load.append(ray.get(engine.stream_state.remote())["in_flight"])
        lora_ipc.ray.load([engine], NAME, version)  # while requests of the previous version run
        ray.get(engine.set_version.remote(NAME, version))
        wait_started(engine, version)
        versions.append(version)
    records = ray.get(engine.stop_stream.remote(), timeout=300)
    assert [r for r in records if "error" in r] == []
    assert max(in_flight_at_load) > 0, in_flight_at_load
    by_version = {v: [r for r in records if r["version"] == v] for v in [first, *versions]}
    assert all(by_version.values()), {v: len(r) for v, r in by_version.items()}
    references = {v: disk_tokens(engine, published, v) for v in by_version}
    assert len({str(r) for r in references.values()}) == len(references)  # versions are distinguishable
    base = ray.get(engine.generate.remote())  # a request served without its adapter would give these
    assert all(ref[i] != base[i] for ref in references.values() for i in range(len(base)))
    wrong = [(r["version"], r["prompt"]) for r in records if r["tokens"] != references[r["version"]][r["prompt"]]]
    assert wrong == [], f"{len(wrong)} of {len(records)} requests did not match their pinned version"
    print(
        f"stream: {len(records)} requests over {len(by_version)} versions, 0 failed; "
        f"requests in flight when each load began: {in_flight_at_load}"
    )


# ---- acceptance 3: faults --------------------------------------------------------------------------


def wait_restarted(handle, old_pid: int, timeout_s: float = 120.0) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        try:
            info = ray.get(handle.info.remote(), timeout=5)
            if info["pid"] != old_pid and info["ready"]:
                return time.monotonic() - started
        except Exception:
            pass
        time.sleep(0.05)
    raise AssertionError(f"relay not back within {timeout_s}s")


def test_killed_relays_are_restarted_and_the_next_publish_repopulates_them(
    cluster, trainer, engine, published, tmp_path_factory
):
    root = tmp_path_factory.mktemp("relay-restart")
    a, b = cluster["A"], cluster["B"]
    endpoint_b = cluster["relays"][b]
    last = max(published)
    for node, label in ((b, "relay_B_restart_s"), (a, "relay_A_restart_s")):
        handle = relay_of(node)
        old = ray.get(handle.info.remote())
        ray.kill(handle, no_restart=False)
        DETECTED[label] = wait_restarted(handle, old["pid"], timeout_s=120)  # fails past 120 s
        info = ray.get(handle.info.remote())
        assert info["restarted"] and info["endpoint"] == old["endpoint"]
        assert info["caught_up"] == {NAME: last}  # copied the newest version from the other relay
        assert info["epoch"] == old["epoch"]  # it continues the set's numbering, so it keeps the set's epoch
        version = publish(trainer, published, root, step=20 + len(DETECTED))
        assert version == last + 1  # numbering continues across the restart of the publishing relay
        got_version, served = served_on(b, endpoint_b)
        assert got_version == version
        assert_same_adapter(served, published[version]["tensors"])
        [loaded] = lora_ipc.ray.load([engine], NAME)
        assert loaded["version"] == version
        assert ray.get(engine.generate.remote(("ipc", NAME, version))) == disk_tokens(engine, published, version)
        last = version


def test_engine_whose_relay_is_gone_gets_exporter_unavailable_and_keeps_serving(
    cluster, trainer, engine, published, tmp_path_factory
):
    b = cluster["B"]
    serving = max(published)
    ray.get(relay_of(b).shutdown.remote())
    ray.kill(relay_of(b), no_restart=True)
    version = publish(trainer, published, tmp_path_factory.mktemp("gone"), step=30)  # node A only now
    started = time.monotonic()
    with pytest.raises(EngineLoadError, match="ExporterUnavailable") as info:
        lora_ipc.ray.load([engine], NAME, version)
    assert info.value.error_type == "ExporterUnavailable"
    DETECTED["engine_relay_gone_s"] = elapsed = time.monotonic() - started
    assert ENGINE_TIMEOUT_S <= elapsed < ENGINE_TIMEOUT_S + 30
    assert ray.get(engine.generate.remote(("ipc", NAME, serving))) == disk_tokens(engine, published, serving)
    # a fresh relay on B catches up from A and the engine loads the version it could not before
    relays = lora_ipc.ray.start_relays()
    assert relays[b] == cluster["relays"][b]
    [loaded] = lora_ipc.ray.load([engine], NAME, version)
    assert loaded["version"] == version
    assert ray.get(engine.generate.remote(("ipc", NAME, version))) == disk_tokens(engine, published, version)


def test_trainer_killed_relays_keep_serving_the_last_version(cluster, trainer, engine, published):
    last = max(published)
    ray.kill(trainer, no_restart=True)
    started = time.monotonic()
    # ray.kill is asynchronous: a call sent before the kill lands may still be answered; the next ones fail
    with pytest.raises(ray.exceptions.RayActorError):
        while True:
            ray.get(trainer.node_id.remote(), timeout=60)
            assert time.monotonic() - started < 60, "the killed trainer still answers"
            time.sleep(0.05)
    DETECTED["trainer_killed_s"] = time.monotonic() - started
    for node, endpoint in cluster["relays"].items():
        got_version, served = served_on(node, endpoint)
        assert got_version == last
        assert_same_adapter(served, published[last]["tensors"])
    assert lora_ipc.ray.served_version(NAME) == last
    [loaded] = lora_ipc.ray.load([engine], NAME, lora_int_id=77)  # a fresh load after the trainer is gone
    assert loaded["version"] == last
    assert ray.get(engine.generate.remote(("ipc", NAME, last))) == disk_tokens(engine, published, last)


# ---- engine actors shaped otherwise (verl's collective_rpc answers None; other method names) -------


def test_load_reads_engines_whose_rpc_answers_none_or_has_another_name(cluster):
    quiet = ray.remote(ray_actors.QuietEngine).options(num_cpus=0).remote()
    got = lora_ipc.ray.load([quiet], NAME, 3)
    assert got[0]["workers"] is None and (got[0]["name"], got[0]["version"], got[0]["engine"]) == (NAME, 3, 0)
    renamed = lora_ipc.ray.load([quiet], NAME, 4, rpc="rpc_all")
    assert (renamed[0]["workers"], renamed[0]["version"], renamed[0]["lora_int_id"]) == (1, 4, 7)
    by_callable = lora_ipc.ray.load([quiet], NAME, 5, rpc=lambda e, method, args: e.rpc_all.remote(method, args))
    assert by_callable[0]["version"] == 5
    assert ray.get(quiet.seen.remote()) == [("lora_ipc_load", (NAME, None, v, None)) for v in (3, 4, 5)]


def test_load_names_engines_it_cannot_read_or_reach(cluster):
    quiet = ray.remote(ray_actors.QuietEngine).options(num_cpus=0).remote()
    odd = ray.remote(ray_actors.OddEngine).options(num_cpus=0).remote()
    with pytest.raises(EngineLoadError) as info:
        lora_ipc.ray.load([quiet, odd], NAME, 3)
    assert (info.value.engine, info.value.error_type) == (1, "UnreadableResult")
    assert "'ok'" in str(info.value) and [r["engine"] for r in info.value.loaded] == [0]
    with pytest.raises(EngineLoadError) as info:
        lora_ipc.ray.load([quiet], NAME, 3, rpc="no_such_rpc")
    assert (info.value.engine, info.value.error_type) == (0, "NoSuchMethod")
    assert "no_such_rpc" in str(info.value)

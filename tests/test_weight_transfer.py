"""Full-weight refit through vLLM's weight-transfer framework with the ``lora_ipc`` backend, on the real
CPU engine. A trainer in its own process perturbs every weight of the tiny Llama and sends them with
``WeightTransferTrainerFactory.trainer_init(LoraIpcTrainerInitInfo(...), client=..., source=ModuleSource(model))``
then ``send_weights()``; the engine's greedy tokens are compared with an engine loaded from disk with the
same weights (``save_pretrained``). Engines: the one under test, one reference, one OpenAI server."""

import os
import time

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm.lora.request import LoRARequest  # noqa: E402

from lora_ipc import AdapterExporter  # noqa: E402
from lora_ipc.tiny import tiny_llama  # noqa: E402
from lora_ipc.vllm import lora_request  # noqa: E402
from lora_ipc.vllm.weight_transfer import OfflineLLMClient  # noqa: E402

from . import engine, models  # noqa: E402
from .procs import RefitTrainerProcess  # noqa: E402

pytestmark = pytest.mark.vllm

BUCKET = 48 << 10  # smaller than the 64 KiB embedding, lm_head and MLP weights: those are split
STEPS = (1, 2, 3)
INIT = {"bucket_bytes": BUCKET, "timeout_s": 5.0}


@pytest.fixture(scope="module")
def llm(model_dir):
    llm = engine.make_llm(
        model_dir,
        worker_extension_cls="tests.refit_extension.FaultyRefitExtension",  # lora_ipc's, plus a fault to inject
        weight_transfer_config={"backend": "lora_ipc"},
    )
    yield llm
    llm.llm_engine.engine_core.shutdown()


@pytest.fixture(scope="module")
def client(llm):
    return OfflineLLMClient(llm)


def serve(client, seen=None):
    """Run the trainer's four-method calls on the engine in this process (recording them in ``seen``)."""

    def handle(method, *args):
        if seen is not None:
            seen.append((method, args))
        getattr(client, method)(*args)

    return handle


@pytest.fixture(scope="module")
def trainer():
    proc = RefitTrainerProcess()
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def progress():
    return {"step": 0}


@pytest.fixture(scope="module")
def refits(llm, trainer, client, progress, tmp_path_factory):
    """Steps 1-3 sent to the engine: per step, the directory the trainer saved and the engine's tokens."""
    root = tmp_path_factory.mktemp("refit")
    out = {0: (None, engine.generate(llm))}
    model_bytes = sum(p.numel() * p.element_size() for p in tiny_llama(0, torch.bfloat16).parameters())
    seen = []
    trainer.call("init", "pipe", None, INIT, handler=serve(client, seen))
    for step in STEPS:
        path = str(root / f"step{step}")
        seen.clear()
        trainer.call("step", step, True, path, f"step-{step}", handler=serve(client, seen))
        methods = [m for m, _ in seen]
        updates = [args[0] for m, args in seen if m == "update_weights"]
        assert methods == ["start_weight_update", *["update_weights"] * len(updates), "finish_weight_update"]
        assert len(updates) == updates[0]["buckets"] > 1 and any(u["pieces"] for u in updates)  # split tensors
        stats = llm.collective_rpc("lora_ipc_refit_stats")[0]
        assert stats["buckets"] == len(updates) and stats["bytes"] == model_bytes  # every weight, once
        progress["step"] = step
        assert llm.get_weight_version() == f"step-{step}"  # finish_weight_update(weight_version=...) round trip
        out[step] = (path, engine.generate(llm))
    return out


@pytest.fixture(scope="module")
def reference(refits):
    """An engine started fresh from step 1's directory; ``reference(path)`` moves it to another saved step
    through vLLM's own disk loader (``reload_weights``) and returns its greedy tokens."""
    first = refits[1][0]
    ref = engine.make_llm(first)
    current = {"path": first}

    def tokens(path, lora=None):
        if path != current["path"]:
            ref.collective_rpc("reload_weights", kwargs={"weights_path": path})
            ref.reset_prefix_cache()
            current["path"] = path
        return engine.generate(ref, lora)

    yield tokens
    ref.llm_engine.engine_core.shutdown()


def test_three_refits_match_an_engine_loaded_from_disk(refits, reference):
    for step in STEPS:
        path, got = refits[step]
        assert got != refits[step - 1][1], f"step {step} did not change the engine's outputs"
        assert got == reference(path), f"step {step}"


def loaded_ids(llm) -> set[int]:
    return {d["lora_int_id"] for d in llm.collective_rpc("lora_ipc_loaded")[0]}


def test_lora_ipc_adapter_across_a_refit(llm, trainer, client, refits, reference, progress, tmp_path):
    """vLLM's finish_weight_update drops every adapter; a request naming a lora-ipc:// adapter loads it again."""
    path = refits[STEPS[-1]][0]
    peft = models.peft_model(7, torch.bfloat16)
    peft.save_pretrained(str(tmp_path / "adapter"))
    disk = LoRARequest("disk-adapter", 4242, str(tmp_path / "adapter"))
    with AdapterExporter() as exporter:
        exporter.publish("policy", peft)
        request = lora_request("policy", exporter.endpoint)
        before = engine.generate(llm, request)
        assert before == reference(path, disk)
        assert before != refits[STEPS[-1]][1]
        assert request.lora_int_id in loaded_ids(llm)
        loads = llm.collective_rpc("lora_ipc_load_count")[0]

        step = progress["step"] + 1
        new_path = str(tmp_path / f"step{step}")
        trainer.call("step", step, True, new_path, f"step-{step}", handler=serve(client))
        progress["step"] = step
        assert request.lora_int_id not in loaded_ids(llm)  # removed by the refit

        after = engine.generate(llm, request)  # re-loaded through lora-ipc:// on first use
        assert llm.collective_rpc("lora_ipc_load_count")[0] == loads + 1
        assert after == reference(new_path, disk)
        assert after != before
        assert engine.generate(llm) == reference(new_path)


def test_trainer_gone_mid_stream_fails_within_the_timeout_then_a_new_trainer_recovers(
    llm, trainer, client, reference, refits, progress, tmp_path
):
    step = progress["step"] + 1
    version_before = llm.get_weight_version()
    before = engine.generate(llm)
    failure = {}

    def kill_before_second_bucket(method, *args):
        if method == "update_weights" and args[0]["bucket"] == 1:
            trainer.kill()  # bucket 0 is loaded, bucket 1 published but not fetched yet
            started = time.monotonic()
            try:
                client.update_weights(args[0])
            except Exception as exc:  # vLLM re-raises the worker's error
                failure.update(error=str(exc), seconds=time.monotonic() - started)
            return
        getattr(client, method)(*args)

    with pytest.raises(ProcessLookupError):
        trainer.call("step", step, True, None, f"step-{step}", handler=kill_before_second_bucket)
    assert "no reply" in failure["error"] and "bucket 2 of" in failure["error"], failure
    assert failure["seconds"] < 60  # INIT's timeout_s is 5 s: an error, not a hang
    assert llm.get_weight_version() == version_before  # finish never ran
    assert engine.generate(llm) == before  # rolled back: the complete old weights, not a mix

    fresh = RefitTrainerProcess()
    try:
        for s in range(1, step):  # the new trainer resumes from the same training state
            fresh.call("step", s, False, None, None)
        fresh.call("init", "pipe", None, INIT, handler=serve(client))
        path = str(tmp_path / f"step{step}")
        fresh.call("step", step, True, path, f"step-{step}", handler=serve(client))
        assert llm.get_weight_version() == f"step-{step}"
        assert engine.generate(llm) == reference(path)
    finally:
        fresh.close()
    progress["step"] = step


IDLE = 3.0  # idle_timeout_s of the updates cut short below


def rollbacks(llm) -> int:
    return llm.collective_rpc("lora_ipc_refit_stats")[0].get("rollbacks", 0)


def wait_for_rollback(llm, count: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while rollbacks(llm) <= count:
        assert time.monotonic() < deadline, "the worker did not roll the idle update back"
        time.sleep(0.2)


def resumed_trainer(step: int) -> RefitTrainerProcess:
    """A trainer whose model went through steps 1..step-1 (nothing sent), as after a restart from a checkpoint."""
    proc = RefitTrainerProcess()
    for s in range(1, step):
        proc.call("step", s, False, None, None)
    return proc


def test_a_dead_trainers_update_is_rolled_back_to_the_exact_old_weights_and_the_next_refit_works(
    llm, client, reference, progress, tmp_path
):
    """Issue 15: bucket 1 of n delivered, then the trainer dies and nobody calls again."""
    step = progress["step"] + 1
    before, version, count = engine.generate(llm), llm.get_weight_version(), rollbacks(llm)
    dying = resumed_trainer(step)
    try:
        dying.call("init", "pipe", None, {**INIT, "idle_timeout_s": IDLE}, handler=serve(client))

        def die_after_first_bucket(method, *args):
            if method == "update_weights" and args[0]["bucket"] == 1:
                dying.kill()
                return
            getattr(client, method)(*args)

        with pytest.raises(ProcessLookupError):
            dying.call("step", step, True, None, "never", handler=die_after_first_bucket)
    finally:
        dying.close()
    assert engine.generate(llm) == before  # the update is still open: the model was not touched
    wait_for_rollback(llm, count)
    assert engine.generate(llm) == before and llm.get_weight_version() == version
    stats = llm.collective_rpc("lora_ipc_refit_stats")[0]
    assert stats["last_rollback"]["buckets"] == 1 and stats["last_rollback"]["of"] > 1, stats

    fresh = resumed_trainer(step)  # the documented recovery: trainer_init, then send_weights
    try:
        fresh.call("init", "pipe", None, INIT, handler=serve(client))
        path = str(tmp_path / f"step{step}")
        fresh.call("step", step, True, path, f"step-{step}", handler=serve(client))
        assert llm.get_weight_version() == f"step-{step}"
        assert engine.generate(llm) == reference(path) != before
    finally:
        fresh.close()
    progress["step"] = step


def test_a_late_trainer_gets_refit_timeout_and_its_next_refit_works(llm, client, reference, progress, tmp_path):
    """The trainer stalls past idle_timeout_s between two buckets: its next call is a RefitTimeout, the engine
    kept the complete old weights, and the same trainer's next send_weights (no new trainer_init) works."""
    from lora_ipc.refit import RefitTimeout

    step = progress["step"] + 1
    before, count = engine.generate(llm), rollbacks(llm)
    slow = resumed_trainer(step)
    try:
        slow.call("init", "pipe", None, {**INIT, "idle_timeout_s": IDLE}, handler=serve(client))

        def stall_before_second_bucket(method, *args):
            if method == "update_weights" and args[0]["bucket"] == 1:
                wait_for_rollback(llm, count)
            getattr(client, method)(*args)

        with pytest.raises(RefitTimeout, match="rolled back"):
            slow.call("step", step, True, None, "never", handler=stall_before_second_bucket)
        assert engine.generate(llm) == before
        progress["step"] = step
        step += 1
        path = str(tmp_path / f"step{step}")
        slow.call("step", step, True, path, f"step-{step}", handler=serve(client))
        assert llm.get_weight_version() == f"step-{step}"
        assert engine.generate(llm) == reference(path) != before
        progress["step"] = step
    finally:
        slow.close()


def test_an_engine_refuses_overlapping_pieces_and_keeps_its_weights(llm, client):
    """Issue 15: two pieces at offset 0 of one parameter used to count as complete (half of it never written)."""
    from dataclasses import asdict

    from lora_ipc.refit import BucketRef, RefitError, RefitPieceError
    from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo

    name, param = next((n, p) for n, p in tiny_llama(0, torch.bfloat16).named_parameters() if p.dim() == 2)
    half = param.numel() // 2
    flat = param.detach().reshape(-1)
    before = engine.generate(llm)
    with AdapterExporter() as exporter:
        version = exporter.publish("bad", {f"{name}#a": flat[:half].clone(), f"{name}#b": flat[half:].clone()}, {})
        client.init_weight_transfer_engine(asdict(LoraIpcInitInfo(exporter.endpoint, "bad", 5.0)))
        client.start_weight_update()
        shape = list(param.shape)
        ref = BucketRef("bad", version, 1, 0, 1, [[f"{name}#a", name, 0, shape], [f"{name}#b", name, 0, shape]])
        with pytest.raises(RefitPieceError, match="overlap"):
            client.update_weights(asdict(ref))
        assert engine.generate(llm) == before
        client.start_weight_update()  # the refused bucket ended the update; a new one starts
        with pytest.raises(RefitError, match="0 of"):
            client.finish_weight_update()
        assert engine.generate(llm) == before


def test_a_workers_typed_error_reaches_the_caller_as_its_class_with_its_own_message(llm, client):
    """vLLM hands a worker's exception to the caller as text ("Call to ... failed: ..."); lora_ipc's typed
    code brings back the worker's class and its message, unwrapped: through the refit client, and through
    ``collective_rpc`` with :func:`lora_ipc.core.protocol.carried`."""
    from dataclasses import asdict

    from lora_ipc.core import protocol
    from lora_ipc.lora.adapters import AdapterNotFound
    from lora_ipc.refit import BucketRef, RefitPieceError
    from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo

    name, param = next((n, p) for n, p in tiny_llama(0, torch.bfloat16).named_parameters() if p.dim() == 2)
    with AdapterExporter() as exporter:
        version = exporter.publish("twice", {"a": param.detach().clone()}, {})
        client.init_weight_transfer_engine(asdict(LoraIpcInitInfo(exporter.endpoint, "twice", 5.0)))
        client.start_weight_update()
        shape = list(param.shape)
        ref = BucketRef("twice", version, 1, 0, 1, [["a", name, 0, shape], ["a", name, 0, shape]])
        with pytest.raises(RefitPieceError) as info:
            client.update_weights(asdict(ref))
        assert str(info.value).startswith("lora_ipc weight update 1 failed at bucket 1 of 1: "), str(info.value)
        assert "Call to" not in str(info.value) and "[lora_ipc:" not in str(info.value)

        with pytest.raises(Exception) as raw:
            llm.collective_rpc("lora_ipc_load", args=("no-such-adapter", exporter.endpoint))
        found = protocol.carried(raw.value)
        assert type(found) is AdapterNotFound, raw.value
        assert str(found) == f"no adapter named 'no-such-adapter' at {exporter.endpoint}", str(found)


# ---- issue 23: whole or nothing, and bound to its controller ---------------------------------------


def full_weights(seed: int) -> dict[str, torch.Tensor]:
    """Every weight of a tiny Llama the served model's shape (HF names), distinct per seed."""
    return {n: p.detach().clone() for n, p in tiny_llama(seed, torch.bfloat16).named_parameters()}


def served_tokens(llm):
    llm.reset_prefix_cache()  # what the weights give now, not KV blocks cached from earlier ones
    return engine.generate(llm)


class Controller:
    """A hand-driven refit controller: its own exporter and stream, buckets sent one call at a time."""

    def __init__(self, client, stream: str, **init):
        from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo

        self.client, self.stream, self.init_info, self.updates = client, stream, init, 0
        self.exporter = AdapterExporter()
        self.info = LoraIpcInitInfo(self.exporter.endpoint, stream, 5.0, **init)

    def init(self, **override):
        from dataclasses import asdict, replace

        self.client.init_weight_transfer_engine(asdict(replace(self.info, **override)))

    def buckets(self, weights: dict, count: int = 1) -> list[dict]:
        """``weights`` published as ``count`` buckets of whole tensors; their update infos."""
        from dataclasses import asdict

        from lora_ipc.refit import BucketRef

        self.updates += 1
        names = list(weights)
        parts = [names[i::count] for i in range(count)]
        return [
            asdict(
                BucketRef(
                    self.stream,
                    self.exporter.publish(self.stream, {n: weights[n] for n in part}, {}),
                    self.updates,
                    i,
                    count,
                )
            )
            for i, part in enumerate(parts)
        ]

    def send(self, weights: dict, version: str | None = None) -> None:
        self.client.start_weight_update()
        for ref in self.buckets(weights):
            self.client.update_weights(ref)
        self.client.finish_weight_update(version)

    def close(self):
        self.exporter.close()


@pytest.fixture
def controllers(client):
    made = []

    def make(stream, **init):
        made.append(Controller(client, stream, **init))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_an_update_the_model_refuses_leaves_the_complete_old_weights(llm, client, controllers):
    """Issue 23 (9): a transposed tensor in the last layer used to leave the layers before it on the new
    weights under the old version name; a refusal only the apply sees (injected) is undone from the host
    copy; NaN weights are refused when asked. Each time: the old tokens, the old version, and the next
    complete update works and round-trips exactly."""
    from lora_ipc.refit import RefitError

    trainer = controllers("atomic", check_finite=True)
    trainer.init()
    old, new = full_weights(11), full_weights(12)
    trainer.send(old, "atomic-old")
    before = served_tokens(llm)

    transposed = dict(new)
    name = "model.layers.1.mlp.down_proj.weight"
    transposed[name] = new[name].t().contiguous()
    assert transposed[name].shape != new[name].shape
    with pytest.raises(RefitError, match="refuses lora_ipc weight update") as info:
        trainer.send(transposed, "never")
    assert "before any weight was written" in str(info.value)
    assert served_tokens(llm) == before and llm.get_weight_version() == "atomic-old"

    nan = dict(new)
    nan["model.layers.0.self_attn.q_proj.weight"] = new["model.layers.0.self_attn.q_proj.weight"].clone()
    nan["model.layers.0.self_attn.q_proj.weight"][3, 5] = float("nan")
    with pytest.raises(RefitError, match="NaN or inf"):
        trainer.send(nan, "never")
    assert served_tokens(llm) == before and llm.get_weight_version() == "atomic-old"

    restored = llm.collective_rpc("lora_ipc_refit_stats")[0].get("restored", 0)
    llm.collective_rpc("lora_ipc_test_fail_next_processing", args=("model.layers.1.mlp.down_proj",))
    with pytest.raises(RefitError, match="restored from the copy") as info:
        trainer.send(new, "never")
    assert "injected" in str(info.value)
    assert llm.collective_rpc("lora_ipc_refit_stats")[0]["restored"] == restored + 1
    assert served_tokens(llm) == before and llm.get_weight_version() == "atomic-old"

    trainer.send(new, "atomic-new")  # the same update, now applied whole
    after = served_tokens(llm)
    assert after != before and llm.get_weight_version() == "atomic-new"
    trainer.send(old, "atomic-old-again")
    assert served_tokens(llm) == before  # exactly the old weights: nothing of the refused updates stayed


def test_a_refit_is_bound_to_its_controller(llm, client, controllers):
    """Issue 23 (19, 20): a second controller's init while an update is open is refused, or takes over
    explicitly and the first controller is told; a finish or a stray bucket of another stream never touches
    the open update; each controller's weights are applied only by its own complete update."""
    from lora_ipc.refit import RefitBusy, RefitError, RefitTakenOver

    first, second = controllers("first"), controllers("second")
    w1, w2 = full_weights(21), full_weights(22)
    first.init()
    first.send(w1, "first-1")
    tokens_1 = served_tokens(llm)
    second.init()
    second.send(w2, "second-1")
    tokens_2 = served_tokens(llm)
    assert tokens_1 != tokens_2

    first.init()  # first is the engine's controller again, mid-update
    client.start_weight_update()
    b1 = first.buckets(w1, 2)
    client.update_weights(b1[0])
    with pytest.raises(RefitBusy, match="refused"):
        second.init()
    client.update_weights(b1[1])  # the refused init touched nothing: first's update goes on
    client.finish_weight_update("first-2")
    assert served_tokens(llm) == tokens_1 and llm.get_weight_version() == "first-2"

    client.start_weight_update()
    client.update_weights(first.buckets(w2, 2)[0])
    second.init(take_over=True)  # explicit: first's open update is discarded
    client.start_weight_update()
    b2 = second.buckets(w2, 2)
    client.update_weights(b2[0])
    with pytest.raises(RefitTakenOver, match="took over"):
        client.update_weights(first.buckets(w1, 1)[0])  # first's next bucket: told, second's update untouched
    with pytest.raises(RefitError, match="incomplete"):
        client.finish_weight_update("first-3")  # a finish while second's update is incomplete: left alone
    assert llm.get_weight_version() == "first-2"
    client.update_weights(b2[1])
    client.finish_weight_update("second-2")  # second's update, whole, by second's finish
    assert served_tokens(llm) == tokens_2 and llm.get_weight_version() == "second-2"

    client.start_weight_update()  # a stray bucket of a stream never initialized here
    b3 = second.buckets(w1, 2)
    client.update_weights(b3[0])
    stray = controllers("stray")
    with pytest.raises(RefitError, match="stream 'stray' refused before anything was fetched"):
        client.update_weights(stray.buckets(w2, 1)[0])
    client.update_weights(b3[1])
    client.finish_weight_update("second-3")
    assert served_tokens(llm) == tokens_1 and llm.get_weight_version() == "second-3"


def test_openai_server_refit_through_the_rl_routes(model_dir, refits, tmp_path_factory):
    """The same three updates through ``python -m vllm.entrypoints.openai.api_server`` and vLLM's HTTP client,
    with pickle-free update info (no VLLM_ALLOW_INSECURE_SERIALIZATION)."""
    assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in os.environ
    try:
        server = engine.Server(
            model_dir,
            tmp_path_factory.mktemp("server"),
            extra_args=["--weight-transfer-config", '{"backend": "lora_ipc"}'],
            env={"VLLM_SERVER_DEV_MODE": "1"},
        )  # the RL routes are dev-mode routes
    except RuntimeError as exc:
        pytest.fail(str(exc))
    trainer = RefitTrainerProcess()
    try:
        assert [server.complete(model_dir, p) for p in engine.PROMPTS] == refits[0][1]
        trainer.call("init", "http", server.base, {"bucket_bytes": BUCKET})
        for step in STEPS:
            assert engine.post(server.base + "/pause", {})[0] == 200  # drains and clears the prefix cache
            trainer.call("step", step, True, None, f"step-{step}")
            assert engine.post(server.base + "/resume", {})[0] == 200
            assert engine.get_json(server.base + "/weight_info")["weight_version"] == f"step-{step}"
            assert [server.complete(model_dir, p) for p in engine.PROMPTS] == refits[step][1], f"step {step}"
    finally:
        trainer.close()
        server.stop()

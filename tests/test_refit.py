"""Full-weight refit transport without an engine: bucket plans, split parameters, bounded slabs,
the JSON-safe bucket reference, and clear errors (see test_weight_transfer.py for the vLLM engine)."""

import contextlib
import json
import math
import time

import pytest
import torch

from lora_ipc import AdapterExporter, ExporterUnavailable, ProtocolError
from lora_ipc.refit import BucketRef, RefitError, RefitPieceError, WeightReceiver, WeightSender, plan_buckets
from lora_ipc.tiny import tiny_llama

from . import models
from .helpers import bitwise_equal

BUCKET = 48 << 10  # below the 64 KiB embedding and lm_head of the tiny Llama (bfloat16)


def params_of(model):
    return [(n, p.dtype, tuple(p.shape)) for n, p in model.named_parameters()]


def test_plan_covers_every_element_once_within_the_bucket_size():
    model = tiny_llama(0, torch.bfloat16)
    params = params_of(model)
    plans = plan_buckets(params, BUCKET)
    assert all(0 < b.nbytes <= BUCKET for b in plans)
    covered: dict[str, list[tuple[int, int]]] = {}
    for b in plans:
        for p in b.pieces:
            covered.setdefault(p.param, []).append((p.start, p.numel))
    assert list(covered) == [n for n, _, _ in params]  # order kept
    for name, _dtype, shape in params:
        ranges = covered[name]
        assert ranges[0][0] == 0 and sum(n for _, n in ranges) == math.prod(shape)
        assert all(a + n == b for (a, n), (b, _) in zip(ranges, ranges[1:]))
    assert any(len(r) > 1 for r in covered.values())  # something was split
    with pytest.raises(ValueError):
        plan_buckets(params, 100)


def test_round_trip_is_bitwise_split_parameters_reassembled_and_slabs_bounded():
    model = tiny_llama(0, torch.bfloat16)
    sender = WeightSender(bucket_bytes=BUCKET)
    receiver = WeightReceiver(sender.endpoint, sender.stream, timeout_s=10)
    try:
        for step in range(1, 4):
            models.perturb_weights(model, step)
            received: dict[str, torch.Tensor] = {}
            refs = []

            def deliver(ref, refs=refs, received=received):
                wire = json.loads(json.dumps(ref.__dict__))  # what an HTTP control plane carries
                refs.append(BucketRef(**wire))
                for name, tensor in receiver.receive(refs[-1]):
                    assert name not in received
                    received[name] = tensor.clone()

            receiver.begin()
            sender.send(params_of(model), model.named_parameters(), deliver)
            assert receiver.end() == len(refs) > 3
            want = dict(model.named_parameters())
            assert set(received) == set(want)
            for name, tensor in want.items():
                assert bitwise_equal(received[name], tensor), name
            assert any(ref.pieces for ref in refs)
            status = sender.exporter.store.status()
            assert status.slabs.live <= 4, status.slabs
            assert status.slabs.bytes <= 4 * (BUCKET + (64 << 10))
    finally:
        receiver.close()
        sender.close()


def test_source_not_matching_its_metadata_is_a_clear_error():
    model = tiny_llama(0, torch.bfloat16)
    sender = WeightSender(bucket_bytes=BUCKET)
    try:
        named = list(model.named_parameters())
        with pytest.raises(RefitError, match="metadata"):
            sender.send(params_of(model), iter(named[1:]), lambda ref: None)
        with pytest.raises(RefitError, match="ended before"):
            sender.send(params_of(model), iter(named[:3]), lambda ref: None)
        wrong = [(n, t.float()) for n, t in named]
        with pytest.raises(RefitError, match="float32"):
            sender.send(params_of(model), iter(wrong), lambda ref: None)
    finally:
        sender.close()


@pytest.mark.parametrize(
    "bad",
    [
        {"version": 0},
        {"version": "1"},
        {"bucket": 5},
        {"stream": ""},
        {"pieces": [["a", "b", -1, [2]]]},
        {"pieces": [["a", "b", 0, "2x2"]]},
        {"pieces": "x"},
        {"pieces": [["a", "b", 0, [1 << 30, 1 << 30]]]},
    ],
)
def test_bucket_ref_rejects_bad_fields(bad):
    fields = {"stream": "s", "version": 1, "update": 1, "bucket": 0, "buckets": 2, "pieces": []}
    with pytest.raises(ProtocolError):
        BucketRef(**{**fields, **bad})


def test_receiver_refuses_out_of_order_and_incomplete_updates_and_a_gone_trainer():
    tensors = {f"w{i}": torch.full((20 << 10,), float(i), dtype=torch.bfloat16) for i in range(3)}  # 40 KiB each
    params = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    sender = WeightSender(bucket_bytes=BUCKET)
    receiver = WeightReceiver(sender.endpoint, sender.stream, timeout_s=2)
    try:
        refs = []

        def deliver_two(ref):  # the engine loads buckets 0 and 1; bucket 2 never reaches it
            refs.append(ref)
            if ref.bucket < 2:
                receiver.receive(ref)

        receiver.begin()
        sender.send(params, iter(tensors.items()), deliver_two)
        assert [r.buckets for r in refs] == [3, 3, 3]
        with pytest.raises(RefitError, match="ended after 2 of 3 buckets"):
            receiver.end()
        receiver.begin()
        with pytest.raises(RefitError, match="in order"):
            receiver.receive(refs[2])
        with pytest.raises(RefitError, match="stream"):
            receiver.receive(BucketRef("other", 1, 1, 0, 1))
    finally:
        sender.close()
    receiver.begin()
    started = time.monotonic()
    with pytest.raises(ExporterUnavailable, match="no reply"):  # the trainer is gone: an error, not a hang
        receiver.receive(BucketRef(sender.stream, refs[-1].version + 1, 2, 0, 1))
    assert time.monotonic() - started < 30
    receiver.close()


# ---- pieces must tile their parameter exactly -------------------------------------------------

FULL = torch.arange(8192, dtype=torch.float32)  # one 8,192-element parameter "w", shape (64, 128)
SHAPE = [64, 128]


def piece(start, numel, shape=SHAPE, dtype=torch.float32, entry=None):
    """A bucket item: (slab entry, tensor, pieces row or None for a whole parameter)."""
    entry = entry or f"w#{start}"
    return entry, torch.arange(start, start + numel, dtype=torch.float32).to(dtype), [entry, "w", start, list(shape)]


WHOLE = ("w", FULL.view(64, 128).clone(), None)
FIX = [piece(4096, 4096)]  # completes "w" after a first bucket holding [0, 4096)


class Buckets:
    """Publishes hand-made buckets of one update and hands their refs to a receiver, in order."""

    def __init__(self, exporter, receiver):
        self.exporter, self.receiver, self.index = exporter, receiver, 0

    def send(self, items, buckets=3, extra_rows=()):
        tensors = {entry: tensor for entry, tensor, _ in items}
        version = self.exporter.publish("weights", tensors, {})
        rows = [row for _, _, row in items if row is not None] + list(extra_rows)
        out = self.receiver.receive(BucketRef("weights", version, 1, self.index, buckets, rows))
        self.index += 1
        return out


OTHER = ("other", torch.ones(16), None)


@contextlib.contextmanager
def exporter_and_receiver(**receiver_kw):
    """An exporter (keep=4), a WeightReceiver of its "weights" (timeout 10 s, ``receiver_kw``) and the
    Buckets that feed it: ``(buckets, receiver)``, closed on the way out."""
    with AdapterExporter(keep=4) as exporter:
        receiver = WeightReceiver(exporter.endpoint, "weights", timeout_s=10, **receiver_kw)
        try:
            yield Buckets(exporter, receiver), receiver
        finally:
            receiver.close()


@pytest.mark.parametrize(
    "first, bad, extra_rows",
    [
        pytest.param([], [piece(0, 4096, entry="w#a"), piece(0, 4096, entry="w#b")], (), id="two-pieces-at-offset-0"),
        pytest.param([piece(0, 4096)], [piece(2048, 4096)], (), id="overlaps-an-earlier-bucket"),
        pytest.param([piece(0, 4096)], [piece(0, 4096)], (), id="same-piece-again"),
        pytest.param([piece(0, 4096)], [piece(4096, 8192)], (), id="runs-past-the-end"),
        pytest.param([piece(0, 4096)], [piece(4096, 4096, shape=[8192])], (), id="another-full-shape"),
        pytest.param([piece(0, 4096)], [piece(4096, 4096, dtype=torch.bfloat16)], (), id="another-dtype"),
        pytest.param([piece(0, 4096)], [WHOLE], (), id="whole-after-pieces"),
        pytest.param([piece(0, 4096)], [OTHER, *FIX], (), id="a-whole-parameter-twice"),
        pytest.param([piece(0, 4096)], FIX, (["w#9", "w", 0, SHAPE],), id="listed-but-not-in-the-slab"),
        pytest.param([piece(0, 4096)], FIX, (["w#4096", "w", 4096, SHAPE],), id="listed-twice"),
    ],
)
def test_pieces_that_do_not_tile_are_refused_and_nothing_received_changes(first, bad, extra_rows):
    with exporter_and_receiver() as (buckets, receiver):
        assert [n for n, _ in buckets.send([OTHER, *first], buckets=2)] == ["other"]
        with pytest.raises(RefitPieceError):
            buckets.send(bad, buckets=2, extra_rows=extra_rows)
        buckets.index = 1  # the same bucket again, right this time: the refused one left no trace
        ((name, got),) = buckets.send(FIX if first else [piece(0, 4096), piece(4096, 4096)], buckets=2)
        assert name == "w" and bitwise_equal(got, FULL.view(64, 128))
        assert receiver.end() == 2


def test_an_update_is_complete_only_when_every_element_arrived_exactly_once():
    with exporter_and_receiver() as (buckets, receiver):  # a gap: [2048, 4096) never arrives
        assert buckets.send([piece(0, 2048)], buckets=2) == []
        assert buckets.send([piece(4096, 4096)], buckets=2) == []
        with pytest.raises(RefitError, match="missing pieces"):
            receiver.end()
        receiver.begin()
        buckets.index = 0  # pieces in any order that tile the parameter complete it, bitwise
        assert [n for n, _ in buckets.send([piece(6000, 2192), OTHER, piece(0, 1000)], buckets=2)] == ["other"]
        ((name, got),) = buckets.send([piece(1000, 5000)], buckets=2)
        assert name == "w" and bitwise_equal(got, FULL.view(64, 128))
        assert receiver.end() == 2


def test_an_update_past_max_update_bytes_is_refused_before_anything_is_allocated():
    # "other" (64 bytes) + all of "w" (split, counted in full)
    with exporter_and_receiver(max_update_bytes=FULL.numel() * 4 + 64) as (buckets, receiver):
        assert [n for n, _ in buckets.send([OTHER, piece(0, 4096)], buckets=2)] == ["other"]
        with pytest.raises(RefitError, match="over its limit"):  # one more parameter would pass the limit
            buckets.send([("more", torch.ones(1), None), *FIX], buckets=2)
        with pytest.raises(RefitError, match="over its limit"):  # a split parameter claiming 4 GiB
            buckets.send([("huge#0", torch.ones(16), ["huge#0", "huge", 0, [1 << 30]]), *FIX], buckets=2)
        ((name, _),) = buckets.send(FIX, buckets=2)
        assert name == "w" and receiver.end() == 2


class RecordingClient:
    """A four-method VLLMWeightSyncClient that checks every payload survives JSON, then hands buckets to
    ``receiver`` as an inference worker would."""

    def __init__(self):
        self.calls = []
        self.receiver = None
        self.received = {}

    def init_weight_transfer_engine(self, init_info):
        from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo

        info = LoraIpcInitInfo(**json.loads(json.dumps(init_info)))
        self.calls.append("init")
        self.receiver = WeightReceiver(info.endpoint, info.stream, timeout_s=info.timeout_s)

    def start_weight_update(self):
        self.calls.append("start")
        self.receiver.begin()

    def update_weights(self, update_info):
        from lora_ipc.vllm.weight_transfer import LoraIpcUpdateInfo

        info = LoraIpcUpdateInfo(**json.loads(json.dumps(update_info)))
        if info.abort:  # the controller ends its own update (the worker rolls it back)
            self.calls.append("abort")
            self.receiver.begin()
            return
        self.calls.append("update")
        for name, tensor in self.receiver.receive(info):
            self.received[name] = tensor.clone()

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish", weight_version))
        self.receiver.end()


def test_trainer_engine_through_vllms_factory_json_payloads_and_non_sender_ranks():
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo

    model = tiny_llama(0, torch.bfloat16)
    client = RecordingClient()
    sender = WeightTransferTrainerFactory.trainer_init(
        LoraIpcTrainerInitInfo(rank=0, bucket_bytes=BUCKET), client=client, source=ModuleSource(model)
    )
    try:
        models.perturb_weights(model, 1)
        sender.send_weights(weight_version="v1")
        assert client.calls[:2] == ["init", "start"] and client.calls[-1] == ("finish", "v1")
        assert client.calls.count("update") > 3
        for name, param in model.named_parameters():
            assert bitwise_equal(client.received[name], param), name
    finally:
        sender.shutdown()
        client.receiver.close()

    class CountingSource(ModuleSource):
        iterations = 0

        def __iter__(self):
            CountingSource.iterations += 1
            return super().__iter__()

    other = RecordingClient()
    rank1 = WeightTransferTrainerFactory.trainer_init(
        LoraIpcTrainerInitInfo(rank=1), client=other, source=CountingSource(model)
    )
    rank1.send_weights()  # joins the source's iteration (collectives), never the control plane
    assert other.calls == [] and CountingSource.iterations == 1


def test_controller_errors_are_typed_a_failed_update_is_ended_and_ctrl_c_stays_ctrl_c():
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from lora_ipc.core.protocol import tag
    from lora_ipc.refit import RefitTimeout
    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo, refit_error

    # vLLM hands the worker's error over as text: the typed code the worker put in front gives the class back
    # (typed codes replaced the class name in front: the assertions on the types are unchanged)
    assert (
        type(refit_error(RuntimeError(f"Worker failed with error '{tag(RefitTimeout, 'update 3 ...')}'")))
        is RefitTimeout
    )
    assert type(refit_error(RuntimeError(tag(RefitPieceError, "bucket 2 ...")))) is RefitPieceError
    assert type(refit_error(ValueError("boom"))) is RefitError

    class Failing(RecordingClient):
        def __init__(self, exc):
            super().__init__()
            self.exc = exc

        def update_weights(self, update_info):
            if update_info.get("abort"):
                self.calls.append("abort")
                return
            self.calls.append("update")
            raise self.exc

    class LeftOpen(RecordingClient):  # an update this trainer left open: vLLM refuses the next start
        stale = True

        def start_weight_update(self):
            if self.stale:
                raise RuntimeError("start_weight_update called while a weight update is already active")
            super().start_weight_update()

        def update_weights(self, update_info):
            if self.stale and update_info.get("abort"):  # this trainer's abort ends the update it left open
                self.stale = False
                self.calls.append("ended")
                return
            super().update_weights(update_info)

    model = tiny_llama(0, torch.bfloat16)
    timeout = Failing(RuntimeError(f"Worker failed with error '{tag(RefitTimeout, '... rolled back')}'"))
    for client, expected in (
        (timeout, RefitTimeout),
        (Failing(KeyboardInterrupt()), KeyboardInterrupt),
        (LeftOpen(), None),
    ):
        sender = WeightTransferTrainerFactory.trainer_init(
            LoraIpcTrainerInitInfo(rank=0, bucket_bytes=BUCKET), client=client, source=ModuleSource(model)
        )
        try:
            if expected is None:
                sender.send_weights(weight_version="v1")
            else:
                with pytest.raises(expected):
                    sender.send_weights()
        finally:
            sender.shutdown()
            client.receiver.close()
        if expected is RefitTimeout:  # the failed update is ended at once (its abort), not left to the idle timeout
            assert client.calls == ["init", "start", "update", "abort"]
        elif expected is KeyboardInterrupt:  # not caught, not turned into a RefitError
            assert client.calls == ["init", "start", "update"]
        else:
            assert client.calls[:3] == ["init", "ended", "start"] and client.calls[-1] == ("finish", "v1")


def test_a_workers_typed_error_crosses_vllms_text_only_rpc_as_its_class_and_message():
    """vLLM hands the caller ``Exception(f"Call to ... failed: {worker's str(exc)}")``, Ray may wrap that
    again; the caller gets the worker's class back with the worker's own message, nothing of the wrapping.
    A message that names other lora_ipc errors (an adapter called 'StaleEpoch: x') does not confuse it."""
    from lora_ipc.core.errors import StaleEpoch, VersionNotFound
    from lora_ipc.core.protocol import carried, tagged
    from lora_ipc.refit import RefitTimeout

    message = "'StaleEpoch: x' version 3 is not kept at ipc:///e (kept: [4]); RefitTimeout: no"
    worker = tagged(VersionNotFound, message)
    for seen in (
        worker,
        Exception(f"Call to collective_rpc method failed: {worker}"),
        RuntimeError(
            f"ray::Engine.collective_rpc()\n  File x\nException: Worker failed with error "
            f"'{worker}', please check the stack trace above for the root cause"
        ),
    ):
        found = carried(seen)
        assert type(found) is VersionNotFound and str(found) == message, (seen, found)
    assert not isinstance(carried(Exception(message)), (StaleEpoch, RefitTimeout))  # no tag: no guessing
    assert carried(Exception(message)) is None


def test_ctrl_c_in_a_worker_rolls_the_update_back_and_stays_ctrl_c():
    """A KeyboardInterrupt inside the worker engine's receive (vLLM's worker process got SIGINT) is not
    turned into a RefitError, and the staged update is rolled back before it propagates."""
    pytest.importorskip("vllm")
    from types import SimpleNamespace

    from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo, LoraIpcUpdateInfo, LoraIpcWeightTransferEngine

    model = tiny_llama(0, torch.bfloat16)
    config = SimpleNamespace(parallel_config=None, model_config=None)
    engine = LoraIpcWeightTransferEngine(None, config, torch.device("cpu"), model)
    sender = WeightSender(bucket_bytes=BUCKET)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    def deliver(ref):  # as vLLM's worker would: bucket 1 arrives, Ctrl-C lands inside bucket 2's fetch
        if ref.bucket == 1:
            engine._receiver.receive = interrupted
        engine.receive_weights(LoraIpcUpdateInfo(**vars(ref)))

    try:
        engine.init_transfer_engine(LoraIpcInitInfo(sender.endpoint, sender.stream))
        engine.start_weight_update()
        with pytest.raises(KeyboardInterrupt):
            sender.send(params_of(model), model.named_parameters(), deliver)
        assert engine._open is None and engine.last_update["rollbacks"] == 1
        assert engine.last_update["last_rollback"]["buckets"] == 1
    finally:
        engine.shutdown()
        sender.close()


def test_the_worker_engine_learns_its_worker_from_vllms_init_call_not_from_the_stack():
    """vLLM's ``Worker.init_weight_transfer_engine`` (wrapped once the first lora_ipc engine exists) hands the
    engine the calling worker; the engine ends and keeps that worker's update session through compat. Without
    that call (no worker), an abort raises, which is how vLLM's own session ends."""
    pytest.importorskip("vllm")
    from dataclasses import asdict
    from types import SimpleNamespace

    from lora_ipc.vllm.compat import runtime
    from lora_ipc.vllm.weight_transfer import LoraIpcInitInfo, LoraIpcUpdateInfo, LoraIpcWeightTransferEngine

    model = tiny_llama(0, torch.bfloat16)
    config = SimpleNamespace(parallel_config=None, model_config=None)
    engine = LoraIpcWeightTransferEngine(None, config, torch.device("cpu"), model)
    sender = WeightSender(bucket_bytes=BUCKET)

    class Worker:  # what vLLM's init_weight_transfer_engine uses of its worker
        weight_transfer_engine = engine
        _weight_update_active = False

        def _check_weight_transfer_engine(self):
            pass

    worker = Worker()
    abort = asdict(LoraIpcUpdateInfo(sender.stream, 1, 1, 0, 1, abort=True))
    try:
        engine.init_transfer_engine(LoraIpcInitInfo(sender.endpoint, sender.stream))
        assert engine._worker is None  # called directly, not by a worker
        engine.start_weight_update()
        with pytest.raises(RefitError, match="aborted by its controller"):  # vLLM ends its session on the raise
            engine.receive_weights(LoraIpcUpdateInfo(**abort))

        runtime.worker_class().init_weight_transfer_engine(worker, asdict(LoraIpcInitInfo(sender.endpoint, "s2")))
        assert engine._worker is not None and engine._worker() is worker
        worker._weight_update_active = True  # vLLM's start
        engine.start_weight_update()
        engine.receive_weights(LoraIpcUpdateInfo(**{**abort, "stream": "s2"}))  # ended here, no raise needed
        assert worker._weight_update_active is False
    finally:
        engine.shutdown()
        sender.close()


def test_trainer_engine_takes_vllms_config_first_forms():
    """Some vLLM releases construct trainer engines as ``trainer_init(config, init_info, *, client, source)``
    (also by keyword) and ``__init__(config, *, client, source, is_sender)``; both forms work."""
    pytest.importorskip("vllm")
    from vllm.distributed.weight_transfer.base import ModuleSource

    from lora_ipc.vllm.weight_transfer import LoraIpcTrainerInitInfo, LoraIpcTrainerWeightTransferEngine

    model = tiny_llama(0, torch.bfloat16)
    config = object()
    for call in (
        lambda info, **kw: LoraIpcTrainerWeightTransferEngine.trainer_init(config, info, **kw),
        lambda info, **kw: LoraIpcTrainerWeightTransferEngine.trainer_init(config=config, init_info=info, **kw),
    ):
        client = RecordingClient()
        engine = call(LoraIpcTrainerInitInfo(rank=0, bucket_bytes=BUCKET), client=client, source=ModuleSource(model))
        try:
            assert engine.config is config
            engine.send_weights(weight_version="v1")
            assert client.calls[-1] == ("finish", "v1")
        finally:
            engine.shutdown()
            client.receiver.close()
    with pytest.raises(TypeError):
        LoraIpcTrainerWeightTransferEngine.trainer_init(
            config, LoraIpcTrainerInitInfo(rank=1), object(), client=RecordingClient(), source=ModuleSource(model)
        )

"""WorkerExtension combines with another framework's extension class (vLLM takes only one)."""

import pytest

from lora_ipc.vllm.worker import WorkerExtension

from .ray_actors import CombinedExtension, OtherExtension


def test_combined_class_has_both_sets_of_rpcs():
    assert callable(CombinedExtension.lora_ipc_load) and callable(CombinedExtension.other_extension_ping)
    assert CombinedExtension.__init__ is object.__init__  # no __init__ assumptions on either side


def test_a_clash_between_the_two_extensions_is_refused_when_the_class_is_defined():
    class Theirs:
        def lora_ipc_load(self):
            return "theirs"

    with pytest.raises(TypeError, match="lora_ipc_load"):

        class Clash(WorkerExtension, Theirs):
            pass

    class Sub(OtherExtension):  # a shared ancestor is not a clash
        pass

    class Fine(WorkerExtension, Sub, OtherExtension):
        pass

    assert Fine.other_extension_ping is OtherExtension.other_extension_ping


def test_no_name_clashes_with_vllms_cpu_worker():
    pytest.importorskip("vllm")
    from vllm.v1.worker.cpu_worker import CPUWorker

    clashes = [n for n in dir(CombinedExtension) if not n.startswith("__") and hasattr(CPUWorker, n)]
    assert clashes == []

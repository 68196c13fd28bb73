"""A worker extension for the refit tests: lora_ipc's, plus one RPC that makes the served model refuse the
next apply half-way, where no check before the apply can see it (a layer's weight processing fails)."""

from __future__ import annotations

from lora_ipc.vllm.worker import WorkerExtension


class FaultyRefitExtension(WorkerExtension):
    def lora_ipc_test_fail_next_processing(self, module: str) -> str:
        """The next time ``module`` (e.g. ``model.layers.1.mlp.down_proj``) processes loaded weights, it raises."""
        layer = self.model_runner.model.get_submodule(module)
        method = layer.quant_method

        def fail_once(target):
            del method.process_weights_after_loading  # back to the class's own, for every later apply
            raise RuntimeError(f"injected: {module} refuses its new weights")

        method.process_weights_after_loading = fail_once
        return type(method).__name__

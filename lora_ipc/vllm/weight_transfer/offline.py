"""``OfflineLLMClient``: the four-method ``VLLMWeightSyncClient`` for an offline ``vllm.LLM`` in this process."""

from __future__ import annotations

from typing import Any

from .messages import refit_error


class OfflineLLMClient:
    """The four-method client for an offline ``vllm.LLM`` in this process.

    After each finished update it resets the prefix cache: vLLM keys cached KV blocks by tokens (and
    adapter), not by weights, so blocks computed with the old weights would otherwise be reused.
    Every failure is raised as a :class:`RefitError` (the one the worker raised, same class and message:
    vLLM's ``LLM`` raises a plain ``Exception`` carrying the worker's typed code, hence ``except Exception``).
    """

    def __init__(self, llm: Any, reset_prefix_cache: bool = True) -> None:
        self.llm = llm
        self.reset_prefix_cache = reset_prefix_cache

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        try:
            self.llm.init_weight_transfer_engine({"init_info": init_info})
        except Exception as exc:
            raise refit_error(exc) from exc

    def start_weight_update(self) -> None:
        try:
            self.llm.start_weight_update()
        except Exception as exc:
            raise refit_error(exc) from exc

    def update_weights(self, update_info: dict[str, Any]) -> None:
        try:
            self.llm.update_weights({"update_info": update_info})
        except Exception as exc:
            raise refit_error(exc) from exc

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        try:
            self.llm.finish_weight_update(weight_version)
        except Exception as exc:
            raise refit_error(exc) from exc
        if self.reset_prefix_cache:
            self.llm.reset_prefix_cache()

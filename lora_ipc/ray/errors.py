"""Errors of the Ray layer (both are :class:`~lora_ipc.core.errors.LoraIpcError`)."""

from __future__ import annotations

from ..core.errors import LoraIpcError


class ReplicationError(LoraIpcError):
    """A version reached the publishing node's relay but not every other relay (``nodes``: node -> why)."""

    def __init__(self, message: str, nodes: dict[str, str] | None = None):
        super().__init__(message)
        self.nodes = nodes or {}


class EngineLoadError(LoraIpcError):
    """One engine actor failed to load; the others loaded (and keep) what they were asked to.

    ``engine`` is the engine's index in the list given to :func:`lora_ipc.ray.load`, ``actor`` its
    Ray actor id, ``loaded`` what the other engines returned, ``error_type`` the name of the lora_ipc
    error the engine's worker raised (``"ExporterUnavailable"``, ``"VersionNotFound"``, ...) when it
    was one, else the exception's type name; ``error`` that lora_ipc error itself (same class and message
    as the worker raised; it crossed vLLM's RPC and Ray as a typed code), else None.
    """

    def __init__(
        self,
        message: str,
        engine: int,
        actor: str,
        loaded: list[dict],
        error_type: str = "",
        error: LoraIpcError | None = None,
    ):
        super().__init__(message)
        self.error = error
        self.engine = engine
        self.actor = actor
        self.loaded = loaded
        self.error_type = error_type

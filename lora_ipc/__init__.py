"""lora_ipc: move LoRA adapters from a trainer into a running vLLM engine through shared memory.

The core moves versioned tensor sets (``TensorSetExporter`` -> ``TensorSetClient``); the LoRA layer
(``AdapterExporter``, ``AdapterClient``) and the refit layer (``lora_ipc.refit``) use it under their names."""

from .core.errors import (
    AdapterRejected,
    BackendError,
    BadAdapterURI,
    ConfigError,
    EndpointInUse,
    EndpointNotTrusted,
    ExporterUnavailable,
    LayoutError,
    LeaseError,
    LimitExceeded,
    LoraIpcError,
    ProtocolError,
    SlabRecycled,
    TensorSetNotFound,
    VersionNotFound,
)
from .core.fetching.client import TensorSet, TensorSetClient
from .core.serving.exporter import RemoteTensorSetExporter, TensorSetExporter
from .core.serving.store import Limits
from .lora.adapters import Adapter, AdapterClient, AdapterExporter, AdapterNotFound, RemoteExporter


def _version() -> str:
    """The installed distribution's version: pyproject.toml's ``[project] version`` is the only copy."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora-ipc")
    except PackageNotFoundError:  # imported from a checkout that was never installed
        return "0+unknown"


__version__ = _version()

__all__ = [
    "Adapter",
    "AdapterClient",
    "AdapterExporter",
    "AdapterNotFound",
    "AdapterRejected",
    "BackendError",
    "BadAdapterURI",
    "ConfigError",
    "EndpointInUse",
    "EndpointNotTrusted",
    "ExporterUnavailable",
    "LayoutError",
    "LeaseError",
    "LimitExceeded",
    "Limits",
    "LoraIpcError",
    "ProtocolError",
    "RemoteExporter",
    "RemoteTensorSetExporter",
    "SlabRecycled",
    "TensorSet",
    "TensorSetClient",
    "TensorSetExporter",
    "TensorSetNotFound",
    "VersionNotFound",
]

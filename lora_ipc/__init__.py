"""lora_ipc: move LoRA adapters from a trainer into a running vLLM engine through shared memory."""

from .client import Adapter, AdapterClient
from .errors import (
    AdapterNotFound,
    AdapterRejected,
    BackendError,
    BadAdapterURI,
    EndpointInUse,
    EndpointNotTrusted,
    ExporterUnavailable,
    LayoutError,
    LeaseError,
    LimitExceeded,
    LoraIpcError,
    ProtocolError,
    SlabRecycled,
    VersionNotFound,
)
from .exporter import AdapterExporter, RemoteExporter
from .store import Limits


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
    "SlabRecycled",
    "VersionNotFound",
]

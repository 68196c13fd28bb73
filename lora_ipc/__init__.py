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

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterClient", "AdapterExporter", "AdapterNotFound", "AdapterRejected", "BackendError",
    "BadAdapterURI", "EndpointInUse", "EndpointNotTrusted", "ExporterUnavailable", "LayoutError", "LeaseError",
    "LimitExceeded", "Limits", "LoraIpcError", "ProtocolError", "RemoteExporter", "SlabRecycled", "VersionNotFound",
]

"""lora_ipc: move LoRA adapters from a trainer into a running vLLM engine through shared memory."""

from .client import Adapter, AdapterClient
from .endpoint import EndpointInUse
from .errors import (
    AdapterNotFound,
    AdapterRejected,
    BackendError,
    ExporterUnavailable,
    LayoutError,
    LeaseError,
    LoraIpcError,
    ProtocolError,
    VersionNotFound,
)
from .exporter import AdapterExporter, RemoteExporter

__version__ = "0.1.0"

__all__ = [
    "Adapter", "AdapterClient", "AdapterExporter", "AdapterNotFound", "AdapterRejected", "BackendError",
    "EndpointInUse", "ExporterUnavailable", "LayoutError", "LeaseError", "LoraIpcError", "ProtocolError", "RemoteExporter",
    "VersionNotFound",
]

"""The errors of a refit; each crosses vLLM's RPC and Ray with its class (``wire_error``)."""

from __future__ import annotations

from ..core.errors import LoraIpcError, wire_error


@wire_error
class RefitError(LoraIpcError):
    """A full-weight update could not complete (source mismatch, missing bucket, trainer gone)."""


@wire_error
class RefitTimeout(RefitError):
    """The update was open longer than its idle timeout without a call: the engine rolled it back and
    serves the weights of the last complete update."""


@wire_error
class RefitPieceError(RefitError):
    """A bucket's pieces do not tile their parameter: out of bounds, overlapping, repeated, a piece the
    slab lacks, or a parameter delivered twice. The bucket was refused before any of it was copied."""


@wire_error
class RefitBusy(RefitError):
    """Another controller's update is open on this engine: a second ``init_weight_transfer_engine`` is
    refused while it is (unless it asks to take over). Nothing of the open update was touched."""


@wire_error
class RefitTakenOver(RefitError):
    """Another controller (another stream) initialized this engine since this controller did: its calls
    are refused, and the other controller's update is left as it was."""


@wire_error
class RefitStrayBucket(RefitError):
    """A bucket of a stream this engine was not initialized for: refused before anything was fetched,
    and the open update of the engine's own controller is left as it was."""

"""vLLM's weight-update session on a worker, as the ``lora_ipc`` refit engine needs to steer it.

vLLM's worker keeps its session in a flag (``Worker._weight_update_active``) and ends it only when
``update_weights`` raises or ``finish_weight_update`` returns; the weight-transfer framework gives an engine
no way to end or keep it. The engine needs both: an update abandoned by a dead trainer, taken over by
another controller, or whose ``finish`` failed would otherwise keep vLLM refusing ``start_weight_update``
until someone sends an abort; and a refused stray bucket (another stream's, which raises) would otherwise
end the session of the update its controller is still sending.

How the engine reaches its worker, without walking the stack: when the worker hands the engine its init
info (``Worker.init_weight_transfer_engine``, every controller's first call), a wrapper installed on that
method by the engine (once per process, when vLLM makes the first lora_ipc engine) records the worker for
the duration of the call; the engine's ``init_transfer_engine`` picks it up. Both names (the method and the
flag) are declared in :mod:`.compat.expectations` and checked when the engine is made; the flag is written
only through :func:`.compat.runtime.set_update_session`. vLLM releases that add their own way to end a
session call the engine's ``abort_weight_update`` hook (declared too) when they drop one.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any

from .compat import runtime
from .compat.expectations import WORKER_BIND_METHOD

_MARK = "__lora_ipc_session__"
_local = threading.local()
_lock = threading.Lock()


def install() -> bool:
    """Wrap ``Worker.init_weight_transfer_engine`` (once per process) so the engine learns its worker; False
    where this vLLM has no such worker (checked at the engine's creation: not reached then)."""
    worker_cls = runtime.worker_class()
    original = getattr(worker_cls, WORKER_BIND_METHOD, None) if worker_cls is not None else None
    if original is None:
        return False
    with _lock:
        original = getattr(worker_cls, WORKER_BIND_METHOD)
        if getattr(original, _MARK, False):
            return True

        @functools.wraps(original)
        def init_weight_transfer_engine(self, *args, **kwargs):
            previous = getattr(_local, "worker", None)
            _local.worker = weakref.ref(self)
            try:
                return original(self, *args, **kwargs)
            finally:
                _local.worker = previous

        setattr(init_weight_transfer_engine, _MARK, True)
        setattr(worker_cls, WORKER_BIND_METHOD, init_weight_transfer_engine)
    return True


def calling_worker() -> weakref.ref | None:
    """The worker whose ``init_weight_transfer_engine`` is running on this thread (None outside it)."""
    return getattr(_local, "worker", None)


def set_active(worker_ref: weakref.ref | None, active: bool) -> bool:
    """Open or end the session of the recorded worker; False when none is recorded (or it is gone)."""
    worker: Any = worker_ref() if worker_ref is not None else None
    if worker is None:
        return False
    runtime.set_update_session(worker, active)
    return True

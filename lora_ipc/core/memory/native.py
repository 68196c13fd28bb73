"""The optional native extension ``lora_ipc._native`` (csrc/vmm.c): CUDA VMM primitives.

The extension is built by setup.py where a C compiler exists, and it loads the CUDA driver
(``libcuda.so.1``) at run time. Either may be missing: :func:`vmm` then raises a ``BackendError``
that says which, the reason is logged once per process, and every other path of lora_ipc (CPU
memfds, torch's CUDA IPC) runs as before. ``$LORA_IPC_LIBCUDA`` names another driver library
(the tests load a host-memory stub through it).
"""

from __future__ import annotations

import logging
import threading
from types import ModuleType

from ..errors import BackendError

log = logging.getLogger(__name__)
_lock = threading.Lock()
_logged: set[str] = set()


def extension() -> ModuleType | None:
    """The compiled extension, or None (why is logged once)."""
    try:
        import lora_ipc._native as _native  # the optional C extension (setup.py); by its full name
    except ImportError as exc:
        _say_once(
            f"lora_ipc native extension not built ({exc}); the CUDA VMM backend is unavailable, "
            "everything else uses the Python paths"
        )
        return None
    return _native


def status() -> tuple[bool, str]:
    """(True, "driver <version>") if the VMM primitives can run here, else (False, why)."""
    native = extension()
    if native is None:
        return False, "lora_ipc native extension not built (reinstall with a C compiler present)"
    ok, detail = native.driver_status()
    if not ok:
        return False, str(detail)
    return True, f"CUDA driver {detail // 1000}.{detail % 1000 // 10}"


def vmm() -> ModuleType:
    """The extension with a working driver behind it; else ``BackendError`` (why logged once)."""
    ok, why = status()
    if not ok:
        _say_once(f"CUDA VMM unavailable: {why}; using the Python paths")
        raise BackendError(f"CUDA VMM unavailable: {why}")
    native = extension()
    assert native is not None  # status() found it
    return native


def call(fn, *args):
    """Run an extension function, turning its ``NativeError`` into ``BackendError``."""
    native = extension()
    assert native is not None, "native.call runs the extension's functions"
    try:
        return fn(*args)
    except native.NativeError as exc:
        code, message = exc.args if len(exc.args) == 2 else (-1, str(exc))
        raise BackendError(message) from None


def _say_once(message: str) -> None:
    with _lock:
        if message in _logged:
            return
        _logged.add(message)
    log.info(message)

"""The vLLM general plugin (entry point ``vllm.general_plugins``: ``lora_ipc``).

vLLM calls ``register()`` in every process it starts, workers included. Every worker LoRA manager
gets an instance-level ``_load_adapter`` (:func:`guard`, installed by the manager's ``__init__`` and again
by ``add_adapter``), so ``lora-ipc://`` paths are served by :mod:`.loader` even where a framework
replaces the class's method, before or after this plugin; every other path goes to whatever the class
has, untouched. One lora_ipc wrapper per vLLM method on a request's path, never one around another:
``add_adapter`` (in-place reloads of an unchanged path skipped), the instance ``_load_adapter``, and in
the API process the OpenAI checks (:mod:`.openai`). With ``$LORA_IPC_ENDPOINT`` set it also registers
the LoRA resolver, so the OpenAI server resolves bare adapter names.

Before wrapping anything it checks this vLLM offers what the wrappers and the loader use
(:func:`.compat.checked_surface`); if not, registration raises :class:`.compat.UnsupportedVLLM`,
which vLLM does not catch: the engine stops with the list of differences instead of sending
``lora-ipc://`` paths to its disk loader. It also registers the ``lora_ipc``
backend of vLLM's weight-transfer framework (worker and trainer sides, see :mod:`.weight_transfer`).
"""

from __future__ import annotations

import functools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..core import settings
from ..core.channels.endpoint import ENV_ENDPOINT
from ..core.errors import LoaderBypassed, LoraIpcError
from ..core.protocol import tagged
from ..lora.uri import AdapterURI

log = logging.getLogger("lora_ipc.vllm")
_MARK = "__lora_ipc_wrapped__"
BACKEND = "lora_ipc"


@dataclass
class ManagerState:
    """lora_ipc's state per vLLM worker LoRA manager, kept beside it (not as attributes on vLLM's object)."""

    paths: dict[int, str] = field(default_factory=dict)  # lora_int_id -> the lora-ipc:// path loaded under it
    loads: int = 0  # adapters loaded through lora_ipc (each a fetch or kept copy + from_lora_tensors)


_states: weakref.WeakKeyDictionary[Any, ManagerState] = weakref.WeakKeyDictionary()
_states_lock = threading.Lock()


def state_of(worker_manager) -> ManagerState:
    with _states_lock:
        return _states.setdefault(worker_manager, ManagerState())


def loaded_paths(worker_manager) -> dict[int, str]:
    """``lora_int_id -> lora-ipc:// path`` of what this worker loaded through lora_ipc."""
    return state_of(worker_manager).paths


def _install(cls, attr: str, make_wrapper) -> None:
    """Replace ``cls.attr`` by ``make_wrapper(original)`` once (register() may run more than once)."""
    original = getattr(cls, attr)
    if getattr(original, _MARK, False):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(wrapper, _MARK, True)
    setattr(cls, attr, wrapper)


def _serve(manager, lora_request):
    from .loader import load_adapter

    try:
        lora = load_adapter(manager, lora_request)
    except LoraIpcError as exc:  # vLLM hands a worker's error back as text: the typed code goes in front
        raise tagged(type(exc), str(exc)) from exc
    state = state_of(manager)
    state.paths[lora_request.lora_int_id] = lora_request.lora_path
    state.loads += 1
    return lora


# ---- robust against frameworks that replace _load_adapter (verl, SkyRL, ROLL, NeMo-RL, ...) -------
#
# They assign their own function to ``WorkerLoRAManager._load_adapter``, ``LRUCacheWorkerLoRAManager.
# _load_adapter`` or a subclass's, before or after this plugin runs, and often do not call what was
# there. A class-level wrapper loses to any of those (and would be a second layer under this one). So
# every manager instance gets its own
# ``_load_adapter`` (an instance attribute wins over any class's function at ``self._load_adapter``,
# which is how vLLM's ``add_adapter`` calls it): ``lora-ipc://`` paths are served by lora_ipc, every
# other path goes to whatever the class has at call time, patched or not.


def _guarded_load_adapter(self, lora_request):
    if AdapterURI.matches(getattr(lora_request, "lora_path", None)):
        return _serve(self, lora_request)
    return type(self)._load_adapter(self, lora_request)


def _class_loader_name(manager) -> str:
    fn = getattr(type(manager), "_load_adapter", None)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def guard(manager) -> None:
    """Give ``manager`` (a ``WorkerLoRAManager``) its own ``lora-ipc://``-serving ``_load_adapter``.

    Idempotent. Raises :class:`LoaderBypassed`, naming the class's ``_load_adapter``, where that cannot
    be done (a manager without an instance ``__dict__``): ``lora-ipc://`` paths would reach that function.
    """
    current = getattr(manager, "__dict__", {}).get("_load_adapter")
    if getattr(current, "__func__", None) is _guarded_load_adapter:
        return
    try:
        manager._load_adapter = _guarded_load_adapter.__get__(manager)
    except AttributeError:
        raise LoaderBypassed(
            f"lora-ipc:// adapters cannot reach lora_ipc's loader in {type(manager).__qualname__}: its "
            f"_load_adapter is {_class_loader_name(manager)} and the manager has no instance dict"
        ) from None


def _init_wrapper(original):
    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        guard(self)

    return __init__


def _touch_kept(worker_manager, lora_path: str) -> None:
    """A request for an adapter marks its kept copy as used (see :mod:`.kept`)."""
    from ..core.errors import LoraIpcError
    from .kept import kept_adapters, key_of

    try:
        kept_adapters(getattr(worker_manager, "lora_config", None)).get(key_of(AdapterURI.parse(lora_path)))
    except LoraIpcError:  # a bad path is refused by the loader itself; marking a kept copy is only a hint
        pass


def _add_adapter_wrapper(original):
    """``load_inplace`` requests are re-sent by vLLM on every step; reload only when the path changed."""

    def add_adapter(self, lora_request):
        guard(self)  # a manager whose class's __init__ did not run ours (a subclass's own __init__)
        if AdapterURI.matches(getattr(lora_request, "lora_path", None)):
            _touch_kept(self, lora_request.lora_path)
        if (
            getattr(lora_request, "load_inplace", False)
            and AdapterURI.matches(lora_request.lora_path)
            and lora_request.lora_int_id in self.list_adapters()
            and loaded_paths(self).get(lora_request.lora_int_id) == lora_request.lora_path
        ):
            import msgspec

            lora_request = msgspec.structs.replace(lora_request, load_inplace=False)
        return original(self, lora_request)

    return add_adapter


def _install_openai_check() -> None:
    """The API process's checks (see :mod:`.openai`) on the hooks :mod:`.compat` declares (checked present
    at registration: a vLLM without one is refused, never served unchecked)."""
    import importlib

    from .compat.expectations import OPENAI_HOOKS
    from .openai import check_model_wrapper, check_wrapper

    wrappers = {"_check_load_lora_adapter_request": check_wrapper, "_check_model": check_model_wrapper}
    for module, cls_name, attr in OPENAI_HOOKS:
        _install(getattr(importlib.import_module(module), cls_name), attr, wrappers[attr])


_registered = False
_register_lock = threading.Lock()


def register_weight_transfer() -> bool:
    """Register ``lora_ipc`` in vLLM's weight-transfer factories, once per process, by module path (the
    module is imported when an engine is made, and checks vLLM's weight-transfer surface then: see
    :func:`~lora_ipc.vllm.compat.require_refit_compatible`). Two callers, one registration: the plugin (in
    every vLLM process) and the import of :mod:`lora_ipc.vllm.weight_transfer` (a trainer process, where
    vLLM's plugins never load). False when this vLLM has no weight-transfer framework."""
    global _registered
    with _register_lock:
        if _registered:
            return True
        try:
            from vllm.distributed.weight_transfer.factory import (
                WeightTransferEngineFactory,
                WeightTransferTrainerFactory,
            )
        except ImportError:  # a vLLM without the weight-transfer framework: nothing to register into
            return False
        module = "lora_ipc.vllm.weight_transfer"
        for factory, cls_name in (
            (WeightTransferEngineFactory, "LoraIpcWeightTransferEngine"),
            (WeightTransferTrainerFactory, "LoraIpcTrainerWeightTransferEngine"),
        ):
            try:
                factory.register_engine(BACKEND, module, cls_name)
            except ValueError as exc:  # the name is taken, not by this process's lora_ipc (it registers once)
                log.warning(
                    "%s: the %r backend was registered by someone else; left as it is (%s)",
                    factory.__name__,
                    BACKEND,
                    exc,
                )
        _registered = True
        return True


def register() -> None:
    register_weight_transfer()
    try:
        from vllm.lora import worker_manager
    except ImportError:  # vLLM without LoRA support: nothing to do
        return
    from .compat import checked_surface

    checked_surface()
    _install(worker_manager.WorkerLoRAManager, "__init__", _init_wrapper)
    for cls in (worker_manager.WorkerLoRAManager, getattr(worker_manager, "LRUCacheWorkerLoRAManager", None)):
        if cls is not None and "add_adapter" in cls.__dict__:
            _install(cls, "add_adapter", _add_adapter_wrapper)
    _install_openai_check()
    if settings.is_set(ENV_ENDPOINT):
        from .resolver import register_resolver

        register_resolver(str(settings.value(ENV_ENDPOINT)))

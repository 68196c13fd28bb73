"""Whole-or-nothing refit: check a staged update against the served model before touching it, and undo
what an apply that still fails half-way wrote.

vLLM's layerwise reload writes a layer as soon as all of its weights have arrived, so a tensor the
model refuses (a transposed shape in layer 2, say) is found after layers 0 and 1 already hold the new
weights. Two guards make the apply whole or nothing:

- :func:`check_update`: a dry run of the model's own ``load_weights`` on the ``meta`` device. Every
  layer is put back into its load format on ``meta`` (the shapes vLLM recorded at load time), each
  weight loader is the original one, and the staged tensors go in as ``meta`` tensors of their shapes
  and dtypes: every name, shape and narrowing check the real apply would make runs, and no byte is
  copied. A tensor no parameter takes, a shape a loader rejects, or a floating tensor for a
  non-floating parameter (or the reverse) is refused here, before the model is touched. The layers are
  restored exactly as they were afterwards (their tensors, attributes and the loaders' attributes).
- :class:`LayerUndo`: before the real apply, every module is recorded: its parameter and buffer
  objects, a host copy of their bytes, and its other attributes (on the CPU backend the packed GEMM
  weights live in a closure attribute, not in a parameter). If the apply still fails
  (a loader's data-dependent check, memory), every recorded layer is put back: the old objects, bytes
  and attributes. The engine then serves the complete old weights.

Both read vLLM's layerwise-reload records (``LAYERWISE_INFO``); where they are missing the dry run is
skipped (logged) and the undo records every module.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..errors import tagged
from ..refit import RefitError

log = logging.getLogger("lora_ipc.vllm")

_STATE_KEYS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


def _reload_internals() -> tuple[Any, Any, Any] | None:
    try:
        from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO, _get_original_loader
        from vllm.model_executor.model_loader.reload.meta import restore_layer_on_meta
    except ImportError:
        return None
    return LAYERWISE_INFO, _get_original_loader, restore_layer_on_meta


@dataclass
class _Saved:
    """A module's tensors and plain attributes, as objects (and, for an undo, a host copy of the bytes)."""

    module: torch.nn.Module
    parameters: dict[str, Any]
    buffers: dict[str, Any]
    non_persistent: set[str]
    attrs: dict[str, Any]
    data: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def of(cls, module: torch.nn.Module, copy_bytes: bool = False) -> _Saved:
        saved = cls(
            module,
            dict(module._parameters),
            dict(module._buffers),
            set(module._non_persistent_buffers_set),
            {k: v for k, v in module.__dict__.items() if k not in _STATE_KEYS},
        )
        if copy_bytes:
            for name, tensor in (*saved.parameters.items(), *saved.buffers.items()):
                if tensor is not None and not tensor.is_meta:
                    saved.data[name] = tensor.detach().to("cpu", copy=True)
        return saved

    def restore(self) -> None:
        module = self.module
        module._parameters.clear()
        module._parameters.update(self.parameters)
        module._buffers.clear()
        module._buffers.update(self.buffers)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(self.non_persistent)
        for key in [k for k in module.__dict__ if k not in _STATE_KEYS and k not in self.attrs]:
            del module.__dict__[key]
        module.__dict__.update(self.attrs)
        with torch.no_grad():
            for name, host in self.data.items():
                tensor = self.parameters.get(name)
                if tensor is None:
                    tensor = self.buffers[name]
                tensor.data.copy_(host)


def _kind(dtype: torch.dtype) -> str:
    return "floating" if dtype.is_floating_point or dtype.is_complex else str(dtype)


def check_update(
    model: torch.nn.Module, staged: Iterable[tuple[str, torch.Tensor]], update: int
) -> set[torch.nn.Module] | None:
    """Dry-run ``model.load_weights`` over ``staged`` on ``meta``; RefitError (model untouched) if it refuses.

    Returns the modules whose weight loaders were called (what the real apply will write), or None when
    this vLLM has no layerwise-reload records to run the dry run with.
    """
    internals = _reload_internals()
    if internals is None:
        log.warning("lora_ipc refit: vLLM's layerwise reload records are missing; update %s not dry-run", update)
        return None
    layerwise_info, original_loader, restore_layer_on_meta = internals
    layers = []
    for module in model.modules():
        info = layerwise_info.get(module)
        if info is not None and (info.restore_metadata[0] or info.restore_metadata[1]):
            layers.append((module, info))
    if not layers:
        log.warning("lora_ipc refit: the model has no layerwise reload records; update %s not dry-run", update)
        return None
    touched: set[torch.nn.Module] = set()
    saved = [_Saved.of(module) for module, _ in layers]
    loaders: list[tuple[torch.Tensor, dict]] = []
    refused: list[str] = []

    def checker(module: torch.nn.Module, name: str, original):
        def check(*args, **kwargs):
            param = args[0] if args else kwargs.get("param")
            loaded = args[1] if len(args) > 1 else kwargs.get("loaded_weight")
            if isinstance(param, torch.Tensor) and isinstance(loaded, torch.Tensor):
                if _kind(param.dtype) != _kind(loaded.dtype):
                    refused.append(f"{type(module).__name__}.{name} is {param.dtype}, the update sends {loaded.dtype}")
                    raise RefitError(refused[-1])
            touched.add(module)
            return original(*args, **kwargs)

        return check

    try:
        for module, info in layers:
            restore_layer_on_meta(module, info)
            for name, tensor in (*module._parameters.items(), *module._buffers.items()):
                if tensor is None or not tensor.is_meta:
                    continue
                loaders.append((tensor, dict(tensor.__dict__)))
                tensor.__dict__["weight_loader"] = checker(module, name, original_loader(tensor))
        meta = ((name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in staged)
        try:
            cast(Any, model).load_weights(meta)
        except Exception as exc:
            raise tagged(
                RefitError,
                f"the served model refuses lora_ipc weight update {update} ({type(exc).__name__}: {exc}); "
                "checked before any weight was written: the engine serves the weights of the last complete update",
            ) from exc
    finally:
        for tensor, attrs in loaders:
            tensor.__dict__.clear()
            tensor.__dict__.update(attrs)
        for state in saved:
            state.restore()
    return touched


class LayerUndo:
    """What an apply may overwrite, recorded before it: ``restore()`` puts every recorded module back."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self._saved = [_Saved.of(module, copy_bytes=True) for module in modules]
        self.bytes = sum(t.numel() * t.element_size() for s in self._saved for t in s.data.values())

    def restore(self) -> None:
        internals = _reload_internals()
        for saved in self._saved:
            saved.restore()
            if internals is not None:
                info = internals[0].get(saved.module)
                if info is not None:
                    info.reset()  # nothing half-loaded stays recorded for the next reload

"""Whole-or-nothing refit: check a staged update against the served model before touching it, and undo
what an apply that still fails half-way wrote.

vLLM's layerwise reload writes a layer as soon as all of its weights have arrived, so a tensor the
model refuses (a transposed shape in layer 2, say) is found after layers 0 and 1 already hold the new
weights. Two guards make the apply whole or nothing:

- :func:`check_update`: a dry run of the real apply's path with the staged tensors as ``meta`` tensors
  of their shapes and dtypes. vLLM's own ``initialize_layerwise_reload`` puts every layer on ``meta`` in
  its load format and wraps its weight loaders, which run the original loaders on the ``meta``
  parameters as weights arrive: every name, shape and narrowing check of the real apply runs, and the
  step that would write a completed layer is held back. A tensor no parameter takes, a shape a loader
  rejects, or a floating tensor for a non-floating parameter (or the reverse) is refused here, before the
  model is touched. Every layer then gets its own tensors back, as vLLM's finalize does for a layer that
  received nothing.
- :class:`LayerUndo`: before the real apply, every module is recorded: its parameter and buffer
  objects, a host copy of their bytes, and its other attributes (on the CPU backend the packed GEMM
  weights live in a closure attribute, not in a parameter). If the apply still fails
  (a loader's data-dependent check, memory), every recorded layer is put back: the old objects, bytes
  and attributes. The engine then serves the complete old weights.

The dry run uses vLLM's layerwise-reload module, private helpers included (``_layerwise_process``,
``_place_kernel_tensors``, ``LOADING_LAYERS``, the ``LayerReloadingInfo`` record): each is declared in
:mod:`.compat.expectations` and checked when the worker engine is made, so a vLLM that moved one is
refused there (:class:`~.compat.UnsupportedVLLM`), never dry-run half-way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from ..core.protocol import tagged
from ..refit import RefitError
from .compat import runtime

_STATE_KEYS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")


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


def _dtype_problems(module: torch.nn.Module, info: Any) -> list[str]:
    out = []
    for name, args in info.loaded_weights:
        param, loaded = args.arguments.get("param"), args.arguments.get("loaded_weight")
        if not (isinstance(param, torch.Tensor) and isinstance(loaded, torch.Tensor)):
            continue
        if _kind(param.dtype) != _kind(loaded.dtype):
            out.append(f"{type(module).__name__}.{name} is {param.dtype}, the update sends {loaded.dtype}")
    return out


def check_update(model: torch.nn.Module, staged: list[tuple[str, torch.Tensor]], update: int) -> None:
    """Dry-run the real apply's path over ``staged`` as ``meta`` tensors; RefitError (model untouched) if the
    model refuses any of it.

    vLLM's own ``initialize_layerwise_reload`` puts every layer on ``meta`` in its load format and wraps its
    weight loaders; each wrapped loader runs the original one on the ``meta`` parameter at once (to count
    what it loads), so every name, shape and narrowing check runs. The step that writes a completed layer
    (``_layerwise_process``) is held back for the dry run, and afterwards every layer gets its own tensors
    back exactly as ``finalize_layerwise_reload`` does for a layer that received nothing.
    """
    layerwise = runtime.layerwise()
    infos = layerwise.LAYERWISE_INFO
    problems: list[str] = []
    process = layerwise._layerwise_process

    def hold(layer: torch.nn.Module, info: Any) -> None:  # a layer got all its weights: check, write nothing
        problems.extend(_dtype_problems(layer, info))

    loaded_any = False
    layerwise._layerwise_process = hold
    try:
        layerwise.initialize_layerwise_reload(model)
        meta = ((name, torch.empty(t.shape, dtype=t.dtype, device="meta")) for name, t in staged)
        try:
            cast(Any, model).load_weights(meta)
            if problems:
                raise RefitError("; ".join(problems[:5]))
        except Exception as exc:
            raise tagged(
                RefitError,
                f"the served model refuses lora_ipc weight update {update} ({type(exc).__name__}: {exc}); "
                "checked before any weight was written: the engine serves the weights of the last complete update",
            ) from exc
    finally:
        layerwise._layerwise_process = process
        for module in model.modules():
            info = infos.get(module)
            if info is None or not info.can_load():
                continue
            problems.extend(_dtype_problems(module, info))
            loaded_any = loaded_any or bool(info.load_numel)
            if info.kernel_tensors is not None:
                layerwise._place_kernel_tensors(module, info)
            info.reset()
        runtime.undo_layerwise_init(model)
        layerwise.LOADING_LAYERS.clear()
    if problems:
        raise tagged(
            RefitError,
            f"the served model refuses lora_ipc weight update {update} ({'; '.join(problems[:5])}); checked "
            "before any weight was written: the engine serves the weights of the last complete update",
        )
    if not loaded_any and staged:
        raise tagged(
            RefitError,
            f"no parameter of the served model takes lora_ipc weight update {update}; the model was not touched",
        )


class LayerUndo:
    """What an apply may overwrite, recorded before it: ``restore()`` puts every recorded module back."""

    def __init__(self, modules: Iterable[torch.nn.Module]):
        self._saved = [_Saved.of(module, copy_bytes=True) for module in modules]
        self.bytes = sum(t.numel() * t.element_size() for s in self._saved for t in s.data.values())

    def restore(self) -> None:
        infos = runtime.layerwise().LAYERWISE_INFO
        for saved in self._saved:
            saved.restore()
            info = infos.get(saved.module)
            if info is not None:
                info.reset()  # nothing half-loaded stays recorded for the next reload

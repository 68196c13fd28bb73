"""What lora_ipc needs from vLLM, checked by feature, never by version number.

The plugin wraps ``WorkerLoRAManager._load_adapter`` (and ``add_adapter``) and the loader mirrors
``_load_adapter`` step for step with ``from_lora_tensors`` in place of ``from_local_checkpoint``.
Peers that do this broke silently when vLLM moved (AReaL on a ``_load_adapter`` signature change;
vLLM 0.33 renamed the classification-head validations ``_load_adapter`` runs). So before wrapping
anything, the plugin compares what this vLLM offers with what lora_ipc assumes, and any difference
is :class:`UnsupportedVLLM` at registration — never a silent fallback to the disk loader.

Four parts:

- :mod:`.expectations`: every vLLM name lora_ipc touches (private ones included), and the shapes the
  readers fill in (:class:`VLLMSurface`, :class:`RefitSurface`, :class:`EntrySurface`);
- :mod:`.checks`: :func:`problems` / :func:`entry_problems` / :func:`refit_problems`, the checks at
  registration (:func:`checked_surface`, :func:`checked_refit_surface`) and :class:`UnsupportedVLLM`;
- :mod:`.runtime`: the imported vLLM (``inspect``, plus ``ast`` over the few function bodies that
  matter), and the accessors through which lora_ipc's modules reach vLLM's private names;
- :mod:`.source`: ``ast`` over the ``.py`` files of a vLLM that need not import (a GPU wheel beside a CPU
  torch); used by ``scripts/check_vllm_api.py``.

Part of the surface is followed rather than required: the ``_validate_*`` calls ``_load_adapter``
makes on its adapter manager after loading are read from its source and the loader makes the same
calls (:attr:`VLLMSurface.validations`).
"""

from .checks import (
    UnsupportedVLLM,
    checked_refit_surface,
    checked_surface,
    entry_problems,
    problems,
    refit_problems,
    require_compatible,
    require_refit_compatible,
)
from .expectations import EntrySurface, LoadAdapterBody, Params, RefitSurface, VLLMSurface
from .runtime import (
    entry_surface_from_runtime,
    lora_model_class,
    params_of,
    refit_surface_from_runtime,
    surface_from_runtime,
)
from .source import entry_surface_from_source, refit_surface_from_source, surface_from_source

__all__ = [
    "EntrySurface",
    "LoadAdapterBody",
    "Params",
    "RefitSurface",
    "UnsupportedVLLM",
    "VLLMSurface",
    "checked_refit_surface",
    "checked_surface",
    "entry_problems",
    "entry_surface_from_runtime",
    "entry_surface_from_source",
    "lora_model_class",
    "params_of",
    "problems",
    "refit_problems",
    "refit_surface_from_runtime",
    "refit_surface_from_source",
    "require_compatible",
    "require_refit_compatible",
    "surface_from_runtime",
    "surface_from_source",
]

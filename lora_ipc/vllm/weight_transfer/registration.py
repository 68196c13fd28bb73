"""The refit backend's registration, first thing when :mod:`lora_ipc.vllm.weight_transfer` is imported (a
trainer process, or vLLM's factory making a worker engine): vLLM's weight-transfer surface is checked
before anything subclasses its classes (:class:`~lora_ipc.vllm.compat.UnsupportedVLLM` naming what
differs), then ``lora_ipc`` is registered in both factories (once per process; the plugin does the same in
every vLLM process, see :func:`lora_ipc.vllm.plugin.register_weight_transfer`)."""

from __future__ import annotations

from ..compat import checked_refit_surface
from ..plugin import register_weight_transfer


def check_and_register() -> None:
    checked_refit_surface()
    register_weight_transfer()

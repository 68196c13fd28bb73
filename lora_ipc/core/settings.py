"""Every ``LORA_IPC_*`` environment variable lora_ipc reads, in one table: name, type, default, meaning.

Code reads them only through :func:`value` (or :func:`is_set`); a value that does not parse is a
:class:`~lora_ipc.core.errors.ConfigError` naming the variable, whoever asks. docs/reference/configuration.md is
checked against this table by a test (tests/test_settings.py): ``python -m lora_ipc.core.settings`` writes it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["SETTINGS", "Setting", "is_set", "value"]


@dataclass(frozen=True)
class Setting:
    name: str
    kind: type  # str, int or float
    default: str | int | float | None  # None: no value (the meaning says what happens then)
    meaning: str
    choices: tuple[str, ...] = ()  # str settings: the accepted values (case-insensitive)
    positive: bool = False  # int/float settings: must be > 0 (else >= 0)
    side: str = "both"  # where it is read: trainer, engine (vLLM worker / server) or both

    def parse(self, raw: str, given_as: str | None = None) -> str | int | float:
        """``raw`` as this setting's type; ``given_as`` names an argument that carried it instead of the
        variable (``transport=...``), for the error."""
        where = f"{given_as or '$' + self.name}={raw!r:.40}"
        if self.kind is str:
            if self.choices:
                raw = raw.lower()
                if raw not in self.choices:
                    raise ConfigError(f"{where}: expected one of {self.choices} (${self.name})")
            return raw
        try:
            parsed = self.kind(raw)
        except ValueError:
            raise ConfigError(f"{where}: expected a {self.kind.__name__}") from None
        if parsed != parsed or parsed < 0 or (self.positive and parsed == 0):  # NaN, negative, zero
            raise ConfigError(f"{where}: expected a {'positive' if self.positive else 'non-negative'} number")
        return parsed


SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in (
        Setting(
            "LORA_IPC_ENDPOINT",
            str,
            None,
            "The endpoint (ipc://path) an in-process exporter listens on and lora-ipc:// URIs without an "
            "endpoint= use; unset: a fresh private socket per exporter, and the per-user daemon socket for clients.",
        ),
        Setting(
            "LORA_IPC_TRANSPORT",
            str,
            "auto",
            "How a client imports a slab: auto (shared memory / CUDA IPC, falling back to a host copy where it "
            "cannot be imported), cuda (never fall back) or host (always the host copy).",
            choices=("auto", "cuda", "host"),
            side="engine",
        ),
        Setting(
            "LORA_IPC_CUDA_EXPORT",
            str,
            "torch",
            "How a trainer exports GPU slabs: torch (torch's CUDA IPC), vmm (CUDA VMM through a POSIX "
            "descriptor; an error where unavailable) or auto (VMM where available, else torch).",
            choices=("torch", "vmm", "auto"),
            side="trainer",
        ),
        Setting(
            "LORA_IPC_MAX_FETCH_BYTES",
            int,
            None,
            "The most bytes one fetch may copy; unset: derived from vLLM's LoRA buffers inside a worker, "
            "4 GiB elsewhere.",
            positive=True,
            side="engine",
        ),
        Setting(
            "LORA_IPC_TIMEOUT_S",
            float,
            10.0,
            "Seconds a vLLM worker's shared client waits for one exporter reply.",
            positive=True,
            side="engine",
        ),
        Setting(
            "LORA_IPC_CONNECT_WAIT_S",
            float,
            0.0,
            "Seconds a vLLM worker's shared client waits for an endpoint nobody serves yet (0: fail at once).",
            side="engine",
        ),
        Setting(
            "LORA_IPC_WORKER_KEEP",
            int,
            None,
            "Pinned versions a vLLM worker keeps to reload after vLLM evicted them; unset: 4 x max_cpu_loras, "
            "at least 8.",
            positive=True,
            side="engine",
        ),
        Setting(
            "LORA_IPC_WORKER_KEEP_BYTES",
            int,
            4 << 30,
            "Bytes of host memory those kept versions may use.",
            positive=True,
            side="engine",
        ),
        Setting(
            "LORA_IPC_LIBCUDA",
            str,
            "libcuda.so.1",
            "The CUDA driver library the native VMM extension loads (read by csrc/vmm.c).",
        ),
    )
}


def is_set(name: str) -> bool:
    """Whether ``$name`` holds a value (an empty string counts as unset)."""
    return bool(os.environ.get(SETTINGS[name].name))


def value(name: str) -> str | int | float | None:
    """``$name`` parsed by its row of :data:`SETTINGS`, or the row's default where unset or empty."""
    setting = SETTINGS[name]
    raw = os.environ.get(name)
    if not raw:
        return setting.default
    return setting.parse(raw.strip())


def markdown() -> str:
    """docs/reference/configuration.md, generated from :data:`SETTINGS`."""
    rows = [
        "# Configuration",
        "",
        "Every environment variable lora_ipc reads. Generated from `lora_ipc/core/settings.py` by",
        "`python -m lora_ipc.core.settings > docs/reference/configuration.md` (a test checks the two agree).",
        "A value that does not parse raises `ConfigError` naming the variable. Empty counts as unset.",
        "",
        "| variable | type | default | read by | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS.values():
        kind = " / ".join(s.choices) if s.choices else s.kind.__name__
        default = "(unset)" if s.default is None else f"`{s.default}`"
        rows.append(f"| `{s.name}` | {kind} | {default} | {s.side} | {s.meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown(), end="")

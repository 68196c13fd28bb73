"""One authority for version numbers across a relay set: Ray's GCS key-value store.

Every relay numbers the versions published into it on its own node, and every relay of a set serves
under one epoch, so two relays that numbered one name independently would give one
(name, version, epoch) to two byte sets: two trainers publishing a name from two nodes, or a relay
Ray restarted that continues from its peers' newest version after it had issued a newer one that
never reached them. So a relay takes each number it issues from the GCS first: the key
``v/<epoch>/<name>/<version>`` is put only if absent (atomic in the GCS), and a number somebody
already holds is skipped. A number is recorded before its version is visible, so in-flight
versions count too, and a restarted relay never issues one again. ``high/<epoch>/<name>`` is only a
hint where to start. Cost: one or two GCS round trips per publish, about 100 bytes of GCS per version.
"""

from __future__ import annotations

from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_put

from .errors import ReplicationError

KV_NAMESPACE = "lora_ipc"
MAX_SKIPS = 1 << 16  # numbers held elsewhere skipped in one claim before giving up


def _key(*parts: str | int) -> bytes:
    return "/".join(str(p) for p in parts).encode()


def claim_version(epoch: str, name: str, at_least: int, holder: str) -> int:
    """The lowest version number of ``name`` in ``epoch`` that is at least ``at_least`` and that nobody
    (no relay, no earlier life of this one) was given before; it is now ``holder``'s."""
    hint = _internal_kv_get(_key("high", epoch, name), namespace=KV_NAMESPACE)
    version = max(at_least, int(hint) + 1 if hint else 1)
    for _ in range(MAX_SKIPS):
        taken = _internal_kv_put(_key("v", epoch, name, version), holder, False, namespace=KV_NAMESPACE)
        if not taken:
            _internal_kv_put(_key("high", epoch, name), str(version), True, namespace=KV_NAMESPACE)
            return version
        version += 1
    raise ReplicationError(f"{name!r}: no free version number from {at_least} on in epoch {epoch}")


def remembered_dir(node_id: str) -> str | None:
    """The directory ``node_id``'s relay bound in (so a restarted relay binds the same path), if recorded."""
    held = _internal_kv_get(_key("relay-dir", node_id), namespace=KV_NAMESPACE)
    return held.decode() if held is not None else None


def remember_dir(node_id: str, directory: str) -> None:
    _internal_kv_put(_key("relay-dir", node_id), directory, True, namespace=KV_NAMESPACE)

"""The pieces of lora_ipc.ray that need no cluster: a store keeping a given version number, and the
validation of a replica received from another node."""

import numpy as np
import pytest
import torch

from lora_ipc.layout import SlabLayout
from lora_ipc.store import TensorSetStore

from . import models
from .helpers import assert_same_adapter


def _replica_bytes(tensors):
    layout = SlabLayout.plan(tensors)
    buf = torch.zeros(layout.used_bytes, dtype=torch.uint8)
    layout.pack(layout.destination_views(buf), tensors)
    return layout, buf


def test_store_keeps_a_given_version_number_and_refuses_an_older_one():
    tensors = models.random_adapter(3)
    layout, buf = _replica_bytes(tensors)
    store = TensorSetStore(keep=2)
    try:
        assert (
            store.publish_copy(
                "p", layout, models.RANDOM_ADAPTER_CONFIG, lambda dst: dst.copy_(buf), torch.device("cpu"), version=7
            )
            == 7
        )
        assert store.newest_version("p") == 7
        for stale in (7, 3):
            with pytest.raises(ValueError, match="not newer"):
                store.publish_copy(
                    "p",
                    layout,
                    models.RANDOM_ADAPTER_CONFIG,
                    lambda dst: dst.copy_(buf),
                    torch.device("cpu"),
                    version=stale,
                )
        assert store.status().slabs.live == 1  # the refused copies took no slab with them
        assert store.publish("p", tensors, models.RANDOM_ADAPTER_CONFIG) == 8  # numbering continues
        lease, pv = store.lease("p", 7, b"t")
        assert_same_adapter(pv.layout.unpack(pv.slab.tensor[: pv.layout.used_bytes].clone()), tensors)
        store.release(lease.lease_id, b"t")
    finally:
        store.close()


def test_a_replica_is_validated_like_any_publish():
    pytest.importorskip("ray")
    from lora_ipc.errors import LayoutError
    from lora_ipc.ray.replica import ReplicaMeta

    layout, buf = _replica_bytes(models.random_adapter(1))
    meta = ReplicaMeta("p", 1, layout.to_wire(), layout.used_bytes, models.RANDOM_ADAPTER_CONFIG)
    assert meta.layout_for(buf.numpy()).to_wire() == layout.to_wire()
    with pytest.raises(LayoutError):
        meta.layout_for(buf.numpy()[:-64])  # short
    with pytest.raises(LayoutError):
        meta.layout_for(buf.numpy().view(np.int8))  # not bytes
    bad = ReplicaMeta("p", 1, [[*layout.to_wire()[0][:3], layout.used_bytes, 64]], layout.used_bytes, {})
    with pytest.raises(LayoutError):
        bad.layout_for(buf.numpy())  # an entry outside the buffer


@pytest.fixture
def short_tmp():
    """A short temporary directory: socket paths must stay under 100 bytes."""
    import shutil
    import tempfile
    from pathlib import Path

    path = tempfile.mkdtemp(prefix="lr", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def test_a_relay_directory_no_other_user_can_pre_empt(short_tmp, monkeypatch):
    """Issue 23 (21): the relay socket used to live at <tmp>/lora-ipc-ray-<uid>; whoever made that directory
    first (another user, or anyone, writable by all) stopped every relay. Now: $XDG_RUNTIME_DIR when it is
    ours and 0700, else a fresh random directory; never the predictable one."""
    pytest.importorskip("ray")
    import os
    import stat
    import tempfile

    from lora_ipc.endpoint import prepare_ipc_path
    from lora_ipc.ray.naming import relay_endpoint

    tmp_path = short_tmp
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    squatted = tmp_path / f"lora-ipc-ray-{os.getuid()}"
    squatted.mkdir()
    squatted.chmod(0o777)  # as another user's directory: refused by the trust check
    node = "ab" * 14
    first, second = relay_endpoint(node), relay_endpoint(node)
    for endpoint in (first, second):
        path = prepare_ipc_path(endpoint)  # the relay binds here: trusted, 0700, ours
        directory = os.path.dirname(path)
        assert directory != str(squatted) and os.path.dirname(directory) == str(tmp_path)
        assert stat.S_IMODE(os.lstat(directory).st_mode) == 0o700
    assert first != second  # random: nobody can make it first

    runtime = tmp_path / "run-user"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert os.path.dirname(prepare_ipc_path(relay_endpoint(node))) == str(runtime / "lora-ipc-ray")
    runtime.chmod(0o755)  # not private: not used
    assert not prepare_ipc_path(relay_endpoint(node)).startswith(str(runtime))

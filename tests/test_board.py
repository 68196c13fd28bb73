"""The newest-version board (memory/board.py) and the fetch made from it without a request (Note [a fetch
without a request], client.py): its entries byte for byte, then a client in this process against an exporter
in another, checked bitwise against the adapter published, and every case in which the client must ask."""

from __future__ import annotations

import dataclasses
import os

import pytest

from lora_ipc import AdapterClient, ExporterUnavailable
from lora_ipc.core.fetching import client as client_module
from lora_ipc.core.memory import board
from lora_ipc.core.memory.shm import GenerationTable
from lora_ipc.core.protocol.tables import BOARD_ENTRY_BYTES, BOARD_SEQ

from . import models
from .helpers import assert_same_adapter
from .procs import ExporterProcess

pytestmark = pytest.mark.skipif(not board.BOARD_SUPPORTED, reason="the board is written on x86-64 only")

ENTRY = board.NewestEntry(7, 3, 4096, b"L" * 16, b"C" * 16, "123.abcd.4")


@pytest.fixture
def table():
    t = GenerationTable(slots=8, board_entries=4)
    yield t
    t.close()


def test_an_entry_reads_back_only_when_complete(table):
    at = table.board_entry_offset(1)
    assert at == 2 * BOARD_ENTRY_BYTES  # the board starts at the first multiple of 256 after 8 counters
    size = os.fstat(table.fd).st_size
    assert board.read_entry(table.fd, at, size) is None  # never written
    table.board.post(1, ENTRY)
    assert board.read_entry(table.fd, at, size) == ENTRY
    assert board.read_entry(table.fd, table.board_entry_offset(0), size) is None  # its neighbour untouched
    newer = board.NewestEntry(8, 5, 8192, b"M" * 16, b"C" * 16, "123.abcd.5")
    table.board.post(1, newer)
    assert board.read_entry(table.fd, at, size) == newer
    seqs = table.board._seqs
    slot = BOARD_ENTRY_BYTES // BOARD_SEQ.size
    seqs[slot] += 1  # a write under way: odd
    assert board.read_entry(table.fd, at, size) is None
    seqs[slot] += 1
    assert board.read_entry(table.fd, at, size) == newer
    table.board.withdraw()
    assert board.read_entry(table.fd, at, size) is None


@pytest.mark.parametrize("offset", [-256, 1, 5 * 256, 4 * 256 + 8])
def test_an_entry_outside_the_table_or_misaligned_is_none(table, offset):
    table.board.post(3, ENTRY)
    assert board.read_entry(table.fd, offset, os.fstat(table.fd).st_size) is None


def test_a_malformed_entry_is_none(table):
    at = table.board_entry_offset(2)
    size = os.fstat(table.fd).st_size
    table.board.post(2, ENTRY)
    region = table.board._region
    body = 2 * BOARD_ENTRY_BYTES
    length_at = body + 8 * 4 + 32
    region[length_at] = 200  # longer than a slab id may be
    assert board.read_entry(table.fd, at, size) is None
    region[length_at] = len(ENTRY.slab_id)
    region[length_at + 1] = 0xFF  # not UTF-8
    assert board.read_entry(table.fd, at, size) is None
    table.board.post(2, board.NewestEntry(9, 1, 4096, b"L" * 16, b"C" * 16, "x" * 129))  # an id too long: withdrawn
    assert board.read_entry(table.fd, at, size) is None


def test_a_closed_table_withdraws_its_board():
    t = GenerationTable(slots=8, board_entries=2)
    t.board.post(0, ENTRY)
    reader = os.dup(t.fd)
    try:
        t.close()
        assert board.read_entry(reader, t.board_entry_offset(0), os.fstat(reader).st_size) is None
    finally:
        os.close(reader)


# ---- a client against an exporter in another process ---------------------------------------------


@pytest.fixture
def exporter():
    proc = ExporterProcess(keep=2)
    yield proc
    proc.close()


def _status(client):
    return client.status().metrics


def test_the_newest_version_is_fetched_without_a_request_once_the_client_holds_its_slabs(exporter):
    exporter.call("publish_random", "b", 1)
    with AdapterClient(exporter.endpoint) as client:
        assert_same_adapter(client.fetch("b").tensors, models.random_adapter(1))  # asks: holds nothing yet
        assert client.board_fetches == 0
        for seed in range(2, 7):  # keep=2: the versions cycle through the slabs the client holds
            version = exporter.call("publish_random", "b", seed)
            fetched = client.fetch("b")
            assert fetched.version == version
            assert_same_adapter(fetched.tensors, models.random_adapter(seed))
        assert client.board_fetches >= 3  # the first versions land in slabs the client does not hold yet
        boarded = client.board_fetches
        metrics = _status(client)  # the untold board fetches travel before this request
        assert metrics.fetches == 6 and metrics.board_fetches == boarded and metrics.fetch_latency.count == 6
        assert client.status().lease_count == 0  # a board fetch takes no lease


def test_an_older_pinned_version_or_another_epoch_is_asked_for(exporter):
    exporter.call("publish_random", "p", 1)
    with AdapterClient(exporter.endpoint) as client:
        client.fetch("p")
        v2 = exporter.call("publish_random", "p", 2)
        assert_same_adapter(client.fetch("p", v2).tensors, models.random_adapter(2))  # the newest, pinned
        boarded = client.board_fetches
        assert_same_adapter(client.fetch("p", v2 - 1).tensors, models.random_adapter(1))  # older: asked
        assert client.board_fetches == boarded
        with pytest.raises(Exception, match="epoch"):
            client.fetch("p", epoch="00000000")
        assert client.board_fetches == boarded


def test_a_slab_reused_during_a_board_copy_is_discarded_and_the_server_asked(exporter, monkeypatch):
    exporter.call("publish_random", "r", 1)
    with AdapterClient(exporter.endpoint) as client:
        client.fetch("r")
        for seed in (2, 3, 4):
            exporter.call("publish_random", "r", seed)
            client.fetch("r")  # the client now holds every slab the name cycles through
        boarded = client.board_fetches
        assert boarded >= 1
        exporter.call("publish_random", "r", 5)
        slab_cls = type(next(iter(client._slabs._items.values())))
        real = slab_cls.copy_out
        state = {"raced": False}

        def copy_out_raced(self, used_bytes, device=None):
            if not state["raced"]:  # the first copy (the board's): two more publishes reuse the slab under it
                state["raced"] = True
                for seed in (6, 7, 8):
                    exporter.call("publish_random", "r", seed)
            return real(self, used_bytes, device)

        monkeypatch.setattr(slab_cls, "copy_out", copy_out_raced)
        fetched = client.fetch("r")
        assert state["raced"] and fetched.version == exporter.call("status").versions[-1].version
        assert_same_adapter(fetched.tensors, models.random_adapter(8))  # the newest, by the request
        assert client.board_fetches == boarded  # the board copy was discarded


def test_a_killed_exporter_is_found_out_not_served_from_its_board(exporter):
    exporter.call("publish_random", "k", 1)
    with AdapterClient(exporter.endpoint, timeout_s=2) as client:
        client.fetch("k")
        client.fetch("k")  # the same version: from the board
        assert client.board_fetches == 1
        exporter.kill()
        with pytest.raises(ExporterUnavailable):
            client.fetch("k")


def test_a_closed_store_is_found_out_not_served_from_its_board(exporter):
    exporter.call("publish_random", "c", 1)
    with AdapterClient(exporter.endpoint, timeout_s=2) as client:
        client.fetch("c")
        client.fetch("c")
        assert client.board_fetches == 1
        exporter.call("close_keep_serving_commands")
        with pytest.raises(ExporterUnavailable):
            client.fetch("c")


def test_board_fetches_are_told_to_the_server_in_batches(exporter, monkeypatch):
    monkeypatch.setattr(client_module, "NOTE_INTERVAL_S", 3600.0)
    exporter.call("publish_random", "n", 1)
    with AdapterClient(exporter.endpoint) as client:
        for _ in range(3):
            client.fetch("n")  # the same version: one request, then the board
        assert client.board_fetches == 2
        assert exporter.call("status").metrics.fetches == 1  # the two board fetches are not told yet
        assert _status(client).fetches == 3  # told before the client's next request


def test_a_board_entry_naming_another_servers_slab_is_not_taken(exporter):
    """A hostile exporter's entry names, byte for byte, the newest version of another exporter's slab this
    process holds: the client holds imports per server, so it asks its own server and gets that one's bytes."""
    other = ExporterProcess(keep=2)
    try:
        other.call("publish_random", "victim", 11)
        exporter.call("publish_random", "h", 12)
        with AdapterClient(other.endpoint) as victim_client, AdapterClient(exporter.endpoint) as client:
            victim_client.fetch("victim")
            victim_client.fetch("victim")
            assert victim_client.board_fetches == 1  # the victim's slab is imported, its board is read
            client.fetch("h")
            boarded = client.board_fetches
            exporter.call("forge_board", "h", other.call("newest_entry", "victim"))
            fetched = client.fetch("h")
            assert_same_adapter(fetched.tensors, models.random_adapter(12))  # its own server's bytes
            assert client.board_fetches == boarded
            forged_layout = dataclasses.replace(exporter.call("newest_entry", "h"), layout_digest=b"?" * 16)
            exporter.call("forge_board", "h", forged_layout)  # a layout the client never validated
            assert_same_adapter(client.fetch("h").tensors, models.random_adapter(12))
            assert client.board_fetches == boarded
    finally:
        other.close()


def test_many_names_told_at_once_do_not_get_the_client_disconnected(exporter, monkeypatch):
    """Board fetches of many names are told together, in one FetchNote. Sent as a note per name in one burst, the
    server had as many replies to send at once and dropped the client as one that does not read them (SEND_HWM,
    server.py ``_reply``): the client's next request timed out. The exporter's threads share one core here, as on a
    loaded machine, so its IO thread falls behind such a burst."""
    monkeypatch.setattr(client_module, "NOTE_INTERVAL_S", 3600.0)
    names = [f"many{i}" for i in range(24)]  # fewer than the slabs a client keeps imported (MAX_CACHED_SLABS)
    for name in names:
        exporter.call("publish_random", name, 1)
    for task in os.listdir(f"/proc/{exporter.pid}/task"):
        os.sched_setaffinity(int(task), {min(os.sched_getaffinity(0))})
    with AdapterClient(exporter.endpoint, timeout_s=5) as client:
        conn = client._conn
        run = {"now": 0, "most": 0}
        notify, request = conn.notify, conn.request

        def counted_notify(message):
            run["now"] += 1
            run["most"] = max(run["most"], run["now"])
            return notify(message)

        def counted_request(*args, **kwargs):
            run["now"] = 0
            return request(*args, **kwargs)

        monkeypatch.setattr(conn, "notify", counted_notify)
        monkeypatch.setattr(conn, "request", counted_request)
        for _ in range(3):
            for name in names:
                client.fetch(name)  # asked the first time, from the board later
            for name in names:
                client.fetch(name)
            metrics = _status(client)  # the untold board fetches of every name travel first
            assert metrics.fetches == 2 * len(names) * (_ + 1) and metrics.board_fetches == client.board_fetches
        assert client.board_fetches == 5 * len(names)
        assert run["most"] <= 1


def test_board_fetches_of_a_dead_server_are_not_told_to_its_successor(exporter, monkeypatch):
    """An exporter killed before its client told its board fetches, another one at the same endpoint: the client's
    next request must not make the new server count fetches it never served."""
    monkeypatch.setattr(client_module, "NOTE_INTERVAL_S", 3600.0)
    exporter.call("publish_random", "d", 1)
    with AdapterClient(exporter.endpoint, timeout_s=10) as client:
        for _ in range(3):
            client.fetch("d")
        assert client.board_fetches == 2  # not told yet
        exporter.kill()
        successor = ExporterProcess(endpoint=exporter.endpoint, keep=2)
        try:
            successor.call("publish_random", "d", 2)
            assert_same_adapter(client.fetch("d").tensors, models.random_adapter(2))  # asked: its writer is dead
            metrics = _status(client)
            assert metrics.fetches == 1 and metrics.board_fetches == 0
        finally:
            successor.close()


def test_a_server_that_reuses_a_dead_servers_pid_is_watched_anew(exporter):
    """A successor that got its dead predecessor's pid (pids are reused; a restarted container's server often
    gets the same one): the client's watch of the old process says dead, and was kept because the pid is the
    same, so this client never fetched from a board again. Simulated by a watch of an exited process that bears
    the server's pid."""
    import subprocess

    from lora_ipc.core.fetching.board import ServerWatch

    exporter.call("publish_random", "u", 1)
    with AdapterClient(exporter.endpoint) as client:
        gone = subprocess.Popen(["sleep", "60"])
        try:
            stale = ServerWatch(gone.pid)
        finally:
            gone.kill()
            gone.wait()
        assert not stale.alive()
        stale.pid = exporter.pid  # the pid the exited process had, now the server's
        client._watch = stale
        assert_same_adapter(client.fetch("u").tensors, models.random_adapter(1))  # asks: holds nothing yet
        assert_same_adapter(client.fetch("u").tensors, models.random_adapter(1))
        assert client.board_fetches == 1
        stale.close()


def test_board_fetches_of_a_closed_store_are_not_told_to_the_next_in_the_same_process(monkeypatch, tmp_path):
    """An exporter closed before its client told its board fetches, another one at the same endpoint in the same
    process (same pid, so the client's watch cannot tell them apart): the new store must not count fetches made
    from the old one's board."""
    from lora_ipc import AdapterExporter

    monkeypatch.setattr(client_module, "NOTE_INTERVAL_S", 3600.0)
    endpoint = f"ipc://{tmp_path}/exporter.sock"
    with AdapterExporter(endpoint) as first, AdapterClient(endpoint, timeout_s=10) as client:
        first.publish("s", models.random_adapter(1), models.RANDOM_ADAPTER_CONFIG)
        for _ in range(3):
            client.fetch("s")
        assert client.board_fetches == 2  # not told yet
        first.close()
        with AdapterExporter(endpoint) as second:
            second.publish("s", models.random_adapter(2), models.RANDOM_ADAPTER_CONFIG)
            metrics = _status(client)
            assert metrics.fetches == 0 and metrics.board_fetches == 0
            assert_same_adapter(client.fetch("s").tensors, models.random_adapter(2))  # asked: the board was withdrawn

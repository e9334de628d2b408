"""The shared SQLite basic: journal mode by filesystem, object stores refused, no lost concurrent writes."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest

from alpaca_ray.cluster.sqlite_store import (
    Mount,
    SQLiteStore,
    filesystem_type,
    journal_mode_for,
    parse_mounts,
    read_mounts,
)
from alpaca_ray.config import UserError

MOUNTS_TEXT = r"""/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime 0 0
fileserver:/export/runs /data nfs4 rw,relatime,vers=4.2 0 0
/dev/vdb /data/local-scratch xfs rw,relatime 0 0
//nas/share /mnt/my\040share cifs rw 0 0
bucket /mnt/gcs fuse.gcsfuse rw,nosuid,nodev 0 0
/dev/vdc /mnt/stacked ext4 rw 0 0
server:/stacked /mnt/stacked nfs rw 0 0
"""
TABLE = parse_mounts(MOUNTS_TEXT)
SCHEMA = "CREATE TABLE IF NOT EXISTS items (id INTEGER PRIMARY KEY AUTOINCREMENT, writer INTEGER, n INTEGER)"


def test_parse_mounts_reads_points_and_types_and_unescapes_spaces():
    assert TABLE[0] == Mount("/", "ext4")
    assert Mount("/mnt/my share", "cifs") in TABLE
    assert len(TABLE) == 9


@pytest.mark.parametrize("path, fs_type, mode", [
    ("/home/user/reports.db", "ext4", "WAL"),
    ("/data/runs/serve/reports.db", "nfs4", "DELETE"),
    ("/data/local-scratch/reports.db", "xfs", "WAL"),  # the longest mount point wins
    ("/database.db", "ext4", "WAL"),  # "/data" is a prefix of the string, not a parent directory
    ("/mnt/my share/ratings.sqlite", "cifs", "DELETE"),
    ("/mnt/gcs/x.db", "fuse.gcsfuse", "DELETE"),
    ("/mnt/stacked/x.db", "nfs", "DELETE"),  # mounted over: the later row is what the path sees
    ("/data", "nfs4", "DELETE"),
])
def test_journal_mode_follows_the_mount_of_the_path(path, fs_type, mode):
    assert filesystem_type(path, TABLE) == fs_type
    assert journal_mode_for(path, TABLE) == mode


def test_unknown_filesystem_counts_as_local():
    assert filesystem_type("/x.db", []) is None and journal_mode_for("/x.db", []) == "WAL"


def test_a_local_path_gets_wal_and_the_override_gets_a_rollback_journal(tmp_path):
    expected = journal_mode_for(str(tmp_path.resolve()), read_mounts())
    if expected != "WAL":
        pytest.skip(f"{tmp_path} is on a network filesystem here")
    store = SQLiteStore(tmp_path / "auto.db", SCHEMA)
    assert store.journal_mode == "WAL" and store.current_journal_mode() == "wal"
    with sqlite3.connect(store.path) as db:  # what another process opening the file sees
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    forced = SQLiteStore(tmp_path / "forced.db", SCHEMA, journal_mode="DELETE")
    assert forced.current_journal_mode() == "delete"
    assert not (tmp_path / "forced.db-wal").exists()


def test_object_store_paths_are_refused_and_readers_do_not_create(tmp_path):
    for uri in ("s3://bucket/reports.db", "gs://bucket/ratings.sqlite"):
        with pytest.raises(UserError, match="SQLite needs a POSIX filesystem"):
            SQLiteStore(uri, SCHEMA)
    with pytest.raises(FileNotFoundError):
        SQLiteStore(tmp_path / "missing.db", create=False)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(ValueError, match="journal_mode"):
        SQLiteStore(tmp_path / "x.db", SCHEMA, journal_mode="MEMORY")  # type: ignore[arg-type]


def test_a_failed_write_is_rolled_back(tmp_path):
    store = SQLiteStore(tmp_path / "t.db", SCHEMA)
    with pytest.raises(RuntimeError), store.write() as db:
        db.execute("INSERT INTO items (writer, n) VALUES (0, 0)")
        raise RuntimeError("fails after the insert")
    with store.read() as db:
        assert db.execute("SELECT COUNT(*) FROM items").fetchone()[0] == 0


def _insert_many(path: str, journal_mode: str, writer: int, count: int, start: multiprocessing.Event) -> None:
    """One writer process: its own store object, one transaction per insert, all starting together."""
    store = SQLiteStore(path, SCHEMA, journal_mode=journal_mode)  # type: ignore[arg-type]
    start.wait(60)
    for n in range(count):
        with store.write() as db:
            db.execute("INSERT INTO items (writer, n) VALUES (?, ?)", (writer, n))


@pytest.mark.parametrize("journal_mode", ["WAL", "DELETE"])
def test_concurrent_writer_processes_lose_nothing(tmp_path, journal_mode):
    path = str(tmp_path / f"{journal_mode}.db")
    SQLiteStore(path, SCHEMA, journal_mode=journal_mode)  # type: ignore[arg-type]
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold Ray's threads
    start = context.Event()
    writers, count = 4, 25
    processes = [context.Process(target=_insert_many, args=(path, journal_mode, w, count, start))
                 for w in range(writers)]
    for process in processes:
        process.start()
    start.set()
    for process in processes:
        process.join(120)
    assert [p.exitcode for p in processes] == [0] * writers
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT writer, n FROM items").fetchall()
        mode = db.execute("PRAGMA journal_mode").fetchone()[0]
    assert sorted(rows) == [(w, n) for w in range(writers) for n in range(count)]
    assert mode == journal_mode.lower()

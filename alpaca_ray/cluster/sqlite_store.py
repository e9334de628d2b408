"""SQLite the same way for every store in the project (reports, human ratings): safe on a cluster.

Three rules, each for a failure seen on clusters:

- **One connection and one transaction per call**, with a busy timeout: nothing is held between calls,
  so threads of one replica and separate processes queue on SQLite's lock instead of failing or losing
  a write. Writes start with ``BEGIN IMMEDIATE`` so the wait happens up front, where the busy timeout
  applies, rather than on a read-to-write upgrade, which SQLite refuses at once to avoid a deadlock.
- **The journal mode follows the filesystem.** WAL keeps readers and the writer out of each other's way,
  but its index lives in shared memory (``-shm``), which only processes on one machine can share: on a
  network filesystem (NFS, CIFS, FUSE...) WAL can corrupt the database. There the rollback journal
  (``journal_mode=DELETE``), which uses only file locks, is used instead. The filesystem is read from
  ``/proc/self/mounts`` (the longest mount point containing the path).
- **No object stores.** SQLite needs a POSIX filesystem (byte-range locks, in-place writes); an ``s3://``
  or ``gs://`` path is refused with an error saying so.

Even with these, one process should write a database that several nodes use: the Serve apps give each
database a single-replica writer deployment (see :mod:`alpaca_ray.serve.app`).
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, closing, contextmanager
from typing import Literal, NamedTuple, cast

from alpaca_ray.cluster import storage
from alpaca_ray.config import UserError

JournalMode = Literal["WAL", "DELETE"]
JOURNAL_MODES: tuple[str, ...] = ("WAL", "DELETE")

#: Filesystem types (the third field of /proc/self/mounts) that are shared between machines, or whose
#: shared-memory mapping and locking SQLite cannot trust: WAL is unsafe on them. Every ``fuse.*`` type
#: counts too (sshfs, s3fs, gcsfuse, juicefs...): the rollback journal is always correct, only slower.
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb", "smb3", "smbfs", "ncpfs", "afs", "9p", "ceph", "glusterfs", "lustre", "gpfs",
    "beegfs", "ocfs2", "gfs2", "davfs", "sshfs", "fuse", "fuseblk", "virtiofs", "orangefs", "pvfs2", "panfs",
})


class Mount(NamedTuple):
    mount_point: str
    fs_type: str


def remote_path_message(path: str, what: str = "SQLite database") -> str:
    """Why an object-store path cannot hold a SQLite database, and what to give instead."""
    return (f"{what} {path}: SQLite needs a POSIX filesystem (file locks, in-place writes), not an object store; "
            "give a path every node mounts (e.g. an NFS share), or a local path on the node that runs the "
            "database's single writer")


def _unescape_mount_field(field: str) -> str:
    """Undo /proc/self/mounts' octal escapes (``\\040`` is a space) in a mount point."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match[1], 8)), field)


def parse_mounts(text: str) -> list[Mount]:
    """The (mount point, filesystem type) rows of a ``/proc/self/mounts`` text, in table order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append(Mount(_unescape_mount_field(fields[1]), fields[2]))
    return mounts


def read_mounts(path: str = "/proc/self/mounts") -> list[Mount]:
    """This process's mount table; empty where there is none to read (not Linux)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return parse_mounts(handle.read())
    except OSError:
        return []


def filesystem_type(path: str, mounts: Sequence[Mount]) -> str | None:
    """The type of the filesystem ``path`` lives on: its longest mount point (the last one, if stacked)."""
    path = os.path.normpath(path)
    best: Mount | None = None
    for mount in mounts:
        point = os.path.normpath(mount.mount_point)
        inside = point == "/" or path == point or path.startswith(point + "/")
        # ">=": a later row with the same mount point is mounted over the earlier one
        if inside and (best is None or len(point) >= len(os.path.normpath(best.mount_point))):
            best = mount
    return best.fs_type if best else None


def is_network_filesystem(fs_type: str | None) -> bool:
    return fs_type is not None and (fs_type in NETWORK_FILESYSTEMS or fs_type.startswith("fuse."))


def journal_mode_for(path: str, mounts: Sequence[Mount]) -> JournalMode:
    """WAL on a local disk, the rollback journal (DELETE) on a network filesystem.

    An unknown filesystem (no mount table, as on macOS) counts as local: that is where such machines keep
    their files, and WAL is what a single machine wants.
    """
    return "DELETE" if is_network_filesystem(filesystem_type(path, mounts)) else "WAL"


class SQLiteStore:
    """A SQLite file opened per call: ``with store.write() as db:`` / ``with store.read() as db:``.

    ``schema`` statements run once, at construction, with ``create`` (the default); a process that only
    reads a database another one writes passes ``create=False``, so it neither creates the file (a
    missing one is a ``FileNotFoundError``) nor changes its journal mode. ``journal_mode`` overrides the
    choice made from the filesystem (tests; a filesystem this module misjudges).
    """

    def __init__(self, path: str | os.PathLike, schema: str | Sequence[str] = (), *, busy_timeout_s: float = 30.0,
                 journal_mode: JournalMode | None = None, create: bool = True):
        path = str(path)
        if storage.is_remote(path):
            raise UserError(remote_path_message(path))
        if journal_mode is not None and journal_mode.upper() not in JOURNAL_MODES:
            raise ValueError(f"journal_mode must be one of {', '.join(JOURNAL_MODES)}, got {journal_mode!r}")
        self.path = os.path.abspath(storage.local_path(path))
        self.busy_timeout_s = busy_timeout_s
        # realpath: a symlink into an NFS mount is on NFS
        chosen = journal_mode.upper() if journal_mode else journal_mode_for(os.path.realpath(self.path),
                                                                              read_mounts())
        self.journal_mode = cast(JournalMode, chosen)
        if not create and not os.path.exists(self.path):  # connecting would create an empty file
            raise FileNotFoundError(f"{self.path}: no such SQLite database")
        if create:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._set_journal_mode()
            statements = [schema] if isinstance(schema, str) else list(schema)
            with self.write() as db:
                for statement in statements:
                    db.execute(statement)

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: no implicit BEGIN from the sqlite3 module; read()/write() say which one
        db = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        db.row_factory = sqlite3.Row
        return db

    def _set_journal_mode(self) -> None:
        with closing(self._connect()) as db:
            actual = str(db.execute(f"PRAGMA journal_mode={self.journal_mode}").fetchone()[0]).upper()
        if actual != self.journal_mode:  # e.g. another process holds a WAL database open: never mix the two
            raise UserError(f"{self.path}: cannot switch the SQLite journal mode to {self.journal_mode} (it stays "
                            f"{actual}); stop the other processes using the database and retry")

    @contextmanager
    def _transaction(self, begin: str) -> Iterator[sqlite3.Connection]:
        with closing(self._connect()) as db:
            db.execute(begin)
            try:
                yield db
            except BaseException:
                db.rollback()
                raise
            db.commit()

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``): committed on success, rolled back on error."""
        return self._transaction("BEGIN IMMEDIATE")

    def read(self) -> AbstractContextManager[sqlite3.Connection]:
        """One read transaction: a consistent snapshot for every query inside it."""
        return self._transaction("BEGIN")

    def current_journal_mode(self) -> str:
        """The journal mode the file really has (``wal`` or ``delete``), as SQLite reports it."""
        with closing(self._connect()) as db:
            return str(db.execute("PRAGMA journal_mode").fetchone()[0]).lower()

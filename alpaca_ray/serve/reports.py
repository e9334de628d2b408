"""The demo's report store: one SQLite file in WAL mode, safe for concurrent writers.

Each write opens its own short transaction with a generous busy timeout, so reports sent at the same
time by many users (or by several replicas on one machine) queue on SQLite's lock instead of being lost.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager

#: The reasons a user can pick on the demo page (plus free text).
REPORT_REASONS = ("harmful", "incorrect", "offensive", "privacy", "other")
COLUMNS = ("id", "time", "model", "instruction", "input", "prompt", "response", "reason", "details")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    instruction TEXT NOT NULL,
    input TEXT NOT NULL,
    prompt TEXT NOT NULL,
    response TEXT NOT NULL,
    reason TEXT NOT NULL,
    details TEXT NOT NULL
)
"""


class ReportStore:
    """Reports in a SQLite file: ``add`` one, ``list`` them back, ``export`` as JSONL or CSV."""

    def __init__(self, path: str, busy_timeout_s: float = 30.0):
        self.path = os.path.abspath(path)
        self.busy_timeout_s = busy_timeout_s
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=self.busy_timeout_s)) as db:
            db.row_factory = sqlite3.Row
            with db:  # one transaction: committed on success, rolled back on error
                yield db

    def add(self, *, model: str, response: str, reason: str, instruction: str = "", input: str = "",  # noqa: A002
            prompt: str = "", details: str = "", when: float | None = None) -> int:
        """Store one report; returns its id. ``reason`` must be one of :data:`REPORT_REASONS`."""
        if reason not in REPORT_REASONS:
            raise ValueError(f"reason must be one of {', '.join(REPORT_REASONS)}; got {reason!r}")
        with self._connect() as db:
            cursor = db.execute(
                "INSERT INTO reports (time, model, instruction, input, prompt, response, reason, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time() if when is None else when, model, instruction, input, prompt, response, reason,
                 details))
            return int(cursor.lastrowid)

    def list(self, limit: int | None = None, offset: int = 0) -> list[dict]:
        """Reports, oldest first."""
        with self._connect() as db:
            rows = db.execute("SELECT * FROM reports ORDER BY id LIMIT ? OFFSET ?",
                              (-1 if limit is None else limit, offset)).fetchall()
        return [dict(row) for row in rows]

    def count(self) -> int:
        with self._connect() as db:
            return int(db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])


def export_reports(db_path: str, fmt: str) -> str:
    """All reports of ``db_path`` as JSONL or CSV text."""
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"{db_path}: no such report database")
    reports = ReportStore(db_path).list()
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reports)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(reports)
        return buffer.getvalue()
    raise ValueError(f"format must be jsonl or csv, got {fmt!r}")

"""The demo's report store: a table on :class:`~alpaca_ray.cluster.sqlite_store.SQLiteStore`.

In the Serve app only the single-replica ``ReportsWriter`` deployment opens it (the API replicas call that
deployment), so reports taken by replicas on different nodes end up in one file. SQLiteStore adds the
per-call transactions, busy timeout and the journal mode that suits the filesystem the file is on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time

from alpaca_ray.cluster import storage
from alpaca_ray.cluster.sqlite_store import JournalMode, SQLiteStore, remote_path_message
from alpaca_ray.config import UserError

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
    """Reports in a SQLite file: ``add`` one, ``list`` them back, ``count`` them.

    ``create=False`` opens a database someone else writes (the export CLI): no schema, no journal change.
    """

    def __init__(self, path: str, busy_timeout_s: float = 30.0, *, journal_mode: JournalMode | None = None,
                 create: bool = True):
        self.db = SQLiteStore(path, _SCHEMA, busy_timeout_s=busy_timeout_s, journal_mode=journal_mode,
                              create=create)
        self.path = self.db.path

    def add(self, *, model: str, response: str, reason: str, instruction: str = "", input: str = "",  # noqa: A002
            prompt: str = "", details: str = "", when: float | None = None) -> int:
        """Store one report; returns its id. ``reason`` must be one of :data:`REPORT_REASONS`."""
        if reason not in REPORT_REASONS:
            raise ValueError(f"reason must be one of {', '.join(REPORT_REASONS)}; got {reason!r}")
        with self.db.write() as db:
            cursor = db.execute(
                "INSERT INTO reports (time, model, instruction, input, prompt, response, reason, details) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (time.time() if when is None else when, model, instruction, input, prompt, response, reason,
                 details))
            return int(cursor.lastrowid)

    def list(self, limit: int | None = None, offset: int = 0, after: int | None = None) -> list[dict]:
        """Reports, oldest first; ``after`` (a report id) starts the page after that report."""
        with self.db.read() as db:
            rows = db.execute("SELECT * FROM reports WHERE id > ? ORDER BY id LIMIT ? OFFSET ?",
                              (-1 if after is None else after, -1 if limit is None else limit, offset)).fetchall()
        return [dict(row) for row in rows]

    def page(self, limit: int, offset: int = 0, after: int | None = None) -> dict:
        """One page of ``GET /v1/reports`` in OpenAI's list shape (``has_more``, ``first_id``, ``last_id``)."""
        rows = self.list(limit + 1, offset, after)
        data = rows[:limit]
        return {"object": "list", "data": data, "has_more": len(rows) > limit,
                "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}

    def count(self) -> int:
        with self.db.read() as db:
            return int(db.execute("SELECT COUNT(*) FROM reports").fetchone()[0])


#: What a spreadsheet reads as the start of a formula (OWASP's list for CSV injection).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value):
    """A CSV cell a spreadsheet shows as text: one starting like a formula gets a leading apostrophe."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def export_reports(db_path: str, fmt: str) -> str:
    """All reports of ``db_path`` as JSONL or CSV text."""
    if storage.is_remote(db_path):  # before the existence check, which would only say "no such database"
        raise UserError(remote_path_message(db_path, "report database"))
    if not os.path.exists(db_path):
        raise FileNotFoundError(f"{db_path}: no such report database")
    reports = ReportStore(db_path, create=False).list()
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in reports)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({k: spreadsheet_safe(v) for k, v in report.items()} for report in reports)
        return buffer.getvalue()
    raise ValueError(f"format must be jsonl or csv, got {fmt!r}")

"""Human ratings in SQLite (WAL): one row per (item, rater), the latest choice winning.

WAL lets the rating page write while a report reads. Connections are opened per call, so the store is
safe to share between the threads of a Serve replica.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS ratings (
    item_id TEXT NOT NULL,
    rater_id TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('A', 'B', 'tie')),
    shown_order TEXT NOT NULL CHECK (shown_order IN ('ab', 'ba')),
    time REAL NOT NULL,
    PRIMARY KEY (item_id, rater_id)
)
"""


@dataclass(frozen=True)
class Rating:
    item_id: str
    rater_id: str
    choice: str  # "A", "B" or "tie": the model the rater preferred (they saw only positions)
    shown_order: str  # "ab": A was shown first
    time: float


class RatingStore:
    def __init__(self, path: str):
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        try:
            with db:  # commits, or rolls back on error
                yield db
        finally:
            db.close()

    def record(self, item_id: str, rater_id: str, choice: str, shown_order: str) -> None:
        if choice not in ("A", "B", "tie") or shown_order not in ("ab", "ba"):
            raise ValueError(f"bad rating: choice={choice!r} order={shown_order!r}")
        with self._connect() as db:
            db.execute("INSERT INTO ratings VALUES (?, ?, ?, ?, ?) ON CONFLICT(item_id, rater_id) DO UPDATE SET "
                       "choice=excluded.choice, shown_order=excluded.shown_order, time=excluded.time",
                       (item_id, rater_id, choice, shown_order, time.time()))

    def ratings(self) -> list[Rating]:
        with self._connect() as db:
            rows = db.execute("SELECT item_id, rater_id, choice, shown_order, time FROM ratings "
                              "ORDER BY time").fetchall()
        return [Rating(*row) for row in rows]

    def rated_items(self, rater_id: str) -> set[str]:
        with self._connect() as db:
            rows = db.execute("SELECT item_id FROM ratings WHERE rater_id = ?", (rater_id,)).fetchall()
        return {row[0] for row in rows}


def read_ratings(path: str) -> list[Rating]:
    """Ratings in ``path``, or none when no one has rated yet (no file)."""
    return RatingStore(path).ratings() if os.path.exists(path) else []

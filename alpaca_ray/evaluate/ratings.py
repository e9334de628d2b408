"""Human ratings in SQLite: one row per (item, rater), the latest choice winning.

A table on :class:`~alpaca_ray.cluster.sqlite_store.SQLiteStore` (a connection and transaction per call, so
the threads of a Serve replica can share the store; WAL on a local disk, the rollback journal on a network
filesystem). Its one writer is the rating page's single replica (:mod:`alpaca_ray.evaluate.human`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from alpaca_ray.cluster.sqlite_store import JournalMode, SQLiteStore

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
    """``create=False`` reads a database the rating page writes, without changing it."""

    def __init__(self, path: str, *, journal_mode: JournalMode | None = None, create: bool = True):
        self.db = SQLiteStore(path, SCHEMA, journal_mode=journal_mode, create=create)
        self.path = path

    def record(self, item_id: str, rater_id: str, choice: str, shown_order: str) -> None:
        if choice not in ("A", "B", "tie") or shown_order not in ("ab", "ba"):
            raise ValueError(f"bad rating: choice={choice!r} order={shown_order!r}")
        with self.db.write() as db:
            db.execute("INSERT INTO ratings VALUES (?, ?, ?, ?, ?) ON CONFLICT(item_id, rater_id) DO UPDATE SET "
                       "choice=excluded.choice, shown_order=excluded.shown_order, time=excluded.time",
                       (item_id, rater_id, choice, shown_order, time.time()))

    def ratings(self) -> list[Rating]:
        with self.db.read() as db:
            rows = db.execute("SELECT item_id, rater_id, choice, shown_order, time FROM ratings "
                              "ORDER BY time").fetchall()
        return [Rating(*row) for row in rows]

    def rated_items(self, rater_id: str) -> set[str]:
        with self.db.read() as db:
            rows = db.execute("SELECT item_id FROM ratings WHERE rater_id = ?", (rater_id,)).fetchall()
        return {row[0] for row in rows}


def read_ratings(path: str) -> list[Rating]:
    """Ratings in ``path``, or none when no one has rated yet (no file)."""
    return RatingStore(path, create=False).ratings() if os.path.exists(path) else []

"""The dataset as it grows: journal records in, parsed, filtered and near-deduplicated, Alpaca records out.

The same :class:`DatasetBuilder` consumes live answers, the saved journal on resume, and the journal
alone on ``--reprocess``, so all three give a dataset made by the same rules.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence

from alpaca_ray.dedup import NearDuplicateFilter
from alpaca_ray.generate.parse import FilterRules, parse_response
from alpaca_ray.generate.stats import Tally
from alpaca_ray.llm_client import RawJournal
from alpaca_ray.records import AlpacaRecord


def journal_files(raw_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(raw_dir, "*.jsonl")))


def read_journal(raw_dir: str) -> tuple[list[dict], int]:
    """Every saved response under ``raw_dir`` in journal order (arrival time), and the torn lines skipped."""
    records, skipped = [], 0
    for path in journal_files(raw_dir):
        journal = RawJournal(path)
        records += journal.read()
        skipped += journal.skipped_lines
    records.sort(key=lambda r: (float(r.get("time", 0.0) or 0.0), str(r.get("request_id", ""))))
    return records, skipped


class DatasetBuilder:
    """Keeps, in arrival order, each parsed task that passes the filters and is no near-duplicate of the
    seed tasks or of anything kept before (Alpaca's sequential ROUGE-L rule), up to ``target``."""

    def __init__(self, seed_instructions: Sequence[str], target: int | None, rules: FilterRules = FilterRules(),
                 similarity_threshold: float = 0.7, default_first_index: int = 4):
        self.target, self.rules, self.default_first_index = target, rules, default_first_index
        self.filter = NearDuplicateFilter(list(seed_instructions), similarity_threshold)
        self.records: list[AlpacaRecord] = []
        self.tally = Tally()
        self._request_ids: set[str] = set()

    @property
    def done(self) -> bool:
        return self.target is not None and len(self.records) >= self.target

    @property
    def missing(self) -> int:
        return 0 if self.target is None else max(0, self.target - len(self.records))

    def kept_per_response(self) -> float:
        """Tasks that survived every filter, per response so far (sizes the next round of requests)."""
        return (self.tally.kept + self.tally.surplus) / self.tally.responses if self.tally.responses else 0.0

    def add_all(self, records: Iterable[dict]) -> int:
        return sum(self.add(record) for record in records)

    def add(self, record: dict) -> int:
        """Take one journal record; return how many new tasks joined the dataset."""
        request_id = str(record.get("request_id", ""))
        if request_id and request_id in self._request_ids:
            return 0  # the same answer twice (a journal copied over itself): count it once
        self._request_ids.add(request_id)
        self.tally.add_usage(record)
        if record.get("error"):
            self.tally.malformed += 1
            return 0
        seed_ids = record.get("seed_task_ids")
        first_index = len(seed_ids) + 1 if seed_ids else self.default_first_index
        parsed = parse_response(str(record.get("text", "")), str(record.get("finish_reason", "stop")),
                                first_index, self.rules)
        self.tally.malformed += parsed.malformed
        self.tally.dropped.update(parsed.dropped)
        self.tally.candidates += len(parsed.records) + sum(parsed.dropped.values())
        if not parsed.records:
            return 0
        kept_flags = self.filter.filter([r.instruction for r in parsed.records])
        added = 0
        for parsed_record, kept in zip(parsed.records, kept_flags):
            if not kept:
                self.tally.dropped["near_duplicate"] += 1
            elif self.done:
                self.tally.surplus += 1
            else:
                self.records.append(parsed_record)
                self.tally.kept += 1
                added += 1
        return added

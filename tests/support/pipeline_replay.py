"""Small replay files for the offline-teacher and pipeline tests (Alpaca's numbered-list format)."""

from __future__ import annotations

import json
from pathlib import Path

BUNDLED_REPLAY = Path(__file__).resolve().parents[2] / "alpaca_ray" / "data" / "teacher_replay.jsonl"


def numbered_tasks(first: int, count: int, topic: str) -> str:
    """A teacher answer in Alpaca's format: ``N. Instruction: / N. Input: / N. Output:`` blocks joined by ###."""
    blocks = []
    for n in range(first, first + count):
        blocks.append(f"{n}. Instruction: Describe {topic} number {n} in one careful sentence please.\n"
                      f"{n}. Input:\n<noinput>\n{n}. Output:\n{topic.capitalize()} {n} is described here.")
    return "\n###\n".join(blocks)


def write_replay(path: Path, texts: list[str], finish_reasons: list[str] | None = None) -> Path:
    """Write ``texts`` as a raw-journal-shaped JSONL file (the fields generate records)."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"request_id": f"r{i}", "time": 0.0, "model": "recorded", "api": "completions",
                                     "prompt": "...", "seed_task_ids": [], "text": text,
                                     "finish_reason": (finish_reasons or ["stop"] * len(texts))[i],
                                     "usage": {"prompt_tokens": 1, "completion_tokens": len(text.split())}}) + "\n")
    return path

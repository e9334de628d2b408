"""Stand-ins for the evaluate stage's tests: two models and a judge with a known position bias.

Deterministic, so a test knows every outcome in advance:

- model A answers briefly; for some instructions (:func:`a_is_excellent`) its answer carries MARKER;
- model B always answers at length (several times A's length), never with MARKER;
- the judge prefers whichever answer is shown FIRST, unless exactly one answer carries MARKER (then it
  picks that one), and names no winner at all when the instruction contains UNDECIDED.

Debiased, a pair is an A win exactly when A's answer carries MARKER; otherwise the judge flipped with the
order, and the pair is a tie (or unparseable, for UNDECIDED instructions). B never wins.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from alpaca_ray.openai_server import OpenAIServer, Reply, prompt_text

MARKER = "EXCELLENT"
UNDECIDED = "UNDECIDED"
CATEGORIES = ("email", "coding", "social media")


def a_is_excellent(instruction: str) -> bool:
    return hashlib.sha256(instruction.encode()).digest()[0] % 2 == 0


def _instruction_of(kind: str, body: dict) -> str:
    text = prompt_text(kind, body)
    found = re.search(r"### Instruction:\n(.*?)\n\n###", text, re.S)  # Alpaca's template (completions)
    return (found.group(1) if found else text.split("\n\n")[0]).strip()


def model_a(kind: str, body: dict) -> Reply:
    instruction = _instruction_of(kind, body)
    answer = f"Answer: {instruction[:40]}"
    return Reply(answer + (f" {MARKER}" if a_is_excellent(instruction) else ""))


def model_b(kind: str, body: dict) -> Reply:
    instruction = _instruction_of(kind, body)
    return Reply(f"Answer: {instruction[:40]}. " + "Here is more detail about it. " * 6)


def biased_judge(kind: str, body: dict) -> Reply:
    text = prompt_text(kind, body)
    first = re.search(r"### Response 1:\n(.*?)\n\n### Response 2:", text, re.S).group(1)
    second = re.search(r"### Response 2:\n(.*?)\n\nExplain", text, re.S).group(1)
    if UNDECIDED in text:
        return Reply("Both responses have merits and flaws; I cannot pick one.")
    if (MARKER in first) != (MARKER in second):
        return Reply(f"One response is excellent.\nWinner: {1 if MARKER in first else 2}")
    return Reply("The first response is better.\nWinner: 1")  # the position bias


def start_servers(judge_key: str | None = None) -> tuple[OpenAIServer, OpenAIServer, OpenAIServer]:
    """Model A, model B and the judge, started (stop them with ``.stop()``)."""
    return (OpenAIServer(model_a, models=["model-a"]).start(), OpenAIServer(model_b, models=["model-b"]).start(),
            OpenAIServer(biased_judge, models=["judge"], api_key=judge_key).start())


def write_eval_set(path: Path, n: int = 12, undecided: int = 0) -> list[dict]:
    """A self-instruct-format set with categories; the first ``undecided`` instructions contain UNDECIDED."""
    rows = []
    for i in range(n):
        word = f" {UNDECIDED}" if i < undecided else ""
        rows.append({"id": f"task_{i}", "instruction": f"Task number {i}: write something useful{word}.",
                     "instances": [{"input": "" if i % 2 else f"context {i}", "output": f"reference {i}"}],
                     "category": CATEGORIES[i % len(CATEGORIES)], "motivation_app": "Test"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def expected_outcomes(rows: list[dict]) -> dict[str, str]:
    """What the debiased judge must conclude per item id ("A", "tie"; UNDECIDED ones are ties too)."""
    return {r["id"]: ("A" if a_is_excellent(r["instruction"]) and UNDECIDED not in r["instruction"] else "tie")
            for r in rows}


def model_args(a: OpenAIServer, b: OpenAIServer, judge: OpenAIServer) -> list[str]:
    return ["--model-a", "model-a", "--model-a-base-url", a.base_url, "--model-b", "model-b",
            "--model-b-base-url", b.base_url, "--judge-model", "judge", "--judge-base-url", judge.base_url]

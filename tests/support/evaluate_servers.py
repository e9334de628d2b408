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
import math
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


# ---------------------------------------------------------------------------------------------------
# A logprob judge (AlpacaEval 2's protocol) with scripted preferences

#: The logprob judge's position bias: the answer shown first gets this much extra probability. Averaging the
#: two orders cancels it exactly, so the debiased score is the scripted preference.
POSITION_BIAS = 0.05
#: Instructions containing this get top logprobs with neither "m" nor "M" (an unparseable answer).
NO_VERDICT = "NOVERDICT"


def scripted_preference(instruction: str) -> float:
    """Model A's scripted probability of being preferred for one instruction, in 0.1..0.9."""
    return 0.1 + 0.8 * (hashlib.sha256(instruction.encode()).digest()[0] / 255)


def _logprob_entry(token: str, probability: float) -> dict:
    return {"token": token, "bytes": list(token.encode()), "logprob": math.log(probability)}


def logprob_judge_body(model: str, body: dict) -> dict:
    """The chat completion the real API returns for AlpacaEval 2's judge request (one token, top_logprobs),
    with P(m) / (P(m) + P(M)) set from :func:`scripted_preference` and :data:`POSITION_BIAS`."""
    text = prompt_text("chat", body)
    instruction = re.search(r'"instruction": """(.*?)""",', text, re.S).group(1)
    first = re.search(r'"model_identifier": "m",\s*"output": """(.*?)"""', text, re.S).group(1)
    q = scripted_preference(instruction)
    p_first = (q if first.startswith("Answer A") else 1.0 - q) + POSITION_BIAS
    # 2% of the mass goes to other tokens, as real judges put a little on "Based", "The"...
    if NO_VERDICT in instruction:
        top = [_logprob_entry("Based", 0.6), _logprob_entry("The", 0.3), _logprob_entry("Both", 0.1)]
    else:
        top = sorted([_logprob_entry("m", 0.98 * p_first), _logprob_entry("M", 0.98 * (1 - p_first)),
                      _logprob_entry("Based", 0.015), _logprob_entry("The", 0.005)], key=lambda e: -e["logprob"])
    top = top[: int(body.get("top_logprobs") or 0)]
    chosen = top[0] if top else _logprob_entry("m", 0.5)
    choice = {"index": 0, "message": {"role": "assistant", "content": chosen["token"]}, "finish_reason": "length",
              "logprobs": {"content": [{**chosen, "top_logprobs": top}]} if body.get("logprobs") else None}
    return {"id": "chatcmpl-judge", "object": "chat.completion", "created": 0, "model": model, "choices": [choice],
            "usage": {"prompt_tokens": len(text.split()), "completion_tokens": 1, "total_tokens": len(text.split()) + 1}}


def logprob_judge(kind: str, body: dict) -> Reply:
    return Reply(raw_body=json.dumps(logprob_judge_body(body.get("model", ""), body)).encode())


def write_alpaca_eval_outputs(root: Path, n: int, no_verdict: int = 0) -> tuple[Path, Path, list[str]]:
    """AlpacaEval model_outputs.json files for model A (generator "model-a-gen") and B ("model-b-gen") on ``n``
    instructions, the first ``no_verdict`` of which the logprob judge answers with neither token."""
    instructions = [f"Task {i}: explain something{' ' + NO_VERDICT if i < no_verdict else ''}." for i in range(n)]
    paths = []
    for side, generator in (("A", "model-a-gen"), ("B", "model-b-gen")):
        rows = [{"instruction": text, "output": f"Answer {side} to {text} " + "more " * (3 * i % 7),
                 "generator": generator, "dataset": "helpful_base"} for i, text in enumerate(instructions)]
        path = root / f"outputs_{side.lower()}.json"
        path.write_text(json.dumps(rows))
        paths.append(path)
    return paths[0], paths[1], instructions

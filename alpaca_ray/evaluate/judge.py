"""The LLM judge: a replaceable prompt template, verdict parsing, and position debiasing.

Each pair is shown to the judge twice, A first and then B first. LLM judges favour a position (often
the first), so a preference counts only when the judge holds it in both orders; a flip is a tie. A
verdict that names no winner is *unparseable*: it is kept, counted and reported, and the pair counts
as a tie, never dropped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from alpaca_ray.config import UserError

DEFAULT_TEMPLATE = """\
You are comparing the responses of two AI assistants to the same instruction. Decide which response \
follows the instruction better: which is more helpful, correct, relevant and clear. The order in \
which the responses are shown, their length and the assistants' identities must not influence you.

### Instruction:
{instruction}

### Input:
{input}

### Response 1:
{output_1}

### Response 2:
{output_2}

Explain your reasoning in at most two sentences, then end with one line that is exactly \
"Winner: 1", "Winner: 2" or "Winner: tie"."""

PLACEHOLDERS = ("{instruction}", "{input}", "{output_1}", "{output_2}")

#: Orders a pair is shown in: "ab" puts model A's answer in position 1, "ba" puts model B's there.
ORDERS = ("ab", "ba")


def load_template(path: str = "") -> str:
    """The judge template from a file (or the default), checked for the placeholders it must contain."""
    if not path:
        return DEFAULT_TEMPLATE
    with open(path, encoding="utf-8") as handle:
        template = handle.read()
    missing = [p for p in PLACEHOLDERS if p not in template and p != "{input}"]
    if missing:
        raise UserError(f"{path}: the judge template lacks {', '.join(missing)}; it needs {', '.join(PLACEHOLDERS)} "
                        "({input} optional)")
    return template


def judge_prompt(template: str, instruction: str, input: str, output_1: str, output_2: str) -> str:  # noqa: A002
    """Fill the template. Plain replacement, so braces elsewhere in a template (JSON examples) are safe."""
    values = {"{instruction}": instruction, "{input}": input.strip() or "(none)",
              "{output_1}": output_1, "{output_2}": output_2}
    # One pass over the template, so an answer that itself contains "{output_2}" is not substituted.
    pattern = re.compile("|".join(re.escape(p) for p in values))
    return pattern.sub(lambda m: values[m.group(0)], template)


_WINNER = re.compile(
    r"winner\s*(?:is\s*)?[:=\-]?\s*\**\s*[\[(\"']*\s*(?:(?:response|output|assistant)\s*)?[\[(]?\s*"
    r"(1|2|tie|one|two|neither|both|none|equal)\b",
    re.IGNORECASE)
_BARE = re.compile(r"^\W*(?:(?:response|output|assistant)\s*)?[\[(]*\s*(1|2|tie)\s*[\])]*\W*$", re.IGNORECASE)
_NORMAL = {"1": "1", "one": "1", "2": "2", "two": "2", "tie": "tie", "neither": "tie", "both": "tie",
           "none": "tie", "equal": "tie"}


def parse_verdict(text: str) -> str | None:
    """``"1"``, ``"2"`` or ``"tie"`` from the judge's answer, or None when it names no winner.

    Takes "Winner: X" lines (the template asks for one); several that disagree are unparseable rather
    than a guess. A bare answer ("2", "Response 1", "[[tie]]") is accepted too.
    """
    found = {_NORMAL[m.group(1).lower()] for m in _WINNER.finditer(text or "")}
    if len(found) == 1:
        return found.pop()
    if found:
        return None
    bare = _BARE.match((text or "").strip())
    return _NORMAL[bare.group(1).lower()] if bare else None


def preferred_model(verdict: str | None, order: str) -> str | None:
    """Which model ("A", "B" or "tie") a position verdict prefers, given the order shown."""
    if verdict is None:
        return None
    if verdict == "tie":
        return "tie"
    first, second = ("A", "B") if order == "ab" else ("B", "A")
    return first if verdict == "1" else second


@dataclass(frozen=True)
class PairOutcome:
    """The debiased outcome of one pair, from model A's side."""

    outcome: str  # "A", "B" or "tie" (an unparseable pair is a tie here and flagged below)
    preference_ab: str | None  # the model preferred with A shown first (None: unparseable)
    preference_ba: str | None  # the model preferred with B shown first
    unparseable: bool
    #: The judge preferred different models in the two orders (position bias or indecision).
    inconsistent: bool


def combine_orders(verdict_ab: str | None, verdict_ba: str | None) -> PairOutcome:
    """Debias: a preference counts only when it is the same in both orders; otherwise the pair is a tie."""
    pref_ab, pref_ba = preferred_model(verdict_ab, "ab"), preferred_model(verdict_ba, "ba")
    if pref_ab is None or pref_ba is None:
        return PairOutcome("tie", pref_ab, pref_ba, unparseable=True, inconsistent=False)
    if pref_ab == pref_ba:
        return PairOutcome(pref_ab, pref_ab, pref_ba, unparseable=False, inconsistent=False)
    return PairOutcome("tie", pref_ab, pref_ba, unparseable=False, inconsistent=True)

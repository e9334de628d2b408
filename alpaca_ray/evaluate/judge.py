"""The LLM judge: replaceable prompt templates, verdict and logprob parsing, and position debiasing.

Two modes. ``verdict``: the judge writes its reasoning and "Winner: 1|2|tie". ``logprobs`` (AlpacaEval 2's
protocol): the judge answers one token, "m" (the answer shown first) or "M" (shown second), and the preference
is read from the two tokens' probabilities among the returned ``top_logprobs``.

Each pair is shown to the judge twice, A first and then B first. LLM judges favour a position (often
the first). In verdict mode a preference counts only when the judge holds it in both orders; a flip is a
tie. In logprobs mode model A's score is the mean of its probability of being preferred in the two orders,
so a position bias cancels out. A judge answer that names no winner (no "Winner:" line; neither token among
the top logprobs) is *unparseable*: it is kept, counted and reported, and the pair counts as a tie, never
dropped; past ``--max-unparseable`` the run stops (see :func:`check_unparseable`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from alpaca_ray.config import UserError
from alpaca_ray.evaluate import alpaca_eval

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


def load_template(path: str = "", mode: str = "verdict") -> str:
    """The judge template from a file (or the mode's default), checked for the placeholders it must contain.

    AlpacaEval's own template files work as they are: their doubled braces (``str.format`` escapes) are
    undoubled, and their ``<|im_start|>role ... <|im_end|>`` blocks become chat messages when sent.
    """
    if not path:
        return alpaca_eval.DEFAULT_LOGPROB_TEMPLATE if mode == "logprobs" else DEFAULT_TEMPLATE
    with open(path, encoding="utf-8") as handle:
        template = alpaca_eval.from_format_style(handle.read())
    missing = [p for p in PLACEHOLDERS if p not in template and p != "{input}"]
    if missing:
        raise UserError(f"{path}: the judge template lacks {', '.join(missing)}; it needs {', '.join(PLACEHOLDERS)} "
                        "({input} optional)")
    return template


def judge_prompt(template: str, instruction: str, input: str, output_1: str, output_2: str) -> str:  # noqa: A002
    """Fill the template. Plain replacement, so braces elsewhere in a template (JSON examples) are safe.

    A template without ``{input}`` (AlpacaEval's) gets the input folded into the instruction, as AlpacaEval
    folds it: instruction, a blank line, input.
    """
    if "{input}" not in template and input.strip():
        instruction = f"{instruction}\n\n{input}"
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
    preference_ab: str | float | None  # verdict: the model preferred with A shown first (None: unparseable);
    preference_ba: str | float | None  # logprobs: A's probability of being preferred in that order
    unparseable: bool
    #: The judge preferred different models in the two orders (position bias or indecision).
    inconsistent: bool
    #: Model A's score in 0..1 (1 a win, 0.5 a tie, 0 a loss, in between a probability-weighted preference);
    #: NaN only for an AlpacaEval annotation with no preference, which is left out as AlpacaEval leaves it out.
    score: float = math.nan


def outcome_of(score: float) -> str:
    return "A" if score > 0.5 else "B" if score < 0.5 else "tie"


def combine_orders(verdict_ab: str | None, verdict_ba: str | None) -> PairOutcome:
    """Debias: a preference counts only when it is the same in both orders; otherwise the pair is a tie."""
    pref_ab, pref_ba = preferred_model(verdict_ab, "ab"), preferred_model(verdict_ba, "ba")
    if pref_ab is None or pref_ba is None:
        return PairOutcome("tie", pref_ab, pref_ba, unparseable=True, inconsistent=False, score=0.5)
    if pref_ab == pref_ba:
        return PairOutcome(pref_ab, pref_ab, pref_ba, unparseable=False, inconsistent=False,
                           score={"A": 1.0, "tie": 0.5, "B": 0.0}[pref_ab])
    return PairOutcome("tie", pref_ab, pref_ba, unparseable=False, inconsistent=True, score=0.5)


def a_probability(top_logprobs: Sequence[Sequence[dict]] | None, order: str) -> float:
    """Model A's probability of being preferred, from the judge's first-token ``top_logprobs`` in one order.

    AlpacaEval's preference ``2 - P(m) / (P(m) + P(M))`` names the answer shown first "m"; with A first
    ("ab") A's probability is ``2 - preference``, with B first it is ``preference - 1``. NaN: unparseable.
    """
    if not top_logprobs:
        return math.nan
    preference = alpaca_eval.preference_from_logprobs(top_logprobs[0])
    return 2.0 - preference if order == "ab" else preference - 1.0


def combine_logprob_orders(p_ab: float, p_ba: float) -> PairOutcome:
    """Model A's score: the mean of its probabilities in the two orders (a position bias cancels out).

    Unparseable in either order: the pair is a tie (0.5), flagged, as in verdict mode.
    """
    if math.isnan(p_ab) or math.isnan(p_ba):
        return PairOutcome("tie", None if math.isnan(p_ab) else p_ab, None if math.isnan(p_ba) else p_ba,
                           unparseable=True, inconsistent=False, score=0.5)
    score = (p_ab + p_ba) / 2.0
    return PairOutcome(outcome_of(score), p_ab, p_ba, unparseable=False,
                       inconsistent=(p_ab - 0.5) * (p_ba - 0.5) < 0, score=score)


def from_alpaca_eval_preference(preference: float) -> PairOutcome:
    """An AlpacaEval annotation's preference (1..2, 0/1.5 a draw, NaN none) as model A's outcome (A = the model,
    ``generator_2``): A's score is ``preference - 1``; no preference is unparseable and scores NaN."""
    score = float(alpaca_eval.scores_from_preferences([preference])[0])
    if math.isnan(score):
        return PairOutcome("tie", None, None, unparseable=True, inconsistent=False, score=math.nan)
    return PairOutcome(outcome_of(score), preference, None, unparseable=False, inconsistent=False, score=score)


def check_unparseable(raw_answers: Sequence[tuple[str, str, str]], total: int, limit: float) -> None:
    """Stop the run when more than ``limit`` (a share) of the ``total`` pairs had an unparseable judge answer.

    ``raw_answers``: (item id, raw answer A first, raw answer B first) of each unparseable pair. A judge the
    parser cannot read (a template asking for another answer format) would otherwise report a 50% tie-fest.
    """
    if not total or len(raw_answers) <= limit * total:
        return
    shown = "\n".join(f"  - item {item_id}: A first: {_excerpt(ab)} | B first: {_excerpt(ba)}"
                      for item_id, ab, ba in raw_answers[:3])
    raise UserError(
        f"{len(raw_answers)} of {total} pairs ({100 * len(raw_answers) / total:.0f}%) got a judge answer that names "
        f"no winner, more than --max-unparseable {limit:g} allows; the report would only count them as ties. "
        f"Raw judge answers of the first {min(3, len(raw_answers))}:\n{shown}\n"
        "Check that --judge-template asks for what --judge-mode reads ('Winner: 1|2|tie' in verdict mode; one "
        "token, m or M, in logprobs mode), or raise --max-unparseable. Every answer is saved under judgments/.")


def _excerpt(text: str, width: int = 200) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= width else text[: width - 1] + "…")

"""AlpacaEval on equal terms: its files, its preference encoding, its head-to-head numbers, its logprob judge.

What AlpacaEval (tatsu-lab/alpaca_eval) does, redone here so our numbers are its numbers:

- **Preferences** are floats in 1..2 from the *baseline's* side: 1 = ``output_1`` (``generator_1``, the
  baseline) preferred, 2 = ``output_2`` (``generator_2``, the model) preferred, in between the judge's
  probability-weighted preference; 0 and 1.5 are draws; null (a judge answer it could not read) is dropped.
  Here model A is ``generator_2`` and model B ``generator_1``, so A's *score* is ``preference - 1``.
- **Head-to-head numbers** (``metrics/winrate.py`` + ``metrics/helpers.py``): ``win_rate`` is the mean of
  ``preference - 1`` in percent, ``standard_error`` its standard error (pandas ``sem``, ddof 1), and
  ``discrete_win_rate`` the same after rounding each preference to 1, 2 or a draw.
- **The logprob judge** (``weighted_alpaca_eval_gpt4_turbo``): one output token, ``logprobs`` with
  ``top_logprobs: 5``; the prompt names ``output_1`` "m" and ``output_2`` "M", and the preference is
  ``2 - P(m) / (P(m) + P(M))`` over the two tokens' probabilities among the top logprobs
  (``completion_parsers.logprob_parser`` with ``is_binarize: false``).
- **Files**: ``annotations.json`` (``instruction``, ``output_1``, ``generator_1``, ``output_2``,
  ``generator_2``, ``preference``, ...) and ``model_outputs.json`` (``instruction``, ``output``,
  ``generator``, ``dataset``).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from alpaca_ray.config import UserError
from alpaca_ray.records import RecordError

#: The judge's two answer tokens: "m" names the output shown first, "M" the one shown second.
FIRST_TOKEN, SECOND_TOKEN = "m", "M"
#: Request settings of AlpacaEval 2's judge (``weighted_alpaca_eval_gpt4_turbo/configs.yaml``).
LOGPROB_SAMPLING = {"max_tokens": 1, "temperature": 1.0, "logprobs": True, "top_logprobs": 5}

# AlpacaEval 2's judge prompt (``alpaca_eval_clf_gpt4_turbo/alpaca_eval_clf.txt``) as a system and a user
# message, with our placeholders ({output_1} is the answer shown first, named "m").
LOGPROB_SYSTEM = ("You are a highly efficient assistant, who evaluates and selects the best large language model "
                  "(LLMs) based on the quality of their responses to a given instruction. This process will be used "
                  "to create a leaderboard reflecting the most accurate and human-preferred answers.")
LOGPROB_USER = """\
I require a leaderboard for various large language models. I'll provide you with prompts given to these models \
and their corresponding outputs. Your task is to assess these responses, and select the model that produces the \
best output from a human perspective.

## Instruction

{
    "instruction": \"\"\"{instruction}\"\"\",
}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a \
unique model identifier.

{
    {
        "model_identifier": "m",
        "output": \"\"\"{output_1}\"\"\"
    },
    {
        "model_identifier": "M",
        "output": \"\"\"{output_2}\"\"\"
    }
}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the \
best output. Answer by providing the model identifier of the best model. We will use your output as the name of \
the best model, so make sure your output only contains one of the following model identifiers and nothing else \
(no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier"""
DEFAULT_LOGPROB_TEMPLATE = f"<|im_start|>system\n{LOGPROB_SYSTEM}\n<|im_end|>\n<|im_start|>user\n{LOGPROB_USER}\n<|im_end|>"

_CHATML = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", re.S)


def chat_messages(prompt: str) -> list[dict]:
    """A filled template as chat messages: ``<|im_start|>role ... <|im_end|>`` blocks (AlpacaEval's templates)
    become one message each; a template without them is one user message."""
    blocks = _CHATML.findall(prompt)
    if not blocks:
        return [{"role": "user", "content": prompt}]
    return [{"role": role, "content": content.strip("\n")} for role, content in blocks]


def from_format_style(template: str) -> str:
    """AlpacaEval's template files are ``str.format`` templates (literal braces doubled); ours are filled by
    plain replacement, so ``{{``/``}}`` become single braces."""
    return template.replace("{{", "{").replace("}}", "}") if "{{" in template else template


# ---------------------------------------------------------------------------------------------------
# Preferences


def preference_value(value: object, where: str = "preference") -> float:
    """One AlpacaEval preference as a float (NaN for null); strings like ``"1.73"`` are read as numbers.

    Raises ValueError naming ``where`` for anything else (a word, a list).
    """
    if value is None:
        return math.nan
    if isinstance(value, bool):
        raise ValueError(f"{where}: expected a number in 1..2 (or 0/1.5 for a draw, null), got {value!r}")
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("", "nan", "none", "null"):
            return math.nan
        try:
            return float(text)
        except ValueError:
            pass
    raise ValueError(f"{where}: expected a number in 1..2 (or 0/1.5 for a draw, null), got {value!r}")


def _valid(values: np.ndarray) -> np.ndarray:
    """AlpacaEval's ``validate_alpacaeval_preference``: 1 <= p <= 2 (NaN and anything else is not a preference)."""
    with np.errstate(invalid="ignore"):
        return (values >= 1.0) & (values <= 2.0)


def scores_from_preferences(preferences: Sequence[object]) -> np.ndarray:
    """Model A's (``generator_2``'s) scores in 0..1: ``preference - 1``, a draw (0 or 1.5) 0.5, NaN where the
    preference is null or outside 1..2 (AlpacaEval drops those)."""
    values = np.array([preference_value(p) for p in preferences], dtype=float)
    values = np.where(values == 0.0, 1.5, values)
    return np.where(_valid(values), values - 1.0, math.nan)


def head2head(preferences: Sequence[object]) -> dict:
    """AlpacaEval's ``get_winrate``: the model's (``generator_2``'s) numbers, rates in percent.

    ``win_rate`` (mean of ``preference - 1``), ``standard_error`` (its sem), ``n_wins`` / ``n_wins_base``
    (preference above / below 1.5), ``n_draws`` (exactly 0 or 1.5), ``n_total`` (valid preferences) and
    ``discrete_win_rate`` (each preference rounded to the nearer of 1 and 2 first, 1.5 staying a draw).
    """
    raw = np.array([preference_value(p) for p in preferences], dtype=float)
    values = np.where(raw == 0.0, 1.5, raw)  # 0 is the old encoding of a draw
    n_draws = int(np.sum(values == 1.5))
    kept = values[_valid(values)] - 1.0
    n = kept.size
    out = {"win_rate": float(kept.mean() * 100) if n else math.nan,
           "standard_error": float(kept.std(ddof=1) / math.sqrt(n) * 100) if n > 1 else math.nan,
           "n_wins": int(np.sum(kept > 0.5)), "n_wins_base": int(np.sum(kept < 0.5)), "n_draws": n_draws,
           "n_total": int(n)}
    # ZeroOneScoringRule: a draw stays 1.5, every other preference is rounded (half to even, as pandas does).
    discrete = np.where(values == 1.5, 1.5, np.round(values))
    discrete = discrete[_valid(discrete)] - 1.0
    out["discrete_win_rate"] = float(discrete.mean() * 100) if discrete.size else math.nan
    return out


def preference_from_logprobs(top_logprobs: Sequence[dict] | None, first: str = FIRST_TOKEN,
                             second: str = SECOND_TOKEN) -> float:
    """``2 - P(first) / (P(first) + P(second))`` from one position's ``top_logprobs`` ([{token, logprob}]).

    A token missing from the top list has probability 0; with neither present the answer is NaN
    (unparseable), as in AlpacaEval's ``logprob_parser``.
    """
    found: dict[str, float] = {}
    for entry in top_logprobs or ():
        token = entry.get("token") if isinstance(entry, dict) else None
        if token in (first, second) and token not in found:
            found[token] = float(entry["logprob"])
    if not found:
        return math.nan
    lp_first, lp_second = found.get(first, -math.inf), found.get(second, -math.inf)
    p_first = math.exp(lp_first - np.logaddexp(lp_first, lp_second))
    return 2.0 - p_first


# ---------------------------------------------------------------------------------------------------
# Files


@dataclass(frozen=True)
class Annotation:
    """One row of an AlpacaEval ``annotations.json``."""

    instruction: str
    output_1: str  # the baseline's answer (model B here)
    output_2: str  # the model's answer (model A here)
    generator_1: str
    generator_2: str
    dataset: str
    preference: float  # NaN: no preference


def load_annotations(path: str) -> list[Annotation]:
    """Read an AlpacaEval ``annotations.json``; errors name the file, the item (0-based) and the field."""
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file (expected an AlpacaEval annotations.json)")
    with open(path, encoding="utf-8") as handle:
        try:
            rows = json.load(handle)
        except json.JSONDecodeError as err:
            raise RecordError(path, f"not valid JSON ({err.msg})", err.lineno) from None
    if not isinstance(rows, list) or not rows:
        raise RecordError(path, "expected a non-empty JSON array of annotations "
                          "({instruction, output_1, output_2, preference, ...})")
    out = []
    for index, row in enumerate(rows):
        where = f"item {index}"
        if not isinstance(row, dict):
            raise RecordError(path, f"{where}: expected a JSON object, got {type(row).__name__}")
        for name in ("instruction", "output_1", "output_2"):
            if not isinstance(row.get(name), str):
                problem = "is missing" if name not in row else f"must be a string, got {type(row[name]).__name__}"
                raise RecordError(path, f"{where}: {problem}", field=name)
        if "preference" not in row:
            raise RecordError(path, f"{where}: is missing", field="preference")
        try:
            preference = preference_value(row["preference"], f"{where}")
        except ValueError as err:
            raise RecordError(path, str(err), field="preference") from None
        out.append(Annotation(row["instruction"], row["output_1"], row["output_2"],
                              str(row.get("generator_1") or "baseline"), str(row.get("generator_2") or "model"),
                              str(row.get("dataset") or "uncategorized"), preference))
    return out


def model_outputs(instructions: Sequence[str], outputs: Sequence[str], generator: str,
                  datasets: Sequence[str]) -> list[dict]:
    """Rows of AlpacaEval's ``model_outputs.json``."""
    return [{"instruction": i, "output": o, "generator": generator, "dataset": d}
            for i, o, d in zip(instructions, outputs, datasets, strict=True)]


def write_json(path: str, rows: list[dict]) -> None:
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(rows, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
    os.replace(path + ".tmp", path)

"""Turning a teacher's numbered task list into Alpaca records, with Alpaca's filters and drop counts.

The rules are those of Alpaca's ``post_process_gpt3_response``: prepend ``"4. Instruction:"`` (the prompt
ended with it), split on ``###``, split each piece on ``{n}. Instruction|Input|Output:`` and keep pieces
that give exactly 7 parts; ``<noinput>`` means no input; the last piece is dropped when the answer
stopped for length; then the word-count, blacklist, "Write a program", punctuation and non-ASCII filters.
A chat model may repeat the prompt's trailing ``4. Instruction:`` at the start of its answer; both forms
parse the same.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache

from alpaca_ray.generate.config import ALPACA_BLACKLIST
from alpaca_ray.generate.prompt import NO_INPUT
from alpaca_ray.records import AlpacaRecord

#: Why a parsed-out task was dropped (keys of ``stats.json``'s ``dropped``).
DROP_REASONS = ("truncated", "unparseable", "too_short", "too_long", "blacklisted", "banned_prefix",
                "starts_with_punctuation", "starts_with_non_ascii", "near_duplicate")


@dataclass(frozen=True)
class FilterRules:
    """Alpaca's instruction filters; the defaults are Alpaca's."""

    min_words: int = 3
    max_words: int = 150
    blacklist: tuple[str, ...] = tuple(ALPACA_BLACKLIST)
    banned_prefixes: tuple[str, ...] = ("Write a program",)
    drop_punctuation_start: bool = True
    drop_non_ascii_start: bool = True


@dataclass
class ParsedResponse:
    """The records one response yielded, the tasks it dropped (by reason), and whether it was malformed."""

    records: list[AlpacaRecord] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    #: True when the text held no well-formed task at all (not even one the filters then dropped).
    malformed: bool = False


@lru_cache(maxsize=256)
def _word_pattern(word: str) -> re.Pattern:
    # Alpaca's find_word_in_string (escaped, so a user's word is matched literally).
    return re.compile(rf"\b({re.escape(word)})\b", flags=re.IGNORECASE)


def drop_reason(instruction: str, rules: FilterRules) -> str | None:
    """Why Alpaca's filters drop ``instruction`` (a :data:`DROP_REASONS` key), or None to keep it."""
    words = len(instruction.split())
    if words <= rules.min_words:
        return "too_short"
    if words > rules.max_words:
        return "too_long"
    if any(_word_pattern(word).search(instruction) for word in rules.blacklist):
        return "blacklisted"
    if any(instruction.startswith(prefix) for prefix in rules.banned_prefixes):
        return "banned_prefix"
    if rules.drop_punctuation_start and instruction[0] in string.punctuation:
        return "starts_with_punctuation"
    if rules.drop_non_ascii_start and not instruction[0].isascii():
        return "starts_with_non_ascii"
    return None


def strip_repeated_label(text: str, first_index: int) -> str:
    """Remove a leading ``[###] {first_index}. Instruction:`` that a chat model repeats from the prompt."""
    match = re.match(rf"\s*(?:###\s*)?{first_index}\.\s+Instruction:", text)
    return text[match.end():] if match else text


def parse_response(text: str, finish_reason: str = "stop", first_index: int = 4,
                   rules: FilterRules = FilterRules()) -> ParsedResponse:
    """Records from one teacher answer to a prompt that ended with ``{first_index}. Instruction:``."""
    result = ParsedResponse()
    raw = f"{first_index}. Instruction:" + strip_repeated_label(text, first_index)
    pieces = re.split("###", raw)
    well_formed = 0
    for offset, piece in enumerate(pieces):
        # A length stop leaves the last task cut off; Alpaca discards it.
        if offset == len(pieces) - 1 and finish_reason == "length":
            if piece.strip():
                result.dropped["truncated"] += 1
            continue
        index = offset + first_index
        parts = re.split(rf"{index}\.\s+(Instruction|Input|Output):", piece)
        if len(parts) != 7:
            if piece.strip():
                result.dropped["unparseable"] += 1
            continue
        well_formed += 1
        instruction = parts[2].strip()
        task_input = parts[4].strip()
        task_input = "" if task_input.lower() == NO_INPUT else task_input
        output = parts[6].strip()
        reason = drop_reason(instruction, rules)
        if reason:
            result.dropped[reason] += 1
            continue
        result.records.append(AlpacaRecord(instruction, task_input, output))
    # No task at all in the text (a refusal, an error page, prose): counted as malformed. A lone task
    # cut off by the length limit is a truncation, not a malformed answer.
    result.malformed = well_formed == 0 and result.dropped["truncated"] == 0
    return result


def rules_from_config(config: object) -> FilterRules:
    """The :class:`FilterRules` of a ``GenerateConfig``."""
    return FilterRules(min_words=config.min_instruction_words, max_words=config.max_instruction_words,
                       blacklist=tuple(config.blacklist), banned_prefixes=tuple(config.banned_prefixes),
                       drop_punctuation_start=config.drop_punctuation_start,
                       drop_non_ascii_start=config.drop_non_ascii_start)


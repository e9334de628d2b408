"""Content filters on prompts and responses: an offline term/regex list, or an OpenAI moderation API.

A filter is anything with ``check(text) -> FilterResult``; ``cheap`` says whether it may be called on
every streamed token (the term list) or only on whole texts (a network call). Alpaca's demo filtered
both the user's prompt and the model's answer; so does the app.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from alpaca_ray.config import UserError

BUNDLED_TERMS = os.path.join(os.path.dirname(__file__), "blocklist.txt")
REFUSAL = ("I'm sorry, but I can't help with that. This request was flagged by the content filter "
           "({reason}).")


@dataclass
class FilterResult:
    flagged: bool
    categories: list[str] = field(default_factory=list)

    @property
    def reason(self) -> str:
        return ", ".join(self.categories) or "flagged"


class ContentFilter(Protocol):
    cheap: bool

    def check(self, text: str) -> FilterResult: ...

    def held_back(self, text: str) -> int:
        """How many of the last characters of ``text`` (a streamed answer so far) must wait, because the
        text that follows may turn them into a flagged piece."""
        ...


class NoFilter:
    cheap = True

    def check(self, text: str) -> FilterResult:
        return FilterResult(False)

    def held_back(self, text: str) -> int:
        return 0


def read_terms(path: str) -> list[str]:
    """Regexes from a file, one a line; blank lines and ``#`` comments are skipped."""
    try:
        with open(path, encoding="utf-8") as handle:
            return [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
    except OSError as err:
        raise UserError(f"filter terms file {path}: cannot read: {err.strerror}") from None


class TermFilter:
    """Flags text matching any of a list of case-insensitive regexes; needs no network."""

    cheap = True

    def __init__(self, patterns: Sequence[str]):
        import regex  # partial matches: what the end of a streamed text may still become

        self.patterns, self.partial = [], []
        for number, pattern in enumerate(patterns, 1):
            try:
                self.patterns.append(re.compile(pattern, re.IGNORECASE))
                self.partial.append(regex.compile(pattern, regex.IGNORECASE | regex.VERSION0))
            except (re.error, regex.error) as err:
                raise UserError(f"content filter pattern {number} ({pattern!r}) is not a valid regex: {err}") from None

    def held_back(self, text: str) -> int:
        """From the earliest place where the end of ``text`` is the start of a match, to the end."""
        start = len(text)
        for pattern in self.partial:
            for match in pattern.finditer(text, partial=True):
                if match.partial:
                    start = min(start, match.start())
        return len(text) - start

    def check(self, text: str) -> FilterResult:
        # name the rule by number only: echoing a pattern would publish the blocklist
        hits = [number for number, p in enumerate(self.patterns, 1) if p.search(text)]
        return FilterResult(bool(hits), [f"blocklist rule {n}" for n in hits[:3]])


class OpenAIModerationFilter:
    """Asks an OpenAI-compatible ``/moderations`` endpoint; fails closed (flags) when it cannot answer."""

    cheap = False
    hold_back_chars = 0  # whole answers are checked before any of them is sent

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 10.0,
                 max_retries: int = 2):
        from openai import OpenAI

        key = os.environ.get(api_key_env)
        if not key:  # every request would be refused: say so where the app is deployed
            raise UserError(f"--content-filter openai needs the moderation API key in ${api_key_env} "
                            "(--moderation-api-key-env), which is not set")
        self.model, self.base_url = model, base_url
        self.client = OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)

    def probe(self) -> None:
        """Ask the endpoint once; a clear :class:`UserError` when it does not answer as a moderation API."""
        try:
            self.client.moderations.create(model=self.model, input="hello")
        except Exception as err:  # noqa: BLE001 - any failure means every request would be refused
            # the error's text is left out: a provider's 401 message quotes part of the key
            status = getattr(err, "status_code", None)
            raise UserError(f"--content-filter openai: the moderation endpoint {self.base_url} did not answer "
                            f"({type(err).__name__}{f', HTTP {status}' if status else ''}); check "
                            "--moderation-base-url and the key in --moderation-api-key-env") from None

    def check(self, text: str) -> FilterResult:
        try:
            result = self.client.moderations.create(model=self.model, input=text).results[0]
        except Exception as err:  # noqa: BLE001 - an unreachable filter must not let text through
            return FilterResult(True, [f"moderation unavailable ({type(err).__name__})"])
        categories = result.categories.model_dump() if hasattr(result.categories, "model_dump") else {}
        return FilterResult(bool(result.flagged), sorted(k for k, v in categories.items() if v))


def make_filter(kind: str, terms: Sequence[str] = (), terms_file: str = "", base_url: str = "",
                model: str = "", api_key_env: str = "OPENAI_API_KEY") -> ContentFilter:
    """Build the filter a deployment asked for (``none`` | ``terms`` | ``openai``)."""
    if kind == "none":
        return NoFilter()
    if kind == "terms":
        return TermFilter([*read_terms(terms_file or BUNDLED_TERMS), *terms])
    if kind == "openai":
        return OpenAIModerationFilter(base_url, model, api_key_env)
    raise UserError(f"unknown content filter {kind!r}; choose none, terms or openai")

"""What a generate run cost and what it kept: the per-model price table and the ``stats.json`` counters."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from alpaca_ray.generate.parse import DROP_REASONS

#: USD per million tokens (input, output), from the providers' public price lists (2025). Check your
#: provider's page; a model missing here gets no cost estimate unless ``price_per_million_tokens`` is set.
PRICES_PER_MILLION: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4-turbo": (10.00, 30.00),
    "gpt-4": (30.00, 60.00),
    "gpt-3.5-turbo-instruct": (1.50, 2.00),
    "gpt-3.5-turbo": (0.50, 1.50),
    "davinci-002": (2.00, 2.00),
    "babbage-002": (0.40, 0.40),
    "text-davinci-003": (20.00, 20.00),  # Alpaca's teacher, at its 2023 price ($0.02 / 1K tokens)
}


def model_price(model: str, override: dict | None = None) -> tuple[tuple[float, float] | None, str]:
    """(input, output) USD per million tokens for ``model`` and where the figure comes from.

    A dated or suffixed name (``gpt-4o-mini-2024-07-18``) takes the price of its longest listed prefix.
    """
    if override:
        return (float(override.get("input", 0.0)), float(override.get("output", 0.0))), "price_per_million_tokens"
    name = model.split("/")[-1].lower()
    for listed in sorted(PRICES_PER_MILLION, key=len, reverse=True):
        if name == listed or name.startswith(listed + "-"):
            return PRICES_PER_MILLION[listed], f"built-in price table ({listed})"
    return None, (f"unknown model price: {model!r} is not in the built-in price table; set "
                  f"--price-per-million-tokens '{{\"input\": X, \"output\": Y}}' to estimate the cost")


def estimated_cost(model: str, prompt_tokens: int, completion_tokens: int,
                   override: dict | None = None) -> tuple[float | None, str]:
    """Estimated USD for the tokens, or None with a note saying why there is no estimate."""
    price, source = model_price(model, override)
    if price is None:
        return None, source
    return round((prompt_tokens * price[0] + completion_tokens * price[1]) / 1e6, 6), source


@dataclass
class Tally:
    """Counters of responses, tokens and what happened to each parsed task."""

    responses: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    malformed: int = 0
    candidates: int = 0
    kept: int = 0
    #: Tasks that passed every filter after the target was already reached (kept in raw/, not in data.json).
    surplus: int = 0
    dropped: Counter = field(default_factory=Counter)

    def add_usage(self, record: dict) -> None:
        usage = record.get("usage") or {}
        self.responses += 1
        self.retries += int(record.get("retries", 0) or 0)
        self.prompt_tokens += int(usage.get("prompt_tokens", 0) or 0)
        self.completion_tokens += int(usage.get("completion_tokens", 0) or 0)

    def to_dict(self, model: str, price_override: dict | None = None) -> dict:
        cost, note = estimated_cost(model, self.prompt_tokens, self.completion_tokens, price_override)
        return {
            "responses": self.responses, "retries": self.retries,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "estimated_cost_usd": cost, "cost_note": note,
            "malformed_responses": self.malformed, "candidates": self.candidates, "kept": self.kept,
            "surplus": self.surplus, "dropped": {reason: int(self.dropped.get(reason, 0)) for reason in DROP_REASONS},
        }

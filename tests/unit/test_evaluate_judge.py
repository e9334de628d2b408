"""Judge prompt, verdict parsing and position debiasing."""

from __future__ import annotations

import pytest

from alpaca_ray.config import UserError
from alpaca_ray.evaluate.judge import (
    DEFAULT_TEMPLATE,
    combine_orders,
    judge_prompt,
    load_template,
    parse_verdict,
    preferred_model,
)


@pytest.mark.parametrize("text, verdict", [
    ("Response 1 is clearer.\nWinner: 1", "1"),
    ("winner: Response 2", "2"),
    ("**Winner:** tie", "tie"),
    ("The winner is Response (2).", "2"),
    ("Winner: Output (1)", "1"),
    ("Winner - neither", "tie"),
    ("2", "2"),
    ("[[1]]", "1"),
    ("Response 2", "2"),
    ("Tie.", "tie"),
    ("Winner: 1\nOn reflection... Winner: 2", None),  # contradicts itself: unparseable, not a guess
    ("Both have merits; I cannot choose.", None),
    ("Response 2 is better in my view but response 1 is shorter", None),
    ("", None),
])
def test_parse_verdict(text, verdict):
    assert parse_verdict(text) == verdict


def test_preferred_model_maps_positions_back_to_models():
    assert preferred_model("1", "ab") == "A" and preferred_model("2", "ab") == "B"
    assert preferred_model("1", "ba") == "B" and preferred_model("2", "ba") == "A"
    assert preferred_model("tie", "ba") == "tie" and preferred_model(None, "ab") is None


def test_combine_orders_counts_only_consistent_preferences():
    assert combine_orders("1", "2").outcome == "A"  # A first and chosen; B first and A (second) chosen
    assert combine_orders("2", "1").outcome == "B"
    flipped = combine_orders("1", "1")  # always the first position: pure position bias
    assert (flipped.outcome, flipped.inconsistent, flipped.unparseable) == ("tie", True, False)
    assert (flipped.preference_ab, flipped.preference_ba) == ("A", "B")
    assert combine_orders("tie", "tie").outcome == "tie"
    assert combine_orders("1", "tie").outcome == "tie" and combine_orders("1", "tie").inconsistent
    unparseable = combine_orders("2", None)
    assert (unparseable.outcome, unparseable.unparseable, unparseable.preference_ab) == ("tie", True, "B")


def test_judge_prompt_fills_placeholders_once(tmp_path):
    text = judge_prompt(DEFAULT_TEMPLATE, "Say hi.", "", "first {output_2}", "second")
    assert "### Instruction:\nSay hi." in text and "### Input:\n(none)" in text
    assert "### Response 1:\nfirst {output_2}\n" in text  # an answer's braces are left alone
    assert text.index("first") < text.index("### Response 2:\nsecond")
    custom = tmp_path / "judge.txt"
    custom.write_text('Return JSON like {"winner": 1}.\nQ: {instruction}\n1: {output_1}\n2: {output_2}\n')
    template = load_template(str(custom))
    assert judge_prompt(template, "Q?", "", "x", "y") == 'Return JSON like {"winner": 1}.\nQ: Q?\n1: x\n2: y\n'
    custom.write_text("Which is better: {output_1}?")
    with pytest.raises(UserError, match=r"lacks \{instruction\}, \{output_2\}"):
        load_template(str(custom))
    assert load_template("") == DEFAULT_TEMPLATE

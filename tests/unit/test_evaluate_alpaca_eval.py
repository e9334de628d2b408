"""AlpacaEval on equal terms, without Ray: its published numbers from its annotations, its logprob parser on
its judge's real answers, the length control, the logprobs probe and the unparseable-verdict stop."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from alpaca_ray.config import UserError
from alpaca_ray.evaluate import alpaca_eval, judge, length_control, pipeline, stats
from alpaca_ray.evaluate.cli import main
from alpaca_ray.evaluate.config import EvaluateConfig
from alpaca_ray.evaluate.eval_sets import EvalItem
from alpaca_ray.llm_client import EndpointConfig
from alpaca_ray.openai_server import OpenAIServer, Reply
from alpaca_ray.records import RecordError
from tests.support.evaluate_servers import logprob_judge

#: AlpacaEval's published annotations and leaderboards, beside the repository (see its README there).
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "alpaca_eval"
ANNOTATIONS = {
    "FuseChat-Gemma-2-9B-Instruct": ("FuseChat-Gemma-2-9B-Instruct.weighted_alpaca_eval_gpt4_turbo.annotations.json",
                                     "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"),
    "claude-2.1": ("claude-2.1.weighted_alpaca_eval_gpt4_turbo.annotations.json",
                   "leaderboard_weighted_alpaca_eval_gpt4_turbo.csv"),
    "gpt4": ("gpt4.alpaca_eval_gpt4.annotations.json", "leaderboard_alpaca_eval_gpt4.csv"),
}
needs_data = pytest.mark.skipif(not DATA.exists(), reason="AlpacaEval reference data not present")


def leaderboard_row(name: str, leaderboard: str) -> dict[str, float]:
    with open(DATA / leaderboard, newline="") as handle:
        for row in csv.DictReader(handle):
            if row[""] == name:
                return {k: float(v) for k, v in row.items() if k and v and k != "mode"}
    raise AssertionError(f"{name} not in {leaderboard}")


@needs_data
@pytest.mark.parametrize("model", list(ANNOTATIONS))
def test_annotations_reproduce_the_published_leaderboard(model, tmp_path, capsys):
    annotations, leaderboard = ANNOTATIONS[model]
    assert main(["--annotations", str(DATA / annotations), "--output", str(tmp_path), "--bootstrap-samples", "100",
                 "--lc-bootstrap-samples", "0"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    published = leaderboard_row(model, leaderboard)
    ours = report["llm_judge"]["alpaca_eval"]
    for name in ("win_rate", "standard_error", "discrete_win_rate"):
        assert ours[name] == pytest.approx(published[name], abs=0.01), name
    for name in ("n_wins", "n_wins_base", "n_draws", "n_total"):
        assert ours[name] == published[name], name
    judged = report["llm_judge"]  # the report's own numbers are the same, as shares
    assert 100 * judged["win_rate"] == pytest.approx(published["win_rate"], abs=0.01)
    assert 100 * judged["discrete_win_rate"] == pytest.approx(published["discrete_win_rate"], abs=0.01)
    assert report["model_a"] == model and report["n_items"] == 805  # labels from generator_2 / generator_1
    assert judged["length_controlled"]["form"] == "length_only"
    assert f"{model} (A)" in capsys.readouterr().out


def test_head2head_reads_alpaca_eval_preferences_as_alpaca_eval_does():
    out = alpaca_eval.head2head([2, "1.0", 1.5, 0, None, "1.75", 1.25, 1.5000001])
    # null dropped; 0 and 1.5 are draws; scores 1, 0, .5, .5, .75, .25, .5000001
    assert out["n_total"] == 7 and out["n_draws"] == 2
    assert (out["n_wins"], out["n_wins_base"]) == (3, 2)
    scores = np.array([1, 0, 0.5, 0.5, 0.75, 0.25, 0.5000001])
    assert out["win_rate"] == pytest.approx(scores.mean() * 100)
    assert out["standard_error"] == pytest.approx(scores.std(ddof=1) / math.sqrt(7) * 100)
    assert out["discrete_win_rate"] == pytest.approx(np.mean([1, 0, 0.5, 0.5, 1, 0, 1]) * 100)  # 1.5000001 rounds up
    with pytest.raises(ValueError, match="got 'two'"):
        alpaca_eval.head2head(["two"])


def test_stats_take_continuous_scores():
    assert stats.win_rate([0.7]) == pytest.approx(0.7)  # once a KeyError
    summary = stats.summarize([0.7, 0.2, 0.5, 1.0, "A", "tie"], samples=200)
    assert (summary["wins"], summary["losses"], summary["ties"]) == (3, 1, 2)
    assert summary["win_rate"] == pytest.approx((0.7 + 0.2 + 0.5 + 1 + 1 + 0.5) / 6)
    assert summary["discrete_win_rate"] == pytest.approx((1 + 0 + 0.5 + 1 + 1 + 0.5) / 6)
    assert summary["ci_low"] < summary["win_rate"] < summary["ci_high"]
    with pytest.raises(ValueError, match="0..1"):
        stats.scores_of([1.5])


@needs_data
def test_logprob_parser_reproduces_the_judges_recorded_preferences():
    """AlpacaEval 2's judge answers for claude-2.1, with its logprobs: our parser gives each stored preference
    (or 3 minus it, where AlpacaEval showed the pair in swapped order)."""
    rows = json.loads((DATA / ANNOTATIONS["claude-2.1"][0]).read_text())
    direct = swapped = 0
    for row in rows:
        content = ((row.get("raw_completion") or {}).get("logprobs") or {}).get("content")
        if not content:
            continue
        parsed = alpaca_eval.preference_from_logprobs(content[0]["top_logprobs"])
        direct += abs(parsed - row["preference"]) < 1e-6
        swapped += abs(3 - parsed - row["preference"]) < 1e-6
    assert direct + swapped == 803 and direct > 300 and swapped > 300
    assert math.isnan(alpaca_eval.preference_from_logprobs([{"token": "The", "logprob": -0.1}]))
    assert alpaca_eval.preference_from_logprobs([{"token": "M", "logprob": -0.01}]) == 2.0  # "m" missing: P 0


def test_logprob_orders_average_out_a_position_bias():
    def top(p_first: float) -> list[list[dict]]:
        return [[{"token": "m", "logprob": math.log(p_first)}, {"token": "M", "logprob": math.log(1 - p_first)}]]

    # A's true probability 0.7; the judge adds 0.1 to whatever is shown first.
    outcome = judge.combine_logprob_orders(judge.a_probability(top(0.8), "ab"), judge.a_probability(top(0.4), "ba"))
    assert outcome.score == pytest.approx(0.7) and outcome.outcome == "A" and not outcome.unparseable
    flipped = judge.combine_logprob_orders(0.6, 0.3)
    assert flipped.inconsistent and flipped.outcome == "B"
    lost = judge.combine_logprob_orders(judge.a_probability([[{"token": "Hi", "logprob": 0.0}]], "ab"), 0.9)
    assert lost.unparseable and lost.score == 0.5


def _length_judged_set(n: int, seed: int, a_lengths: tuple[int, int], b_lengths: tuple[int, int]):
    """Answers whose only difference is length (filler text), judged by length alone: the longer wins, equal
    lengths tie."""
    rng = np.random.default_rng(seed)
    steps_a, steps_b = rng.integers(*a_lengths, n), rng.integers(*b_lengths, n)
    answers_a = ["word " * (10 * k) for k in steps_a]
    answers_b = ["word " * (10 * k) for k in steps_b]
    scores = [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(steps_a, steps_b)]
    return scores, answers_a, answers_b


@pytest.mark.parametrize("a_lengths,b_lengths", [((1, 20), (1, 20)), ((8, 30), (1, 15)), ((1, 10), (5, 25))],
                         ids=["same lengths", "A longer", "B longer"])
def test_length_controlled_win_rate_of_a_judge_that_prefers_the_longer_answer(a_lengths, b_lengths):
    scores, answers_a, answers_b = _length_judged_set(300, 0, a_lengths, b_lengths)
    lc = length_control.length_controlled_win_rate(scores, answers_a, answers_b, bootstrap_samples=0)
    assert 0.45 <= lc["win_rate"] <= 0.55, (stats.win_rate(scores), lc)
    assert lc["form"] == "length_only" and lc["weights"]["np.tanh(std_delta_len)"] < 0  # B shorter: A wins
    # a difficulty file that knows nothing about length changes nothing of that
    difficulty = np.random.default_rng(1).normal(size=len(scores))
    with_file = length_control.length_controlled_win_rate(scores, answers_a, answers_b, difficulty,
                                                          bootstrap_samples=10)
    assert 0.45 <= with_file["win_rate"] <= 0.55 and with_file["form"] == "alpaca_eval"
    assert with_file["ci_low"] <= with_file["win_rate"] <= with_file["ci_high"]


def test_length_controlled_win_rate_keeps_a_real_preference():
    """A judge that prefers A in 80% of pairs whatever the lengths: controlling for length keeps about 80%."""
    rng = np.random.default_rng(2)
    scores, answers_a, answers_b = _length_judged_set(300, 3, (1, 20), (1, 20))
    scores = list(np.where(rng.random(300) < 0.8, 0.9, 0.1))
    lc = length_control.length_controlled_win_rate(scores, answers_a, answers_b, bootstrap_samples=0)
    assert lc["win_rate"] == pytest.approx(stats.win_rate(scores), abs=0.03)


def test_instruction_difficulty_file_by_position_or_by_instruction(tmp_path):
    by_position = tmp_path / "instruction_difficulty.csv"
    by_position.write_text("index,instruction_difficulty\n0,0.5\n1,-1.25\n2,3\n")
    table = length_control.read_instruction_difficulty(str(by_position))
    assert list(length_control.difficulty_for(["x", "y"], table, "f")) == [0.5, -1.25]
    by_text = tmp_path / "by_text.csv"
    by_text.write_text('instruction,instruction_difficulty\n"Say hi",1.5\n"Count, then stop",-2\n')
    table = length_control.read_instruction_difficulty(str(by_text))
    assert list(length_control.difficulty_for(["Count, then stop", "Say hi"], table, "f")) == [-2.0, 1.5]
    with pytest.raises(UserError, match="no instruction difficulty for 1 of 2 items"):
        length_control.difficulty_for(["Say hi", "Unknown"], table, str(by_text))
    bad = tmp_path / "bad.csv"
    bad.write_text("index,instruction_difficulty\n0,high\n")
    with pytest.raises(UserError, match="line 2.*'instruction_difficulty'.*'high'"):
        length_control.read_instruction_difficulty(str(bad))


def test_bad_annotations_name_the_item_and_field(tmp_path):
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps([{"instruction": "i", "output_1": "a", "output_2": "b", "preference": 2},
                                {"instruction": "i", "output_1": "a", "output_2": "b", "preference": "left"}]))
    with pytest.raises(RecordError, match=r"annotations.json: field 'preference': item 1: .*'left'"):
        alpaca_eval.load_annotations(str(path))
    path.write_text(json.dumps([{"instruction": "i", "output_1": "a", "preference": 1}]))
    with pytest.raises(RecordError, match="field 'output_2': item 0: is missing"):
        alpaca_eval.load_annotations(str(path))


def test_alpaca_eval_templates_become_chat_messages():
    template = "<|im_start|>system\nBe fair.\n<|im_end|>\n<|im_start|>user\n{{ \"instruction\": {instruction} }}<|im_end|>"
    filled = judge.judge_prompt(alpaca_eval.from_format_style(template), "Hi", "", "a", "b")
    assert alpaca_eval.chat_messages(filled) == [{"role": "system", "content": "Be fair."},
                                                 {"role": "user", "content": '{ "instruction": Hi }'}]
    assert alpaca_eval.chat_messages("plain") == [{"role": "user", "content": "plain"}]


def _config(tmp_path: Path, **fields) -> EvaluateConfig:
    for name in ("a.json", "b.json"):  # recorded answers without a generator: labelled by file name
        (tmp_path / name).write_text(json.dumps([{"instruction": "Instruction 0", "output": "x"}]))
    return EvaluateConfig(output=str(tmp_path / "out"), model_a_answers=str(tmp_path / "a.json"),
                          model_b_answers=str(tmp_path / "b.json"), judge_model="judge", **fields)


def test_too_many_unparseable_verdicts_stop_the_run_with_the_raw_answers(tmp_path):
    items = [EvalItem(f"t{i}", f"Instruction {i}") for i in range(10)]
    answers = {"a": {i.id: "short" for i in items}, "b": {i.id: "longer answer" for i in items}}
    texts = ["m", "M"] * 2 + ["Winner: 1"] * 6  # AlpacaEval's one-token answers, which verdict mode cannot read
    raw = {item.id: ({"text": text}, {"text": "Winner: 2"}) for item, text in zip(items, texts)}
    with pytest.raises(UserError) as err:
        pipeline.make_report(_config(tmp_path), items, answers, raw)
    message = str(err.value)
    assert "4 of 10 pairs (40%)" in message and "--max-unparseable 0.1" in message
    assert "item t0: A first: 'm' | B first: 'Winner: 2'" in message
    assert not (tmp_path / "out" / "report.json").exists()
    built = pipeline.make_report(_config(tmp_path, max_unparseable=0.5), items, answers, raw)
    assert built["llm_judge"]["unparseable"] == 4 and built["llm_judge"]["wins"] == 6
    written = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert [r["preference"] for r in written] == [1.5] * 4 + [2.0] * 6  # A (generator_2) won the six
    assert written[0]["generator_2"] == "a.json" and written[0]["output_1"] == "longer answer"


def test_logprobs_probe_fails_before_anything_is_paid_for(tmp_path):
    config = _config(tmp_path, judge_mode="logprobs")
    with OpenAIServer(lambda kind, body: Reply("m"), models=["judge"]) as plain:
        endpoint = EndpointConfig("judge", plain.base_url, api_key_env="")
        with pytest.raises(UserError, match="returned no logprobs.*--judge-mode verdict"):
            pipeline.check_judge_logprobs(config, endpoint, None)
        assert len(plain.completion_requests()) == 1  # the one-token probe, nothing else
        probe = plain.completion_requests()[0].body
        assert (probe["max_tokens"], probe["logprobs"], probe["top_logprobs"]) == (1, True, 5)
        assert probe["messages"][0]["role"] == "system"  # AlpacaEval's template: a system and a user message
    with OpenAIServer(logprob_judge, models=["judge"]) as server:
        pipeline.check_judge_logprobs(config, EndpointConfig("judge", server.base_url, api_key_env=""), None)


def test_regularisation_towards_the_baseline_with_alpaca_evals_gamed_annotations(tmp_path):
    """df_gamed.csv rows (the baseline against its own longer and shorter answers) in which length decides
    nothing pull the length weight towards zero, as AlpacaEval's regularize_to_baseline does; their
    instruction difficulties are used when no difficulty file is given."""
    scores, answers_a, answers_b = _length_judged_set(200, 4, (1, 20), (1, 20))
    scores = [0.5 + 0.4 * (s - 0.5) for s in scores]  # a judge mildly swayed by length
    rng = np.random.default_rng(5)
    path = tmp_path / "df_gamed.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["model", "index", "preference", "std_delta_len", "instruction_difficulty",
                         "not_gamed_baseline"])
        for model in ("verbose", "concise"):
            for i in range(200):
                writer.writerow([model, i, 0.5, rng.normal(), i % 3 - 1, "False"])
    gamed = length_control.read_gamed_annotations(str(path))
    plain = length_control.length_controlled_win_rate(scores, answers_a, answers_b, bootstrap_samples=0)
    pulled = length_control.length_controlled_win_rate(scores, answers_a, answers_b, bootstrap_samples=3,
                                                       gamed=gamed)
    assert pulled["regularized_to_baseline"] and pulled["form"] == "alpaca_eval"
    assert "instruction_difficulty" in pulled["weights"]
    length_weight = "np.tanh(std_delta_len)"
    assert abs(pulled["weights"][length_weight]) < 0.9 * abs(plain["weights"][length_weight])  # 0.97 vs 1.18
    (tmp_path / "bad.csv").write_text("index,preference\n0,0.5\n")
    with pytest.raises(UserError, match="missing column.*std_delta_len"):
        length_control.read_gamed_annotations(str(tmp_path / "bad.csv"))


def test_a_template_without_input_gets_it_folded_into_the_instruction():
    prompt = judge.judge_prompt(alpaca_eval.DEFAULT_LOGPROB_TEMPLATE, "Fix the grammar.", "He go home.", "x", "y")
    assert '"instruction": """Fix the grammar.\n\nHe go home.""",' in prompt
    assert "### Input:\nHe go home." in judge.judge_prompt(judge.DEFAULT_TEMPLATE, "Fix.", "He go home.", "x", "y")

"""The report (json/md/png), the ratings store and the rating page's pure parts."""

from __future__ import annotations

import json
import sqlite3

import pytest

from alpaca_ray.config import ConfigError
from alpaca_ray.evaluate import human, report
from alpaca_ray.evaluate.config import EvaluateConfig
from alpaca_ray.evaluate.eval_sets import EvalItem
from alpaca_ray.evaluate.judge import combine_orders
from alpaca_ray.evaluate.ratings import Rating, RatingStore, read_ratings


def results() -> list[report.ItemResult]:
    verdicts = [("1", "2"), ("1", "2"), ("2", "1"), ("1", "1"), ("I am unsure", "1")]  # A, A, B, tie, unparseable
    out = []
    for i, (ab, ba) in enumerate(verdicts):
        item = EvalItem(f"t{i}", f"Instruction {i}", "", "email" if i < 3 else "coding")
        from alpaca_ray.evaluate.judge import parse_verdict

        result = report.ItemResult(item, "short answer", "a much longer answer than the other one")
        result.raw_ab, result.raw_ba = ab, ba
        result.judged = combine_orders(parse_verdict(ab), parse_verdict(ba))
        out.append(result)
    return out


def test_report_counts_and_files(tmp_path):
    ratings = [Rating("t0", "r1", "A", "ab", 1.0), Rating("t0", "r2", "A", "ba", 2.0),
               Rating("t1", "r1", "B", "ab", 3.0), Rating("t1", "r2", "A", "ab", 4.0),
               Rating("t2", "r1", "B", "ba", 5.0)]
    built = report.build_report(results(), {"model_a": "ours", "model_b": "teacher", "judge": "j"}, ratings,
                                samples=500)
    judge = built["llm_judge"]
    assert (judge["wins"], judge["losses"], judge["ties"], judge["unparseable"], judge["inconsistent"]) == (2, 1, 2, 1, 1)
    assert judge["win_rate"] == pytest.approx((2 + 0.5 * 2) / 5)
    assert judge["ci_low"] <= judge["win_rate"] <= judge["ci_high"]
    assert judge["by_category"]["email"]["wins"] == 2 and judge["by_category"]["coding"]["ties"] == 2
    assert list(judge["by_length"]) == ["B longer"]
    assert built["items"][4]["unparseable"] and built["items"][4]["judge_raw_a_first"] == "I am unsure"

    human_part = built["human"]
    # per-item majorities: t0 A (2 votes), t1 tie (A vs B), t2 B
    assert (human_part["wins"], human_part["losses"], human_part["ties"], human_part["items_rated"]) == (1, 1, 1, 3)
    assert human_part["inter_rater"]["pairs"] == 2 and human_part["inter_rater"]["agreement"] == 0.5
    # judge says t0 A, t1 A, t2 B; humans t0 A, t1 tie, t2 B -> 2 of 3; single ratings 4 of 5
    assert human_part["agreement_with_judge"]["agreement"] == pytest.approx(2 / 3)
    assert human_part["agreement_with_judge"]["rating_agreement"] == pytest.approx(4 / 5)
    assert built["items"][0]["human"] == [{"rater": "r1", "choice": "A"}, {"rater": "r2", "choice": "A"}]

    paths = report.write_report(built, str(tmp_path))
    loaded = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN written as null
    assert loaded["llm_judge"]["wins"] == 2
    markdown = (tmp_path / "report.md").read_text()
    assert "**A win rate 50.0%**" in markdown and "| email | 3 | 2 | 1 | 0 |" in markdown
    assert "unparseable judge answers (no winner named; counted as ties): 1" in markdown
    assert "## Human raters" in markdown and "| t1 |" in markdown
    png = open(paths["png"], "rb").read()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_report_without_judge_or_ratings(tmp_path):
    plain = [report.ItemResult(EvalItem("t0", "I"), "a", "b")]
    built = report.build_report(plain, {"model_a": "a", "model_b": "b", "judge": None})
    assert built["llm_judge"] is None and built["human"] is None
    report.write_report(built, str(tmp_path))
    assert "## LLM judge" not in (tmp_path / "report.md").read_text()


def test_rating_store_upserts_in_wal_mode(tmp_path):
    path = str(tmp_path / "ratings.sqlite")
    store = RatingStore(path)
    store.record("t0", "r1", "A", "ab")
    store.record("t0", "r1", "tie", "ab")  # a rater changing their mind replaces the rating
    store.record("t1", "r1", "B", "ba")
    assert [(r.item_id, r.choice) for r in read_ratings(path)] == [("t0", "tie"), ("t1", "B")]
    assert store.rated_items("r1") == {"t0", "t1"} and store.rated_items("r2") == set()
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    with pytest.raises(ValueError):
        store.record("t0", "r1", "C", "ab")
    assert read_ratings(str(tmp_path / "none.sqlite")) == []


def test_rating_page_order_is_random_but_stable():
    items = [f"t{i}" for i in range(40)]
    orders = [human.shown_order(0, "r1", i) for i in items]
    assert set(orders) == {"ab", "ba"}
    assert orders == [human.shown_order(0, "r1", i) for i in items]
    assert human.rater_sequence(0, "r1", items) != human.rater_sequence(0, "r2", items)
    assert sorted(human.rater_sequence(0, "r1", items)) == sorted(items)
    assert human.choice_to_model("1", "ab") == "A" and human.choice_to_model("1", "ba") == "B"
    assert human.choice_to_model("2", "ba") == "A" and human.choice_to_model("tie", "ab") == "tie"
    assert "Response 1" in human.PAGE and "model A" not in human.PAGE  # blind


def test_config_validation_lists_every_problem(tmp_path):
    with pytest.raises(ConfigError) as err:
        EvaluateConfig(model_a="m", model_b_answers="x.json", model_b="n", model_b_base_url="http://h/v1")
    message = str(err.value)
    assert "output: an output directory is required" in message
    assert "--model-a and --model-a-base-url go together" in message
    assert "(not both)" in message and "judge_model: a judge is required" in message
    with pytest.raises(ConfigError, match="output: must be a local or shared filesystem path"):
        EvaluateConfig(output="s3://bucket/eval", model_a_answers="a.json", model_b_answers="b.json", human=True)
    config = EvaluateConfig(output=str(tmp_path), model_a_answers="a.json", model_b_answers="b.json", human=True)
    assert config.human_db_path == str(tmp_path / "human_ratings.sqlite") and config.label("b") == "b.json"


def test_config_round_trips_through_cli_flags(tmp_path):
    """The pipeline builds the job's entrypoint with ``config_to_argv``: the CLI must read back the same config."""
    from alpaca_ray.config import config_from_args, config_to_argv, make_parser

    config = EvaluateConfig(output=str(tmp_path), model_a="ours", model_a_base_url="http://127.0.0.1:8000/v1",
                            model_b_answers="teacher.json", judge_model="judge", answer_api="completions", limit=5)
    parser = make_parser("evaluate", "", EvaluateConfig)
    assert config_from_args(EvaluateConfig, parser.parse_args(config_to_argv(config))) == config
    assert config.eval_set == "" and config.eval_set_path.endswith("alpaca_ray/data/eval_set.jsonl")


def test_stage_imports_only_the_shared_basics():
    import ast
    from pathlib import Path

    import alpaca_ray.evaluate

    allowed = {"records", "prompts", "config", "storage", "tiny", "openai_server", "llm_client", "cluster", "dedup",
               "evaluate"}
    for path in Path(alpaca_ray.evaluate.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if name.startswith("alpaca_ray."):
                    assert name.split(".")[1] in allowed, f"{path.name} imports {name}"


def test_cli_help_lists_every_flag(capsys):
    from alpaca_ray.evaluate.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--model-b-answers" in text and "--judge-template" in text and "95 percent confidence" in text

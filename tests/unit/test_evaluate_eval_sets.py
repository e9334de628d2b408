"""Evaluation sets and recorded answers in every supported format, and their errors."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.config import UserError
from alpaca_ray.evaluate.config import BUNDLED_EVAL_SET
from alpaca_ray.evaluate.eval_sets import load_answers, load_eval_set
from alpaca_ray.records import RecordError


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_json_and_jsonl(tmp_path):
    rows = [{"instruction": "Add.", "input": "1 2", "output": "3"}, {"instruction": "Greet.", "input": ""}]
    (tmp_path / "set.json").write_text(json.dumps(rows, indent=2))
    items = load_eval_set(str(tmp_path / "set.json"))
    assert [(i.id, i.instruction, i.input, i.reference) for i in items] == [
        ("item-1", "Add.", "1 2", "3"), ("item-2", "Greet.", "", None)]
    assert items[0].category == "uncategorized"
    assert load_eval_set(str(write_jsonl(tmp_path / "set.jsonl", rows)), limit=1) == items[:1]


def test_self_instruct_user_oriented_252(shared_data):
    items = load_eval_set(str(shared_data / "self_instruct_user_oriented_252.jsonl"))
    assert len(items) == 252 and len({i.id for i in items}) == 252
    first = items[0]
    assert first.id == "user_oriented_task_0" and first.category == "Grammarly"  # motivation_app as category
    assert first.input.startswith("If you have any questions") and first.reference


def test_self_instruct_with_category_and_several_instances(tmp_path):
    path = write_jsonl(tmp_path / "set.jsonl", [
        {"id": "t1", "instruction": "Reply.", "category": "email", "motivation_app": "Gmail",
         "instances": [{"input": "Hi", "output": "Hello"}, {"input": "Yo", "output": "Hey"}]}])
    items = load_eval_set(str(path))
    assert [(i.id, i.input, i.category) for i in items] == [("t1/0", "Hi", "email"), ("t1/1", "Yo", "email")]


def test_bundled_eval_set_if_present():
    import os

    if not os.path.exists(BUNDLED_EVAL_SET):
        pytest.skip("the bundled eval set is not written yet")
    items = load_eval_set(BUNDLED_EVAL_SET)
    assert len(items) >= 100 and all(i.category != "uncategorized" for i in items)


def test_alpacaeval_format(tmp_path):
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps([{"instruction": "What is 2+2?", "output": "4", "generator": "gpt4",
                                 "dataset": "helpful_base"}]))
    (item,) = load_eval_set(str(path))
    assert (item.category, item.reference, item.input) == ("helpful_base", "4", "")


def test_local_datasets_folder(tmp_path):
    folder = tmp_path / "my_set"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"instruction": "Name a fruit.", "input": "", "output": "Apple"}])
    (item,) = load_eval_set(str(folder))
    assert item.instruction == "Name a fruit."


def test_errors_name_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "ok"}, {"prompt": "no instruction"}])
    with pytest.raises(RecordError, match=r"bad.jsonl, line 2: field 'instruction': is missing \(expected Alpaca"):
        load_eval_set(str(path))
    path = write_jsonl(tmp_path / "bad2.jsonl", [{"id": "x", "instruction": "a", "instances": []}])
    with pytest.raises(RecordError, match="line 1: field 'instances'"):
        load_eval_set(str(path))
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "instruction": "a"}, {"id": 1, "instruction": "b"}])
    with pytest.raises(RecordError, match="line 2: field 'id': id '1' repeats"):
        load_eval_set(str(path))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(UserError, match="empty.jsonl: the evaluation set is empty"):
        load_eval_set(str(tmp_path / "empty.jsonl"))
    with pytest.raises(RecordError, match="no such file"):
        load_eval_set(str(tmp_path / "missing.jsonl"))


def test_recorded_answers_match_by_id_or_instruction(tmp_path):
    items = load_eval_set(str(write_jsonl(tmp_path / "set.jsonl", [
        {"id": "a", "instruction": "One.", "instances": [{"input": "x", "output": "ref"}]},
        {"id": "b", "instruction": "Two.", "instances": [{"input": "", "output": "ref"}]}])))
    by_id = write_jsonl(tmp_path / "by_id.jsonl", [{"id": "b", "instruction": "reworded", "output": "answer b"},
                                                   {"id": "a", "instruction": "One.", "output": "answer a"}])
    assert load_answers(str(by_id), items) == {"a": "answer a", "b": "answer b"}
    # AlpacaEval-style outputs carry no id: instruction and input decide
    by_key = tmp_path / "outputs.json"
    by_key.write_text(json.dumps([{"instruction": " Two. ", "output": "2", "generator": "m", "dataset": "d"},
                                  {"instruction": "One.", "input": "x", "output": "1", "generator": "m"}]))
    assert load_answers(str(by_key), items) == {"a": "1", "b": "2"}
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"instruction": "One.", "input": "x", "output": "1"}])
    with pytest.raises(UserError, match=r"partial.jsonl: no recorded answer for 1 of 2 items: id 'b' \('Two.'\)"):
        load_answers(str(partial), items)
    no_output = write_jsonl(tmp_path / "no_output.jsonl", [{"instruction": "One.", "input": "x"}])
    with pytest.raises(RecordError, match="line 1: field 'output': has no answer"):
        load_answers(str(no_output), items)

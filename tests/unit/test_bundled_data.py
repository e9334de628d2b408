"""The data files shipped in the package: the 175 seed tasks and the user-oriented evaluation set.

Checks the files as shipped: format, counts, the share of tasks with an input, and, for the seed tasks,
that no two instructions are near-duplicates by ROUGE-L (the similarity Alpaca filters on).
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from rouge_score import rouge_scorer

import alpaca_ray

DATA = Path(alpaca_ray.__file__).parent / "data"
SEED_FILE = DATA / "seed_tasks.jsonl"
EVAL_FILE = DATA / "eval_set.jsonl"

EVAL_CATEGORIES = {"email", "social_media", "productivity", "coding", "reasoning", "writing", "knowledge", "everyday"}


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            assert line.strip(), f"{path.name}: line {number} is blank"
            row = json.loads(line)
            assert isinstance(row, dict), f"{path.name}: line {number} is not a JSON object"
            rows.append(row)
    return rows


@pytest.fixture(scope="module")
def seeds() -> list[dict]:
    return _read_jsonl(SEED_FILE)


@pytest.fixture(scope="module")
def eval_items() -> list[dict]:
    return _read_jsonl(EVAL_FILE)


def _check_instances(row: dict, where: str) -> None:
    instances = row["instances"]
    assert isinstance(instances, list) and instances, f"{where}: instances must be a non-empty list"
    for instance in instances:
        assert isinstance(instance, dict), where
        assert isinstance(instance.get("input"), str), f"{where}: input must be a string"
        assert isinstance(instance.get("output"), str) and instance["output"].strip(), f"{where}: empty output"


# ---------------------------------------------------------------- seed tasks


def test_seed_tasks_are_175_well_formed_tasks(seeds):
    assert len(seeds) == 175
    for number, task in enumerate(seeds):
        where = f"seed_tasks.jsonl line {number + 1}"
        assert set(task) >= {"id", "name", "instruction", "instances", "is_classification"}, where
        assert task["id"] == f"seed_task_{number}", f"{where}: ids must be seed_task_0, seed_task_1, ..."
        assert isinstance(task["name"], str) and task["name"].strip(), where
        assert isinstance(task["instruction"], str) and task["instruction"].strip(), where
        assert task["instruction"][0].isascii() and task["instruction"][0].isalpha(), where
        assert isinstance(task["is_classification"], bool), where
        _check_instances(task, where)
    assert len({task["id"] for task in seeds}) == len(seeds)
    assert len({task["name"] for task in seeds}) == len(seeds)


def test_about_one_third_of_seed_tasks_have_an_input(seeds):
    with_input = sum(1 for task in seeds if task["instances"][0]["input"].strip())
    share = with_input / len(seeds)
    assert abs(share - 1 / 3) <= 0.05, f"{with_input}/{len(seeds)} seed tasks have an input ({share:.1%})"


def test_seed_tasks_mix_classification_and_generation(seeds):
    classification = sum(task["is_classification"] for task in seeds)
    assert 10 <= classification <= len(seeds) // 2


def test_no_seed_instruction_starts_with_write_a_program(seeds):
    # Alpaca's generation filter drops instructions starting so; a seed that does would teach the teacher to.
    offenders = [task["id"] for task in seeds if task["instruction"].lower().startswith("write a program")]
    assert not offenders


def test_no_two_seed_instructions_are_near_duplicates(seeds):
    """ROUGE-L F-measure below 0.7 for every pair, scored as Alpaca's generate_instruction.py does."""
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    tokens = [scorer._tokenizer.tokenize(task["instruction"]) for task in seeds]
    worst = (0.0, -1, -1)
    for i in range(len(tokens)):
        for j in range(i + 1, len(tokens)):
            score = rouge_scorer._score_lcs(tokens[i], tokens[j]).fmeasure
            if score > worst[0]:
                worst = (score, i, j)
    score, i, j = worst
    assert score <= 0.7, f"ROUGE-L {score:.3f}: {seeds[i]['instruction']!r} vs {seeds[j]['instruction']!r}"
    # The tokenizer shortcut agrees with the public API.
    assert scorer.score(seeds[i]["instruction"], seeds[j]["instruction"])["rougeL"].fmeasure == pytest.approx(score)


# ---------------------------------------------------------------- evaluation set


def test_eval_set_is_well_formed(eval_items):
    assert len(eval_items) >= 100
    for number, item in enumerate(eval_items):
        where = f"eval_set.jsonl line {number + 1}"
        assert set(item) >= {"id", "category", "motivation_app", "instruction", "instances"}, where
        assert isinstance(item["id"], str) and item["id"], where
        assert isinstance(item["motivation_app"], str) and item["motivation_app"].strip(), where
        assert isinstance(item["instruction"], str) and item["instruction"].strip(), where
        assert item["category"] in EVAL_CATEGORIES, f"{where}: unknown category {item['category']!r}"
        _check_instances(item, where)
    assert len({item["id"] for item in eval_items}) == len(eval_items)
    assert len({item["instruction"] for item in eval_items}) == len(eval_items)


def test_eval_set_covers_every_category(eval_items):
    counts = collections.Counter(item["category"] for item in eval_items)
    assert set(counts) == EVAL_CATEGORIES
    thin = {category: n for category, n in counts.items() if n < 8}
    assert not thin, f"categories with fewer than 8 items: {thin}"


def test_eval_set_mixes_items_with_and_without_input(eval_items):
    with_input = sum(1 for item in eval_items if item["instances"][0]["input"].strip())
    assert 0.3 <= with_input / len(eval_items) <= 0.7

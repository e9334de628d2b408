"""The dedup stage without Ray: files in, kept records out, Alpaca's similarity report, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from alpaca_ray.config import ConfigError
from alpaca_ray.dedup import brute_force_filter, reference_filter, rouge_l_score, rouge_tokens
from alpaca_ray.dedup.cli import main
from alpaca_ray.dedup.config import DedupConfig
from alpaca_ray.dedup.pipeline import run_dedup
from alpaca_ray.records import read_records, write_records
from tests.support.dedup_data import make_instructions, mixed_workload

SEED_ROWS = [{"id": f"seed_task_{i}", "name": f"t{i}", "instruction": text, "instances": [{"input": "", "output": "x"}],
              "is_classification": False} for i, text in enumerate(make_instructions(25, seed=7, duplicate_rate=0))]


def _write_inputs(tmp_path, count=300):
    texts = mixed_workload(count, seed=8, long_count=2)
    rows = [{"instruction": text if text.strip() else "?", "input": "", "output": f"answer {i}", "id": i} for i, text in enumerate(texts)]
    (tmp_path / "data.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "seeds.jsonl").write_text("".join(json.dumps(r) + "\n" for r in SEED_ROWS), encoding="utf-8")
    return rows


def test_stage_keeps_alpacas_choice_and_reports_similarity(tmp_path, capsys):
    rows = _write_inputs(tmp_path)
    status = main(["--input", str(tmp_path / "data.json"), "--output", str(tmp_path / "kept.jsonl"),
                   "--against", str(tmp_path / "seeds.jsonl"), "--report-similar", "--no-progress",
                   "--dropped-output", str(tmp_path / "dropped.json")])
    assert status == 0
    seeds = [r["instruction"] for r in SEED_ROWS]
    expected = reference_filter([r["instruction"] for r in rows], seeds)
    kept = read_records(tmp_path / "kept.jsonl", require_output=False)
    dropped = read_records(tmp_path / "dropped.json", require_output=False)
    assert [r.extra["id"] for r in kept] == [r["id"] for r, keep in zip(rows, expected) if keep]
    assert len(kept) + len(dropped) == len(rows) and dropped
    assert kept[3].output == rows[kept[3].extra["id"]]["output"]  # records travel whole
    out = capsys.readouterr().out
    assert f"kept {len(kept)} of {len(rows)}" in out and f"dropped {len(dropped)}" in out
    # Alpaca's report: each kept instruction scored against seeds + the instructions kept before it.
    pool = list(seeds)
    for record in kept[:60]:
        scores = [rouge_l_score(rouge_tokens(record.instruction), rouge_tokens(p)) for p in pool]
        assert record.extra["most_similar_instructions"] == \
            {pool[i]: scores[i] for i in np.argsort(scores)[-10:][::-1]}
        assert record.extra["avg_similarity_score"] == float(np.mean(scores))
        pool.append(record.instruction)


def test_threshold_flag_and_config_file(tmp_path):
    rows = _write_inputs(tmp_path, count=200)
    (tmp_path / "recipe.yaml").write_text("dedup:\n  threshold: 0.5\n  progress: false\n", encoding="utf-8")
    assert main(["--config", str(tmp_path / "recipe.yaml"), "--input", str(tmp_path / "data.json"),
                 "--output", str(tmp_path / "kept.parquet")]) == 0
    kept = read_records(tmp_path / "kept.parquet", require_output=False)
    expected = brute_force_filter([r["instruction"] for r in rows], threshold=0.5)
    assert [r.instruction for r in kept] == [r["instruction"] for r, keep in zip(rows, expected) if keep]


def test_missing_file_is_a_clear_error(tmp_path, capsys):
    assert main(["--input", str(tmp_path / "nope.json"), "--output", str(tmp_path / "out.json")]) == 2
    err = capsys.readouterr().err
    assert "nope.json" in err and "no such file" in err and "Traceback" not in err
    assert not (tmp_path / "out.json").exists()


def test_malformed_record_names_file_and_line(tmp_path, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Name a colour."}\n{"instruction": 42}\n', encoding="utf-8")
    assert main(["--input", str(path), "--output", str(tmp_path / "out.json"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2" in err and "'instruction'" in err
    path.write_text('{"instruction": "Name a colour."}\n{"instruction": "x"\n', encoding="utf-8")
    assert main(["--input", str(path), "--output", str(tmp_path / "out.json")]) == 2
    assert "bad.jsonl, line 2: invalid JSON" in capsys.readouterr().err


def test_config_is_validated():
    with pytest.raises(ConfigError) as err:
        DedupConfig(input="", output="o.json", threshold=1.5, num_workers=-1)
    message = str(err.value)
    assert "input is required" in message and "threshold" in message and "num_workers" in message


def test_run_dedup_api_on_empty_input(tmp_path):
    write_records([], tmp_path / "empty.json")
    result = run_dedup(DedupConfig(input=str(tmp_path / "empty.json"), output=str(tmp_path / "o.json"),
                                   progress=False))
    assert (result.total, result.kept) == (0, 0)
    assert json.loads((tmp_path / "o.json").read_text()) == []

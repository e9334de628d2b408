"""``jobs/evaluate.py`` through the real ``ray job submit`` on a local head node."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.openai_server import OpenAIServer
from tests.support.evaluate_servers import biased_judge, expected_outcomes, model_a, model_b, write_eval_set

pytestmark = pytest.mark.job


def test_evaluate_job_through_ray_job_submit(ray_head, tmp_path):
    rows = write_eval_set(tmp_path / "set.jsonl", 6, undecided=1)
    # Both models from recorded answers (what the stand-in models would say), so the job's one Ray Data
    # run is the judge's; collection through Ray Data is covered on the session cluster.
    for name, responder in (("a", model_a), ("b", model_b)):
        answers = [{"id": r["id"], "instruction": r["instruction"],
                    "output": responder("chat", {"messages": [{"role": "user", "content": r["instruction"]}]}).text}
                   for r in rows]
        (tmp_path / f"{name}.json").write_text(json.dumps(answers))
    with OpenAIServer(biased_judge, models=["judge"], api_key="sk-test-judge") as judge:
        output = tmp_path / "out"
        result = ray_head.submit(["python", "jobs/evaluate.py", "--eval-set", str(tmp_path / "set.jsonl"),
                                  "--output", str(output), "--model-a-answers", str(tmp_path / "a.json"),
                                  "--model-b-answers", str(tmp_path / "b.json"), "--judge-model", "judge",
                                  "--judge-base-url", judge.base_url, "--judge-api-key-env", "EVAL_JUDGE_KEY",
                                  "--bootstrap-samples", "200", "--max-unparseable", "0.2"],  # 1 of 6
                                 env_vars={"EVAL_JUDGE_KEY": "sk-test-judge"}, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "A win rate" in result.stdout and "sk-test-judge" not in result.stdout + result.stderr
        requests = judge.completion_requests()
        assert len(requests) == 12 and all(r.authorization == "Bearer sk-test-judge" for r in requests)
    report = json.loads((output / "report.json").read_text())
    assert {row["id"]: row["outcome"] for row in report["items"]} == expected_outcomes(rows)
    assert report["llm_judge"]["unparseable"] == 1
    assert len(list((output / "judgments").glob("judge-*.jsonl"))) >= 1  # raw judge answers kept
    assert "sk-test-judge" not in json.dumps(report)  # the saved config names the variable, not the key
    assert report["config"]["judge_api_key_env"] == "EVAL_JUDGE_KEY"

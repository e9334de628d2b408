"""Answer collection and endpoint checks against real OpenAI-protocol servers (no Ray needed here)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

from alpaca_ray.config import UserError
from alpaca_ray.evaluate import collect, pipeline
from alpaca_ray.evaluate.eval_sets import EvalItem
from alpaca_ray.llm_client import EndpointConfig, Secret
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.conftest import run_cli
from tests.support.evaluate_servers import model_a, model_args, start_servers, write_eval_set
from tests.support.ray_head import free_port

ITEMS = [EvalItem("t0", "Write a haiku."), EvalItem("t1", "Summarize.", "A long text.")]


def test_answers_are_journaled_and_never_asked_twice(tmp_path):
    with OpenAIServer(model_a, models=["m"]) as server:
        endpoints = {"a": EndpointConfig("m", server.base_url, api="completions", max_retries=0)}
        sampling = {"a": {"max_tokens": 16, "temperature": 0.0}}
        requests = collect.answer_requests(ITEMS, "a", endpoints["a"], sampling["a"])
        runner = collect.RequestRunner(endpoints, sampling, str(tmp_path))
        results = asyncio.run(runner.run(requests))
        assert [r["error"] for r in results] == ["", ""]
        # completions: Alpaca's template, to the character
        assert server.requests[0].body["prompt"].startswith("Below is an instruction that describes a task")
        assert any("### Input:\nA long text.\n\n### Response:" in r.body["prompt"] for r in server.requests)
        saved = collect.read_journals(str(tmp_path), collect.ANSWER_JOURNALS["a"])
        assert {record["item_id"] for record in saved.values()} == {"t0", "t1"}
        assert saved[requests[0].key]["text"].startswith("Answer: Write a haiku.")
        assert collect.pending(requests, saved) == []
        # same prompt and sampling -> same key; another temperature is another request
        assert collect.answer_requests(ITEMS, "a", endpoints["a"], sampling["a"]) == requests
        hotter = collect.answer_requests(ITEMS, "a", endpoints["a"], {"max_tokens": 16, "temperature": 0.7})
        assert collect.pending(hotter, saved) == hotter


def test_chat_prompt_and_failures_are_reported_not_raised(tmp_path):
    with OpenAIServer(lambda kind, body: Reply("ok"), models=["m"], api_key="right-key") as server:
        endpoint = EndpointConfig("m", server.base_url, api="chat", max_retries=0)
        requests = collect.answer_requests(ITEMS, "b", endpoint, {})
        assert requests[1].prompt == [{"role": "user", "content": "Summarize.\n\nA long text."}]
        good = collect.RequestRunner({"b": endpoint}, {}, str(tmp_path), api_keys={"b": Secret("right-key")})
        assert asyncio.run(good.run(requests[:1]))[0]["error"] == ""
        bad = collect.RequestRunner({"b": endpoint}, {}, str(tmp_path), api_keys={"b": Secret("wrong-key")})
        (result,) = asyncio.run(bad.run(requests[1:]))
        assert result["error"].startswith("AuthError") and "wrong-key" not in result["error"]
        assert len(collect.read_journals(str(tmp_path), "answers/b")) == 1  # what succeeded is kept


def test_unreachable_endpoint_and_wrong_key_fail_fast(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    start = time.monotonic()
    with pytest.raises(UserError, match=rf"model A \(m at {dead}\): cannot reach"):
        pipeline.check_endpoints({"a": EndpointConfig("m", dead)}, {})
    assert time.monotonic() - start < 20
    with OpenAIServer(lambda kind, body: Reply("x"), models=["judge"], api_key="right") as server:
        with pytest.raises(UserError, match=r"the judge \(judge at .*\): .*refused the API key from \$JUDGE_KEY"):
            pipeline.check_endpoints({"judge": EndpointConfig("judge", server.base_url, api_key_env="JUDGE_KEY")},
                                     {"judge": Secret("not-the-key")})
        with pytest.raises(UserError, match="has no model 'nope'"):
            pipeline.check_endpoints({"b": EndpointConfig("nope", server.base_url)}, {"b": Secret("right")})


def test_cli_errors_are_one_clear_line(tmp_path):
    eval_set = tmp_path / "set.jsonl"
    write_eval_set(eval_set, 3)
    a, b, judge = start_servers(judge_key="sk-right-judge-key")
    try:
        # A Ray address nothing listens on: these errors must come before any Ray work.
        env = {**os.environ, "JUDGE_KEY": "sk-wrong-judge-key", "RAY_ADDRESS": "127.0.0.1:1"}
        args = ["evaluate", "--eval-set", str(eval_set), "--output", str(tmp_path / "out"), *model_args(a, b, judge),
                "--judge-api-key-env", "JUDGE_KEY"]
        result = run_cli(args, env=env, timeout=120)
        assert result.returncode == 2, result.stderr
        assert "error: the judge (judge at" in result.stderr and "refused the API key from $JUDGE_KEY" in result.stderr
        assert "sk-wrong-judge-key" not in result.stderr + result.stdout and "Traceback" not in result.stderr
        assert a.completion_requests() == [] and b.completion_requests() == []  # nothing was paid for

        (tmp_path / "empty.jsonl").write_text("")
        result = run_cli([*args[:2], str(tmp_path / "empty.jsonl"), *args[3:]], env=env, timeout=120)
        assert result.returncode == 2 and "the evaluation set is empty" in result.stderr

        missing = tmp_path / "answers.jsonl"
        missing.write_text('{"id": "task_0", "instruction": "x", "output": "y"}\n')
        result = run_cli(["evaluate", "--eval-set", str(eval_set), "--output", str(tmp_path / "out"),
                          "--model-a-answers", str(missing), "--model-b-answers", str(missing),
                          "--judge-model", "judge"], env=env, timeout=120)
        assert result.returncode == 2
        assert "no recorded answer for 2 of 3 items: id 'task_1'" in result.stderr
    finally:
        for server in (a, b, judge):
            server.stop()


def test_driver_keeps_answers_from_workers_it_cannot_see(tmp_path):
    """A worker on another node journals on its own disk; the driver keeps the copy it was sent."""
    with OpenAIServer(model_a, models=["m"]) as server:
        endpoint = EndpointConfig("m", server.base_url, max_retries=0)
        worker_disk, driver_disk = tmp_path / "worker-node", tmp_path / "driver-node"
        runner = collect.RequestRunner({"a": endpoint}, {}, str(worker_disk))
        requests = collect.answer_requests(ITEMS, "a", endpoint, {})
        results = asyncio.run(runner.run(requests))
    shutil.rmtree(worker_disk)  # what the driver's node sees of that disk: nothing
    assert collect.keep_unseen_records(results, str(driver_disk)) == 2
    saved = collect.read_journals(str(driver_disk), "answers/a")
    assert collect.pending(requests, saved) == [] and (driver_disk / "answers" / "a-driver.jsonl").exists()

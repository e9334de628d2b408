"""``alpaca-ray generate`` stops at once, clearly and before spending, on bad input (no Ray needed).

Also the per-request step (:func:`ask_teacher`) against a real local server: the answer is journaled
before it is handed on, malformed answers are journaled and flagged, refusals are reported.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from alpaca_ray.generate.calls import ask_teacher
from alpaca_ray.generate.cli import main
from alpaca_ray.llm_client import EndpointConfig, LLMClient, RawJournal
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.support.generate_teacher import SelfInstructTeacher, write_seed_tasks
from tests.support.ray_head import free_port

KEY = "sk-generate-unit-secret-5f3a9c"


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    write_seed_tasks(path)
    return str(path)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("GEN_UNIT_KEY", KEY)


def run(argv, capsys):
    status = main(argv)
    captured = capsys.readouterr()
    return status, captured.out + captured.err


def base_args(tmp_path, seeds, url):
    return ["--output", str(tmp_path / "out"), "--target", "5", "--seed-tasks", seeds, "--teacher-base-url", url,
            "--teacher-model", "teacher", "--api-key-env", "GEN_UNIT_KEY", "--no-progress"]


def test_wrong_key_stops_before_any_completion(tmp_path, seeds, key_env, capsys):
    with OpenAIServer(SelfInstructTeacher(), models=["teacher"], api_key="another-key") as server:
        status, text = run(base_args(tmp_path, seeds, server.base_url), capsys)
        assert server.completion_requests() == []
    assert status == 2 and "refused the API key from $GEN_UNIT_KEY" in text and KEY not in text
    assert not (tmp_path / "out" / "raw").exists()


def test_unknown_model_stops_before_any_completion(tmp_path, seeds, key_env, capsys):
    with OpenAIServer(SelfInstructTeacher(), models=["other-model"]) as server:
        status, text = run(base_args(tmp_path, seeds, server.base_url), capsys)
        assert server.completion_requests() == []
    assert status == 2 and "no model 'teacher'" in text and "other-model" in text


def test_unreachable_endpoint(tmp_path, seeds, key_env, capsys):
    status, text = run(base_args(tmp_path, seeds, f"http://127.0.0.1:{free_port()}/v1"), capsys)
    assert status == 2 and "cannot reach" in text


@pytest.mark.parametrize("change, message", [
    (["--target", "0"], "target must be a whole number >= 1"),
    (["--seed-tasks", "/nonexistent/seeds.jsonl"], "/nonexistent/seeds.jsonl: no such seed task file"),
    (["--num-prompt-instructions", "50"], "8 seed task(s), but each prompt shows 50"),
    (["--resume"], "holds no saved responses"),
    (["--prompt-template", "/nonexistent/header.txt"], "no such prompt template"),
])
def test_bad_input_is_one_clear_line(tmp_path, seeds, key_env, capsys, change, message):
    with OpenAIServer(SelfInstructTeacher(), models=["teacher"]) as server:
        status, text = run(base_args(tmp_path, seeds, server.base_url) + change, capsys)
        assert server.completion_requests() == []
    assert status == 2 and message in text and "Traceback" not in text


def test_malformed_seed_line_is_named(tmp_path, key_env, capsys):
    bad = tmp_path / "seeds.jsonl"
    bad.write_text('{"instruction": "Say hi.", "instances": [{"input": "", "output": "hi"}]}\n'
                   '{"instruction": "Say bye.", "instances": [{"input": "", "output": null}]}\n')
    status, text = run(base_args(tmp_path, str(bad), "http://127.0.0.1:1/v1"), capsys)
    assert status == 2 and f"{bad}, line 2: field 'instances[0].output': is missing" in text


def test_missing_target(tmp_path, seeds, capsys):
    status, text = run(["--output", str(tmp_path / "o"), "--seed-tasks", seeds], capsys)
    assert status == 2 and "target is required" in text


def test_ask_teacher_journals_before_returning(tmp_path, key_env):
    teacher = SelfInstructTeacher(faults={1: "malformed"})
    faults = {2: Reply(raw_body=b"not json at all")}

    def responder(kind, body):
        return faults.get(teacher.count) or teacher(kind, body)

    request = {"request_id": "run-000001", "prompt": "header\n###\n4. Instruction:", "seed_task_ids": ["a", "b", "c"]}
    journal = RawJournal(tmp_path / "raw" / "w.jsonl")
    with OpenAIServer(responder, models=["teacher"], api_key=KEY) as server:
        client = LLMClient(EndpointConfig("teacher", base_url=server.base_url, api_key_env="GEN_UNIT_KEY"))

        async def three():
            try:
                return [await ask_teacher(client, journal, {**request, "request_id": f"r{i}"}, {"max_tokens": 50})
                        for i in range(3)]
            finally:
                await client.aclose()

        answers = asyncio.run(three())
    saved = journal.read()
    assert [r["request_id"] for r in saved] == ["r0", "r1", "r2"] and saved == answers
    assert saved[0]["text"].startswith(" ") and saved[0]["usage"]["completion_tokens"] > 0
    assert set(saved[0]) >= {"request_id", "time", "model", "api", "prompt", "seed_task_ids", "text",
                             "finish_reason", "usage"}
    assert saved[1]["text"].startswith("I'm sorry")  # well-formed HTTP, useless text: parsed later
    assert saved[2]["text"] == "" and "malformed" in saved[2]["error"]
    assert {r["finish_reason"] for r in saved} <= {"stop", "length"}  # replayable by `alpaca-ray teacher`
    assert KEY not in json.dumps(saved)


def test_ask_teacher_reports_a_refused_key(tmp_path, key_env):
    with OpenAIServer(SelfInstructTeacher(), models=["teacher"], api_key="other") as server:
        client = LLMClient(EndpointConfig("teacher", base_url=server.base_url, api_key_env="GEN_UNIT_KEY"))
        journal = RawJournal(tmp_path / "w.jsonl")
        result = asyncio.run(ask_teacher(client, journal, {"request_id": "r", "prompt": "p", "seed_task_ids": []},
                                         {}))
    assert result["failure"] == "auth" and KEY not in result["message"] and journal.read() == []

"""``alpaca-ray generate`` stops at once, clearly and before spending, on bad input (no Ray needed).

Also the per-request step (:func:`ask_teacher`) against a real local server: the answer is journaled
before it is handed on, malformed answers are journaled and flagged, refusals are reported.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import threading
import urllib.request

import pytest

from alpaca_ray.generate.calls import ask_teacher
from alpaca_ray.generate.cli import main
from alpaca_ray.llm_client import EndpointConfig, LLMClient, RawJournal
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.conftest import run_cli
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


class StaticFiles(http.server.SimpleHTTPRequestHandler):
    """A plain static file server, as ``python -m http.server`` is: ``GET /`` answers 200 (a directory
    listing), the API's routes 404, any POST 501. Every request is recorded in ``seen``."""

    seen: list = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=os.path.dirname(__file__), **kwargs)

    def send_head(self):
        self.seen.append((self.command, self.path))
        return super().send_head()

    def do_POST(self):  # what the stdlib server does (501), recorded first
        self.seen.append((self.command, self.path))
        self.send_error(501, f"Unsupported method ({self.command!r})")

    def log_message(self, *args):
        pass


class WebPages(StaticFiles):
    """A web app that answers everything, GET and POST, with 200 and an HTML page."""

    def do_GET(self):
        self.seen.append((self.command, self.path))
        self._page()

    def do_POST(self):
        self.seen.append((self.command, self.path))
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self._page()

    def _page(self):
        body = b"<!DOCTYPE html><html><body><h1>Welcome</h1></body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.mark.parametrize("handler, answers", [
    (StaticFiles, ["GET {url}/models answered HTTP 404 (text/html)",
                   "POST {url}/chat/completions answered HTTP 501 (text/html)"]),
    (WebPages, ["GET {url}/models answered HTTP 200 (text/html) with no OpenAI model list",
                "POST {url}/chat/completions answered HTTP 200 (text/html)"]),
], ids=["static-file-server", "html-200"])
def test_a_server_that_is_no_openai_api_stops_at_the_check(tmp_path, seeds, handler, answers):
    """A real process against a real HTTP server that is up but no OpenAI API: one line naming the URL, the
    statuses and what was expected, after the free model list and one never-retried probe; no journal."""
    handler.seen = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        with urllib.request.urlopen(root + "/") as page:
            assert page.status == 200  # the server is up: only its answers to the API tell it is no teacher
        handler.seen.clear()
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the check comes before any Ray
        result = run_cli(["generate", "--output", str(tmp_path / "out"), "--target", "5", "--seed-tasks", seeds,
                          "--teacher-base-url", root + "/v1", "--teacher-model", "teacher", "--no-progress"],
                         env=env, timeout=120)
    finally:
        server.shutdown()
        server.server_close()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stdout + result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stdout + result.stderr, result.stderr
    (line,) = lines
    assert f"{root}/v1 is not an OpenAI-compatible API" in line and "OpenAI chat completion" in line
    for answer in answers:
        assert answer.format(url=root + "/v1") in line, line
    # the free listing and one one-token probe, never retried (a 501 is never retried): nothing else sent
    assert handler.seen == [("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
    raw = tmp_path / "out" / "raw"
    assert not raw.exists() or not any(raw.iterdir())  # nothing journaled: a rerun resumes from nothing


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

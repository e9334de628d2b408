"""The offline teacher: replay-file errors, and recorded answers served to the real ``openai`` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import openai
import pytest

from alpaca_ray.config import ConfigError
from alpaca_ray.teacher import TeacherConfig, read_replay, start_teacher
from alpaca_ray.teacher.replay import ReplayError
from tests.conftest import REPO_ROOT, run_cli
from tests.support.pipeline_replay import BUNDLED_REPLAY, numbered_tasks, write_replay


@pytest.fixture
def replay_file(tmp_path):
    texts = [numbered_tasks(4, 2, "apples"), numbered_tasks(4, 3, "rivers"), numbered_tasks(4, 1, "clouds")]
    return write_replay(tmp_path / "replay.jsonl", texts, ["stop", "length", "stop"])


def test_serves_recorded_answers_in_order_cycling_to_the_openai_client(replay_file):
    recorded = [json.loads(line) for line in replay_file.read_text().splitlines()]
    with start_teacher(replay_file) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="anything", max_retries=0)
        answers = []
        for i in range(5):  # alternate the two protocols: the order is one sequence across both
            if i % 2 == 0:
                out = client.completions.create(model="text-davinci-003", prompt="List of 20 tasks:", max_tokens=3072)
                answers.append((out.choices[0].text, out.choices[0].finish_reason, out.usage))
            else:
                out = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "go"}])
                answers.append((out.choices[0].message.content, out.choices[0].finish_reason, out.usage))
    expected = [recorded[i % 3] for i in range(5)]
    assert [a[0] for a in answers] == [e["text"] for e in expected]
    assert [a[1] for a in answers] == [e["finish_reason"] for e in expected]
    assert all(a[2].completion_tokens == len(e["text"].split()) > 0 for a, e in zip(answers, expected))
    assert answers[0][2].prompt_tokens == 4  # "List of 20 tasks:"


def test_model_names_are_enforced_when_given(replay_file):
    with start_teacher(replay_file, models=["teacher"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == ["teacher"]
        assert client.completions.create(model="teacher", prompt="p").choices[0].text
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="other", prompt="p")


def test_bundled_replay_file_is_valid_and_alpaca_shaped():
    if not BUNDLED_REPLAY.exists():
        pytest.skip("the bundled teacher_replay.jsonl is not written yet")
    responses = read_replay(BUNDLED_REPLAY)
    assert len(responses) >= 16
    for response in responses:
        assert "Instruction:" in response.text and "Output:" in response.text


@pytest.mark.parametrize("content, problem", [
    ("", "empty: no recorded responses"),
    ("\n\n", "empty: no recorded responses"),
    ('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n', "line 2: not valid JSON"),
    ('{"text": "a"}\n["text"]\n', "line 2: expected a JSON object"),
    ('{"text": "a"}\n{"finish_reason": "stop"}\n', "line 2: field 'text' is missing"),
    ('{"text": 3}\n', "line 1: field 'text' must be a string, got int"),
    ('{"text": "a", "finish_reason": "done"}\n', "line 1: field 'finish_reason' must be one of"),
])
def test_bad_replay_files_are_clear_errors_naming_line_and_field(tmp_path, content, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ReplayError, match=problem) as info:
        read_replay(path)
    assert str(path) in str(info.value)


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(ReplayError, match="no such replay file"):
        read_replay(tmp_path / "nope.jsonl")
    with pytest.raises(ReplayError, match="no \\*.jsonl replay files"):
        read_replay(tmp_path)


def test_a_raw_journal_directory_replays_in_file_order_and_a_torn_last_line_is_skipped(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    write_replay(raw / "b.jsonl", ["second"])
    write_replay(raw / "a.jsonl", ["first"])
    with open(raw / "b.jsonl", "a") as handle:
        handle.write('{"text": "cut sh')  # a run killed mid-write
    assert [r.text for r in read_replay(raw)] == ["first", "second"]


def test_config_requires_a_replay_file():
    with pytest.raises(ConfigError, match="replay: a recorded-responses file is required"):
        TeacherConfig()
    with pytest.raises(ConfigError, match="port"):
        TeacherConfig(replay="x", port=70000)


def test_cli_reports_a_bad_file_without_a_traceback(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "a"}\n{"txt": "b"}\n')
    result = run_cli(["teacher", "--replay", str(path)], timeout=60)
    assert result.returncode == 2
    assert f"error: {path}, line 2: field 'text' is missing" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_serves_in_the_foreground_until_sigterm(replay_file):
    process = subprocess.Popen([sys.executable, "-m", "alpaca_ray.cli", "teacher", "--replay", str(replay_file)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        base_url = None
        deadline = time.monotonic() + 60
        while base_url is None and time.monotonic() < deadline:  # the URL line is printed once serving
            line = process.stdout.readline()
            if line.startswith("base URL: "):
                base_url = line.split()[2]
        assert base_url, "the teacher never printed its URL"
        client = openai.OpenAI(base_url=base_url, api_key="x", max_retries=0)
        assert client.completions.create(model="m", prompt="p").choices[0].text == numbered_tasks(4, 2, "apples")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        assert "stopped after 1 requests" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()

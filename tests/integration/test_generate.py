"""``alpaca-ray generate`` end to end on the session's Ray cluster, against a real local OpenAI-protocol
server whose stand-in teacher injects 429s with Retry-After, 500s, slow answers, ``length`` stops and
malformed text."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alpaca_ray.config import UserError
from alpaca_ray.dedup import NearDuplicateFilter
from alpaca_ray.generate import GenerateConfig, generate
from alpaca_ray.llm_client import WINDOW_GUARD_S
from alpaca_ray.openai_server import OpenAIServer, Reply
from tests.conftest import REPO_ROOT, run_cli
from tests.support.generate_teacher import SelfInstructTeacher, write_seed_tasks

pytestmark = pytest.mark.ray

KEY = "sk-generate-integration-7e1d42c9b0"
KEY_ENV = "GEN_TEST_TEACHER_KEY"


def everything_written(directory: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in directory.rglob("*") if p.is_file())


def journal_lines(output: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in (output / "raw").glob("*.jsonl"))


def assert_clean_dataset(output: Path, seed_instructions: list[str], count: int) -> list[dict]:
    data = json.loads((output / "data.json").read_text())
    assert len(data) == count and all(set(row) == {"instruction", "input", "output"} for row in data)
    instructions = [row["instruction"] for row in data]
    assert len(set(instructions)) == count
    # Alpaca's rule holds over the whole dataset, seed tasks included: nothing is a near-duplicate.
    assert all(NearDuplicateFilter(seed_instructions).filter(instructions))
    import pyarrow.parquet as pq

    assert pq.read_table(output / "data.parquet").column("instruction").to_pylist() == instructions
    return data


@pytest.fixture
def seeds(tmp_path):
    path = tmp_path / "seeds.jsonl"
    return str(path), write_seed_tasks(path)


def config_for(server: OpenAIServer, output: Path, seed_path: str, **overrides) -> GenerateConfig:
    values = dict(output=str(output), target=40, seed_tasks=seed_path, teacher_model="teacher",
                  teacher_base_url=server.base_url, api_key_env=KEY_ENV, num_workers=2, requests_per_worker=2,
                  requests_per_minute=0, tokens_per_minute=0, progress=False)
    values.update(overrides)
    return GenerateConfig(**values)


def test_reaches_target_through_faults_then_reprocesses_for_free(ray_local, tmp_path, seeds, monkeypatch, capfd):
    monkeypatch.setenv(KEY_ENV, KEY)
    seed_path, seed_instructions = seeds
    faults = {0: Reply(status=429, headers={"Retry-After": "1"}), 2: Reply(status=500),
              3: Reply("too late", delay_s=6.0), 4: "malformed", 5: "length"}
    teacher = SelfInstructTeacher(good_tasks=10, repeat_label=True, faults=faults)  # a chat model's habit
    output = tmp_path / "out"
    with OpenAIServer(teacher, models=["teacher"], api_key=KEY) as server:
        config = config_for(server, output, seed_path, timeout_s=3.0, expected_kept_per_request=5.0)
        stats = generate(config)
        seen = len(server.completion_requests())

        # --reprocess: the same journal through other filters, with no call at all.
        reprocessed = generate(dataclasses.replace(config, reprocess=True, blacklist=config.blacklist + ["describe"]))
        assert len(server.requests) == seen + 0  # not even the free model check

    total = stats["total"]
    assert stats["kept"] == 40 and stats["complete"]
    assert total["retries"] >= 3  # the 429, the 500 and the time-out, each retried
    assert total["malformed_responses"] == 1 and total["dropped"]["truncated"] == 1
    for reason in ("near_duplicate", "too_short", "blacklisted", "banned_prefix"):
        assert total["dropped"][reason] >= total["responses"] - 2, reason  # planted in every good answer
    assert seen == total["responses"] + total["retries"]  # every request the server saw is accounted for
    assert journal_lines(output) == total["responses"] == stats["this_run"]["requests"]
    assert stats["this_run"]["wall_time_s"] > 0 and "unknown model price" in total["cost_note"]

    assert reprocessed["this_run"]["requests"] == 0 and reprocessed["this_run"]["reprocess"]
    assert reprocessed["total"]["responses"] == total["responses"]
    data = assert_clean_dataset(output, seed_instructions, reprocessed["kept"])
    assert not any("describe" in row["instruction"].lower() for row in data)
    assert reprocessed["total"]["dropped"]["blacklisted"] > total["dropped"]["blacklisted"]

    captured = capfd.readouterr()
    assert KEY not in everything_written(output) + captured.out + captured.err


def test_rate_limit_is_shared_by_all_workers(ray_local, tmp_path, seeds, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    seed_path, seed_instructions = seeds
    with OpenAIServer(SelfInstructTeacher(good_tasks=10), models=["teacher"]) as server:
        # 2 workers x 4 in flight could send all 6 requests at once; 120/min spaces them ~0.5 s apart.
        config = config_for(server, tmp_path / "out", seed_path, target=45, api="completions", num_workers=2,
                            requests_per_worker=4, requests_per_minute=120, expected_kept_per_request=5.0)
        stats = generate(config)
    # Asserted on the shared limiter's grant times (every request of both workers asked it), not on when
    # requests reached the server: the limit holds by construction, whatever the machine's load.
    granted = stats["this_run"]["rate_limit"]
    assert granted["granted_requests"] == len(server.completion_requests()) == stats["total"]["responses"]
    assert granted["granted_requests"] >= 6
    assert granted["min_gap_s"] >= (60 + WINDOW_GUARD_S) / 120 - 1e-9
    assert granted["max_requests_in_60s"] <= 120
    assert all(r.path.endswith("/v1/completions") for r in server.completion_requests())
    assert_clean_dataset(tmp_path / "out", seed_instructions, 45)


def test_a_teacher_that_never_answers_in_format_stops_with_a_clear_error(ray_local, tmp_path, seeds, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    seed_path, _ = seeds
    prose = SelfInstructTeacher(faults={n: "malformed" for n in range(100)})
    with OpenAIServer(prose, models=["teacher"]) as server:
        config = config_for(server, tmp_path / "out", seed_path, target=5, max_answers_without_progress=1)
        with pytest.raises(UserError, match="added no instruction .*malformed answers: 1"):
            generate(config)
    # What was paid for is on disk, and the (empty) outputs say where the run stopped.
    assert journal_lines(tmp_path / "out") == 1
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["kept"] == 0 and not stats["complete"] and stats["total"]["malformed_responses"] == 1


def test_killed_run_resumes_without_paying_twice(ray_env, tmp_path, seeds):
    seed_path, seed_instructions = seeds
    output = tmp_path / "out"
    teacher = SelfInstructTeacher(good_tasks=10, delay_s=0.4)
    env = {**ray_env, KEY_ENV: KEY}
    with OpenAIServer(teacher, models=["teacher"], api_key=KEY) as server:
        args = ["generate", "--output", str(output), "--target", "150", "--seed-tasks", seed_path,
                "--teacher-model", "teacher", "--teacher-base-url", server.base_url, "--api-key-env", KEY_ENV,
                "--num-workers", "1", "--requests-per-worker", "2", "--requests-per-minute", "0", "--seed", "5"]
        first = subprocess.Popen([sys.executable, "-m", "alpaca_ray.cli", *args], env=env, cwd=REPO_ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (output / "raw").exists() or journal_lines(output) < 3:  # poll: some answers are saved
            assert first.poll() is None, first.stdout.read()
            assert time.monotonic() < deadline, "no answers journaled in time"
            time.sleep(0.1)
        first.send_signal(signal.SIGKILL)
        first_output = first.communicate()[0]
        saved_at_kill = journal_lines(output)
        assert not (output / "stats.json").exists() or json.loads((output / "stats.json").read_text())["kept"] < 150

        second = run_cli(args, env=env, timeout=240)
        assert second.returncode == 0, second.stdout + second.stderr
        requests_seen = len(server.completion_requests())

    stats = json.loads((output / "stats.json").read_text())
    assert stats["this_run"]["resumed_responses"] >= saved_at_kill >= 3
    # Only answers in flight at the kill (at most one per concurrent request) were paid for and lost.
    assert requests_seen <= journal_lines(output) + 2
    assert stats["total"]["responses"] == journal_lines(output)
    # The resumed run continued the request numbering: no prompt of the first run was sent again.
    numbers = [json.loads(line)["request_number"] for p in (output / "raw").glob("*.jsonl")
               for line in p.read_text().splitlines()]
    assert len(numbers) == len(set(numbers))
    assert_clean_dataset(output, seed_instructions, 150)
    assert "kept 150 of 150 instructions" in second.stdout
    assert KEY not in first_output + second.stdout + second.stderr + everything_written(output)


@pytest.mark.job
def test_generate_job_through_ray_job_submit(ray_head, tmp_path, seeds):
    seed_path, seed_instructions = seeds
    output = tmp_path / "job-out"
    with OpenAIServer(SelfInstructTeacher(good_tasks=10), models=["teacher"], api_key=KEY) as server:
        result = ray_head.submit(
            ["python", "jobs/generate.py", "--output", str(output), "--target", "20", "--seed-tasks", seed_path,
             "--teacher-model", "teacher", "--teacher-base-url", server.base_url, "--api-key-env", KEY_ENV,
             "--num-workers", "1", "--no-progress"],
            env_vars={KEY_ENV: KEY}, timeout=300)
    logs = result.stdout + result.stderr
    assert result.returncode == 0, logs[-4000:]
    assert "kept 20 of 20 instructions" in logs
    assert_clean_dataset(output, seed_instructions, 20)
    assert KEY not in logs + everything_written(output)
    assert os.path.exists(output / "stats.json")

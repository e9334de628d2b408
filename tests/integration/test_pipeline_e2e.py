"""End to end: the quick-start pipeline as Ray jobs on a ``ray start --head`` node, offline and on CPU.

One run covers the issue's acceptance test: the offline teacher, generate -> train -> serve submitted as
jobs, a Ray Train worker killed mid-training (the job recovers from its checkpoint), a request answered
by the served model, and a rerun that submits nothing for the finished stages.
"""

from __future__ import annotations

import json
import subprocess
import sys

import openai
import pytest
import yaml

from tests.conftest import REPO_ROOT, run_cli
from tests.support.pipeline_e2e import (
    delete_serve_app,
    job_client,
    kill_a_train_worker,
    quickstart_for_test,
    wait_for_checkpoint,
)

pytestmark = [pytest.mark.job, pytest.mark.ray]


def pipeline_jobs(head) -> list[str]:
    jobs = job_client(head).list_jobs()
    return sorted(j.submission_id for j in jobs if (j.submission_id or "").startswith("alpaca-ray-"))


def test_quickstart_pipeline_survives_a_killed_worker_serves_and_resumes(ray_head, tiny_model_dir, tmp_path):
    # ~30 short steps with a checkpoint every 3 leave time, even on a fast machine, to kill a worker after
    # the first checkpoint and before the end.
    config_path, config = quickstart_for_test(tmp_path, tiny_model_dir, epochs=3, global_batch_size=4,
                                              checkpoint_every=3, max_failures=2)
    run_dir = tmp_path / "run"
    log_path = tmp_path / "pipeline.log"
    command = [sys.executable, "-m", "alpaca_ray.cli", "pipeline", "--config", str(config_path),
               "--address", ray_head.dashboard_url]
    jobs_before = pipeline_jobs(ray_head)
    try:
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                       env=ray_head.env())
        try:
            wait_for_checkpoint(run_dir, process, timeout=200)
            killed_pid = kill_a_train_worker(ray_head)
            returncode = process.wait(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
        output = log_path.read_text()
        assert returncode == 0, output[-5000:]

        state = json.loads((run_dir / "pipeline_state.json").read_text())
        assert [state["stages"][s]["status"] for s in ("generate", "train", "serve")] == ["succeeded"] * 3
        jobs = pipeline_jobs(ray_head)
        submitted = sorted(set(jobs) - set(jobs_before))
        # The pipeline's own driver ran as a job on the cluster, and submitted one job per stage.
        assert [j.split("-")[2] for j in submitted] == ["generate", "pipeline", "serve", "train"]
        assert len(json.loads((run_dir / "generate" / "data.json").read_text())) == 40

        # The train job lost a worker, restored the latest checkpoint and still finished.
        train_logs = job_client(ray_head).get_job_logs(state["stages"]["train"]["job_id"])
        assert "resumed from checkpoint at step" in train_logs, f"worker {killed_pid} killed; logs:\n{train_logs[-3000:]}"
        steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
                 if '"loss"' in line]
        assert steps == sorted(set(steps)) and steps[-1] == max(steps)  # each step once, in order
        assert (run_dir / "train" / "final" / "model.safetensors").exists()

        # The served model answers the OpenAI client.
        url = state["stages"]["serve"]["url"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=2, timeout=120)
        (model,) = [m.id for m in client.models.list()]
        answer = client.completions.create(model=model, prompt="Give three tips for staying healthy.", max_tokens=8)
        assert isinstance(answer.choices[0].text, str) and answer.usage.completion_tokens >= 1
        assert f"served model {model!r} at {url}/v1" in output

        # A rerun finds every stage finished (and the app still up) and submits no job.
        rerun = run_cli(["pipeline", "--config", str(config_path), "--address", ray_head.dashboard_url],
                        env=ray_head.env(), timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        for stage in ("generate", "train", "serve"):
            assert f"{stage}: already finished" in rerun.stdout
        rerun_jobs = sorted(set(pipeline_jobs(ray_head)) - set(jobs))
        assert [j.split("-")[2] for j in rerun_jobs] == ["pipeline"]  # only the driver: no stage job
    finally:
        delete_serve_app(ray_head, config["serve"]["app_name"])


def test_a_failing_stage_stops_the_pipeline_with_the_jobs_error(ray_head, tiny_model_dir, tmp_path):
    config_path, config = quickstart_for_test(tmp_path, tiny_model_dir)
    bad_seeds = tmp_path / "seed_tasks.jsonl"
    bad_seeds.write_text('{"id": "s1", "name": "x", "instruction": "Say hi.", "instances": [], '
                         '"is_classification": false}\n{"id": "s2", "name": \n')
    config["generate"]["seed_tasks"] = str(bad_seeds)
    config_path.write_text(yaml.safe_dump(config))
    jobs_before = pipeline_jobs(ray_head)
    result = run_cli(["pipeline", "--config", str(config_path), "--address", ray_head.dashboard_url],
                     env=ray_head.env(), timeout=300)
    assert result.returncode == 2, result.stdout[-3000:]
    assert f"error: stage 'generate' failed: {bad_seeds}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "Running entrypoint for job alpaca-ray-generate" in result.stdout  # the job's logs were streamed
    submitted = sorted(set(pipeline_jobs(ray_head)) - set(jobs_before))
    assert [j.split("-")[2] for j in submitted] == ["generate", "pipeline"]  # nothing after the failed stage
    state = json.loads((tmp_path / "run" / "pipeline_state.json").read_text())
    assert state["stages"]["generate"]["status"] == "failed" and "train" not in state["stages"]

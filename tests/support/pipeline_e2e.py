"""Helpers for the pipeline's end-to-end test: a quick-start config for tests, and fault injection."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.support.ray_head import REPO_ROOT, RayHead, free_port


def quickstart_for_test(tmp_path: Path, tiny_model_dir: Path, **train_overrides) -> tuple[Path, dict]:
    """configs/quickstart.yaml shrunk for CI: 40 instructions, tiny lengths, a free port, its own route."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    config["output"] = str(tmp_path / "run")
    config["teacher"]["replay"] = str(REPO_ROOT / config["teacher"]["replay"])
    config["generate"].update(target=40)
    config["train"].update(base_model=str(tiny_model_dir), max_length=128, **train_overrides)
    # Other tests may share this cluster's Serve proxy: an app name and route of our own.
    config["serve"].update(port=free_port(), app_name="pipeline-e2e", route_prefix="/pipeline-e2e",
                           ready_timeout_s=180)
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, timeout: float) -> None:
    """Poll until Ray Train has registered a checkpoint of the train stage (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    pattern = str(run_dir / "train" / "ray_results" / "*" / "checkpoint_manager_snapshot.json")
    while not glob.glob(pattern):
        if process.poll() is not None:
            raise AssertionError(f"the pipeline exited ({process.returncode}) before train saved a checkpoint")
        if time.monotonic() > deadline:
            raise AssertionError(f"no train checkpoint within {timeout}s ({pattern})")
        time.sleep(0.1)


def auth_headers(head: RayHead) -> dict[str, str]:
    """The head's own token, for SDK clients in this process (subprocesses get it through ``head.env()``)."""
    token = getattr(head, "auth_token", "")
    return {"Authorization": f"Bearer {token}"} if token else {}


def job_client(head: RayHead):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=auth_headers(head))


def kill_a_train_worker(head: RayHead, timeout: float = 30) -> int:
    """SIGKILL one live Ray Train worker process of the cluster; return its PID."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(address=head.dashboard_url, headers=auth_headers(head))
    options = ListApiOptions(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    deadline = time.monotonic() + timeout
    while True:
        workers = client.list(StateResource.ACTORS, options=options, raise_on_missing_output=False)
        pids = [w.pid for w in workers if w.pid]
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            return pids[-1]
        if time.monotonic() > deadline:
            raise AssertionError("found no live RayTrainWorker to kill")
        time.sleep(0.2)


def delete_serve_app(head: RayHead, app_name: str) -> None:
    """Remove the test's app from the shared cluster (a subprocess: this process may be on another cluster)."""
    code = ("import ray; from ray import serve; "
            f"ray.init(address={head.gcs_address!r}, log_to_driver=False); serve.delete({app_name!r})")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120, cwd=REPO_ROOT, env=head.env())

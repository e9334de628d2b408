"""A Ray head node for job-submission tests: ``ray start --head --block`` on free ports.

``--block`` keeps the head in the foreground, so stopping *this* process stops only this cluster
(``ray stop`` would stop every Ray cluster on the machine, other test sessions' included). The head
uses token authentication (Ray 2.60's default once a token exists), so clients get ``RAY_AUTH_MODE=token``.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    process: subprocess.Popen
    dashboard_url: str
    gcs_address: str
    log_path: Path
    auth_token: str

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for ``ray job submit`` against this head."""
        return {**os.environ, "RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.auth_token, **extra}

    def submit(self, entrypoint: list[str], timeout: float = 600, env_vars: dict[str, str] | None = None,
               working_dir: str | Path = REPO_ROOT) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir DIR -- ENTRYPOINT``: waits for the job and returns its output."""
        runtime_env = {"excludes": [".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache"]}
        if env_vars:
            runtime_env["env_vars"] = env_vars
        command = ["ray", "job", "submit", "--address", self.dashboard_url, "--working-dir", str(working_dir),
                   "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=self.env())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                _kill_group(self.process)


def _kill_group(process: subprocess.Popen) -> None:
    """Kill the head and every process it started (they share its session)."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_ray_head(workdir: Path, num_cpus: int = 8, ready_timeout: float = 120) -> RayHead:
    gcs_port, dashboard_port = free_port(), free_port()
    log_path = workdir / "ray-head.log"
    # Its own temp dir: Ray points jobs at the cluster named in <temp dir>/ray_current_cluster, and
    # /tmp/ray is shared with any other cluster on the machine. Kept short for Unix socket paths.
    temp_dir = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               f"--port={gcs_port}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
               f"--num-cpus={num_cpus}", "--include-dashboard=true", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    # A token of this head's own, so it neither needs nor touches ~/.ray/auth_token.
    auth_token = secrets.token_hex(32)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token,
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}  # tests need no drain on shutdown
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    dashboard_url = f"http://127.0.0.1:{dashboard_port}"
    deadline = time.monotonic() + ready_timeout
    while True:  # poll until the job API answers (a readiness check, bounded in time)
        if process.poll() is not None:
            raise RuntimeError(f"ray start --head exited early:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{dashboard_url}/api/version", timeout=2):
                break
        except urllib.error.HTTPError:
            break  # the job API answers (401 without a token): it is up
        except OSError:
            pass
        if time.monotonic() > deadline:
            _kill_group(process)
            raise RuntimeError(f"Ray head not ready in {ready_timeout}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return RayHead(process, dashboard_url, f"127.0.0.1:{gcs_port}", log_path, auth_token)

"""Run the stages as Ray jobs, one after another, resuming from the first unfinished one.

Each stage is ``python jobs/<stage>.py <flags>`` submitted with :class:`JobSubmissionClient` and the
repository as its working directory. The runner waits for it while streaming its logs, stops at the
first failure with the job's error, and records each finished stage in ``ROOT/pipeline_state.json``;
a rerun skips the stages recorded there (unless their section changed, or the served app is gone).
Everything but :class:`PipelineRunner` and :func:`local_cluster` is plain code, tested without Ray.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shlex
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from alpaca_ray.cluster import storage
from alpaca_ray.cluster.services import deployed_app_url
from alpaca_ray.config import UserError, config_from_dict, config_to_argv
from alpaca_ray.pipeline.config import (
    INPUT_PATH_FIELDS,
    STAGES,
    TEACHER_APP,
    TEACHER_PATH_FIELDS,
    TEACHER_URL,
    PipelineConfig,
    StageSpec,
    TeacherSection,
    app_host,
    fingerprint,
    load_config_class,
    served_base_url,
)

STATE_VERSION = 1

#: Never uploaded with a job: caches, VCS data and run outputs (which can be gigabytes of checkpoints).
JOB_EXCLUDES = [".git", "**/__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", "runs/", "out/",
                "benchmarks/_work/", "**/*.safetensors", "**/*.pt", "**/*.bin"]

#: The placeholder key given to generate when it talks to the offline teacher (which accepts any key).
OFFLINE_TEACHER_KEY = "offline-teacher-needs-no-key"


class PipelineError(UserError):
    """A stage failed; the message names the stage, the job and its error."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


# --- plain functions (unit-tested without Ray) ------------------------------------------------------


def find_repo_root() -> Path:
    """The directory holding ``alpaca_ray/`` and ``jobs/``: what each job gets as its working directory."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "jobs").is_dir() and (candidate / "alpaca_ray").is_dir():
            return candidate
    raise UserError("cannot find the alpaca-ray repository (a directory with alpaca_ray/ and jobs/): run the "
                    "pipeline from a checkout, installed with `pip install -e .`")


def stage_argv(spec: StageSpec, extra: dict | None = None) -> list[str]:
    """The stage's CLI flags: its wired section plus run-time values (the teacher's URL...)."""
    values = {**spec.values, **(extra or {})}
    return config_to_argv(values, spec.config_class)


def stage_entrypoint(stage: str, argv: list[str]) -> str:
    """The job's shell command, run in the uploaded copy of the repository."""
    return shlex.join(["python", f"jobs/{stage}.py", *argv])


def job_runtime_env(repo_root: Path, output_root: str, env_vars: dict[str, str] | None = None) -> dict:
    """The repository as the job's working directory, minus caches and any run output kept inside it."""
    excludes = list(JOB_EXCLUDES)
    if not storage.is_remote(output_root):
        try:
            inside = Path(output_root).resolve().relative_to(repo_root.resolve())
            excludes.append(inside.as_posix() + "/")
        except ValueError:
            pass  # the output root is outside the repository: nothing to leave out
    runtime_env: dict[str, Any] = {"working_dir": str(repo_root), "excludes": excludes}
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    return runtime_env


def travels_with_job(relative_path: str) -> bool:
    """Whether a path relative to the repository is uploaded with each job (not left out as run output)."""
    import fnmatch

    parts = Path(relative_path).parts
    if not parts or parts[0] == "..":
        return False
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in JOB_EXCLUDES:
        pattern = pattern.rstrip("/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.removeprefix("**/")) for p in prefixes):
            return False
    return True


def portable_config(config: PipelineConfig, repo_root: Path, base_dir: str | None = None) -> PipelineConfig:
    """The config as a driver on a remote cluster must see it; refuses what only exists on this machine.

    The root must be absolute (a path the cluster's nodes mount) or a URI: it is resolved on the cluster,
    not here. A relative input that exists here travels with the job when it lies inside the repository
    (it is rewritten relative to the repository, the job's working directory); anything else relative
    that exists only here is refused, naming the field. Absolute paths and hub names pass unchanged:
    they are the cluster's to resolve, and the preflight and stages check them there.
    """
    base = Path(base_dir or os.getcwd())
    problems = []
    if not storage.is_remote(config.output) and not os.path.isabs(config.output):
        problems.append(f"output: {config.output} is relative; with --address the root is on the cluster: give "
                        "a path every node mounts (e.g. /mnt/cluster_storage/NAME) or an s3:// / gs:// URI")

    def portable(field: str, path):
        if not isinstance(path, str) or not path or storage.is_remote(path) or os.path.isabs(path):
            return path
        here = (base / storage.local_path(path)).resolve()
        if not here.exists():
            return path  # a hub name, or a path that means something only on the cluster
        try:
            inside = here.relative_to(repo_root.resolve()).as_posix()
        except ValueError:
            inside = None
        if inside is not None and travels_with_job(inside):
            return inside
        problems.append(f"{field}: {path} exists only on this machine (outside what the job uploads from "
                        f"{repo_root}); put it under the storage root, or give a path or URI the cluster sees")
        return path

    changes: dict = {}
    for stage in STAGES:
        section = getattr(config, stage)
        if isinstance(section, dict):
            section = {k.replace("-", "_"): v for k, v in section.items()}
            changes[stage] = {k: portable(f"{stage}.{k}", v) if k in INPUT_PATH_FIELDS[stage] else v
                              for k, v in section.items()}
    if isinstance(config.teacher, dict):
        changes["teacher"] = {k: portable(f"teacher.{k}", v) if k in TEACHER_PATH_FIELDS else v
                              for k, v in config.teacher.items()}
    if problems:
        raise UserError("the config names files the cluster cannot see:\n  - " + "\n  - ".join(problems))
    return dataclasses.replace(config, **changes)


def new_state() -> dict:
    return {"version": STATE_VERSION, "stages": {}}


def read_state(path: str) -> dict:
    """The recorded progress of a run (an empty one when there is none yet)."""
    if not storage.exists(path):
        return new_state()
    with storage.open_text(path) as handle:
        try:
            state = json.load(handle)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err.msg}, line {err.lineno}); delete it to start the run "
                            "over (finished stages' outputs are kept and resumed by each stage)") from None
    if not isinstance(state, dict) or not isinstance(state.get("stages"), dict):
        raise UserError(f"{path}: field 'stages' is missing; delete the file to start the run over")
    return state


def write_state(path: str, state: dict) -> None:
    """Write the state file; locally through a temporary file, so a crash never leaves half a file."""
    text = json.dumps(state, indent=2, sort_keys=True) + "\n"
    if storage.is_remote(path):
        with storage.open_text(path, "w") as handle:
            handle.write(text)
        return
    path = storage.local_path(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def record_finished(state: dict, spec: StageSpec, job_id: str, wall_s: float, **extra: Any) -> dict:
    state["stages"][spec.name] = {"status": "succeeded", "job_id": job_id, "fingerprint": spec.fingerprint,
                                  "finished_at": time.time(), "wall_s": round(wall_s, 1), **extra}
    return state


def plan_stages(specs: list[StageSpec], state: dict, from_stage: str | None = None,
                is_alive: Callable[[str, dict], bool] | None = None) -> tuple[list[str], list[StageSpec], dict]:
    """Split the run into the finished stages to skip and the ones to run, from the first unfinished one on.

    A stage counts as finished when the state records it succeeded with the same section (fingerprint),
    and, for a stage that leaves something running (serve), when ``is_alive`` says it still is.
    Returns (skipped names, specs to run, why the first one runs).
    """
    for index, spec in enumerate(specs):
        record = state.get("stages", {}).get(spec.name)
        if spec.name == from_stage:
            reason = "asked to start here"
        elif not record or record.get("status") != "succeeded":
            reason = "not finished yet"
        elif record.get("fingerprint") != spec.fingerprint:
            reason = "its section changed since it finished"
        elif is_alive is not None and not is_alive(spec.name, record):
            reason = "what it started is no longer running"
        else:
            continue
        return [s.name for s in specs[:index]], specs[index:], {"stage": spec.name, "reason": reason}
    return [s.name for s in specs], [], {}


def resumes_attempt(spec: StageSpec, state: dict) -> bool:
    """Whether to pass ``--resume``: an earlier attempt of this very section started and did not finish.

    Train refuses to overwrite its checkpoints without ``--resume``; generate resumes either way. A
    section changed since that attempt starts over (and the stage says so if that needs a clean output).
    """
    record = state.get("stages", {}).get(spec.name) or {}
    has_field = "resume" in getattr(spec.config_class, "__dataclass_fields__", {})
    return (has_field and spec.name in ("generate", "train") and "resume" not in spec.values
            and record.get("status") not in (None, "succeeded") and record.get("fingerprint") == spec.fingerprint)


#: Stages whose output holds a run they refuse to overwrite (train's checkpoints): rerun without --resume
#: (``--from-stage``, a changed section), the earlier run is moved aside and the stage starts afresh.
FRESH_RUN_STAGES = ("train",)


def set_aside_earlier_run(spec: StageSpec, resuming: bool, say: Callable[[str], None]) -> str | None:
    """Move ``spec``'s output directory aside (to ``OUTPUT.previous-TIME``) when it holds an earlier run
    that this submission does not resume; returns where it went, None when there was nothing to move."""
    output = str(spec.values.get("output") or "")
    if spec.name not in FRESH_RUN_STAGES or resuming or spec.values.get("resume") or not output:
        return None
    if storage.is_remote(output):
        if storage.exists(output) and storage.listdir(output):
            raise UserError(f"{spec.name}.output {output} holds an earlier run, which cannot be moved aside on "
                            "object storage: delete it, or set another output, to rerun the stage")
        return None
    local = storage.local_path(output).rstrip("/")
    if not os.path.isdir(local) or not os.listdir(local):
        return None
    aside = f"{local}.previous-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(local, aside)
    say(f"{spec.name}: the earlier run in {local} was moved aside to {aside}; {spec.name} starts afresh")
    return aside


def submit_time_values(spec: StageSpec, specs: list[StageSpec], state: dict, serve_url: str) -> dict:
    """Flags known only when the stage is submitted: ``--resume`` for an unfinished attempt, and for
    evaluate, model A = the model this run served (its name, and its URL as recorded when deployed)."""
    values: dict = {}
    if resumes_attempt(spec, state):
        values["resume"] = True
    serve = next((s for s in specs if s.name == "serve"), None)
    if spec.name == "evaluate" and serve is not None and not spec.values.get("model_a") \
            and spec.values.get("model_a_base_url") == served_base_url(serve.values) + "/v1":
        values["model_a"] = served_model_id(serve.values, serve.config_class)
        values["model_a_base_url"] = serve_url + "/v1"
    return values


def error_summary(logs: str, message: str = "") -> str:
    """The most useful line of a failed job: the stage's ``error: ...`` line, else the last exception line."""
    lines = [line.strip() for line in logs.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error: "):
            return line[len("error: "):]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt")) and " " not in head:
            return line
    return (message or "").strip().splitlines()[0] if (message or "").strip() else "no error message"


def served_model_id(serve_values: dict, serve_class: type | None) -> str:
    """The model name the serve stage answers to (what evaluate asks for as model A)."""
    if serve_class is not None and hasattr(serve_class, "model_id"):
        return config_from_dict(serve_class, serve_values).model_id
    if serve_values.get("served_model_name"):
        return serve_values["served_model_name"]
    path = str(serve_values.get("model", "")).rstrip("/")
    name = os.path.basename(path)
    return os.path.basename(os.path.dirname(path)) if name == "final" else name


def http_answers(url: str, timeout: float = 5.0) -> bool:
    """True when something answers ``url`` as an OpenAI endpoint would (200, or 401/403 behind a key)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status == 200
    except urllib.error.HTTPError as err:
        return err.code in (401, 403)
    except (OSError, ValueError):
        return False


def cluster_ip(address: str) -> str:
    """The address workers on every node reach apps on the cluster at.

    In a driver connected to the cluster (the pipeline's own job, on the head): this node's cluster IP,
    never loopback, which only the head itself would reach. Otherwise the host of ``address``.
    """
    import ray

    if ray.is_initialized():
        from alpaca_ray.cluster.ray_cluster import this_node_address

        return this_node_address()
    return cluster_host(address)


def pipeline_needs(to_run: list[StageSpec], config: PipelineConfig) -> list:
    """The environment variables the stages to run need, less the keys of the run's own teacher."""
    from alpaca_ray.cluster.preflight import stage_needs

    needs = []
    for spec in to_run:
        teacher_keys = []
        if config.teacher is not None and spec.name == "generate":
            teacher_keys.append(spec.values.get("api_key_env", "OPENAI_API_KEY"))
        if config.teacher is not None and spec.values.get("judge_base_url") == TEACHER_URL:
            teacher_keys.append(spec.values.get("judge_api_key_env", "OPENAI_API_KEY"))
        needs += [n for n in stage_needs(spec.name, spec.values, teacher_keys) if n not in needs]
    return needs


def unreachable_apps(to_run: list[StageSpec], config: PipelineConfig, specs: list[StageSpec]) -> list[str]:
    """Apps that workers on other nodes must call but that bind only the head's loopback."""
    problems = []
    serve = next((s.values for s in specs if s.name == "serve"), {})
    evaluate = next((s for s in to_run if s.name == "evaluate"), None)
    host = serve.get("host") or "127.0.0.1"
    loopback = host.startswith("127.") or host in ("::1", "localhost")
    if evaluate is not None and loopback and not evaluate.values.get("model_a_answers") \
            and evaluate.values.get("model_a_base_url") == served_base_url(serve) + "/v1":
        problems.append(f"serve.host: {host} binds only the head's loopback, but "
                        "evaluate's workers on other nodes call the served model: set serve.host: 0.0.0.0 "
                        "(with api_key_env to require a key)")
    if config.teacher and config.teacher.get("model") and loopback:
        problems.append(f"serve.host: {host} binds only the head's loopback, but "
                        "generate's workers on other nodes call the teacher deployed on that proxy: set "
                        "serve.host: 0.0.0.0")
    return problems


def stage_uses_teacher(spec: StageSpec) -> bool:
    """Whether the stage talks to the run's teacher: generate always, evaluate when a URL says ``teacher``."""
    return spec.name == "generate" or TEACHER_URL in (spec.values.get("model_b_base_url"),
                                                      spec.values.get("judge_base_url"))


def cluster_host(address: str) -> str:
    """The host clients use for apps on the cluster: the address's host, or loopback for a local one."""
    host = urlparse(address if "://" in address else f"http://{address}").hostname or "127.0.0.1"
    return "127.0.0.1" if host in ("localhost", "0.0.0.0") else host


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- the Ray part -------------------------------------------------------------------------------------


@contextmanager
def local_cluster(num_cpus: int | None = None, ready_timeout: float = 180) -> Iterator[tuple[str, dict]]:
    """Start a private local Ray cluster (``ray start --head --block``); yield its job API URL and auth headers.

    Private in three ways. Its own temp dir: a job's driver finds its cluster through
    ``TEMP_DIR/ray_current_cluster``, which under the shared default ``/tmp/ray`` names whichever cluster
    on the machine started last. Its own auth token (Ray's token authentication, passed to its processes
    through the environment), so it neither needs nor touches ``~/.ray/auth_token``. And ``--block`` keeps
    the head in the foreground, so stopping that one process stops just this cluster.
    """
    import secrets
    import signal
    import subprocess
    import tempfile

    num_cpus = num_cpus or max(os.cpu_count() or 1, 8)  # logical CPUs: train workers + Data tasks + Serve
    temp_dir = tempfile.mkdtemp(prefix="alpaca-ray-")  # short: Ray's socket paths live under it
    dashboard_port = free_port()
    command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--block", f"--temp-dir={temp_dir}",
               f"--port={free_port()}", f"--dashboard-port={dashboard_port}", "--dashboard-host=127.0.0.1",
               "--include-dashboard=true", f"--num-cpus={num_cpus}", "--disable-usage-stats",
               f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
               f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]
    log_path = os.path.join(temp_dir, "ray-head.log")
    token = secrets.token_hex(32)
    # No graceful drain on shutdown: the run is over and its served app is meant to go with the cluster.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{dashboard_port}"
    print(f"[pipeline] starting a local Ray cluster ({num_cpus} logical CPUs; dashboard {url})", flush=True)
    clean_exit = False
    try:
        deadline = time.monotonic() + ready_timeout
        while not http_answers(f"{url}/api/version", timeout=2):  # readiness: the job API answers
            if process.poll() is not None or time.monotonic() > deadline:
                with open(log_path) as log:
                    raise UserError(f"the local Ray cluster did not start:\n{log.read()[-2000:]}")
            time.sleep(0.5)
        yield url, {"Authorization": f"Bearer {token}"}
        clean_exit = True
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
        if clean_exit:
            shutil.rmtree(temp_dir, ignore_errors=True)
        else:  # keep the cluster's logs for a post-mortem
            print(f"[pipeline] the local cluster's logs are in {temp_dir}", file=sys.stderr, flush=True)


def submit_job(client, timeout: float = 120, **kwargs: Any) -> str:
    """``client.submit_job(**kwargs)``, retried while a just-started cluster's job agent is not up yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.submit_job(**kwargs)
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(1.0)


def dashboard_address(address: str) -> str:
    """The job API's URL: ``address`` itself when it is one, else the dashboard of the cluster at ``address``.

    ``--address`` is normally the dashboard URL (``http://HEAD:8265``); inside a Ray job ``RAY_ADDRESS`` is
    the cluster's GCS address instead, whose dashboard the cluster itself knows.
    """
    if address.startswith(("http://", "https://")):
        return address
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    url = ray._private.worker.global_worker.node.address_info.get("webui_url") or ""
    if not url:
        raise UserError(f"the Ray cluster at {address} has no dashboard (job API); start it with the dashboard")
    return url if "://" in url else f"http://{url}"


def use_token_auth_if_available() -> None:
    """Send the cluster's auth token when this machine has one, as ``ray.init`` does for existing clusters.

    A head started with ``ray start`` uses token authentication once ``~/.ray/auth_token`` exists; the job
    client authenticates only in token mode, which ``RAY_AUTH_MODE`` (if set) decides instead.
    """
    try:  # a private helper of Ray 2.60, the one ray.init uses; without it, RAY_AUTH_MODE=token does the same
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def job_client(address: str, headers: dict[str, str] | None = None):
    """A ``JobSubmissionClient`` for the cluster at ``address``, or a :class:`UserError` saying it is not up."""
    from ray.job_submission import JobSubmissionClient

    if not headers:
        use_token_auth_if_available()
    try:
        return JobSubmissionClient(address, headers=headers or None)
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise UserError(f"cannot reach the Ray job API at {address}: {err}".splitlines()[0]
                        + "; is the cluster up (ray up cluster.yaml / ray start --head)?") from None


class PipelineRunner:
    """Submit the planned stages to a cluster's job API and follow them to the end."""

    def __init__(self, config: PipelineConfig, specs: list[StageSpec], address: str,
                 headers: dict[str, str] | None = None, write: Callable[[str], Any] | None = None,
                 repo_root: Path | None = None):
        self.config, self.specs, self.address, self.headers = config, specs, address, dict(headers or {})
        self.client = job_client(address, self.headers)
        self.write = write or (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
        self.repo_root = repo_root or find_repo_root()
        self.cluster_ip = cluster_ip(address)
        self.state = read_state(config.state_path)
        self.submitted: list[str] = []
        self.teacher: tuple[str, str, Any] | None = None

    def say(self, line: str) -> None:
        self.write(f"[pipeline] {line}\n")

    def preflight(self, from_stage: str | None = None) -> None:
        """Before anything is submitted or paid for: every node sees the root and has what the stages need."""
        from alpaca_ray.cluster.preflight import PreflightError, alive_node_count, finish, run_preflight

        _, to_run, _ = plan_stages(self.specs, self.state, from_stage, self.is_alive)
        needs = pipeline_needs(to_run, self.config)
        loopback = unreachable_apps(to_run, self.config, self.specs) if alive_node_count() > 1 else []
        if loopback:
            raise PreflightError("preflight: on a cluster of several nodes:\n  - " + "\n  - ".join(loopback))
        finish(run_preflight(self.config.output, needs, say=self.say))

    def serve_url(self) -> str:
        """Where the served model answers: as recorded when it was deployed, else as configured."""
        record = self.state["stages"].get("serve") or {}
        return record.get("url") or served_base_url(self._values("serve"), self.cluster_ip)

    def _values(self, stage: str) -> dict:
        return next((s.values for s in self.specs if s.name == stage), {})

    def is_alive(self, stage: str, record: dict) -> bool:
        if stage != "serve":
            return True
        return http_answers((record.get("url") or self.serve_url()) + "/v1/models")

    def run(self, from_stage: str | None = None) -> list[str]:
        """Run every unfinished stage; return the names of the stages run. Raises :class:`PipelineError`."""
        skipped, to_run, why = plan_stages(self.specs, self.state, from_stage, self.is_alive)
        for name in skipped:
            job = self.state["stages"][name].get("job_id")
            self.say(f"{name}: already finished (job {job}), skipping")
        if not to_run:
            self.say("every stage is finished; nothing to run (--from-stage STAGE runs from STAGE again)")
            return []
        self.say(f"running {', '.join(s.name for s in to_run)} on {self.address} "
                 f"(starting at {why['stage']}: {why['reason']})")
        try:
            for spec in to_run:
                extra, env_vars = {}, {}
                if stage_uses_teacher(spec) and self.config.teacher is not None:
                    url = self.teacher_url()
                    if spec.name == "generate":
                        extra["teacher_base_url"] = url
                        key_env = spec.values.get("api_key_env") or getattr(spec.config_class, "api_key_env",
                                                                            "OPENAI_API_KEY")
                        env_vars[key_env or "OPENAI_API_KEY"] = OFFLINE_TEACHER_KEY  # the run's teacher takes any key
                    else:
                        extra.update({name: url for name in ("model_b_base_url", "judge_base_url")
                                      if spec.values.get(name) == TEACHER_URL})
                        if spec.values.get("judge_base_url") == TEACHER_URL:  # the run's teacher takes any key
                            env_vars[spec.values.get("judge_api_key_env") or "OPENAI_API_KEY"] = OFFLINE_TEACHER_KEY
                else:
                    self.stop_teacher()  # before train: its GPUs are for training
                extra.update(submit_time_values(spec, self.specs, self.state, self.serve_url()))
                set_aside_earlier_run(spec, resuming=bool(extra.get("resume")), say=self.say)
                self._run_stage(spec, extra, env_vars)
        finally:
            self.stop_teacher()
        return [s.name for s in to_run]

    def teacher_url(self) -> str:
        """Deploy the run's teacher on the cluster (once); its base URL, reachable from every node."""
        if self.teacher is not None:
            return self.teacher[1]
        section = config_from_dict(TeacherSection, self.config.teacher, source="teacher")
        if section.replay:
            from alpaca_ray.teacher import read_replay
            from alpaca_ray.teacher.service import start_replay_service

            responses = read_replay(section.replay)
            actor, url = start_replay_service(responses, section.names or None)
            self.teacher = ("replay", url, actor)
            self.say(f"offline teacher: replaying {len(responses)} recorded responses from {section.replay} "
                     f"at {url} (a cluster service)")
            return url
        serve_values = self._values("serve")
        teacher_model = self._values("generate").get("teacher_model") or "teacher"
        values = section.serve_values(serve_values, teacher_model)
        spec = StageSpec("serve", values, load_config_class("serve"), fingerprint(values))
        self.say(f"teacher: deploying {section.model} with the serve stage's app as {TEACHER_APP!r}")
        self._submit_and_wait(spec, {}, {}, "teacher", "teacher")
        base = deployed_app_url(self.address, TEACHER_APP, app_host(values, self.cluster_ip), self.headers) or \
            served_base_url(values, self.cluster_ip)
        self.teacher = ("serve", base + "/v1", None)
        self.say(f"teacher: {teacher_model!r} answers at {base}/v1")
        return base + "/v1"

    def stop_teacher(self) -> None:
        """Remove the run's teacher (the replay actor, or the teacher's Serve app)."""
        if self.teacher is None:
            return
        kind, _url, actor = self.teacher
        self.teacher = None
        if kind == "replay":
            from alpaca_ray.teacher.service import stop_replay_service

            self.say(f"offline teacher stopped after {stop_replay_service(actor)} requests")
        else:
            from ray import serve

            serve.delete(TEACHER_APP)
            self.say(f"teacher app {TEACHER_APP!r} removed")

    def _submit_and_wait(self, spec: StageSpec, extra: dict, env_vars: dict[str, str], name: str, label: str,
                         on_submitted: Callable[[str], None] | None = None) -> tuple[str, float]:
        """Submit ``spec`` as the job ``name`` and follow it; returns (job id, seconds).

        ``name`` is what the job id and an error call it (a stage, or ``teacher``); ``label`` prefixes its
        log lines. Raises :class:`PipelineError`.
        """
        from ray.job_submission import JobStatus

        entrypoint = stage_entrypoint(spec.name, stage_argv(spec, extra))
        job_id = f"alpaca-ray-{name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.say(f"{label}: submitting job {job_id}\n[pipeline]   {entrypoint}")
        started = time.monotonic()
        submit_job(self.client, entrypoint=entrypoint, submission_id=job_id,
                   runtime_env=job_runtime_env(self.repo_root, self.config.output, env_vars))
        self.submitted.append(job_id)
        if on_submitted:
            on_submitted(job_id)
        try:
            status = follow_job(self.client, job_id, self.write)
        except KeyboardInterrupt:
            self.say(f"interrupted: stopping job {job_id}; rerun to resume from {name}")
            self.client.stop_job(job_id)
            raise
        wall_s = time.monotonic() - started
        if status != JobStatus.SUCCEEDED:
            info = self.client.get_job_info(job_id)
            logs = self.client.get_job_logs(job_id)
            raise PipelineError(
                f"stage '{name}' failed: {error_summary(logs, info.message or '')}\n"
                f"  job {job_id} ended {status.value} after {wall_s:.0f}s ({info.error_type or 'no error type'}); "
                f"full logs: ray job logs --address {self.address} {job_id}\n"
                f"  fix the cause and rerun the same command: finished stages are skipped", status=status.value)
        return job_id, wall_s

    def _run_stage(self, spec: StageSpec, extra: dict, env_vars: dict[str, str]) -> None:
        names = [s.name for s in self.specs]
        position = f"[{names.index(spec.name) + 1}/{len(names)}]"

        def running(job_id: str) -> None:
            self.state["stages"][spec.name] = {"status": "running", "job_id": job_id,
                                               "fingerprint": spec.fingerprint, "started_at": time.time()}
            write_state(self.config.state_path, self.state)

        try:
            job_id, wall_s = self._submit_and_wait(spec, extra, env_vars, spec.name, f"{position} {spec.name}",
                                                   running)
        except PipelineError as err:
            self.state["stages"][spec.name]["status"] = (err.status or "failed").lower()
            write_state(self.config.state_path, self.state)
            raise
        extra_record = {}
        if spec.name == "serve":
            configured = served_base_url(spec.values, self.cluster_ip)
            app_name = spec.values.get("app_name") or getattr(spec.config_class, "app_name", "alpaca-ray")
            host = app_host(spec.values, self.cluster_ip)
            extra_record["url"] = deployed_app_url(self.address, app_name, host, self.headers) or configured
        record_finished(self.state, spec, job_id, wall_s, **extra_record)
        write_state(self.config.state_path, self.state)
        self.say(f"{position} {spec.name}: finished in {wall_s:.0f}s")


def follow_job(client, job_id: str, write: Callable[[str], Any]):
    """Stream a job's logs until it ends; return its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    try:
        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001 - log streaming is a convenience; the status below decides
        write(f"[pipeline] (log stream ended: {err}; waiting for the job)\n")
    deadline = time.monotonic() + 24 * 3600
    while True:  # the stream can end a moment before the status turns terminal
        status = client.get_job_status(job_id)
        if status.is_terminal() or time.monotonic() > deadline:
            return status
        time.sleep(1.0)

"""``alpaca-ray pipeline --config FILE``: run every stage as a Ray job from one config file, resumably.

The pipeline's own driver runs on the cluster, as a Ray job, wherever the command is typed: there it
sees the storage root, checks every node (the preflight), deploys the run's teacher where every node can
reach it, and submits each stage as a job of its own. The command itself only submits that driver job,
streams its logs, stops it on Ctrl-C (which stops the running stage), and, for a local cluster it
started, keeps the served model up until Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import signal
import sys
import time
import uuid
from contextlib import nullcontext

from alpaca_ray.cluster.services import wait_for_stop_signal
from alpaca_ray.config import add_config_args, config_from_dict, run_cli
from alpaca_ray.pipeline.config import (
    STAGES,
    PipelineConfig,
    load_pipeline_config,
    resolve_paths,
    served_base_url,
    stage_specs,
)
from alpaca_ray.pipeline.runner import (
    PipelineRunner,
    dashboard_address,
    error_summary,
    find_repo_root,
    follow_job,
    job_client,
    job_runtime_env,
    local_cluster,
    plan_stages,
    portable_config,
    read_state,
    served_model_id,
    stage_argv,
    stage_entrypoint,
    submit_job,
    submit_time_values,
)

#: Set by ``jobs/pipeline.py``: this process is the pipeline's driver on the cluster.
DRIVER_ENV = "ALPACA_RAY_PIPELINE_DRIVER"

EPILOG = """\
The pipeline's driver runs on the cluster as a Ray job (`python jobs/pipeline.py`), so the storage root
need only be visible to the cluster's nodes, not to this machine. Each stage is then submitted as
`python jobs/<stage>.py <flags>`. A rerun skips the stages recorded as finished in
ROOT/pipeline_state.json; --from-stage runs from a stage again. Without --address (or $RAY_ADDRESS) a
local cluster is started for the run and, once the model is served, kept up until Ctrl-C.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpaca-ray pipeline", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="pipeline YAML (configs/*.yaml): output root, a section per stage, "
                                         "optional teacher section")
    source.add_argument("--config-json", help=argparse.SUPPRESS)  # the resolved config, handed to the driver job
    add_config_args(parser, PipelineConfig)
    parser.add_argument("--from-stage", choices=STAGES, help="run from this stage again, even if it finished")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and each job's entrypoint; "
                                                               "submit nothing")
    parser.add_argument("--keep-serving", action=argparse.BooleanOptionalAction, default=True,
                        help="with a local cluster: keep it (and the served model) up until Ctrl-C (default: on)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        overrides = {k: v for k, v in vars(args).items() if k in PipelineConfig.__dataclass_fields__}
        if os.environ.get(DRIVER_ENV):
            return drive_on_cluster(args, overrides)
        config = load_pipeline_config(args.config, overrides)
        specs = stage_specs(config)
        if args.dry_run:
            return dry_run(config, specs, args.from_stage)
        address = config.address or os.environ.get("RAY_ADDRESS", "")
        if address:
            # This machine may not see the root (a laptop): only what travels with the job may be relative.
            config = portable_config(load_pipeline_config(args.config, overrides, resolve=False), find_repo_root())
        cluster = nullcontext((address, {})) if address else local_cluster(config.local_num_cpus)
        with cluster as (address, headers):
            status = submit_driver(config, args.from_stage, dashboard_address(address), headers)
            if status == 0 and not address_given(config) and args.keep_serving and "serve" in config.stage_names:
                print("the local cluster stays up while the model is served; Ctrl-C to stop it", flush=True)
                wait_for_stop_signal()
        return status

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the first unfinished stage", file=sys.stderr)
        return 130


def dry_run(config: PipelineConfig, specs: list, from_stage: str | None) -> int:
    state = read_state(config.state_path)
    skipped, to_run, _ = plan_stages(specs, state, from_stage)
    serve_values = next((s.values for s in specs if s.name == "serve"), {})
    # As PipelineRunner.serve_url: the URL recorded at deployment, else the configured one.
    serve_url = (state["stages"].get("serve") or {}).get("url") or served_base_url(serve_values)
    print(f"pipeline: output {config.output}")
    for name in skipped:
        if name == "serve":  # a real run redeploys it (and reruns what follows) once its app is gone
            print(f"  serve: finished; skipped while its app answers at {serve_url}/v1, else deployed "
                  "again (and the stages after it run again)")
        else:
            print(f"  {name}: finished, would be skipped")
    for spec in to_run:  # with the flags a real run adds at submission (--resume, evaluate's model A)
        argv = stage_argv(spec, submit_time_values(spec, specs, state, serve_url))
        print(f"  {spec.name}: {stage_entrypoint(spec.name, argv)}")
    return 0


def driver_argv(config: PipelineConfig, from_stage: str | None) -> list[str]:
    """The driver job's flags: the whole resolved config as JSON (no file need exist on the cluster)."""
    values = dataclasses.asdict(config)
    values["address"] = ""  # inside the cluster the driver uses the cluster it runs on
    argv = ["--config-json", json.dumps(values, sort_keys=True)]
    return argv + (["--from-stage", from_stage] if from_stage else [])


def submit_driver(config: PipelineConfig, from_stage: str | None, address: str, headers: dict) -> int:
    """Submit the pipeline's driver as a job, stream its logs, stop it on Ctrl-C; returns an exit status."""
    from ray.job_submission import JobStatus

    client = job_client(address, headers)
    job_id = f"alpaca-ray-pipeline-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    entrypoint = shlex.join(["python", "jobs/pipeline.py", *driver_argv(config, from_stage)])
    submit_job(client, entrypoint=entrypoint, submission_id=job_id,
               runtime_env=job_runtime_env(find_repo_root(), config.output))
    print(f"[pipeline] driver job {job_id} on {address} (logs: ray job logs --address {address} -f {job_id})",
          flush=True)
    write = lambda text: (sys.stdout.write(text), sys.stdout.flush())  # noqa: E731
    try:
        status = follow_job(client, job_id, write)
    except KeyboardInterrupt:
        print(f"[pipeline] interrupted: stopping the driver job {job_id} (it stops the running stage)",
              file=sys.stderr, flush=True)
        client.stop_job(job_id)
        follow_job(client, job_id, lambda _text: None)
        raise
    if status == JobStatus.SUCCEEDED:
        return 0
    info = client.get_job_info(job_id)
    summary = error_summary(client.get_job_logs(job_id), info.message or "")
    print(f"error: {summary}\n  pipeline driver job {job_id} ended {status.value}; "
          f"rerun the same command to resume from the first unfinished stage", file=sys.stderr, flush=True)
    return 2  # as a stage's own error: the driver failed on something the user can fix


def drive_on_cluster(args: argparse.Namespace, overrides: dict) -> int:
    """The pipeline's driver, running on the cluster: preflight, teacher, stages, served-model banner."""
    from alpaca_ray.cluster.ray_cluster import ensure_ray

    if args.config_json:
        values = {**json.loads(args.config_json), **{k: v for k, v in overrides.items() if v is not None}}
        # Relative inputs in it travelled with the job: they resolve against this job's working directory.
        config = resolve_paths(config_from_dict(PipelineConfig, values, source="--config-json"))
    else:  # `ray job submit -- python jobs/pipeline.py --config FILE` run by hand
        config = load_pipeline_config(args.config, overrides)
    specs = stage_specs(config)
    # Stopping this job (Ctrl-C on the submitting machine, `ray job stop`) sends SIGTERM: turn it into the
    # KeyboardInterrupt the runner answers by stopping the running stage's job too.
    signal.signal(signal.SIGTERM, _interrupt)
    ensure_ray(os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    runner = PipelineRunner(config, specs, dashboard_address(os.environ.get("RAY_ADDRESS", "auto")))
    runner.preflight(args.from_stage)
    runner.run(args.from_stage)
    if any(s.name == "serve" for s in specs):
        print(served_banner(runner), flush=True)
    print(f"pipeline state: {config.state_path}", flush=True)
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def served_banner(runner: PipelineRunner) -> str:
    url = runner.serve_url()
    spec = next(s for s in runner.specs if s.name == "serve")
    model = served_model_id(spec.values, spec.config_class)
    body = json.dumps({"model": model, "prompt": "Give three tips for staying healthy.", "max_tokens": 32})
    return (f"\nserved model {model!r} at {url}/v1 (OpenAI-compatible; web demo at {url}/)\n"
            f"try: curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")


def address_given(config: PipelineConfig) -> bool:
    return bool(config.address or os.environ.get("RAY_ADDRESS"))

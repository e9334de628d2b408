"""``alpaca-ray pipeline --config FILE``: run every stage as a Ray job from one config file, resumably."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from contextlib import nullcontext

from alpaca_ray.config import add_config_args, run_cli
from alpaca_ray.pipeline.config import (
    STAGES,
    PipelineConfig,
    load_pipeline_config,
    served_base_url,
    stage_specs,
)
from alpaca_ray.pipeline.runner import (
    PipelineRunner,
    cluster_host,
    dashboard_address,
    local_cluster,
    plan_stages,
    read_state,
    served_model_id,
    stage_argv,
    stage_entrypoint,
    submit_time_values,
)

EPILOG = """\
Each stage is submitted as `python jobs/<stage>.py <flags>` with the repository as the job's working
directory. A rerun skips the stages recorded as finished in ROOT/pipeline_state.json; --from-stage
runs from a stage again. Without --address (or $RAY_ADDRESS) a local cluster is started for the run
and, once the model is served, kept up until Ctrl-C.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alpaca-ray pipeline", description=__doc__.splitlines()[0],
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="pipeline YAML (configs/*.yaml): output root, a section "
                                                        "per stage, optional teacher section")
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
        config = load_pipeline_config(args.config, overrides)
        specs = stage_specs(config)
        if args.dry_run:
            state = read_state(config.state_path)
            skipped, to_run, why = plan_stages(specs, state, args.from_stage)
            serve_values = next((s.values for s in specs if s.name == "serve"), {})
            # As PipelineRunner.serve_url: the URL recorded at deployment, else the configured one.
            serve_url = (state["stages"].get("serve") or {}).get("url") or served_base_url(
                serve_values, cluster_host(config.address or os.environ.get("RAY_ADDRESS", "") or "127.0.0.1"))
            print(f"pipeline {args.config}: output {config.output}")
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
        address = config.address or os.environ.get("RAY_ADDRESS", "")
        cluster = nullcontext((address, {})) if address else local_cluster(config.local_num_cpus)
        with cluster as (address, headers):
            runner = PipelineRunner(config, specs, dashboard_address(address), headers)
            ran = runner.run(args.from_stage)
            if any(s.name == "serve" for s in specs):
                print(served_banner(runner), flush=True)
                if not address_given(config) and args.keep_serving and ran:
                    wait_for_interrupt()
        print(f"pipeline state: {config.state_path}", flush=True)
        return 0

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume from the first unfinished stage", file=sys.stderr)
        return 130


def served_banner(runner: PipelineRunner) -> str:
    url = runner.serve_url()
    spec = next(s for s in runner.specs if s.name == "serve")
    model = served_model_id(spec.values, spec.config_class)
    body = json.dumps({"model": model, "prompt": "Give three tips for staying healthy.", "max_tokens": 32})
    return (f"\nserved model {model!r} at {url}/v1 (OpenAI-compatible; web demo at {url}/)\n"
            f"try: curl {url}/v1/completions -H 'Content-Type: application/json' -d '{body}'")


def address_given(config: PipelineConfig) -> bool:
    return bool(config.address or os.environ.get("RAY_ADDRESS"))


def wait_for_interrupt() -> None:
    """Keep the local cluster (and the served model) up until Ctrl-C or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    print("the local cluster stays up while the model is served; Ctrl-C to stop it", flush=True)
    stop.wait()

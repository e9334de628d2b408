"""``alpaca-ray serve``, ``alpaca-ray reports export`` and ``alpaca-ray watermark detect``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.cluster.services import wait_for_stop_signal
from alpaca_ray.config import UserError, config_from_args, config_to_dict, make_parser, run_cli
from alpaca_ray.hub import check_model_exists
from alpaca_ray.serve.config import (
    ServeConfig,
    check_port_free,
    is_loopback,
    resolve_config,
    take_api_key_hash,
)


def serve_model_root(model: str) -> str | None:
    """The directory holding a model given as a path or URI (what replicas read), None for a hub name."""
    from alpaca_ray.cluster import storage

    if storage.is_remote(model) or os.path.isabs(model):
        return storage.dirname(model.rstrip("/"))
    return None


def serve_model(config: ServeConfig) -> str:
    """Deploy the app; with ``blocking``, stay until SIGINT/SIGTERM and then delete it. Returns the URL."""
    config = resolve_config(config)  # bad paths and a missing key fail here, before any cluster is touched
    # the key is read here and removed from this process's environment before any Ray process can inherit
    # it (a cluster started below does): only its SHA-256 goes to the replicas
    key_hash = take_api_key_hash(config)
    ray = sys.modules.get("ray")  # imported and initialised only by a caller that has a cluster already
    if config.blocking and not os.environ.get("RAY_ADDRESS") and not (ray and ray.is_initialized()):
        # A new local cluster, on this machine: its proxy binds here and its replicas load the model here,
        # so both are checked now, in one line each, rather than in Ray's proxy and replica logs.
        check_port_free(config.host, config.port)
        check_model_exists(config.model, "--model")
    if config.blocking:
        ensure_ray()  # RAY_ADDRESS's cluster, else a local one that lives as long as this process
    else:
        # a cluster started by this process would die with it, taking the app along: join a running one
        try:
            ensure_ray(os.environ.get("RAY_ADDRESS") or "auto")
        except ConnectionError as err:
            raise UserError("--no-blocking needs a running Ray cluster to leave the app on (start one with "
                            f"'ray start --head' or set RAY_ADDRESS): {err}") from None
    from ray import serve

    from alpaca_ray.serve.app import deploy

    model_root = serve_model_root(config.model)
    if model_root:  # every node a replica may start on must see the model's files
        finish(preflight_stage("serve", model_root, config_to_dict(config),
                               say=lambda line: print(line, file=sys.stderr, flush=True)))

    if not is_loopback(config.host) and not config.api_key_env:  # only with --allow-unauthenticated
        print(f"warning: binding {config.host} without an API key: anyone who can reach this port can use the "
              "model and read the reports (set --api-key-env)", file=sys.stderr, flush=True)
    url = deploy(config, key_hash)
    print(f"serving {config.model_id!r} at {url} (OpenAI API: {url}v1, demo: {url}, metrics: {url}metrics)",
          flush=True)
    if not config.blocking:
        return url
    wait_for_stop_signal(on_ready=lambda: print("press Ctrl-C to stop", flush=True))
    print(f"stopping: deleting app {config.app_name!r}", flush=True)
    serve.delete(config.app_name)
    return url


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray serve", "Serve a model on Ray Serve: an OpenAI-compatible API under /v1, "
                         "a web demo with reporting at /, /metrics and /healthz.", ServeConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        serve_model(config_from_args(ServeConfig, args, section="serve"))
        return 0

    return run_cli(body)


def reports_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="alpaca-ray reports", description="Read back the demo's reports.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write every report as JSONL or CSV")
    export.add_argument("--db", required=True, help="the SQLite report database (serve's --reports-db)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--output", help="file to write (default: stdout)")
    args = parser.parse_args(argv)

    def body() -> int:
        from alpaca_ray.serve.reports import ReportStore, export_reports

        try:
            text = export_reports(args.db, args.format)
        except FileNotFoundError as err:
            raise UserError(str(err)) from None
        if args.output:
            with open(args.output, "w", encoding="utf-8", newline="") as handle:
                handle.write(text)
            print(f"wrote {ReportStore(args.db, create=False).count()} report(s) to {args.output}", file=sys.stderr)
        else:
            sys.stdout.write(text)
        return 0

    return run_cli(body)


def watermark_main(argv: list[str] | None = None) -> int:
    defaults = ServeConfig(model="-")  # one source for gamma, key and threshold
    parser = argparse.ArgumentParser(prog="alpaca-ray watermark",
                                     description="Detect the serve stage's output watermark in a text.")
    sub = parser.add_subparsers(dest="command", required=True)
    detect = sub.add_parser("detect", help="z-score and verdict for a text file ('-' reads stdin)")
    detect.add_argument("file", help="text file to test, or - for stdin")
    detect.add_argument("--model", required=True, help="the served model (its tokenizer and vocabulary size)")
    detect.add_argument("--gamma", type=float, default=defaults.watermark_gamma,
                        help=f"green-list fraction used when serving (default: {defaults.watermark_gamma})")
    detect.add_argument("--key", type=int, default=defaults.watermark_key, help="the deployment's watermark key")
    detect.add_argument("--z-threshold", type=float, default=defaults.watermark_z_threshold,
                        help=f"z above which text is called watermarked (default: {defaults.watermark_z_threshold}; "
                             "one-sided false-positive rate about 3e-5)")
    detect.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    def body() -> int:
        if args.file == "-":
            text = sys.stdin.read()
        else:
            try:
                with open(args.file, encoding="utf-8") as handle:
                    text = handle.read()
            except OSError as err:
                raise UserError(f"{args.file}: cannot read: {err.strerror}") from None
        if not 0 < args.gamma < 1:
            raise UserError(f"--gamma must be in (0, 1), got {args.gamma}")
        from alpaca_ray.serve.watermark import WatermarkDetector  # torch: only once the input is known good

        try:
            detector = WatermarkDetector.from_model(args.model, args.gamma, args.key, args.z_threshold)
        except OSError as err:
            raise UserError(f"--model {args.model}: cannot load its tokenizer/config: {err}") from None
        result = detector.detect(text)
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            verdict = "WATERMARKED" if result.watermarked else "not watermarked"
            print(f"{verdict}: z = {result.z_score:.2f} (threshold {result.z_threshold}), p = {result.p_value:.2e}, "
                  f"{result.num_green}/{result.num_tokens_scored} tokens green "
                  f"({result.green_fraction:.1%}; {result.gamma:.0%} expected without the watermark)")
        return 0

    return run_cli(body)

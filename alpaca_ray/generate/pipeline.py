"""``generate(config)``: the driver loop, and the thin Ray Data layer that spreads requests over workers.

The driver replays what ``OUTPUT/raw/`` already holds, then launches rounds of requests until the
target is reached. A round is a Ray Data dataset of requests mapped by :class:`TeacherWorker` actors,
each keeping several requests in flight (async ``__call__``) under one rate limiter shared by all of
them. Each worker appends every answer to its own journal file before handing it on; the driver
consumes answers as they stream in and keeps the new tasks in arrival order. A round is always run to
its end, so no answer already paid for is thrown away; the next round is sized from what is missing.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator

from alpaca_ray.cluster import storage
from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.config import UserError, config_to_dict
from alpaca_ray.generate.builder import DatasetBuilder, journal_files, read_journal
from alpaca_ray.generate.calls import FATAL_FAILURES, TeacherWorker, make_requests, new_run_id, sampling_args
from alpaca_ray.generate.config import GenerateConfig
from alpaca_ray.generate.parse import rules_from_config
from alpaca_ray.generate.prompt import SeedExample, read_header
from alpaca_ray.generate.seed_tasks import read_seed_tasks
from alpaca_ray.llm_client import EndpointConfig, LLMClient, Secret, shared_rate_limiter
from alpaca_ray.records import write_records


def run_round(requests: list[dict], config: GenerateConfig, raw_dir: str, run_id: str, limiter_name: str | None,
              api_key: Secret, node_check=None) -> Iterator[dict]:
    """Send ``requests`` through Ray Data; yield each worker's result as it arrives (journaled already)."""
    import ray

    rows = [{"request": json.dumps(r)} for r in requests]
    dataset = ray.data.from_items(rows, override_num_blocks=len(rows))  # one request a block: fine-grained
    dataset = dataset.map_batches(
        TeacherWorker, batch_size=1, batch_format="default",
        # Async __call__ + several calls per actor: each worker keeps requests_per_worker requests in flight.
        compute=ray.data.ActorPoolStrategy(size=min(config.num_workers, len(rows)),
                                           max_tasks_in_flight_per_actor=config.requests_per_worker,
                                           max_concurrent_calls_per_actor=config.requests_per_worker),
        num_cpus=config.worker_num_cpus,
        fn_constructor_kwargs={"endpoint": endpoint_dict(config), "sampling": sampling_args(config),
                               "raw_dir": raw_dir, "run_id": run_id, "limiter_name": limiter_name,
                               "api_key": api_key, "system_prompt": config.system_prompt,
                               "node_check": node_check})
    for row in dataset.iter_rows():
        yield json.loads(row["record"])


def endpoint_dict(config: GenerateConfig) -> dict:
    return {"model": config.teacher_model, "base_url": config.teacher_base_url, "api": config.api,
            "api_key_env": config.api_key_env, "requests_per_minute": config.requests_per_minute,
            "tokens_per_minute": config.tokens_per_minute, "max_retries": config.max_retries,
            "timeout_s": config.timeout_s, "max_concurrency": config.requests_per_worker}


def _init_ray() -> None:
    import ray

    ensure_ray(log_to_driver=False, configure_logging=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run has its own bar, counted in kept instructions
    context.print_on_execution_start = False


def round_size(builder: DatasetBuilder, config: GenerateConfig) -> int:
    """Requests for the next round: what is missing over the observed yield, capped per round."""
    observed = builder.kept_per_response() if builder.tally.responses >= 3 else 0.0
    per_request = observed if observed > 0 else config.expected_kept_per_request
    return max(1, min(config.max_requests_per_round, math.ceil(builder.missing / per_request)))


def generate(config: GenerateConfig) -> dict:
    """Run (or resume, or reprocess) a generation into ``config.output``; return ``stats.json``'s content."""
    started = time.time()
    output = storage.local_path(config.output)
    raw_dir = os.path.join(output, "raw")
    seeds = read_seed_tasks(config.seed_tasks)
    if len(seeds) < config.num_prompt_instructions:
        raise UserError(f"{config.seed_tasks}: {len(seeds)} seed task(s), but each prompt shows "
                        f"{config.num_prompt_instructions} (--num-prompt-instructions)")
    header = read_header(config.prompt_template)
    saved = journal_files(raw_dir)
    if config.reprocess and not saved:
        raise UserError(f"--reprocess: {raw_dir} holds no saved responses to rebuild from")
    if config.resume and not saved:
        raise UserError(f"--resume: {raw_dir} holds no saved responses; drop --resume to start a new run there")

    client, node_check = None, None
    if not config.reprocess:
        # On a cluster, every node must see the root the journals go to before anything is paid for.
        node_check = preflight_stage("generate", config.output, config_to_dict(config), say=lambda line: print(line, file=sys.stderr, flush=True),
                                     log_to_driver=False, configure_logging=False)
        # Fail before anything is spent: key, endpoint and model are checked with a free call.
        client = LLMClient(EndpointConfig(**endpoint_dict(config)))
        client.check_sync()

    builder = DatasetBuilder([s.instruction for s in seeds], config.target, rules_from_config(config),
                             config.similarity_threshold, config.num_prompt_instructions + 1)
    saved_records, torn = read_journal(raw_dir)
    builder.add_all(saved_records)
    this_run = {"run_id": None, "requests": 0, "failed_requests": 0, "failures": {}, "retries": 0,
                "prompt_tokens": 0, "completion_tokens": 0, "resumed_responses": len(saved_records),
                "torn_journal_lines": torn}
    if not config.reprocess and not builder.done:
        try:
            _generate_rounds(config, builder, client, raw_dir, this_run, seeds, header, node_check)
        except BaseException:
            # Stopped early (a refused key mid-run, Ctrl-C...): what was kept so far stays usable, and the
            # journal lets the next run carry on from it.
            write_outputs(config, builder, this_run, time.time() - started)
            raise
        finally:
            finish(node_check)
    finish(node_check)
    stats = write_outputs(config, builder, this_run, time.time() - started)
    return stats


def _generate_rounds(config: GenerateConfig, builder: DatasetBuilder, client: LLMClient, raw_dir: str,
                     this_run: dict, seeds: list[SeedExample], header: str, node_check=None) -> None:
    import ray
    from tqdm import tqdm

    _init_ray()
    os.makedirs(raw_dir, exist_ok=True)
    run_id = new_run_id()
    this_run["run_id"] = run_id
    rng = random.Random(config.seed)
    limiter_name = None
    if config.requests_per_minute or config.tokens_per_minute:
        limiter_name = f"alpaca-ray-generate-limiter-{run_id}"
        limiter = shared_rate_limiter(limiter_name, config.requests_per_minute, config.tokens_per_minute)
    bar = tqdm(total=config.target, initial=len(builder.records), desc="instructions", unit="inst",
               disable=not config.progress, file=sys.stderr, dynamic_ncols=True)
    sent, rounds_without_progress = 0, 0
    try:
        while not builder.done:
            requests = make_requests(round_size(builder, config), seeds, header, config.num_prompt_instructions,
                                     rng, run_id, first_number=sent)
            sent += len(requests)
            kept_before, answered, last_failure = len(builder.records), 0, None
            for record in run_round(requests, config, raw_dir, run_id, limiter_name, client.api_key(), node_check):
                this_run["requests"] += 1
                if "failure" in record:
                    this_run["failed_requests"] += 1
                    failures = this_run["failures"]
                    failures[record["failure"]] = failures.get(record["failure"], 0) + 1
                    last_failure = record["message"]
                    if record["failure"] in FATAL_FAILURES:
                        raise UserError(record["message"])
                    continue
                answered += 1
                this_run["retries"] += int(record.get("retries", 0) or 0)
                usage = record.get("usage") or {}
                this_run["prompt_tokens"] += int(usage.get("prompt_tokens", 0) or 0)
                this_run["completion_tokens"] += int(usage.get("completion_tokens", 0) or 0)
                added = builder.add(record)
                if added:
                    bar.update(added)
                bar.set_postfix(requests=this_run["requests"], malformed=builder.tally.malformed, refresh=False)
            if answered == 0:
                raise UserError(f"all {len(requests)} requests of a round failed; last error: {last_failure}")
            rounds_without_progress = 0 if len(builder.records) > kept_before else rounds_without_progress + 1
            if rounds_without_progress >= config.max_rounds_without_progress:
                dropped = {k: v for k, v in builder.tally.dropped.items() if v}
                raise UserError(f"{rounds_without_progress} rounds of requests in a row added no instruction "
                                f"(malformed answers: {builder.tally.malformed}, dropped: {dropped}); the teacher's "
                                f"answers may not follow the numbered task list format; see {raw_dir}")
            # Partial outputs after each round: a long run can be inspected (and trained on) as it goes.
            if not builder.done:
                write_outputs(config, builder, this_run, None)
    finally:
        bar.close()
        if limiter_name:
            ray.kill(limiter)


def write_outputs(config: GenerateConfig, builder: DatasetBuilder, this_run: dict, wall_time_s: float | None) -> dict:
    """Write data.json, data.parquet and stats.json (each atomically); return the stats."""
    from alpaca_ray.generate.stats import estimated_cost

    output = storage.local_path(config.output)
    os.makedirs(output, exist_ok=True)
    write_records(builder.records, os.path.join(output, "data.json"))
    write_records(builder.records, os.path.join(output, "data.parquet"))
    totals = builder.tally.to_dict(config.teacher_model, config.price_per_million_tokens or None)
    run_cost, _ = estimated_cost(config.teacher_model, this_run["prompt_tokens"], this_run["completion_tokens"],
                                 config.price_per_million_tokens or None)
    stats = {
        "target": config.target, "kept": len(builder.records), "complete": builder.done or config.target is None,
        "teacher_model": config.teacher_model, "api": config.api,
        "total": totals,
        "this_run": {**this_run, "estimated_cost_usd": run_cost, "wall_time_s": wall_time_s,
                     "reprocess": config.reprocess},
        "config": config_to_dict(config),
    }
    path = os.path.join(output, "stats.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    return stats

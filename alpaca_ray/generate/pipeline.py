"""``generate(config)``: the driver, and the thin Ray layer that keeps the teacher busy until the target.

The driver replays what ``OUTPUT/raw/`` already holds (a finished run or ``--reprocess`` stops there, with
no key and no call), checks the endpoint, then streams: a fixed pool of :class:`TeacherWorker` actors
lives for the whole run, and the driver keeps ``num_workers x requests_per_worker`` requests in flight
on them, sending a new one as each answer comes back, under one rate limiter shared by all of them. It
stops sending as soon as the answers in flight, at the yield observed so far, should fill what is
missing; the answers still in flight then are journaled and counted like every other (nothing paid for
is thrown away), and a resumed run continues the numbering of the requests (see ``RequestFeed``).
"""

from __future__ import annotations

import json
import os
import sys
import time

from alpaca_ray.cluster import storage
from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.config import UserError, config_to_dict
from alpaca_ray.generate import sources
from alpaca_ray.generate.builder import DatasetBuilder, journal_files, read_journal
from alpaca_ray.generate.calls import FATAL_FAILURES, RequestFeed, TeacherWorker, new_run_id, sampling_args
from alpaca_ray.generate.config import GenerateConfig
from alpaca_ray.generate.parse import rules_from_config
from alpaca_ray.generate.prompt import SeedExample, read_header
from alpaca_ray.generate.seed_tasks import read_seed_tasks
from alpaca_ray.llm_client import EndpointConfig, LLMClient, shared_rate_limiter
from alpaca_ray.records import write_records

#: Seconds between the partial data.json / stats.json a long run writes as it goes.
PARTIAL_OUTPUT_EVERY_S = 30.0


def endpoint_dict(config: GenerateConfig) -> dict:
    return {"model": config.teacher_model, "base_url": config.teacher_base_url, "api": config.api,
            "api_key_env": config.api_key_env, "requests_per_minute": config.requests_per_minute,
            "tokens_per_minute": config.tokens_per_minute, "max_retries": config.max_retries,
            "timeout_s": config.timeout_s, "max_concurrency": config.requests_per_worker,
            "max_retry_after_s": config.max_retry_after_s}


def _init_ray() -> None:
    ensure_ray(log_to_driver=False, configure_logging=False)


def should_send_more(missing: int, in_flight: int, kept_per_request: float) -> bool:
    """Whether another request is needed: the answers in flight, at ``kept_per_request`` each, fall short."""
    return missing > in_flight * kept_per_request


def kept_per_request(builder: DatasetBuilder, config: GenerateConfig) -> float:
    """Instructions one more answer should add: the observed yield once 3 answers are in, else the guess."""
    observed = builder.kept_per_response() if builder.tally.responses >= 3 else 0.0
    return observed if observed > 0 else config.expected_kept_per_request


def read_inputs(config: GenerateConfig) -> tuple[list[SeedExample], str, dict]:
    """The seed tasks and the prompt header, from files or URLs (fetched once into OUTPUT/sources/), and
    where each came from with its SHA-256."""
    cache_dir = storage.join(storage.local_path(config.output), "sources")
    seed_source = sources.resolve(config.seed_tasks, cache_dir, "seed tasks")
    seeds = read_seed_tasks(seed_source.path, name=seed_source.location)
    if len(seeds) < config.num_prompt_instructions:
        raise UserError(f"{config.seed_tasks}: {len(seeds)} seed task(s), but each prompt shows "
                        f"{config.num_prompt_instructions} (--num-prompt-instructions)")
    if config.prompt_template:
        header_source = sources.resolve(config.prompt_template, cache_dir, "prompt template")
        header = read_header(header_source.path, name=header_source.location)
    else:
        header = read_header(None)
        header_source = sources.Source("built-in", "", _sha256(header))
    return seeds, header, {"seed_tasks": seed_source.to_dict(), "prompt_template": header_source.to_dict()}


def _sha256(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def plan(config: GenerateConfig) -> dict:
    """``--dry-run``: the inputs (fetched and checked), the first prompt and the request, no call made."""
    seeds, header, inputs = read_inputs(config)
    feed = RequestFeed(os.path.join(storage.local_path(config.output), "raw"), seeds, header,
                       config.num_prompt_instructions, "dry-run", config.seed)
    first = feed.peek()
    return {"dry_run": True, "sources": inputs, "seed_task_count": len(seeds),
            "teacher": {"model": config.teacher_model, "base_url": config.teacher_base_url, "api": config.api},
            "request": sampling_args(config), "shrink_max_tokens": config.shrink_max_tokens,
            "rate_limits": {"requests_per_minute": config.requests_per_minute,
                            "tokens_per_minute": config.tokens_per_minute},
            "in_flight": config.num_workers * config.requests_per_worker, "target": config.target,
            "first_request_number": first["request_number"], "first_prompt": first["prompt"]}


def generate(config: GenerateConfig) -> dict:
    """Run (or resume, or reprocess) a generation into ``config.output``; return ``stats.json``'s content."""
    if config.dry_run:
        return plan(config)
    started = time.time()
    output = storage.local_path(config.output)
    raw_dir = os.path.join(output, "raw")
    seeds, header, inputs = read_inputs(config)
    saved = journal_files(raw_dir)
    if config.reprocess and not saved:
        raise UserError(f"--reprocess: {raw_dir} holds no saved responses to rebuild from")
    if config.resume and not saved:
        raise UserError(f"--resume: {raw_dir} holds no saved responses; drop --resume to start a new run there")

    # The journal first: a finished run and --reprocess need no endpoint, no key and no cluster.
    builder = DatasetBuilder([s.instruction for s in seeds], config.target, rules_from_config(config),
                             config.similarity_threshold, config.num_prompt_instructions + 1)
    saved_records, torn = read_journal(raw_dir)
    builder.add_all(saved_records)
    this_run = {"run_id": None, "requests": 0, "failed_requests": 0, "failures": {}, "retries": 0,
                "retry_after_capped": 0, "max_tokens_shrunk": 0, "prompt_tokens": 0, "completion_tokens": 0,
                "resumed_responses": len(saved_records), "torn_journal_lines": torn, "sources": inputs}
    if not config.reprocess and not builder.done:
        # On a cluster, every node must see the root the journals go to before anything is paid for.
        node_check = preflight_stage("generate", config.output, config_to_dict(config),
                                     say=lambda line: print(line, file=sys.stderr, flush=True),
                                     log_to_driver=False, configure_logging=False)
        try:
            # Fail before anything is spent: key, endpoint and model are checked with a free call.
            client = LLMClient(EndpointConfig(**endpoint_dict(config)))
            client.check_sync()
            run_id = new_run_id()
            feed = RequestFeed(raw_dir, seeds, header, config.num_prompt_instructions, run_id, config.seed,
                               saved_records)
            try:
                _stream(config, builder, client.api_key(), raw_dir, this_run, feed, run_id, node_check)
            except BaseException:
                # Stopped early (a refused key mid-run, Ctrl-C...): what was kept so far stays usable, and the
                # journal lets the next run carry on from it.
                write_outputs(config, builder, this_run, time.time() - started)
                raise
        finally:
            finish(node_check)
    return write_outputs(config, builder, this_run, time.time() - started)


class AnswerStream:
    """Requests in flight on a pool of up to ``num_workers`` long-lived actors, each given at most
    ``per_worker`` at once. A worker is started the first time every one there is already busy (so a
    run that needs one request starts one actor), and lives until the run ends."""

    def __init__(self, make_worker, num_workers: int, per_worker: int):
        self.make_worker, self.num_workers, self.per_worker = make_worker, num_workers, per_worker
        self.workers: list = []
        self.load: list[int] = []
        self.pending: dict = {}  # ObjectRef -> (worker index, request)

    @property
    def in_flight(self) -> int:
        return len(self.pending)

    def has_room(self) -> bool:
        return len(self.pending) < self.num_workers * self.per_worker

    def send(self, request: dict) -> None:
        if len(self.workers) < self.num_workers and all(self.load):
            self.workers.append(self.make_worker())
            self.load.append(0)
        index = min(range(len(self.load)), key=self.load.__getitem__)  # the least busy worker
        self.pending[self.workers[index].ask.remote(request)] = (index, request)
        self.load[index] += 1

    def next_answers(self) -> list[dict]:
        """Wait for at least one answer; return every one that is in (journaled already, by its worker)."""
        import ray

        refs = list(self.pending)
        ready, rest = ray.wait(refs, num_returns=1)
        if rest:
            ready += ray.wait(rest, num_returns=len(rest), timeout=0)[0]
        answers = []
        for ref in ready:
            index, request = self.pending.pop(ref)
            self.load[index] -= 1
            try:
                answers.append(ray.get(ref))
            except ray.exceptions.RayActorError as err:  # the worker died (its node went away...)
                answers.append({"request_id": request["request_id"], "failure": "worker_died",
                                "message": f"a teacher worker died with the request in flight ({type(err).__name__})"})
        return answers


def _stream(config: GenerateConfig, builder: DatasetBuilder, api_key, raw_dir: str, this_run: dict,
            feed: RequestFeed, run_id: str, node_check=None) -> None:
    import ray
    from tqdm import tqdm

    _init_ray()
    os.makedirs(raw_dir, exist_ok=True)
    this_run["run_id"] = run_id
    limiter, limiter_name = None, None
    if config.requests_per_minute or config.tokens_per_minute:
        limiter_name = f"alpaca-ray-generate-limiter-{run_id}"
        limiter = shared_rate_limiter(limiter_name, config.requests_per_minute, config.tokens_per_minute)
    worker_class = ray.remote(TeacherWorker).options(
        num_cpus=config.worker_num_cpus, max_concurrency=config.requests_per_worker, scheduling_strategy="SPREAD",
        max_restarts=3)  # a restarted worker takes new requests; the one in flight when it died is counted failed
    stream = AnswerStream(lambda: worker_class.remote(
        endpoint_dict(config), sampling_args(config), raw_dir, run_id, limiter_name, api_key, config.system_prompt,
        node_check, config.shrink_max_tokens), config.num_workers, config.requests_per_worker)
    bar = tqdm(total=config.target, initial=len(builder.records), desc="instructions", unit="inst",
               disable=not config.progress, file=sys.stderr, dynamic_ncols=True)
    window = config.num_workers * config.requests_per_worker
    problem: UserError | None = None
    answers_without_progress = failures_in_a_row = 0
    next_partial = time.monotonic() + PARTIAL_OUTPUT_EVERY_S
    try:
        while True:
            while (problem is None and stream.has_room()
                   and should_send_more(builder.missing, stream.in_flight, kept_per_request(builder, config))):
                stream.send(feed())
            if not stream.in_flight:
                break
            for record in stream.next_answers():
                this_run["requests"] += 1
                capped = int(record.get("retry_after_capped", 0) or 0)
                if capped and not this_run["retry_after_capped"]:
                    bar.write(f"note: {config.teacher_base_url} asked to wait longer than --max-retry-after-s "
                              f"({config.max_retry_after_s:g} s) before a retry; such waits are cut to it "
                              "(counted in stats.json this_run.retry_after_capped)", file=sys.stderr)
                this_run["retry_after_capped"] += capped
                if "failure" in record:
                    this_run["failed_requests"] += 1
                    failures = this_run["failures"]
                    failures[record["failure"]] = failures.get(record["failure"], 0) + 1
                    failures_in_a_row += 1
                    if problem is None and record["failure"] in FATAL_FAILURES:
                        problem = UserError(record["message"])
                    elif problem is None and failures_in_a_row >= window:
                        problem = UserError(f"the last {failures_in_a_row} requests all failed; last error: "
                                            f"{record['message']}")
                    continue
                failures_in_a_row = 0
                this_run["retries"] += int(record.get("retries", 0) or 0)
                this_run["max_tokens_shrunk"] += "max_tokens" in record
                usage = record.get("usage") or {}
                this_run["prompt_tokens"] += int(usage.get("prompt_tokens", 0) or 0)
                this_run["completion_tokens"] += int(usage.get("completion_tokens", 0) or 0)
                done_before = builder.done
                added = builder.add(record)
                bar.update(added)
                bar.set_postfix(requests=this_run["requests"], malformed=builder.tally.malformed, refresh=False)
                answers_without_progress = 0 if added or done_before else answers_without_progress + 1
                if problem is None and answers_without_progress >= config.max_answers_without_progress:
                    dropped = {k: v for k, v in builder.tally.dropped.items() if v}
                    problem = UserError(
                        f"{answers_without_progress} answers in a row added no instruction (malformed answers: "
                        f"{builder.tally.malformed}, dropped: {dropped}); the teacher's answers may not follow the "
                        f"numbered task list format; see {raw_dir}")
            # Partial outputs now and then: a long run can be inspected (and trained on) as it goes.
            if not builder.done and time.monotonic() >= next_partial:
                write_outputs(config, builder, this_run, None)
                next_partial = time.monotonic() + PARTIAL_OUTPUT_EVERY_S
        # Every request sent has been answered (or failed): stopping on a problem waited for them, so
        # what they cost is journaled too.
        if problem is not None:
            raise problem
    finally:
        bar.close()
        if limiter is not None:
            try:
                this_run["rate_limit"] = ray.get(limiter.report.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a report is nice to have, never worth failing the run for
                pass
        for worker in stream.workers:
            ray.kill(worker)
        if limiter is not None:
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
    run = {k: v for k, v in this_run.items() if k != "sources"}
    stats = {
        "target": config.target, "kept": len(builder.records), "complete": builder.done or config.target is None,
        "teacher_model": config.teacher_model, "api": config.api,
        "sources": this_run.get("sources"),
        "total": totals,
        "this_run": {**run, "estimated_cost_usd": run_cost, "wall_time_s": wall_time_s,
                     "reprocess": config.reprocess},
        "config": config_to_dict(config),
    }
    path = os.path.join(output, "stats.json")
    with open(path + ".tmp", "w", encoding="utf-8") as handle:
        json.dump(stats, handle, indent=2)
        handle.write("\n")
    os.replace(path + ".tmp", path)
    return stats

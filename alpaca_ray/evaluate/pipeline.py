"""The evaluate stage end to end; Ray enters only in :func:`execute_requests` (Ray Data).

``run_evaluate(config)``: read the set -> collect both models' answers (Ray Data, both models at once,
each answer journaled as it arrives) -> ask the judge about every pair in both orders (Ray Data, the
same way) -> compute and write the report. A rerun into the same output sends only what is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import sys
import uuid

from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.cluster.services import wait_for_stop_signal
from alpaca_ray.config import UserError, config_to_dict
from alpaca_ray.evaluate import collect, judge, report
from alpaca_ray.evaluate.config import BUNDLED_EVAL_SET, EvaluateConfig
from alpaca_ray.evaluate.eval_sets import EvalItem, default_eval_set, load_answers, load_eval_set
from alpaca_ray.evaluate.ratings import read_ratings
from alpaca_ray.llm_client import EndpointConfig, LLMClient, LLMError, Secret

SIDES = {"a": "model A", "b": "model B", "judge": "the judge"}


def log(message: str) -> None:
    print(f"[evaluate] {message}", file=sys.stderr, flush=True)


def endpoint_for(config: EvaluateConfig, name: str) -> EndpointConfig:
    """The endpoint of model A/B or the judge, from the config."""
    if name == "judge":
        model, url, key_env, api = config.judge_model, config.judge_base_url, config.judge_api_key_env, config.judge_api
    else:
        model, url, key_env = (getattr(config, f"model_{name}{s}") for s in ("", "_base_url", "_api_key_env"))
        api = config.answer_api
    return EndpointConfig(model=model, base_url=url, api=api, api_key_env=key_env,
                          requests_per_minute=config.requests_per_minute, tokens_per_minute=config.tokens_per_minute,
                          max_retries=config.max_retries, timeout_s=config.timeout_s,
                          max_concurrency=config.max_concurrency)


def api_key_for(endpoint: EndpointConfig, name: str) -> Secret | None:
    """The key from the endpoint's env var (read here, handed to workers as a Secret, never logged).

    A named variable that is not set is an error; a local endpoint with no variable named needs no key.
    """
    env = endpoint.api_key_env
    if not env:
        return None
    value = os.environ.get(env)
    if value:
        return Secret(value)
    if name != "judge" or endpoint.base_url.rstrip("/") == "https://api.openai.com/v1":
        raise UserError(f"{SIDES[name]}: the environment variable {env} (its API key) is not set")
    return None


def sampling_for(config: EvaluateConfig) -> dict[str, dict]:
    answer = {"max_tokens": config.max_tokens, "temperature": config.temperature}
    return {"a": answer, "b": answer, "judge": {"max_tokens": config.judge_max_tokens, "temperature": 0.0}}


def check_endpoints(endpoints: dict[str, EndpointConfig], api_keys: dict[str, Secret | None]) -> None:
    """Fail fast, naming the endpoint, on an unreachable server, a wrong key or an unknown model."""
    for name, endpoint in endpoints.items():
        quick = dataclasses.replace(endpoint, timeout_s=min(endpoint.timeout_s, 15.0))  # fail fast, not in 2 min
        client = LLMClient(quick, api_key=api_keys.get(name))
        try:
            client.check_sync()
        except LLMError as err:
            raise UserError(f"{SIDES[name]} ({endpoint.model} at {endpoint.base_url}): {err}") from None


class _RequestWorker:
    """A Ray Data actor: one :class:`collect.RequestRunner` and one event loop for its whole life."""

    def __init__(self, endpoints: dict, sampling: dict, output: str, api_keys: dict, limiters: dict,
                 node_check=None):
        if node_check is not None:  # a node the autoscaler started after the preflight: check it first
            node_check.verify()
        self.runner = collect.RequestRunner(endpoints, sampling, output, api_keys, limiters)
        self.loop = asyncio.new_event_loop()  # kept: the openai client's connection pool is bound to it

    def __call__(self, batch: dict) -> dict:
        columns = list(batch)
        rows = [{c: str(batch[c][i]) for c in columns} for i in range(len(batch["key"]))]
        results = self.loop.run_until_complete(self.runner.run([collect.Request.from_row(r) for r in rows]))
        return {name: [r[name] for r in results] for name in ("key", "error", "journal", "journal_path", "record_json")}


def execute_requests(requests: list[collect.Request], endpoints: dict[str, EndpointConfig],
                     api_keys: dict[str, Secret | None], config: EvaluateConfig) -> list[str]:
    """Send ``requests`` through a pool of Ray Data actors within each endpoint's shared rate limit.

    Returns the error messages of the requests that failed (the others are journaled).
    """
    if not requests:
        return []
    import ray

    from alpaca_ray.llm_client import shared_rate_limiter

    # On a cluster, every node must see the root the answers are journaled under before any is paid for.
    node_check = preflight_stage("evaluate", config.output, config_to_dict(config), say=log)
    ensure_ray()
    used = sorted({r.endpoint for r in requests})
    run_id = uuid.uuid4().hex[:8]
    # One limiter per endpoint, shared by every worker: the budget is the endpoint's, not the worker's.
    limiters = {name: shared_rate_limiter(f"alpaca-ray-evaluate-{name}-{run_id}", config.requests_per_minute,
                                          config.tokens_per_minute) for name in used}
    workers = max(1, min(config.num_workers, len(requests)))
    try:
        dataset = ray.data.from_items([r.to_row() for r in requests],
                                      override_num_blocks=min(len(requests), workers * 4))
        results = dataset.map_batches(
            _RequestWorker, batch_size=config.max_concurrency, compute=ray.data.ActorPoolStrategy(size=workers),
            num_cpus=0.25,  # the workers wait on the network, not on a core
            fn_constructor_kwargs={"endpoints": {n: endpoints[n] for n in used}, "sampling": sampling_for(config),
                                   "output": os.path.abspath(config.output),
                                   "api_keys": {n: api_keys.get(n) for n in used}, "limiters": limiters,
                                   "node_check": node_check},
        ).take_all()
    finally:
        finish(node_check)
        for handle in limiters.values():
            ray.kill(handle)
    copied = collect.keep_unseen_records(results, os.path.abspath(config.output))
    if copied:
        log(f"{copied} answers came from workers whose journals this node cannot see; copied them here")
    return [row["error"] for row in results if row["error"]]


def _raise_failures(errors: list[str], what: str) -> None:
    if errors:
        shown = "\n  ".join(sorted(set(errors))[:5])
        raise UserError(f"{len(errors)} {what} request(s) failed (everything answered is saved; rerun to resume):"
                        f"\n  {shown}")


def collect_answers(config: EvaluateConfig, items: list[EvalItem], check_judge: bool = False
                    ) -> dict[str, dict[str, str]]:
    """Both models' answers by item id: from recorded-answer files, the journals, or the endpoints.

    ``check_judge``: when answers are to be paid for, check the judge's endpoint first too, so a wrong
    judge key fails the run before the models are asked anything.
    """
    answers: dict[str, dict[str, str]] = {}
    endpoints: dict[str, EndpointConfig] = {}
    requests: dict[str, list[collect.Request]] = {}
    sampling = sampling_for(config)
    for side in ("a", "b"):
        recorded = getattr(config, f"model_{side}_answers")
        if recorded:
            answers[side] = load_answers(recorded, items, config.eval_split)
            log(f"{SIDES[side]}: {len(answers[side])} recorded answers from {recorded}")
            continue
        endpoints[side] = endpoint_for(config, side)
        requests[side] = collect.answer_requests(items, side, endpoints[side], sampling[side])
    missing: dict[str, list[collect.Request]] = {}
    for side, side_requests in requests.items():
        saved = collect.read_journals(config.output, collect.ANSWER_JOURNALS[side])
        missing[side] = collect.pending(side_requests, saved)
        log(f"{SIDES[side]}: {len(side_requests) - len(missing[side])} of {len(side_requests)} answers already "
            f"saved, asking {endpoints[side].model} for {len(missing[side])}")
    # Interleaved, so every batch keeps both endpoints busy at once.
    todo = [r for pair in itertools.zip_longest(*missing.values()) for r in pair if r is not None]
    needed = {r.endpoint for r in todo}
    api_keys = {name: api_key_for(endpoints[name], name) for name in needed}
    to_check = {name: endpoints[name] for name in needed}
    if todo and check_judge:
        to_check["judge"] = endpoint_for(config, "judge")
        api_keys["judge"] = api_key_for(to_check["judge"], "judge")
    check_endpoints(to_check, api_keys)
    _raise_failures(execute_requests(todo, endpoints, api_keys, config), "answer")
    for side, side_requests in requests.items():
        saved = collect.read_journals(config.output, collect.ANSWER_JOURNALS[side])
        answers[side] = {r.meta["item_id"]: saved[r.key]["text"].strip() for r in side_requests}
    return answers


def judge_pairs(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]]
                ) -> dict[str, tuple[str, str]]:
    """The judge's raw answers (A shown first, B shown first) by item id, asking only for what is missing."""
    template = judge.load_template(config.judge_template)
    endpoint = endpoint_for(config, "judge")
    requests = collect.judge_requests(items, answers["a"], answers["b"], template, endpoint,
                                      sampling_for(config)["judge"])
    saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    todo = collect.pending(list(requests.values()), saved)
    log(f"judge: {len(requests) - len(todo)} of {len(requests)} verdicts already saved, asking {endpoint.model} "
        f"for {len(todo)}")
    if todo:
        api_keys = {"judge": api_key_for(endpoint, "judge")}
        check_endpoints({"judge": endpoint}, api_keys)
        _raise_failures(execute_requests(todo, {"judge": endpoint}, api_keys, config), "judge")
        saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    return {item.id: (saved[requests[(item.id, "ab")].key]["text"], saved[requests[(item.id, "ba")].key]["text"])
            for item in items}


def load_items(config: EvaluateConfig) -> list[EvalItem]:
    source = config.eval_set or default_eval_set(BUNDLED_EVAL_SET)
    return load_eval_set(source, config.eval_split, config.limit)


def report_meta(config: EvaluateConfig) -> dict:
    return {"model_a": config.label("a"), "model_b": config.label("b"), "judge": config.judge_model or None,
            "eval_set": config.eval_set or "bundled (alpaca_ray/data/eval_set.jsonl)",
            "judge_template": config.judge_template or "default", "config": config_to_dict(config)}


def make_report(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]],
                raw_verdicts: dict[str, tuple[str, str]] | None) -> dict:
    """Parse and debias the verdicts, add any human ratings, and write report.json/.md/.png."""
    results = []
    for item in items:
        result = report.ItemResult(item, answers["a"][item.id], answers["b"][item.id])
        if raw_verdicts is not None:
            result.raw_ab, result.raw_ba = raw_verdicts[item.id]
            verdicts = judge.parse_verdict(result.raw_ab), judge.parse_verdict(result.raw_ba)
            result.judged = judge.combine_orders(*verdicts)
        results.append(result)
    ratings = [r for r in read_ratings(config.human_db_path) if r.item_id in answers["a"]]
    built = report.build_report(results, report_meta(config), ratings, samples=config.bootstrap_samples,
                                seed=config.seed)
    paths = report.write_report(built, config.output)
    log(f"report written: {paths['md']}")
    return built


def existing_verdicts(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]]
                      ) -> dict[str, tuple[str, str]] | None:
    """Verdicts already journaled for every pair (for a human-only report), or None when some are missing."""
    if not config.judge_model:
        return None
    template = judge.load_template(config.judge_template)
    endpoint = endpoint_for(config, "judge")
    requests = collect.judge_requests(items, answers["a"], answers["b"], template, endpoint,
                                      sampling_for(config)["judge"])
    saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    if any(r.key not in saved for r in requests.values()):
        return None
    return {item.id: (saved[requests[(item.id, "ab")].key]["text"], saved[requests[(item.id, "ba")].key]["text"])
            for item in items}


def run_evaluate(config: EvaluateConfig) -> dict:
    """The LLM-judged comparison: answers, verdicts, report. Returns the report (also written to OUTPUT)."""
    os.makedirs(config.output, exist_ok=True)
    items = load_items(config)
    log(f"{len(items)} items from {config.eval_set_path}")
    answers = collect_answers(config, items, check_judge=True)
    raw_verdicts = judge_pairs(config, items, answers)
    return make_report(config, items, answers, raw_verdicts)


def run_human(config: EvaluateConfig) -> str:
    """Serve the blind rating page for the pairs (collecting answers first if needed); returns its URL.

    Blocking (the default): rate until Ctrl-C/SIGTERM, then take the page down and write the report with the
    ratings (and the LLM judge's verdicts, where a judged run saved them in the same output).
    """
    from alpaca_ray.evaluate import human

    os.makedirs(config.output, exist_ok=True)
    items = load_items(config)
    answers = collect_answers(config, items)
    pairs = [{**item.to_dict(), "answer_a": answers["a"][item.id], "answer_b": answers["b"][item.id]}
             for item in items]
    url = human.deploy_rating_page(pairs, os.path.abspath(config.human_db_path), config.seed, config.app_name,
                                   config.route_prefix, config.host, config.port)
    print(f"rating page: {url}  (ratings are stored in {config.human_db_path})", flush=True)
    if not config.blocking:
        return url
    log("rate in the browser; press Ctrl-C to stop and write the report")
    wait_for_stop_signal()
    from ray import serve

    serve.delete(config.app_name)
    make_report(config, items, answers, existing_verdicts(config, items, answers))
    return url

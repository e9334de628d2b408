"""The evaluate stage end to end; Ray enters only in :func:`execute_requests` (Ray Data).

``run_evaluate(config)``: read the set -> collect both models' answers (Ray Data, both models at once,
each answer journaled as it arrives) -> ask the judge about every pair in both orders (Ray Data, the
same way) -> compute and write the report. A rerun into the same output sends only what is missing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import sys
import uuid

from alpaca_ray.cluster.preflight import finish, preflight_stage
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.cluster.services import wait_for_stop_signal
from alpaca_ray.cluster.storage import exists, read_text, write_text
from alpaca_ray.config import UserError, config_to_dict
from alpaca_ray.evaluate import alpaca_eval, collect, judge, length_control, report
from alpaca_ray.evaluate.config import BUNDLED_EVAL_SET, EvaluateConfig
from alpaca_ray.evaluate.eval_sets import (
    EvalItem,
    default_eval_set,
    generator_of,
    load_answers,
    load_eval_set,
)
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


def judge_sampling(config: EvaluateConfig) -> dict:
    """The judge's request settings: a reasoned verdict, or AlpacaEval 2's one token with its top logprobs."""
    if config.judge_mode == "verdict":
        return {"max_tokens": config.judge_max_tokens, "temperature": 0.0}
    if config.judge_api == "completions":  # the completions API takes the number of top logprobs as `logprobs`
        return {"max_tokens": 1, "temperature": alpaca_eval.LOGPROB_SAMPLING["temperature"],
                "logprobs": alpaca_eval.LOGPROB_SAMPLING["top_logprobs"]}
    return dict(alpaca_eval.LOGPROB_SAMPLING)


def sampling_for(config: EvaluateConfig) -> dict[str, dict]:
    answer = {"max_tokens": config.max_tokens, "temperature": config.temperature}
    return {"a": answer, "b": answer, "judge": judge_sampling(config)}


def check_judge_logprobs(config: EvaluateConfig, endpoint: EndpointConfig, api_key: Secret | None) -> None:
    """Logprobs mode: one one-token probe, so a judge endpoint that returns no logprobs fails the run before
    any answer or verdict is paid for (the judge's preferences would otherwise all be unparseable)."""
    if config.judge_mode != "logprobs":
        return
    quick = dataclasses.replace(endpoint, timeout_s=min(endpoint.timeout_s, 30.0), max_retries=min(endpoint.max_retries, 2))
    client = LLMClient(quick, api_key=api_key)
    prompt = judge.judge_prompt(judge.load_template(config.judge_template, "logprobs"), "Say hello.", "", "Hello!", "Hi.")
    request: str | list[dict] = prompt if endpoint.api == "completions" else alpaca_eval.chat_messages(prompt)
    try:
        completion = client.complete_sync(request, **judge_sampling(config))
    except LLMError as err:
        raise UserError(f"the judge ({endpoint.model} at {endpoint.base_url}) failed the logprobs probe: {err}") from None
    if not completion.top_logprobs or not completion.top_logprobs[0]:
        raise UserError(
            f"the judge ({endpoint.model} at {endpoint.base_url}) returned no logprobs for a request with "
            f"{'logprobs=5' if endpoint.api == 'completions' else 'logprobs=true, top_logprobs=5'} (it answered "
            f"{completion.text[:40]!r}); --judge-mode logprobs needs an endpoint that returns them (OpenAI's chat "
            "models, vLLM, llama.cpp's server do), or use --judge-mode verdict. Nothing was paid for beyond this probe.")


def check_endpoints(endpoints: dict[str, EndpointConfig], api_keys: dict[str, Secret | None],
                    config: EvaluateConfig | None = None) -> None:
    """Fail fast, naming the endpoint, on an unreachable server, a wrong key or an unknown model; with
    ``config``, a judge among them is also probed for what its ``--judge-mode`` needs."""
    for name, endpoint in endpoints.items():
        quick = dataclasses.replace(endpoint, timeout_s=min(endpoint.timeout_s, 15.0))  # fail fast, not in 2 min
        client = LLMClient(quick, api_key=api_keys.get(name))
        try:
            client.check_sync()
        except LLMError as err:
            raise UserError(f"{SIDES[name]} ({endpoint.model} at {endpoint.base_url}): {err}") from None
    if config is not None and "judge" in endpoints:
        check_judge_logprobs(config, endpoints["judge"], api_keys.get("judge"))


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
        if config.requests_per_minute or config.tokens_per_minute:
            record_rate_limits(config.output, {name: ray.get(h.report.remote(), timeout=30)
                                               for name, h in limiters.items()})
        for handle in limiters.values():
            ray.kill(handle)
    copied = collect.keep_unseen_records(results, os.path.abspath(config.output))
    if copied:
        log(f"{copied} answers came from workers whose journals this node cannot see; copied them here")
    return [row["error"] for row in results if row["error"]]


def record_rate_limits(output: str, reports: dict[str, dict]) -> None:
    """Keep what each endpoint's limiter granted in ``OUTPUT/rate_limits.json`` (latest collection per endpoint).

    The grant times are what the limits are kept by (arrival at a server jitters with load), so this is the
    record to check a run's pacing against.
    """
    path = os.path.join(output, "rate_limits.json")
    recorded = json.loads(read_text(path)) if exists(path) else {}
    write_text(path, json.dumps({**recorded, **reports}, indent=2))


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
    check_endpoints(to_check, api_keys, config)
    _raise_failures(execute_requests(todo, endpoints, api_keys, config), "answer")
    for side, side_requests in requests.items():
        saved = collect.read_journals(config.output, collect.ANSWER_JOURNALS[side])
        answers[side] = {r.meta["item_id"]: saved[r.key]["text"].strip() for r in side_requests}
    return answers


def judge_pairs(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]]
                ) -> dict[str, tuple[dict, dict]]:
    """The judge's journaled answers (A shown first, B shown first) by item id, asking only for what is missing."""
    template = judge.load_template(config.judge_template, config.judge_mode)
    endpoint = endpoint_for(config, "judge")
    requests = collect.judge_requests(items, answers["a"], answers["b"], template, endpoint,
                                      sampling_for(config)["judge"])
    saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    todo = collect.pending(list(requests.values()), saved)
    log(f"judge: {len(requests) - len(todo)} of {len(requests)} verdicts already saved, asking {endpoint.model} "
        f"for {len(todo)}")
    if todo:
        api_keys = {"judge": api_key_for(endpoint, "judge")}
        check_endpoints({"judge": endpoint}, api_keys, config)
        _raise_failures(execute_requests(todo, {"judge": endpoint}, api_keys, config), "judge")
        saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    return {item.id: (saved[requests[(item.id, "ab")].key], saved[requests[(item.id, "ba")].key]) for item in items}


def load_items(config: EvaluateConfig) -> list[EvalItem]:
    source = config.eval_set or default_eval_set(BUNDLED_EVAL_SET)
    return load_eval_set(source, config.eval_split, config.limit)


def report_meta(config: EvaluateConfig, labels: dict[str, str] | None = None) -> dict:
    labels = labels or {side: answer_label(config, side) for side in ("a", "b")}
    return {"model_a": labels["a"], "model_b": labels["b"], "judge": config.judge_model or None,
            "judge_mode": config.judge_mode, "eval_set": config.eval_set or "bundled (alpaca_ray/data/eval_set.jsonl)",
            "judge_template": config.judge_template or "default", "config": config_to_dict(config)}


def answer_label(config: EvaluateConfig, side: str) -> str:
    """A model's name in the report: --model-X-label, else the ``generator`` its answers file names, else
    its model name or file name."""
    if not getattr(config, f"model_{side}_label"):
        recorded = getattr(config, f"model_{side}_answers")
        generator = generator_of(recorded) if recorded else None
        if generator:
            return generator
    return config.label(side)


def length_control_inputs(config: EvaluateConfig, instructions: list[str]) -> dict:
    """``difficulty`` and ``gamed`` for the length control, from the files the config names (None when not)."""
    gamed = (length_control.read_gamed_annotations(config.lc_gamed_annotations)
             if config.lc_gamed_annotations else None)
    return {"difficulty": difficulty_for(config, instructions), "gamed": gamed}


def difficulty_for(config: EvaluateConfig, instructions: list[str]):
    """The instructions' difficulties from --instruction-difficulty, or None (the length control's fallback)."""
    if not config.instruction_difficulty:
        return None
    table = length_control.read_instruction_difficulty(config.instruction_difficulty)
    return length_control.difficulty_for(instructions, table, config.instruction_difficulty)


def judged_outcome(config: EvaluateConfig, record_ab: dict, record_ba: dict) -> judge.PairOutcome:
    """One pair's debiased outcome from the judge's two journaled answers, read as --judge-mode says."""
    if config.judge_mode == "logprobs":
        return judge.combine_logprob_orders(judge.a_probability(record_ab.get("top_logprobs"), "ab"),
                                            judge.a_probability(record_ba.get("top_logprobs"), "ba"))
    return judge.combine_orders(judge.parse_verdict(record_ab["text"]), judge.parse_verdict(record_ba["text"]))


def raw_answer(record: dict) -> str:
    """What the judge said, for people: its text, and in logprobs mode the top tokens it weighed."""
    top = record.get("top_logprobs")
    if not top:
        return record["text"]
    tokens = ", ".join(f"{t['token']!r}: {t['logprob']:.3f}" for t in top[0][:5])
    return f"{record['text']} (top logprobs: {tokens})"


def make_report(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]],
                raw_verdicts: dict[str, tuple[dict, dict]] | None) -> dict:
    """Parse and debias the verdicts, add any human ratings, and write report.json/.md/.png (and, for a judged
    run, model_outputs.json and annotations.json in AlpacaEval's format)."""
    results = []
    for item in items:
        result = report.ItemResult(item, answers["a"][item.id], answers["b"][item.id])
        if raw_verdicts is not None:
            record_ab, record_ba = raw_verdicts[item.id]
            result.raw_ab, result.raw_ba = raw_answer(record_ab), raw_answer(record_ba)
            result.judged = judged_outcome(config, record_ab, record_ba)
        results.append(result)
    if raw_verdicts is not None:
        judge.check_unparseable([(r.item.id, r.raw_ab, r.raw_ba) for r in results if r.judged.unparseable],
                                len(results), config.max_unparseable)
    ratings = [r for r in read_ratings(config.human_db_path) if r.item_id in answers["a"]]
    meta = report_meta(config)
    built = report.build_report(results, meta, ratings, samples=config.bootstrap_samples, seed=config.seed,
                                **length_control_inputs(config, [i.instruction for i in items]),
                                lc_samples=config.lc_bootstrap_samples)
    paths = report.write_report(built, config.output)
    if raw_verdicts is not None:
        report.write_alpaca_eval_files(results, meta["model_a"], meta["model_b"],
                                       f"{config.judge_model} ({config.judge_mode})", config.output)
    log(f"report written: {paths['md']}")
    return built


def run_from_annotations(config: EvaluateConfig) -> dict:
    """The whole report from an AlpacaEval ``annotations.json``: no model and no judge is asked anything.

    Model A is AlpacaEval's model (``generator_2``, ``output_2``), model B its baseline (``generator_1``).
    """
    os.makedirs(config.output, exist_ok=True)
    rows = alpaca_eval.load_annotations(config.annotations)
    log(f"{len(rows)} annotations from {config.annotations}")
    items, answers, results = [], {"a": {}, "b": {}}, []
    for index, row in enumerate(rows):
        item = EvalItem(f"item-{index}", row.instruction, category=row.dataset)
        items.append(item)
        answers["a"][item.id], answers["b"][item.id] = row.output_2, row.output_1
        result = report.ItemResult(item, row.output_2, row.output_1)
        result.judged = judge.from_alpaca_eval_preference(row.preference)
        results.append(result)
    labels = {"a": config.model_a_label or ",".join(sorted({r.generator_2 for r in rows})),
              "b": config.model_b_label or ",".join(sorted({r.generator_1 for r in rows}))}
    meta = {**report_meta(config, labels), "judge": "AlpacaEval annotations", "judge_mode": "annotations",
            "eval_set": config.annotations}
    built = report.build_report(results, meta, samples=config.bootstrap_samples, seed=config.seed,
                                **length_control_inputs(config, [i.instruction for i in items]),
                                lc_samples=config.lc_bootstrap_samples)
    paths = report.write_report(built, config.output)
    log(f"report written: {paths['md']}")
    return built


def existing_verdicts(config: EvaluateConfig, items: list[EvalItem], answers: dict[str, dict[str, str]]
                      ) -> dict[str, tuple[dict, dict]] | None:
    """Verdicts already journaled for every pair (for a human-only report), or None when some are missing."""
    if not config.judge_model:
        return None
    template = judge.load_template(config.judge_template, config.judge_mode)
    endpoint = endpoint_for(config, "judge")
    requests = collect.judge_requests(items, answers["a"], answers["b"], template, endpoint,
                                      sampling_for(config)["judge"])
    saved = collect.read_journals(config.output, collect.JUDGE_JOURNAL)
    if any(r.key not in saved for r in requests.values()):
        return None
    return {item.id: (saved[requests[(item.id, "ab")].key], saved[requests[(item.id, "ba")].key]) for item in items}


def run_evaluate(config: EvaluateConfig) -> dict:
    """The LLM-judged comparison: answers, verdicts, report. Returns the report (also written to OUTPUT).

    With ``config.annotations`` the report is built from an AlpacaEval annotations file instead.
    """
    if config.annotations:
        return run_from_annotations(config)
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

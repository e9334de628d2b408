"""``alpaca-ray generate``: self-instruct data from a teacher model (Alpaca's recipe, on Ray actors)."""

from __future__ import annotations

import json
import sys

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.generate.config import GenerateConfig

DESCRIPTION = """Ask a teacher model (any OpenAI-compatible endpoint) for instruction-following data the way
Stanford Alpaca did: each request shows 3 random seed tasks and asks for a list of 20; answers are parsed,
filtered and near-deduplicated (ROUGE-L > 0.7) until --target instructions are kept. Every answer is saved
to OUTPUT/raw/ before it is parsed: re-running into OUTPUT resumes without paying twice, and --reprocess
rebuilds the dataset from raw/ alone. --seed-tasks and --prompt-template take files or https:// URLs (fetched
once into OUTPUT/sources/, SHA-256 in stats.json); --dry-run shows them and the first prompt without a call.
The API key is read from the variable named by --api-key-env."""


def summary(stats: dict, output: str) -> str:
    total, run = stats["total"], stats["this_run"]
    cost = total["estimated_cost_usd"]
    cost_text = f"${cost:.4f}" if cost is not None else "unknown (see stats.json cost_note)"
    dropped = ", ".join(f"{k} {v}" for k, v in total["dropped"].items() if v) or "none"
    lines = [f"kept {stats['kept']}" + (f" of {stats['target']}" if stats["target"] else "")
             + f" instructions -> {output}/data.json",
             f"responses {total['responses']} ({run['requests']} requests this run, {run['failed_requests']} failed), "
             f"retries {total['retries']}, malformed {total['malformed_responses']}",
             f"tokens {total['prompt_tokens']} in / {total['completion_tokens']} out, estimated cost {cost_text}",
             f"dropped: {dropped}"]
    limit = run.get("rate_limit")
    if limit and limit.get("requests_per_minute_used") is not None:
        lines.append(f"rate: {limit['requests_per_minute_used']:g} requests/min granted of {limit['requests_per_minute']:g}"
                     f" allowed; busiest minute {limit['max_requests_in_60s']} requests, "
                     f"{limit['max_tokens_in_60s']} tokens")
    if run.get("retry_after_capped"):
        lines.append(f"Retry-After waits cut to --max-retry-after-s: {run['retry_after_capped']}")
    return "\n".join(lines)


def describe_plan(plan: dict) -> str:
    """``--dry-run``'s report: where the inputs come from (URL, SHA-256), the request, the first prompt."""
    lines = ["dry run: no request sent"]
    for what, source in plan["sources"].items():
        cached = f" (cached at {source['path']})" if source["path"] and source["path"] != source["location"] else ""
        lines.append(f"{what}: {source['location']}{cached}\n  sha256 {source['sha256']}")
    teacher, limits = plan["teacher"], plan["rate_limits"]
    lines += [f"seed tasks: {plan['seed_task_count']}; target {plan['target']}",
              f"teacher: {teacher['model']} at {teacher['base_url']} ({teacher['api']} API)",
              f"request: {json.dumps(plan['request'])}; shrink max_tokens on context errors: "
              f"{'on' if plan['shrink_max_tokens'] else 'off'}",
              f"in flight: {plan['in_flight']} requests; limits {limits['requests_per_minute']:g} requests/min, "
              f"{limits['tokens_per_minute']:g} tokens/min",
              f"first prompt (request {plan['first_request_number']}):", plan["first_prompt"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray generate", DESCRIPTION, GenerateConfig)

    def body() -> int:
        args = parser.parse_args(argv)
        config = config_from_args(GenerateConfig, args, section="generate")
        from alpaca_ray.generate.pipeline import generate

        stats = generate(config)
        print(describe_plan(stats) if config.dry_run else summary(stats, config.output), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

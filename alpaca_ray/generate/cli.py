"""``alpaca-ray generate``: self-instruct data from a teacher model (Alpaca's recipe, on Ray Data)."""

from __future__ import annotations

import sys

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.generate.config import GenerateConfig

DESCRIPTION = """Ask a teacher model (any OpenAI-compatible endpoint) for instruction-following data the way
Stanford Alpaca did: each request shows 3 random seed tasks and asks for a list of 20; answers are parsed,
filtered and near-deduplicated (ROUGE-L > 0.7) until --target instructions are kept. Every answer is saved
to OUTPUT/raw/ before it is parsed: re-running into OUTPUT resumes without paying twice, and --reprocess
rebuilds the dataset from raw/ alone. The API key is read from the variable named by --api-key-env."""


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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray generate", DESCRIPTION, GenerateConfig)

    def body() -> int:
        args = parser.parse_args(argv)
        config = config_from_args(GenerateConfig, args, section="generate")
        from alpaca_ray.generate.pipeline import generate

        stats = generate(config)
        print(summary(stats, config.output), flush=True)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())

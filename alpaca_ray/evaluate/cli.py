"""``alpaca-ray evaluate``: blind pairwise comparison of two models, judged by an LLM or by people."""

from __future__ import annotations

import math

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.evaluate.config import EvaluateConfig

DESCRIPTION = """Compare model A with model B on an evaluation set, blind and pairwise. Each model is an
OpenAI-compatible endpoint (--model-a NAME --model-a-base-url URL) or a file of recorded answers
(--model-a-answers FILE). The judge sees each pair in both orders; a preference counts only when it holds
in both. Writes OUTPUT/report.json, report.md and report.png; a rerun into the same OUTPUT asks for nothing
already answered. --human serves a blind rating page instead (Ray Serve); the next report includes the
ratings. --judge-mode logprobs judges as AlpacaEval 2 does (one token, preference from its logprobs);
--annotations FILE builds the report from an AlpacaEval annotations.json without asking anyone. API keys
are read from the environment variables named by the --*-api-key-env flags."""


def summary_line(report: dict) -> str:
    judge = report.get("llm_judge")
    if not judge:
        return "no LLM judge verdicts"

    def pct(x: float | None) -> str:
        return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"

    lc = judge["length_controlled"]
    return (f"{report['model_a']} (A) vs {report['model_b']} (B): A win rate {pct(judge['win_rate'])} "
            f"[95% CI {pct(judge['ci_low'])}, {pct(judge['ci_high'])}; s.e. {pct(judge['standard_error'])}], "
            f"discrete {pct(judge['discrete_win_rate'])}, A {judge['wins']} / B {judge['losses']} / "
            f"tie {judge['ties']} (unparseable {judge['unparseable']}, inconsistent {judge['inconsistent']}); "
            f"length-controlled {pct(lc['win_rate'])} ({lc['form']})")


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray evaluate", DESCRIPTION, EvaluateConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        config = config_from_args(EvaluateConfig, args, section="evaluate")
        from alpaca_ray.evaluate import pipeline

        if config.human:
            pipeline.run_human(config)
            return 0
        report = pipeline.run_evaluate(config)
        print(summary_line(report))
        print(f"report: {config.output}/report.md")
        return 0

    return run_cli(body)

"""The evaluate stage: blind pairwise comparison of two models, judged by an LLM and by people.

Python API: ``run_evaluate(EvaluateConfig(...))`` returns the report dict and writes it to ``output``.
"""

from alpaca_ray.evaluate.config import EvaluateConfig

__all__ = ["EvaluateConfig", "run_evaluate", "run_human"]


def run_evaluate(config: EvaluateConfig) -> dict:
    from alpaca_ray.evaluate.pipeline import run_evaluate as _run

    return _run(config)


def run_human(config: EvaluateConfig) -> str:
    from alpaca_ray.evaluate.pipeline import run_human as _run

    return _run(config)

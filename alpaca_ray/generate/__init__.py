"""Self-instruct data from a teacher model, Stanford Alpaca's recipe on Ray actors.

``generate(GenerateConfig(output=..., target=...))`` runs, resumes or reprocesses a generation;
``alpaca-ray generate`` and ``jobs/generate.py`` are its command-line faces.
"""

from alpaca_ray.generate.config import GenerateConfig


def generate(config: GenerateConfig) -> dict:
    """Run, resume or reprocess a generation into ``config.output``; return ``stats.json``'s content."""
    # Imported here so Ray workers that load this package's small modules skip the driver's (dedup, numba).
    from alpaca_ray.generate.pipeline import generate as run

    return run(config)

__all__ = ["GenerateConfig", "generate"]

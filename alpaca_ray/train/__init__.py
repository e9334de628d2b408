"""The train stage: Alpaca-recipe supervised fine-tuning with FSDP2 on Ray Train.

``run_train(TrainConfig(...))`` is the Python API; ``alpaca-ray train`` and ``jobs/train.py`` the commands.
"""

from alpaca_ray.train.config import TrainConfig

__all__ = ["TrainConfig", "run_train"]


def run_train(config: TrainConfig) -> dict:
    """Fine-tune ``config.base_model`` on ``config.data``; see :func:`alpaca_ray.train.pipeline.run_train`."""
    from alpaca_ray.train.pipeline import run_train as _run_train

    return _run_train(config)

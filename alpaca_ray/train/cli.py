"""``alpaca-ray train``: supervised fine-tuning with FSDP2 on Ray Train (Alpaca's recipe by default)."""

from __future__ import annotations

import json

from alpaca_ray.config import config_from_args, make_parser, run_cli
from alpaca_ray.train.config import TrainConfig


def main(argv: list[str] | None = None) -> int:
    parser = make_parser("alpaca-ray train", __doc__.splitlines()[0], TrainConfig)
    args = parser.parse_args(argv)

    def body() -> int:
        from alpaca_ray.train.pipeline import run_train

        config = config_from_args(TrainConfig, args, section="train")
        summary = run_train(config)
        print(json.dumps({k: summary[k] for k in ("final", "merged", "metrics", "resumed") if k in summary}, indent=2))
        return 0

    return run_cli(body)

"""Helpers for the train stage's integration tests: one tiny recipe, metrics reading, Ray polling."""

from __future__ import annotations

import json
import time
from pathlib import Path


def tiny_recipe(model: Path, data: Path, output: Path, **overrides) -> list[str]:
    """CLI flags of a run that takes seconds on 2 CPU workers: 47 train examples, 12 steps an epoch."""
    flags = {"base-model": model, "data": data, "output": output, "num-workers": 2, "epochs": 2, "lr": 1e-3,
             "global-batch-size": 4, "micro-batch-size": 1, "max-length": 128, "checkpoint-every": 4,
             "max-failures": 0, **overrides}
    argv = []
    for name, value in flags.items():
        if isinstance(value, bool):
            argv.append(f"--{name}" if value else f"--no-{name}")
        elif isinstance(value, (list, tuple)):
            argv += [f"--{name}", *map(str, value)]
        else:
            argv += [f"--{name}", str(value)]
    return argv


def read_metrics(output: Path) -> tuple[list[dict], list[dict]]:
    """(train step records, eval records) of ``OUTPUT/metrics.jsonl``."""
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def wait_until(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll ``condition`` until it returns something truthy; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def alive_train_actors() -> int:
    """Ray Train controller and worker actors alive on the cluster this process is connected to.

    Reads the GCS actor table through the connected driver (the state API would need a dashboard).
    """
    from ray._private.state import actors

    table = actors(actor_state_name="ALIVE").values()
    return sum(info["ActorClassName"] in ("RayTrainWorker", "TrainController") for info in table)

"""Train stage, driver and rank-0 file handling without Ray: placement, and every file it writes on a
storage root that is an object store (moto's S3 server) as well as a local directory."""

from __future__ import annotations

import json

import pytest

from alpaca_ray.cluster import storage
from alpaca_ray.config import ConfigError, UserError, config_to_dict
from alpaca_ray.train.config import TrainConfig
from alpaca_ray.train.loop import parse_metrics, plot_loss, truncate_metrics
from alpaca_ray.train.pipeline import (
    RUN_NAME,
    check_run_dir,
    resolve_paths,
    scaling_config,
    throughput_summary,
)
from tests.support.object_store import object_store  # noqa: F401 - the fixture


def test_placement_strategy_reaches_scaling_config():
    spread = TrainConfig(base_model="m", data="d", output="o", num_workers=4, placement_strategy="SPREAD")
    scaling = scaling_config(spread)
    assert (scaling.placement_strategy, scaling.num_workers, scaling.resources_per_worker) == \
        ("SPREAD", 4, {"CPU": 1})
    assert scaling_config(TrainConfig(base_model="m", data="d", output="o")).placement_strategy == "PACK"
    with pytest.raises(ConfigError, match="placement_strategy must be one of PACK, SPREAD, STRICT_SPREAD"):
        TrainConfig(base_model="m", data="d", output="o", placement_strategy="spread")  # as a config file gives it


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("object_store").fresh_uri("train-unit")


def _records(steps: int) -> list[dict]:
    records = []
    for step in range(1, steps + 1):
        records.append({"step": step, "loss": 3.0 / step, "real_tokens": 90, "computed_tokens": 100, "time_s": 0.5})
        if step % 2 == 0:
            records.append({"step": step, "eval_loss": 2.5 / step})
    return records


def test_metrics_plot_and_summary_on_the_root(root):
    metrics = storage.join(root, "metrics.jsonl")
    with storage.AppendLog(metrics) as log:
        for record in _records(4):
            log.append(json.dumps(record) + "\n")
    assert [r["step"] for r in parse_metrics(storage.read_text(metrics))] == [1, 2, 2, 3, 4, 4]

    truncate_metrics(metrics, 2)  # resuming from step 2 redoes steps 3 and 4
    assert [(r["step"], "loss" in r) for r in parse_metrics(storage.read_text(metrics))] == \
        [(1, True), (2, True), (2, False)]

    summary = throughput_summary(metrics)
    assert summary == {"steps": 2, "real_token_share": pytest.approx(0.9), "tokens_per_s": pytest.approx(180.0)}
    assert throughput_summary(storage.join(root, "absent.jsonl")) == {}

    plot_loss(parse_metrics(storage.read_text(metrics)), storage.join(root, "loss.png"))
    assert storage.read_bytes(storage.join(root, "loss.png"))[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(storage.listdir(root)) == ["loss.png", "metrics.jsonl"]


def test_run_dir_checks_work_on_the_root(root):
    cfg = resolve_paths(TrainConfig(base_model="m", data="d", output=root))
    assert cfg.storage_path == storage.join(root, "ray_results")  # a URI keeps its query at the end
    run_dir = storage.join(cfg.storage_path, RUN_NAME)

    storage.write_text(storage.join(run_dir, "stale.txt"), "a run that died before its first checkpoint")
    assert check_run_dir(cfg) is False and not storage.exists(run_dir)  # nothing worth keeping: removed

    storage.write_text(storage.join(run_dir, "checkpoint_manager_snapshot.json"), "{}")
    storage.write_text(storage.join(root, "train_config.json"), json.dumps(config_to_dict(cfg)))
    with pytest.raises(UserError, match="pass --resume"):
        check_run_dir(cfg)
    resumed = TrainConfig(**{**config_to_dict(cfg), "resume": True})
    assert check_run_dir(resumed) is True
    changed = TrainConfig(**{**config_to_dict(resumed), "lr": 1.0})
    with pytest.raises(UserError, match=r"lr: 2e-05 -> 1.0"):
        check_run_dir(changed)

"""Deploying the serve stage's app on the session's Serve proxy for integration tests."""

from __future__ import annotations

import urllib.request
from pathlib import Path

from alpaca_ray.serve.config import ServeConfig
from alpaca_ray.serve.metrics import parse_prometheus

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def app_config(model_dir: Path, port: int, app_name: str, route_prefix: str, reports_db: Path,
                **overrides) -> ServeConfig:
    """A config for a test app: small batches wait a little longer so concurrent callers share them."""
    values = dict(model=str(model_dir), port=port, app_name=app_name, route_prefix=route_prefix,
                  reports_db=str(reports_db), batch_wait_timeout_s=0.05, num_cpus_per_replica=0.5,
                  ready_timeout_s=180)
    values.update(overrides)
    return ServeConfig(**values)


def metrics_of(base_url: str) -> dict[str, float]:
    with urllib.request.urlopen(base_url + "metrics", timeout=30) as response:
        return parse_prometheus(response.read().decode())


def batches_larger_than_one(metrics: dict[str, float]) -> float:
    """How many engine batches held more than one sequence (from the batch-size histogram)."""
    return metrics["alpaca_ray_serve_batch_size_count"] - metrics['alpaca_ray_serve_batch_size_bucket{le="1"}']

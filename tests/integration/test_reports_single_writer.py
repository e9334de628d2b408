"""Reports taken by two API replicas all land in the one database owned by the single ReportsWriter.

On a real cluster the two replicas sit on two nodes, and before the writer each kept a database of its
own; here they share the session's one node, so the test pins what makes the multi-node case work: the
app is two deployments, the writer has exactly one replica (on the head node), and every report posted
concurrently through HTTP comes back from ``GET /v1/reports`` and ``alpaca-ray reports export``.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import run_cli
from tests.support.serve_app import app_config

pytestmark = pytest.mark.ray
APP = "test-reports-writer"


def _serve_details() -> dict:
    from ray.serve.context import _get_global_client  # private, as in alpaca_ray.cluster.services

    return _get_global_client().get_serve_details()


def test_two_replicas_one_writer_every_report_kept(serve_port, tiny_model_dir, tmp_path):
    import ray
    from ray import serve

    from alpaca_ray.cluster.services import serve_app_url
    from alpaca_ray.serve.app import deploy

    db = tmp_path / "reports.db"
    config = app_config(tiny_model_dir, serve_port, APP, "/reports-writer", db, num_replicas=2,
                        max_replicas_per_node=2)
    url = deploy(config)
    try:
        assert serve_app_url(APP) == url.rstrip("/") == f"http://127.0.0.1:{serve_port}/reports-writer"
        assert serve_app_url("no-such-app") is None

        deployments = serve.status().applications[APP].deployments
        assert deployments["AlpacaServer"].replica_states == {"RUNNING": 2}
        assert deployments["ReportsWriter"].replica_states == {"RUNNING": 1}
        details = _serve_details()["applications"][APP]["deployments"]
        assert details["AlpacaServer"]["deployment_config"]["max_replicas_per_node"] == 2
        (writer,) = details["ReportsWriter"]["replicas"]
        assert writer["node_id"] == ray.get_runtime_context().get_node_id()  # the head: this driver's node

        def report(i: int) -> int:
            response = httpx.post(url + "v1/reports", timeout=120, json={
                "instruction": f"instruction {i}", "response": f"answer {i}", "reason": "incorrect",
                "details": "single-writer"})
            assert response.status_code == 200, response.text
            return response.json()["id"]

        with ThreadPoolExecutor(20) as pool:
            ids = list(pool.map(report, range(20)))
        assert sorted(ids) == list(range(1, 21))  # one AUTOINCREMENT sequence: one database

        listed = httpx.get(url + "v1/reports", params={"limit": 1000}, timeout=60).json()["data"]
        assert sorted(r["response"] for r in listed) == sorted(f"answer {i}" for i in range(20))
        assert {r["model"] for r in listed} == {config.model_id}
        page = httpx.get(url + "v1/reports", params={"limit": 5, "offset": 15}, timeout=60).json()["data"]
        assert [r["id"] for r in page] == [16, 17, 18, 19, 20]
        writer_handle = serve.get_deployment_handle("ReportsWriter", APP)
        assert writer_handle.count.remote().result(timeout_s=60) == 20

        out = tmp_path / "reports.jsonl"
        run_cli(["reports", "export", "--db", str(db), "--format", "jsonl", "--output", str(out)], check=True)
        exported = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(r["id"] for r in exported) == sorted(ids)
    finally:
        serve.delete(APP)

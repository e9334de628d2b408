"""The quick start on a real multi-node cluster: a 0-CPU head, two workers with disks of their own.

What one machine hides and these tests expose: a root that each node sees separately (refused by the
preflight, naming the node), files written on a worker that the head never sees (every artifact goes to
the shared root), a teacher or served model bound to one node's loopback (every address handed to
workers is a cluster address), reports split between replicas (one writer), and a pipeline driven from
a laptop that does not see the root at all (its driver runs on the cluster).
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT
from tests.support.multinode import MultiNodeCluster
from tests.support.ray_head import free_port

pytestmark = pytest.mark.timeout(1500)

REPLAY = "alpaca_ray/data/teacher_replay.jsonl"  # relative to the repository: travels with the job


def quickstart_on(cluster: MultiNodeCluster, root: Path, tiny_model_dir: Path, tmp_path: Path) -> Path:
    """configs/quickstart.yaml for the cluster: its root at ``root``, the base model on the shared root."""
    config = yaml.safe_load((REPO_ROOT / "configs" / "quickstart.yaml").read_text())
    base = cluster.shared_root / "tiny-base"
    if not base.exists():
        shutil.copytree(tiny_model_dir, base)
    config["output"] = str(root)
    config["teacher"]["replay"] = REPLAY
    config["generate"].update(target=24)
    # Ranks on two nodes (SPREAD), short steps with frequent checkpoints so a node can die mid-run.
    config["train"].update(base_model=str(base), max_length=128, epochs=2, global_batch_size=4, checkpoint_every=2,
                           max_failures=3, placement_strategy="SPREAD")
    # Two replicas on two nodes; a proxy on every node where each node has its own network (else on the head).
    config["serve"].update(host="0.0.0.0", allow_unauthenticated=True, port=free_port(), num_replicas=2, max_replicas_per_node=1,
                           proxy_location="EveryNode" if cluster.private_loopback else "HeadOnly",
                           app_name="multinode", route_prefix="/multinode", ready_timeout_s=400)
    # Model A is the served model, model B and the judge the run's teacher: both called from worker nodes.
    config["evaluate"] = {"limit": 2, "max_tokens": 8, "num_workers": 2, "model_b": "text-davinci-003",
                          "model_b_base_url": "teacher", "judge_model": "text-davinci-003",
                          "judge_base_url": "teacher", "answer_api": "completions", "bootstrap_samples": 100,
                          # the offline teacher replays self-instruct answers, never a verdict: this test is
                          # about the calls crossing nodes, so unreadable verdicts must not stop the stage
                          "max_unparseable": 1.0}
    path = tmp_path / "quickstart-multinode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def pipeline_command(config_path: Path, cluster: MultiNodeCluster) -> list[str]:
    return [sys.executable, "-m", "alpaca_ray.cli", "pipeline", "--config", str(config_path),
            "--address", cluster.dashboard_url]


def submitted_jobs(cluster: MultiNodeCluster) -> set[str]:
    return {j.submission_id for j in cluster.job_client().list_jobs()
            if (j.submission_id or "").startswith("alpaca-ray-")}


def get_json(url: str, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as response:
        return json.load(response)


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)


def test_a_root_on_node_local_disks_is_refused_before_any_job(multinode_cluster, tiny_model_dir, tmp_path):
    cluster = multinode_cluster
    root = cluster.node_local_dir / f"quickstart-{tmp_path.name}"
    config_path = quickstart_on(cluster, root, tiny_model_dir, tmp_path)
    before = submitted_jobs(cluster)
    result = subprocess.run(pipeline_command(config_path, cluster), capture_output=True, text=True, timeout=600,
                            env=cluster.env(), cwd=REPO_ROOT)
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert f"preflight failed for the root {root}" in output
    for worker in cluster.workers:  # each worker node is named, with the path it cannot see
        assert f"node {worker.ip} " in output
    assert "does not see" in output and "shared filesystem" in output and "s3://" in output
    new_jobs = submitted_jobs(cluster) - before
    assert [j.split("-")[2] for j in new_jobs] == ["pipeline"]  # the driver only: no stage was submitted
    leftovers = [p for p in root.rglob("*") if p.is_file()] if root.exists() else []
    assert leftovers == []  # not even the probes stay behind


def test_quickstart_from_a_laptop_runs_end_to_end_across_nodes(multinode_cluster, tiny_model_dir, tmp_path):
    cluster = multinode_cluster
    root = cluster.shared_root / f"quickstart-{tmp_path.name}"
    config_path = quickstart_on(cluster, root, tiny_model_dir, tmp_path)
    log_path = tmp_path / "laptop.log"
    started = time.monotonic()
    # The laptop cannot see the shared root: only the cluster's driver job can.
    with open(log_path, "w") as log:
        process = subprocess.Popen(cluster.laptop_argv(pipeline_command(config_path, cluster)), stdout=log,
                                   stderr=subprocess.STDOUT, env=cluster.env(), cwd=REPO_ROOT)
    try:
        # A worker node dies once train has a checkpoint on the root; the run goes on from it.
        pattern = str(root / "train" / "ray_results" / "*" / "checkpoint_manager_snapshot.json")
        deadline = time.monotonic() + 600
        while not glob.glob(pattern):
            assert process.poll() is None, log_path.read_text()[-5000:]
            assert time.monotonic() < deadline, "no train checkpoint on the root in 600 s"
            time.sleep(0.2)
        cluster.kill_worker_raylet(1)
        cluster.wait_for_nodes(2, timeout=120)
        cluster.restart_worker(1)  # capacity comes back, as the autoscaler would bring a new node
        cluster.wait_for_nodes(3, timeout=120)
        returncode = process.wait(timeout=1200)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert returncode == 0, output[-6000:]
    wall_s = time.monotonic() - started

    # The driver ran on the cluster: its preflight saw all three nodes share the root.
    assert f"preflight: root {root} is shared by all 3 alive node(s)" in output
    # Every artifact is on the shared root, whichever node wrote it.
    state = json.loads((root / "pipeline_state.json").read_text())
    assert {s: state["stages"][s]["status"] for s in state["stages"]} == {
        "generate": "succeeded", "train": "succeeded", "serve": "succeeded", "evaluate": "succeeded"}
    journals = sorted((root / "generate" / "raw").glob("*.jsonl"))
    assert journals  # written by generate's actors on the worker nodes, journaled into the root
    assert len(json.loads((root / "generate" / "data.json").read_text())) == 24
    train_logs = cluster.job_client().get_job_logs(state["stages"]["train"]["job_id"])
    assert "resumed from checkpoint at step" in train_logs, train_logs[-3000:]
    assert (root / "train" / "metrics.jsonl").exists() and (root / "train" / "loss.png").exists()
    assert (root / "train" / "final" / "config.json").exists()
    assert not list(root.rglob(".alpaca-ray-preflight/*"))  # probes are removed
    # The teacher was a cluster service: its address is a node's cluster address, never loopback.
    teacher_urls = [line for line in output.splitlines() if "offline teacher: replaying" in line]
    assert teacher_urls
    if cluster.private_loopback:  # (on the shared-network fallback, node addresses are 127.0.0.x)
        assert all("127.0.0.1" not in line and "localhost" not in line for line in teacher_urls)

    # Serve: two replicas on two different worker nodes, answering through the proxy.
    url = state["stages"]["serve"]["url"]
    assert cluster.head_ip in url
    details = get_json(f"{cluster.dashboard_url}/api/serve/applications/", cluster.auth_headers())
    replicas = details["applications"]["multinode"]["deployments"]["AlpacaServer"]["replicas"]
    assert len({r["node_id"] for r in replicas if r["state"] == "RUNNING"}) == 2
    models = get_json(f"{url}/v1/models")
    assert [m["id"] for m in models["data"]] == [root.name]

    # Reports sent through every node's proxy all reach the one writer.
    proxies = [url]
    if cluster.private_loopback:
        port = url.split(":")[2].split("/")[0]
        proxies += [url.replace(cluster.head_ip + ":" + port, f"{w.ip}:{port}") for w in cluster.workers]
    bodies = [(proxies[i % len(proxies)], {"response": f"answer {i}", "reason": "incorrect", "model": root.name})
              for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(lambda item: post_json(item[0] + "/v1/reports", item[1])["id"], bodies))
    assert sorted(ids) == list(range(1, 21))
    listed = get_json(f"{url}/v1/reports?limit=100")
    assert sorted(r["response"] for r in listed["data"]) == sorted(b["response"] for _, b in bodies)
    export = cluster.run_on_head([sys.executable, "-m", "alpaca_ray.cli", "reports", "export", "--db",
                                  str(root / "serve" / "reports.db")], cwd=REPO_ROOT)
    assert export.returncode == 0, export.stderr[-2000:]
    assert len(export.stdout.splitlines()) == 20

    # Evaluate reached the served model and the teacher from the worker nodes.
    report = json.loads((root / "evaluate" / "report.json").read_text())
    assert report["n_items"] == 2 and len(report["items"]) == 2
    # Model A answered from the served model, model B and the judge from the teacher: all through workers.
    assert all(isinstance(item["answer_a"], str) and item["answer_b"] for item in report["items"])
    assert all(item["judge_raw_a_first"] for item in report["items"])
    assert list((root / "evaluate").rglob("answers/*")), "no answers journaled on the root"
    print(f"multinode quickstart from a laptop: {wall_s:.0f} s")

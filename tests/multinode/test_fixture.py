"""The multinode fixture itself: nodes, disks, the laptop, loopback, and a node failure.

These are the properties every other multinode test relies on, so each is checked with a positive
control (the thing *is* visible / reachable where it should be) beside the negative one.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import sys
import uuid

import pytest

pytestmark = pytest.mark.multinode

# A Ray driver run on the head: one task pinned to each worker by its custom resource writes a file on
# its node-local disk and one on the shared root, and reports what it sees. Tasks run one after another
# so the second worker lists its node-local dir after the first worker wrote to the same path.
WRITE_ON_EACH_WORKER = r"""
import json, os, sys
from pathlib import Path
import ray

tag, shared, local = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
workers = json.loads(sys.argv[4])
ray.init(log_to_driver=False)

@ray.remote(num_cpus=1)
def write(name):
    (local / f"{tag}-{name}.txt").write_text(name)
    (shared / f"{tag}-{name}.txt").write_text(name)
    return {"name": name, "node_id": ray.get_runtime_context().get_node_id(),
            "local_listing": sorted(p for p in os.listdir(local) if p.startswith(tag))}

results = [ray.get(write.options(resources={name: 0.01}).remote(name)) for name in workers]
print("RESULT " + json.dumps({"results": results, "cpus": ray.cluster_resources().get("CPU")}))
"""


def _result_line(output: str) -> dict:
    lines = [line for line in output.splitlines() if line.startswith("RESULT ")]
    assert lines, f"the driver printed no result:\n{output[-3000:]}"
    return json.loads(lines[-1][len("RESULT "):])


def test_skip_reason_without_root_or_unshare(monkeypatch):
    # The fixture skips (instead of failing) where the cluster cannot be built; checked without building it.
    import tests.support.multinode as multinode

    monkeypatch.setattr(multinode.os, "geteuid", lambda: 1000)
    assert "root" in multinode.unavailable_reason()
    monkeypatch.setattr(multinode.os, "geteuid", lambda: 0)
    real_which = multinode.shutil.which
    monkeypatch.setattr(multinode.shutil, "which", lambda tool: None if tool == "unshare" else real_which(tool))
    assert "unshare" in multinode.unavailable_reason()


def test_three_alive_nodes_and_a_head_without_cpus(multinode_cluster):
    cluster = multinode_cluster
    alive = cluster.wait_for_nodes(3, timeout=30)
    by_id = {node["node_id"]: node for node in alive}
    head = by_id[cluster.head.node_id]
    assert head["is_head_node"]
    assert head["resources_total"].get("CPU", 0) == 0  # drivers only: no task may land on the head
    for worker in cluster.workers:
        info = by_id[worker.node_id]
        assert not info["is_head_node"]
        assert info["resources_total"]["CPU"] == 4
        assert info["resources_total"][worker.resource] == 1
        assert info["node_ip"] == worker.ip
    # Every node has an address of its own, as machines of a cluster do.
    assert len({node["node_ip"] for node in alive}) == 3


def test_node_local_disks_are_private_and_shared_root_is_shared(multinode_cluster, tmp_path):
    cluster = multinode_cluster
    tag = uuid.uuid4().hex[:8]
    names = [worker.resource for worker in cluster.workers]
    result = cluster.run_on_head([sys.executable, "-c", WRITE_ON_EACH_WORKER, tag, str(cluster.shared_root),
                                  str(cluster.node_local_dir), json.dumps(names)], timeout=180)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = _result_line(result.stdout)
    assert report["cpus"] == 4 * len(cluster.workers)  # the head adds none

    for worker, task in zip(cluster.workers, report["results"]):
        assert task["node_id"] == worker.node_id  # the custom resource pinned it there
        # The shared root is the same directory for the head side (this process) ...
        assert (cluster.shared_root / f"{tag}-{worker.name}.txt").read_text() == worker.name
        # ... but the node-local file stayed on the worker's own disk.
        assert not (cluster.node_local_dir / f"{tag}-{worker.name}.txt").exists()
    # The second worker wrote after the first, at the same path, and saw only its own file.
    assert report["results"][1]["local_listing"] == [f"{tag}-{names[1]}.txt"]

    # Seen from inside each worker's namespace: its own file is there, the other's is not.
    for i, worker in enumerate(cluster.workers):
        listing = cluster.run_in_worker(i, ["ls", str(cluster.node_local_dir)])
        assert listing.returncode == 0, listing.stderr
        mine = sorted(name for name in listing.stdout.split() if name.startswith(tag))
        assert mine == [f"{tag}-{worker.name}.txt"]


def test_laptop_sees_no_shared_root_but_reaches_the_job_api(multinode_cluster, tmp_path):
    cluster = multinode_cluster
    marker = cluster.shared_root / f"laptop-marker-{uuid.uuid4().hex[:8]}"
    marker.write_text("on the cluster's shared storage")
    probe = cluster.run_as_laptop(["test", "-e", str(marker)])
    assert probe.returncode == 1  # hidden from the laptop (and 1, not an error starting the namespace)

    # The job gets its code only through the API (the working dir upload), runs on the head, and there
    # sees the shared root the laptop cannot.
    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "hello.py").write_text("import os, sys\nprint('job-ran', 6 * 7, os.path.exists(sys.argv[1]))\n")
    job_id = f"laptop-{uuid.uuid4().hex[:8]}"
    submit = cluster.run_as_laptop(
        [sys.executable, "-m", "ray.scripts.scripts", "job", "submit", "--address", cluster.dashboard_url,
         "--submission-id", job_id, "--working-dir", str(workdir), "--", "python", "hello.py", str(marker)],
        timeout=300)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "job-ran 42 True" in submit.stdout

    # The same job seen from the pytest process through an in-process client (no ray.init, no os.environ).
    from ray.job_submission import JobStatus

    client = cluster.job_client()
    assert client.get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "job-ran 42 True" in client.get_job_logs(job_id)


# Two listeners in one process on worker 1: one on its loopback only, one on every address (as a Serve
# proxy started with host 0.0.0.0). Each answers with its own name.
TWO_LISTENERS = r"""
import socket, threading
def serve(host, reply):
    server = socket.socket()
    server.bind((host, 0))
    server.listen()
    def loop():
        while True:
            connection, _ = server.accept()
            connection.sendall(reply)
            connection.close()
    threading.Thread(target=loop, daemon=True).start()
    return server.getsockname()[1]
print(serve("127.0.0.1", b"loopback"), serve("0.0.0.0", b"wildcard"), flush=True)
threading.Event().wait()
"""

CALL = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as connection:
        print("got", connection.recv(100).decode())
except OSError as error:
    print("refused", type(error).__name__)
"""


def _call_from_host(host: str, port: int) -> str:
    try:
        with socket.create_connection((host, port), timeout=5) as connection:
            return "got " + connection.recv(100).decode()
    except OSError as error:
        return f"refused {type(error).__name__}"


def test_loopback_is_private_per_node(multinode_cluster):
    cluster = multinode_cluster
    if not cluster.private_loopback:
        pytest.skip(f"nodes share the host network: {cluster.network_note}")
    first = cluster.workers[0]
    server = subprocess.Popen(cluster.worker_argv(0, [sys.executable, "-c", TWO_LISTENERS]),
                              stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([server.stdout], [], [], 30)  # bounded wait for the ports line
        assert ready, "the servers on worker 1 did not start"
        loopback, wildcard = (int(port) for port in server.stdout.readline().split())

        def from_worker(i: int, host: str, port: int) -> str:
            return cluster.run_in_worker(i, [sys.executable, "-c", CALL, host, str(port)]).stdout.strip()

        # Positive controls: on its own node, the loopback server answers.
        assert from_worker(0, "127.0.0.1", loopback) == "got loopback"
        # Another node's 127.0.0.1 is another machine, and so is the host's.
        assert from_worker(1, "127.0.0.1", loopback).startswith("refused")
        assert _call_from_host("127.0.0.1", loopback).startswith("refused")
        # Nor is a loopback-bound server reachable at the node's address from elsewhere ...
        assert from_worker(1, first.ip, loopback).startswith("refused")
        # ... while one bound to every address is, from the other node and from the pytest process.
        assert from_worker(1, first.ip, wildcard) == "got wildcard"
        assert _call_from_host(first.ip, wildcard) == "got wildcard"
    finally:
        server.kill()
        server.wait(timeout=30)

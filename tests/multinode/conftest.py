"""The ``multinode_cluster`` fixture: a head with no CPUs and two worker nodes in namespaces of their own.

Run these tests alone with ``python -m pytest tests/multinode`` (20-40 s to start the cluster, more on a
busy machine); they also run in the full suite (``python -m pytest``). They need root (mount and network
namespaces) and skip with the reason elsewhere. See tests/support/multinode.py for how the nodes are built.

One pytest process, two clusters: the repo's ``ray_local`` fixture calls ``ray.init(address="local")``
in the pytest process, and a process can be the driver of one Ray cluster only. So the multinode tests
never call ``ray.init`` in the pytest process. Ray-API work runs in subprocesses instead:
``cluster.run_on_head([...])`` for a driver (``RAY_ADDRESS`` is the GCS, inside the head's network, as
a job driver runs), ``ray job submit`` with ``cluster.env()`` for jobs, and the dashboard's HTTP API
(``cluster.alive_nodes()``, ``cluster.job_client()``) for cluster state. Nor does the fixture put the token
in os.environ: Ray caches it per process, so it would leak into the other cluster's clients. Both fixtures
live in one session, in either order (checked with tests/integration/test_dedup_ray.py).

The fixture is package-scoped (stopped once this directory's tests are done, so its three nodes do not
compete for the CPUs with the clusters of the tests that follow), and the suite runs this directory first
(tests/conftest.py), before any other cluster is started; a test that breaks a node (``kill_worker_raylet``) restarts it before it
ends (``restart_worker``), so later tests find three alive nodes, though with a new node id there.
Debugging: ``ALPACA_MULTINODE_KEEP=1`` keeps the nodes' logs (under ``cluster.base``) after the session;
``ALPACA_MULTINODE_SHARED_NET=1`` runs on the shared host network instead of private namespaces.

Helpers (all on the yielded ``MultiNodeCluster``):
  env(**extra) / driver_env(**extra)   client env for `ray job submit` / env for a driver on the head
  job_client(), auth_headers()         in-process JobSubmissionClient / HTTP auth (token in a header)
  dashboard_url, gcs_address, head_ip  addresses, reachable from the pytest process
  shared_root, node_local_dir          a directory all nodes see / one path, private contents per node
  workers[i]                           name, ip, resource, node_id, pid, temp_dir, log_path
  run_on_head(argv), run_in_worker(i, argv), worker_argv(i, argv), run_as_laptop(argv)
  alive_nodes(), wait_for_nodes(n, timeout), kill_worker_raylet(i), restart_worker(i), stop()
  private_loopback                     True when 127.0.0.1 is a different host on every node
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.multinode import MultiNodeCluster, start_multinode_cluster, unavailable_reason

HERE = Path(__file__).resolve().parent
_timings: dict[str, float] = {}
_notes: list[str] = []


def pytest_collection_modifyitems(items):
    # Everything in this directory runs on the multinode cluster, so it carries the marker even where a
    # test file forgets it (``-m "not multinode"`` must leave out the whole directory).
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.multinode)


@pytest.fixture(scope="package")
def multinode_cluster() -> MultiNodeCluster:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    cluster = start_multinode_cluster()
    _timings["start_s"] = time.monotonic() - started
    _notes.append(cluster.network_note)
    _notes.append("ready at " + ", ".join(f"{name} {t}s" for name, t in cluster.start_phases.items()))
    retried = [f"{node.name} x{node.start_attempts}" for node in [cluster.head, *cluster.workers]
               if node.start_attempts > 1]
    if retried:
        _notes.append(f"node starts retried: {', '.join(retried)}")
    yield cluster
    stopping = time.monotonic()
    cluster.stop()
    _timings["stop_s"] = time.monotonic() - stopping


def pytest_terminal_summary(terminalreporter):
    # Starting three Ray nodes is the slow part of these tests; its cost is worth seeing on every run.
    if _timings:
        times = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in _timings.items())
        terminalreporter.write_line(f"multinode cluster: {times}; {'; '.join(_notes)}")

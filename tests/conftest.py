"""Fixtures shared by every stage's tests: one local Ray cluster, one head node, tiny assets.

Starting Ray costs seconds, so each is session-scoped and started only by the tests that ask for it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ray_head import RayHead, free_port, start_ray_head

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def pytest_runtest_setup(item):
    # A browser test that cannot start its browser fails, loudly: a silent skip would pass a suite that
    # never drove the pages. Debian's Chromium is what the tests drive (pip's browser downloads need internet).
    if item.get_closest_marker("browser") and not os.path.exists("/usr/bin/chromium"):
        pytest.fail("this test drives headless Chromium, and /usr/bin/chromium is missing: install it with "
                    "'sudo apt-get install -y chromium' (README, Setup)", pytrace=False)


def pytest_collection_modifyitems(items):
    # The multi-node tests first: their three Ray nodes then have the machine's cores to themselves, and
    # they are stopped before the session's single-node clusters (ray_local, ray_head) start.
    items.sort(key=lambda item: not item.nodeid.startswith("tests/multinode/"))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: public data read by path; tests that need it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray cluster for the whole session (``address="local"`` never joins another cluster).

    Yields the cluster's GCS address; subprocesses given ``RAY_ADDRESS`` of it join instead of starting one.
    """
    import ray

    context = ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                       configure_logging=False)
    yield context.address_info["gcs_address"]
    ray.shutdown()


@pytest.fixture(scope="session")
def ray_env(ray_local) -> dict[str, str]:
    """Environment for a subprocess (the real CLI) that should run on the session's Ray cluster."""
    return {**os.environ, "RAY_ADDRESS": ray_local}


@pytest.fixture(scope="session")
def serve_port(ray_local) -> int:
    """Ray Serve's HTTP proxy on the session cluster, on a free loopback port (one proxy per cluster).

    Every app deployed in tests shares it, under its own app name and route prefix.
    """
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    yield port
    serve.shutdown()


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory) -> RayHead:
    """A head node started with ``ray start --head`` (free ports), for ``ray job submit`` tests."""
    head = start_ray_head(tmp_path_factory.mktemp("ray-head"))
    yield head
    head.stop()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama model and tokenizer on local disk, made once per session."""
    from alpaca_ray.tiny import make_tiny_model

    return Path(make_tiny_model(str(tmp_path_factory.mktemp("tiny-model"))))


def run_cli(args: list[str], env: dict | None = None, timeout: float = 300, cwd: str | Path | None = None,
            check: bool = False) -> subprocess.CompletedProcess:
    """Run ``alpaca-ray ARGS`` as a user would, capturing its output."""
    result = subprocess.run([sys.executable, "-m", "alpaca_ray.cli", *args], capture_output=True, text=True,
                            env=env, timeout=timeout, cwd=cwd or REPO_ROOT)
    if check and result.returncode != 0:
        raise AssertionError(f"alpaca-ray {' '.join(args)} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result

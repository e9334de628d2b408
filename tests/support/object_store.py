"""A real S3-compatible server for the object-store tests: moto's standalone server on a loopback port.

``object_store`` (session fixture) starts it once, makes one bucket and gives URIs in it that carry the
endpoint as pyarrow query options (``s3://BUCKET/KEY?endpoint_override=127.0.0.1:PORT&scheme=http``), so
every process that gets such a URI reaches this server with no other configuration but credentials.

Credentials (dummies: moto accepts any) must reach three kinds of processes:

- this pytest process: the fixture sets ``AWS_*`` in ``os.environ`` for the session and restores it after;
- a driver started as a subprocess (the real CLI): :attr:`ObjectStore.env` holds the same variables;
- the Ray workers of that driver (Ray Train workers upload checkpoints and write metrics). The session's
  ``ray_local`` cluster took its environment when it started, possibly before this fixture ran (fixture
  order follows test order), so setting ``os.environ`` here cannot reach its workers. Instead
  :attr:`ObjectStore.env` also carries the job-level runtime environment the way ``ray job submit
  --runtime-env-json`` hands it to an entrypoint (``RAY_JOB_CONFIG_JSON_ENV_VAR``): ``ray.init`` in the
  driver reads it, and every worker of that job starts with ``env_vars`` set. That is also how a real
  cluster without instance roles would get them, so the test goes the production way.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

BUCKET = "alpaca-ray-test"
#: Dummy credentials: moto accepts any; real SDKs refuse to sign requests without some.
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1",
               # never wait on the EC2 metadata service for credentials or a region
               "AWS_EC2_METADATA_DISABLED": "true"}
#: What `ray job submit` sets for an entrypoint; `ray.init` merges its runtime_env into the job's.
RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


@dataclass
class ObjectStore:
    """The running server's bucket; ``env`` is what a subprocess (and its Ray workers) needs on top of
    its own environment to reach it."""

    endpoint: str  # host:port
    bucket: str = BUCKET
    env: dict[str, str] = field(default_factory=dict)

    def uri(self, *parts: str) -> str:
        """``s3://BUCKET/PARTS...`` with the endpoint options at the end."""
        key = "/".join(p.strip("/") for p in parts if p)
        return f"s3://{self.bucket}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def fresh_uri(self, name: str) -> str:
        """A URI under a prefix no other test uses."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")

    def files(self, uri: str) -> set[str]:
        """Names (relative to ``uri``) of every object under it, listed through pyarrow."""
        from pyarrow import fs

        filesystem, inner = fs.FileSystem.from_uri(uri)
        selector = fs.FileSelector(inner, recursive=True, allow_not_found=True)
        return {info.path[len(inner) + 1:] for info in filesystem.get_file_info(selector)
                if info.type == fs.FileType.File}


@pytest.fixture(scope="session")
def object_store() -> Iterator[ObjectStore]:
    """moto's S3 server for the session, with one empty bucket (each test takes a fresh prefix)."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()  # returns once the server listens
    try:
        host, port = server.get_host_and_port()
        endpoint = f"{host}:{port}"
        boto3.client("s3", endpoint_url=f"http://{endpoint}").create_bucket(Bucket=BUCKET)
        job_config = {"runtime_env": {"env_vars": dict(CREDENTIALS)}}
        yield ObjectStore(endpoint=endpoint, env={**CREDENTIALS, RAY_JOB_CONFIG_ENV: json.dumps(job_config)})
    finally:
        server.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

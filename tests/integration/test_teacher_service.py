"""The run's teacher as a cluster service: deployed by the pipeline's driver, reachable, removed again.

Both kinds go through the same path a pipeline takes (``PipelineRunner.teacher_url`` / ``stop_teacher``),
run as a driver on a ``ray start --head`` node: the replay teacher (an actor on a node's cluster address)
and an open model served with the serve stage's app (here the tiny model, with the transformers engine).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT
from tests.support.ray_head import free_port

pytestmark = [pytest.mark.job, pytest.mark.timeout(900)]

DRIVER = r"""
import json, os, sys, urllib.request
import openai
from alpaca_ray.cluster.ray_cluster import ensure_ray
from alpaca_ray.pipeline.config import PipelineConfig, stage_specs
from alpaca_ray.pipeline.runner import PipelineRunner, dashboard_address

teacher, output, base, port = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
ensure_ray(os.environ["RAY_ADDRESS"], log_to_driver=False)
config = PipelineConfig(output=output, teacher=teacher, generate={"teacher_model": "the-teacher", "target": 5},
                        train={"base_model": base}, serve={"port": port, "app_name": "teacher-test-student",
                                                           "route_prefix": "/student"})
runner = PipelineRunner(config, stage_specs(config), dashboard_address(os.environ["RAY_ADDRESS"]))
url = runner.teacher_url()
client = openai.OpenAI(base_url=url, api_key="any", max_retries=2, timeout=120)
models = [m.id for m in client.models.list()]
answer = client.completions.create(model="the-teacher", prompt="Name a colour.", max_tokens=4)
runner.stop_teacher()
try:
    urllib.request.urlopen(url + "/models", timeout=10)
    gone = False
except Exception:
    gone = True
print("RESULT " + json.dumps({"url": url, "models": models, "text": answer.choices[0].text, "gone": gone}))
"""


def run_driver(ray_head, teacher: dict, tmp_path, tiny_model_dir) -> dict:
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(teacher), str(tmp_path / "run"),
                             str(tiny_model_dir), str(free_port())], capture_output=True, text=True, timeout=800,
                            env=ray_head.env(RAY_ADDRESS=ray_head.gcs_address), cwd=REPO_ROOT)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]) | {"log": result.stdout}


def test_the_replay_teacher_is_an_actor_at_a_cluster_address(ray_head, tiny_model_dir, tmp_path):
    result = run_driver(ray_head, {"replay": str(REPO_ROOT / "alpaca_ray" / "data" / "teacher_replay.jsonl")},
                        tmp_path, tiny_model_dir)
    # Bound to all interfaces and reported by the node's cluster address: reachable from other nodes.
    assert not result["url"].startswith(("http://127.", "http://localhost", "http://0.0.0.0"))
    assert result["text"]  # a recorded answer
    assert result["gone"]  # stopped with the stage that needed it
    assert "offline teacher stopped after 1 requests" in result["log"]


def test_an_open_model_teacher_is_served_with_the_serve_stages_app_and_removed(ray_head, tiny_model_dir, tmp_path):
    teacher = {"model": str(tiny_model_dir), "engine": "transformers", "num_replicas": 1}
    result = run_driver(ray_head, teacher, tmp_path, tiny_model_dir)
    assert result["url"].endswith("/teacher/v1")
    assert result["models"] == ["the-teacher"]  # answers to generate's teacher_model name
    assert isinstance(result["text"], str)
    assert result["gone"]  # removed before train, so its GPUs are free for training
    assert "teacher app 'alpaca-ray-teacher' removed" in result["log"]

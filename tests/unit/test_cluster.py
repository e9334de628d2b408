"""The cluster launch files: valid for Ray's own autoscaler schema, and able to run what the jobs ask for."""

from __future__ import annotations

import copy
import os

import pytest
import yaml

from alpaca_ray.pipeline.config import load_pipeline_config, stage_specs
from tests.conftest import REPO_ROOT

AUTOSCALER_FILES = ["cluster.yaml", "deploy/cluster-gcp.yaml"]


def load(path: str) -> dict:
    with open(REPO_ROOT / path) as handle:
        return yaml.safe_load(handle)


def job_demands(config_name: str) -> dict[str, float]:
    """What the stages of a shipped recipe ask the cluster for: GPUs for train/serve, CPUs for generate."""
    specs = {s.name: s for s in stage_specs(load_pipeline_config(str(REPO_ROOT / "configs" / config_name)))}
    train, serve, generate = specs["train"].values, specs["serve"].values, specs["generate"].values
    assert train["use_gpu"] and serve["use_gpu"]
    return {"train_gpus": train["num_workers"], "serve_gpus": serve.get("num_replicas", 1),
            "generate_cpus": generate["num_workers"] * generate.get("worker_num_cpus", 0.1)}


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_validates_against_rays_schema_as_ray_up_does(path):
    # ray up: prepare_config (merge the provider's defaults, fill node min/max) then validate_config
    # (jsonschema against ray/autoscaler/ray-schema.json plus its own cross-field checks).
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = load(path)
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == raw["provider"]["type"]
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["resourcez"] = {"GPU": 8}  # a typo must not pass
    with pytest.raises(Exception, match="resourcez"):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
@pytest.mark.parametrize("recipe", ["alpaca-7b.yaml", "modern-8b.yaml"])
def test_every_resource_the_jobs_ask_for_exists_in_some_node_type(path, recipe):
    cluster = load(path)
    types = cluster["available_node_types"]
    workers = {name: t for name, t in types.items() if name != cluster["head_node_type"]}
    demands = job_demands(recipe)
    gpu_types = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU node type for train and serve"
    # train's workers must fit on the GPU group at its largest (FSDP across one or more 8-GPU nodes)
    assert sum(t["resources"]["GPU"] * t["max_workers"] for t in gpu_types) >= demands["train_gpus"]
    assert any(t["resources"]["GPU"] >= 8 for t in gpu_types), "want 8-GPU nodes (8x A100/H100)"
    cpu_only = [t for t in workers.values() if t["resources"].get("CPU", 0) > 0 and not t["resources"].get("GPU")]
    assert cpu_only and cpu_only[0]["max_workers"] >= 1, "no autoscaling CPU group for generate"
    assert sum(t["resources"]["CPU"] * t["max_workers"] for t in cpu_only) >= demands["generate_cpus"]
    assert all(t.get("min_workers", 0) == 0 for t in workers.values()), "worker groups should scale from zero"
    assert types[cluster["head_node_type"]]["resources"].get("GPU", 0) == 0


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_setup_installs_this_project_and_opens_the_job_port(path):
    cluster = load(path)
    mounts = cluster["file_mounts"]
    (remote, local), = mounts.items()
    assert local == "." and remote == "~/alpaca-ray"
    setup = "\n".join(cluster["setup_commands"])
    assert "pip install" in setup and "torch==" in setup
    assert "pip install -q -e ~/alpaca-ray" in setup
    start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-port=8265" in start and "--dashboard-host=0.0.0.0" in start


def test_kuberay_manifest_has_a_cluster_with_cpu_and_gpu_groups_and_a_job():
    with open(REPO_ROOT / "deploy" / "kuberay.yaml") as handle:
        documents = [d for d in yaml.safe_load_all(handle) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"RayCluster", "RayJob"}
    assert all(d["apiVersion"] == "ray.io/v1" for d in documents)
    cluster, job = by_kind["RayCluster"], by_kind["RayJob"]
    spec = cluster["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    head_ports = {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
    assert {6379, 8265, 8000} <= head_ports

    def limits(group: dict) -> dict:
        return group["template"]["spec"]["containers"][0]["resources"]["limits"]

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = [g for g in groups.values() if "nvidia.com/gpu" in limits(g)]
    cpu = [g for g in groups.values() if "nvidia.com/gpu" not in limits(g)]
    assert len(gpu) == 1 and limits(gpu[0])["nvidia.com/gpu"] == "8"
    assert len(cpu) == 1 and int(limits(cpu[0])["cpu"]) >= 1
    for group in groups.values():
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
    # the job runs one of this repository's job scripts, with a shipped config, on that cluster
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    words = job["spec"]["entrypoint"].split()
    assert words[0] == "python" and (REPO_ROOT / words[1]).is_file()
    config = words[words.index("--config") + 1]
    assert (REPO_ROOT / config).is_file()
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"])["working_dir"]
    text = (REPO_ROOT / "deploy" / "kuberay.yaml").read_text()
    assert "sk-" not in text and "secretRef" in text  # keys come from a Secret, not the manifest


def test_the_autoscaler_schema_is_the_one_shipped_with_ray():
    import ray.autoscaler

    assert os.path.exists(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"))

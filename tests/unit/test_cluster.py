"""The cluster launch files: valid for Ray's own autoscaler schema, able to run what the jobs ask for,
and never leaving the pipeline's root on a node-local disk.

The setup scripts are run for real with bash, with the commands that would touch the machine (sudo,
mount, the cloud CLIs, ray) replaced by a recording stub placed first on PATH.
"""

from __future__ import annotations

import copy
import os
import re
import stat
import subprocess

import pytest
import yaml

from alpaca_ray.cluster import storage
from alpaca_ray.pipeline.config import load_pipeline_config, stage_specs
from tests.conftest import REPO_ROOT

AUTOSCALER_FILES = ["cluster.yaml", "deploy/cluster-gcp.yaml"]
KUBERAY_FILE = "deploy/kuberay.yaml"
KUBERAY_STORAGE_FILE = "deploy/kuberay-storage.yaml"
SECRET_NAME = "alpaca-ray-secrets"

# Per autoscaler file: the variable naming the network file system (shipped empty), a value a user
# would put there, the NFS source it must become, and the mount type.
FILESYSTEM = {
    "cluster.yaml": ("EFS_ID", "fs-0123456789abcdef0",
                     "fs-0123456789abcdef0.efs.us-west-2.amazonaws.com:/", "nfs4"),
    "deploy/cluster-gcp.yaml": ("FILESTORE", "10.0.0.2:/share", "10.0.0.2:/share", "nfs"),
}
FAKE_KEY = "sk-test-0000-not-a-real-key"


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


def node_commands(path: str) -> dict[str, dict]:
    """What each node type really runs, resolved by Ray's own code: a node type's
    initialization_commands / worker_setup_commands replace the global ones, setup_commands are merged
    into the head's and workers' lists (prepare_config), and docker options are merged per node type."""
    from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig

    raw = load(path)
    config = AutoscalingConfig(copy.deepcopy(raw), skip_content_hash=True)
    head = config.get_head_node_type()
    # `ray up` sets the head up with the GLOBAL initialization_commands, whatever its node type says;
    # a head-specific list would be silently ignored, so there must be none.
    assert "initialization_commands" not in raw["available_node_types"][head]
    result = {}
    for name in raw["available_node_types"]:
        docker = config.get_docker_config(name)
        role = "head" if name == head else "worker"
        result[name] = {
            "init": config.get_initialization_commands(name),
            "setup": config.get_head_setup_commands() if name == head else config.get_worker_setup_commands(name),
            "start": config.get_head_start_ray_commands() if name == head else config.get_worker_start_ray_commands(),
            "run_options": docker.get("run_options", []) + docker.get(f"{role}_run_options", []),
            "image": docker.get("image", ""),
        }
    return result


def script_variable(script: str, name: str) -> str:
    match = re.search(rf"^\s*{name}=(\S*)", script, re.M)
    assert match, f"no {name}= line in the initialization script"
    return match.group(1).strip('"')


def init_script(path: str) -> str:
    """The one initialization command that mounts the root (the same for every node type, see below)."""
    scripts = [c for c in load(path)["initialization_commands"] if FILESYSTEM[path][0] + "=" in c]
    assert len(scripts) == 1
    return scripts[0]


def shared_root(path: str) -> str:
    return script_variable(init_script(path), "ROOT")


def cluster_root() -> str:
    """The mount point every cluster file gives the pipeline's root (they must agree on one)."""
    roots = {shared_root(p) for p in AUTOSCALER_FILES}
    assert len(roots) == 1, roots
    return roots.pop()


# A test double for everything that would touch the machine. It logs each call to $STUB_STATE/calls,
# keeps "mounted" state in a file, maps `sudo tee`/`sudo cat` into $STUB_STATE/root, and runs other
# `sudo X` only if X is itself a stub (so `sudo mkdir /mnt/...` is recorded, not done).
STUB = r"""#!/bin/bash
name="${0##*/}"
printf '%s\n' "$name $*" >> "$STUB_STATE/calls"
case "$name" in
  sudo)
    cmd="$1"; shift
    case "$cmd" in
      tee) path="${!#}"; mkdir -p "$STUB_STATE/root$(dirname "$path")"; cat > "$STUB_STATE/root$path";;
      cat) exec cat "$STUB_STATE/root$1";;
      *) if [ -x "$STUB_DIR/$cmd" ]; then exec "$STUB_DIR/$cmd" "$@"; fi;;
    esac;;
  mount) [ -e "$STUB_STATE/mount-is-noop" ] || touch "$STUB_STATE/mounted";;
  mountpoint) [ -e "$STUB_STATE/mounted" ];;
  findmnt) [ -e "$STUB_STATE/mounted" ] && cat "$STUB_STATE/fstype";;
  aws) cat "$STUB_STATE/aws.out"; exit "$(cat "$STUB_STATE/cli.rc")";;
  gcloud)
    case "$*" in
      *" list "*) cat "$STUB_STATE/gcloud.list";;
      *" access "*) for a in "$@"; do case "$a" in --secret=*) cat "$STUB_STATE/secret-${a#--secret=}";; esac; done;;
    esac
    exit "$(cat "$STUB_STATE/cli.rc")";;
  ray) printf 'OPENAI_API_KEY=%s\n' "${OPENAI_API_KEY-<unset>}" >> "$STUB_STATE/ray-env";;
esac
"""
STUBBED = ["sudo", "mount", "mountpoint", "findmnt", "aws", "gcloud", "ray"]


class Machine:
    """A temp dir standing in for a node: runs real snippets with the stubs first on PATH."""

    def __init__(self, tmp_path, fstype: str = "nfs4"):
        self.dir, self.state = tmp_path / "bin", tmp_path / "state"
        self.dir.mkdir(parents=True)
        self.state.mkdir()
        stub = self.dir / "stub"
        stub.write_text(STUB)
        stub.chmod(0o755)
        for name in STUBBED:
            (self.dir / name).symlink_to(stub)
        (self.state / "fstype").write_text(fstype + "\n")
        (self.state / "cli.rc").write_text("0")
        for name in ("aws.out", "gcloud.list"):
            (self.state / name).write_text("")
        self.env = {"PATH": f"{self.dir}:{os.environ['PATH']}", "HOME": str(tmp_path),
                    "STUB_STATE": str(self.state), "STUB_DIR": str(self.dir), "LC_ALL": "C"}

    def run(self, commands: list[str]) -> subprocess.CompletedProcess:
        """Like Ray's updater: each command in its own bash, stopping at the first that fails."""
        result = None
        for command in commands:
            result = subprocess.run(["bash", "-c", command], env=self.env, capture_output=True, text=True,
                                    timeout=60)
            if result.returncode != 0:
                break
        return result

    @property
    def calls(self) -> list[str]:
        path = self.state / "calls"
        return path.read_text().splitlines() if path.exists() else []

    def file(self, path: str):
        return self.state / "root" / path.lstrip("/")

    def set_secrets(self, path: str, values: dict[str, str]) -> None:
        """Put secrets in the stubbed secret store of the file's cloud, plus one badly named entry."""
        if "gcp" in path:
            names = [*values, "not-a-variable"]
            (self.state / "gcloud.list").write_text("".join(f"projects/1/secrets/{n}\n" for n in names))
            for name, value in [*values.items(), ("not-a-variable", "x")]:
                (self.state / f"secret-{name}").write_text(value)
        else:
            rows = [*values.items(), ("not-a-variable", "x")]
            (self.state / "aws.out").write_text("".join(f"/alpaca-ray/{n}\t{v}\n" for n, v in rows))


def with_filesystem_set(path: str, script: str) -> str:
    """The script as a user leaves it after filling in the file system, the one edit it asks for."""
    variable, value, _, _ = FILESYSTEM[path]
    shipped = f'{variable}=""'
    assert re.search(rf"^\s*{re.escape(shipped)}", script, re.M), f"{path} must ship with {shipped}"
    return script.replace(shipped, f'{variable}="{value}"', 1)


# --- the schema, the node types, the installed project -------------------------------------------

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


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_every_node_runs_the_python_and_ray_the_project_pins(path):
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    ray_pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    min_python = tuple(int(x) for x in re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups())
    for name, node in node_commands(path).items():
        # rayproject/ray:<ray version>-py<major><minor>[-gpu]: the container every Ray process runs in
        match = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)(-gpu|-cpu|-cu\d+)?", node["image"])
        assert match, f"{name}: image {node['image']!r} is not a pinned rayproject/ray tag"
        assert match.group(1) == ray_pin, f"{name}: image has Ray {match.group(1)}, the project pins {ray_pin}"
        assert (int(match.group(2)), int(match.group(3))) >= min_python


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_vllm_is_installed_on_gpu_nodes_only_after_the_common_setup(path):
    cluster = load(path)
    common = cluster["setup_commands"]
    for name, node in node_commands(path).items():
        setup = node["setup"]
        # a node type's own list replaces the common one, so it must still start with all of it
        assert setup[: len(common)] == common, f"{name} drops part of the common setup"
        vllm = [c for c in setup if "[vllm]" in c or "ray[llm]" in c]
        if cluster["available_node_types"][name]["resources"].get("GPU", 0) > 0:
            assert vllm == ['python3 -m pip install -q -e "$HOME/alpaca-ray[vllm]"'], name
        else:
            assert not vllm, f"{name} has no GPU but installs vLLM"


# --- the shared root: mounted everywhere, never node-local -----------------------------------------

@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_every_node_type_mounts_the_recipes_root_from_a_network_file_system(path):
    variable, _, _, fstype = FILESYSTEM[path]
    root = cluster_root()
    script = init_script(path)
    for name, node in node_commands(path).items():
        init = "\n".join(node["init"])
        assert script in node["init"], f"{name} does not run the mount script"
        # (where it is mounted, and that it really is, is checked by running the script below)
        assert re.search(rf"mount -t {fstype}\b", init) and f'"${variable}' in init, name
        # the container sees the host's mount at the same path ...
        assert f"--volume={root}:{root}" in node["run_options"], f"{name} does not bind {root} into its container"
        # ... and checks it is the NFS mount before installing or starting anything
        assert f"mountpoint -q {root}" in node["setup"][0] and "'^nfs'" in node["setup"][0], name


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_setup_stops_with_a_message_while_the_file_system_is_not_set(path, tmp_path):
    variable = FILESYSTEM[path][0]
    for name, node in node_commands(path).items():
        machine = Machine(tmp_path / name)
        result = machine.run(node["init"])  # as shipped: the variable is empty
        assert result.returncode != 0, f"{name} would start on local disks"
        assert f"alpaca-ray: set {variable} in {path}" in result.stderr
        assert not any(c.startswith(("sudo", "mount")) for c in machine.calls), machine.calls


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_setup_mounts_the_file_system_once_set_and_exports_the_secrets_to_ray(path, tmp_path):
    _, _, source, fstype = FILESYSTEM[path]
    root = cluster_root()
    for name, node in node_commands(path).items():
        machine = Machine(tmp_path / name, fstype=fstype)
        machine.set_secrets(path, {"OPENAI_API_KEY": FAKE_KEY, "HF_TOKEN": "hf_test"})
        init = [with_filesystem_set(path, c) if c == init_script(path) else c for c in node["init"]]
        result = machine.run(init)
        assert result.returncode == 0, result.stderr
        mounts = [c for c in machine.calls if c.startswith("mount ")]
        assert len(mounts) == 1 and mounts[0].startswith(f"mount -t {fstype} ")
        assert mounts[0].endswith(f" {source} {root}"), mounts[0]
        assert "skipping" in result.stderr and "not-a-variable" in result.stderr
        assert FAKE_KEY not in result.stdout + result.stderr  # never echoed into ray up's log
        secrets = machine.file("/etc/alpaca-ray/secrets.env")
        assert stat.S_IMODE(secrets.stat().st_mode) & 0o077 == 0, "the secrets file must be private"
        assert "not-a-variable" not in secrets.read_text()
        # the start commands export them in the shell that runs `ray start`
        machine.run(node["start"])
        assert any(c.startswith("ray start") for c in machine.calls)
        assert (machine.state / "ray-env").read_text().splitlines()[-1] == f"OPENAI_API_KEY={FAKE_KEY}"


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
@pytest.mark.parametrize("failure", ["mount did nothing", "not NFS"])
def test_setup_fails_when_the_root_is_not_really_a_network_mount(path, failure, tmp_path):
    machine = Machine(tmp_path, fstype="ext4" if failure == "not NFS" else FILESYSTEM[path][3])
    if failure == "mount did nothing":
        (machine.state / "mount-is-noop").touch()
    result = machine.run([with_filesystem_set(path, init_script(path))])
    assert result.returncode != 0
    assert f"alpaca-ray: {cluster_root()} is not an NFS mount" in result.stderr
    assert not machine.file("/etc/alpaca-ray/secrets.env").exists()


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_setup_fails_when_the_secrets_cannot_be_read(path, tmp_path):
    machine = Machine(tmp_path, fstype=FILESYSTEM[path][3])
    (machine.state / "cli.rc").write_text("255")  # e.g. the node's role may not read them
    result = machine.run([with_filesystem_set(path, init_script(path))])
    assert result.returncode != 0 and "alpaca-ray: could not" in result.stderr
    assert not machine.file("/etc/alpaca-ray/secrets.env").exists()


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_ray_is_not_started_without_the_secrets_file(path, tmp_path):
    for name, node in node_commands(path).items():
        machine = Machine(tmp_path / name)
        result = machine.run(node["start"])
        assert result.returncode != 0 and "secrets.env is missing" in result.stderr
        assert not any(c.startswith("ray start") for c in machine.calls), name


@pytest.mark.parametrize("path", AUTOSCALER_FILES)
def test_the_scripts_agree_with_the_rest_of_the_file(path):
    cluster = load(path)
    script = init_script(path)
    if cluster["provider"]["type"] == "aws":
        assert script_variable(script, "AWS_REGION") == cluster["provider"]["region"]
    else:
        project = cluster["provider"]["project_id"]
        for name, node_type in cluster["available_node_types"].items():
            for account in node_type["node_config"].get("serviceAccounts", []):
                assert account["email"].endswith(f"@{project}.iam.gserviceaccount.com"), name


def kuberay_documents() -> list[dict]:
    with open(REPO_ROOT / KUBERAY_FILE) as handle:
        return [d for d in yaml.safe_load_all(handle) if d]


def pod_templates(cluster: dict) -> dict[str, dict]:
    spec = cluster["spec"]
    return {"head": spec["headGroupSpec"]["template"]["spec"],
            **{g["groupName"]: g["template"]["spec"] for g in spec["workerGroupSpecs"]}}


def test_kuberay_every_pod_mounts_the_read_write_many_claim_at_the_root():
    with open(REPO_ROOT / KUBERAY_STORAGE_FILE) as handle:
        claims = [d for d in yaml.safe_load_all(handle) if d]
    assert [c["kind"] for c in claims] == ["PersistentVolumeClaim"]
    claim = claims[0]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every node must mount it read-write"
    assert claim["spec"].get("storageClassName"), "a class that provisions RWX volumes (EFS, Filestore)"
    cluster = next(d for d in kuberay_documents() if d["kind"] == "RayCluster")
    root = cluster_root()
    for group, pod in pod_templates(cluster).items():
        claimed = {v["name"] for v in pod["volumes"]
                   if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]}
        assert claimed, f"{group} does not use the claim"
        for container in pod["containers"]:
            at_root = [m for m in container.get("volumeMounts", []) if m["mountPath"] == root]
            assert len(at_root) == 1 and at_root[0]["name"] in claimed, f"{group}: {root} is not the claim"


def test_kuberay_manifest_has_a_cluster_with_cpu_and_gpu_groups_and_a_job():
    documents = kuberay_documents()
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


def test_kuberay_secrets_come_from_the_secret_into_every_ray_container():
    documents = kuberay_documents()
    cluster = next(d for d in documents if d["kind"] == "RayCluster")
    for group, pod in pod_templates(cluster).items():
        for container in pod["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert {"name": SECRET_NAME, "optional": True} in refs, f"{group} does not get the keys"
            for env in container.get("env", []):  # no key typed into the manifest instead
                assert not (looks_secret(env["name"]) and "value" in env), f"{group}: {env['name']} in plain text"
    job = next(d for d in documents if d["kind"] == "RayJob")
    env_vars = (yaml.safe_load(job["spec"]["runtimeEnvYAML"]) or {}).get("env_vars", {})
    assert not [k for k in env_vars if looks_secret(k)], "keys must not travel in a job's runtime_env"


# --- the recipes against the cluster files -------------------------------------------------------

def recipes() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO_ROOT / "configs").glob("*.yaml"))}


def runs_on_the_cluster(recipe: dict) -> bool:
    """A recipe that asks for GPUs is one for the cluster; the CPU quick start is for one machine."""
    return any((recipe.get(stage) or {}).get("use_gpu") for stage in ("train", "serve"))


def test_cluster_recipes_keep_their_output_under_the_root_every_node_mounts():
    root = cluster_root()
    cluster_recipes = {n: r for n, r in recipes().items() if runs_on_the_cluster(r)}
    assert {"alpaca-7b.yaml", "modern-8b.yaml"} <= set(cluster_recipes)
    for name, recipe in cluster_recipes.items():
        output = str(recipe["output"])
        if storage.is_remote(output):
            continue  # s3:// or gs://: shared by every node without a mount
        path = storage.local_path(output)
        assert os.path.isabs(path) and os.path.commonpath([path, root]) == root, (
            f"{name}: output {output!r} would be node-local on the cluster; put it under {root} or use s3://")


def test_node_local_paths_of_cluster_recipes_exist_on_every_node():
    # serve.reports_db is meant to be node-local (SQLite WAL and NFS do not mix); its directory must
    # still be writable by the containers' user on every node that may run a Serve replica.
    directories = set()
    for recipe in recipes().values():
        db = (recipe.get("serve") or {}).get("reports_db")
        if runs_on_the_cluster(recipe) and db and not storage.is_remote(db):
            if os.path.commonpath([db, cluster_root()]) != cluster_root():
                directories.add(os.path.dirname(db))
    for path in AUTOSCALER_FILES:
        for name, node in node_commands(path).items():
            setup = "\n".join(node["setup"])
            for directory in directories:
                assert f"mkdir -p {directory}" in setup, f"{path} {name}: {directory} is not made"
    cluster = next(d for d in kuberay_documents() if d["kind"] == "RayCluster")
    for group, pod in pod_templates(cluster).items():
        mounted = {m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert directories <= mounted, f"kuberay {group}: {directories - mounted} is not provided"


# --- secrets never in plain text ------------------------------------------------------------------

SECRET_VALUE = re.compile(
    r"sk-[A-Za-z0-9_-]{8,}"                       # OpenAI-style keys
    r"|hf_[A-Za-z0-9]{16,}"                        # Hugging Face tokens
    r"|AKIA[0-9A-Z]{16}"                           # AWS access key ids
    # a variable whose name ends like a secret's, given a literal value (not "$VAR")
    r"|\b[A-Z0-9_]*(?:KEY|TOKEN|SECRET|PASSWORD)\b\s*[=:]\s*[\"']?[A-Za-z0-9_\-]{8,}")


def looks_secret(name: str) -> bool:
    return bool(re.search(r"API_KEY|TOKEN|SECRET|PASSWORD", name.upper()))


def test_the_secret_detector_catches_what_it_is_for():
    for leaked in ['OPENAI_API_KEY=sk-abcdef123456', 'export HF_TOKEN="hf_abcdefghijklmnopqrst"',
                   "VLLM_API_KEY: changeme-please", "aws_access_key_id = AKIAABCDEFGHIJKLMNOP",
                   "MODERATION_API_KEY='0123456789abcdef'"]:
        assert SECRET_VALUE.search(leaked), leaked
    for fine in ['--from-literal=OPENAI_API_KEY="$OPENAI_API_KEY"', "api_key_env: OPENAI_API_KEY",
                 "printf 'export %s=%q' \"$var\" \"$value\"", "secretRef: {name: alpaca-ray-secrets}",
                 "SECRETS_LABEL=alpaca_ray=env", "SECRETS_FILE=/etc/alpaca-ray/secrets.env"]:
        assert not SECRET_VALUE.search(fine), fine


@pytest.mark.parametrize("path", [*AUTOSCALER_FILES, KUBERAY_FILE, KUBERAY_STORAGE_FILE,
                                  *(f"configs/{n}" for n in recipes())])
def test_no_cluster_file_or_recipe_holds_a_secret_in_plain_text(path):
    text = (REPO_ROOT / path).read_text()
    leaks = [m.group(0) for m in SECRET_VALUE.finditer(text)]
    assert not leaks, f"{path} holds what looks like a key: {leaks}"


def test_the_autoscaler_schema_is_the_one_shipped_with_ray():
    import ray.autoscaler

    assert os.path.exists(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json"))

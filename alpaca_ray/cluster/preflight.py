"""The preflight: prove that every node sees the storage root and has the secrets its stage needs.

On a real cluster the driver runs on the head and the work runs on worker nodes with disks of their own,
so a root that is a node-local directory "works" on each node separately while every artifact is lost
between them. Writing a probe on every node would not notice that; so the driver writes a token under
the root, a small task on every alive node must read that very token back (it sees the driver's files)
and write one of its own, which the driver then reads (the driver sees the node's files). The same task
reports which of the stage's environment variables are missing on its node (names only, never values).

Nodes started later by the autoscaler are checked as the first thing the stage's workers do there:
:meth:`NodeCheck.verify` reads the same token before any work starts.

Everything but :func:`run_preflight` is plain code, tested without Ray.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field

from alpaca_ray.cluster import storage
from alpaca_ray.config import UserError

#: Where probes live under a root; removed again once the check is done.
PROBE_DIR = ".alpaca-ray-preflight"

FIX_ROOT = ("fix: make the root a path that every node mounts (a shared filesystem: EFS, Filestore, NFS, a "
            "ReadWriteMany volume; cluster.yaml mounts one at /mnt/cluster_storage) or an s3:// / gs:// URI")
FIX_ENV = ("fix: set it on every node before `ray start` (the head's environment, the cluster file's start "
           "commands, or a Kubernetes Secret: see the README's 'Secrets on the cluster'); never in a config")


class PreflightError(UserError):
    """The cluster cannot run the stage as configured; the message names the node, the path and the fix."""


@dataclass(frozen=True)
class EnvNeed:
    """An environment variable a stage needs, and where."""

    name: str
    #: Why, in words shown to the user ("generate: the teacher's API key").
    why: str
    #: "driver": only where the stage's driver runs (it reads the secret and hands it over);
    #: "workers": on every node that can run the stage's workers.
    where: str = "workers"


@dataclass
class NodeReport:
    """What one node found."""

    node_id: str
    ip: str
    hostname: str
    is_driver_node: bool = False
    problems: list[str] = field(default_factory=list)
    missing_env: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"node {self.ip} ({self.hostname}, id {self.node_id[:12]})"


@dataclass(frozen=True)
class NodeCheck:
    """What a stage's workers check first on whatever node they start: the root's token and the env."""

    root: str
    token: str
    env_names: tuple[str, ...] = ()

    @property
    def token_path(self) -> str:
        return storage.join(self.root, PROBE_DIR, f"{self.token}.driver")

    def verify(self) -> None:
        """Raise :class:`PreflightError` naming this node if it cannot see the root or lacks a variable."""
        report = probe_this_node(self.root, self.token, self.env_names, write=False)
        problems = report.problems + [f"environment variable {name} is not set" for name in report.missing_env]
        if problems:
            raise PreflightError(f"{report.label} cannot run this stage's workers: " + "; ".join(problems)
                                 + f"\n  {FIX_ROOT if report.problems else FIX_ENV}")


def this_node_identity() -> tuple[str, str, str]:
    """(node id, ip, hostname) of the node this process runs on (Ray's view when Ray is up)."""
    node_id, ip = "", ""
    try:
        import ray

        if ray.is_initialized():
            from alpaca_ray.cluster.ray_cluster import this_node_address

            node_id = ray.get_runtime_context().get_node_id()
            ip = this_node_address()
    except Exception:  # noqa: BLE001 - identity is for messages only
        pass
    return node_id or "local", ip or "127.0.0.1", socket.gethostname()


def probe_this_node(root: str, token: str, env_names: Iterable[str], write: bool = True) -> NodeReport:
    """Run on one node: read the driver's token under ``root``, optionally write this node's own probe.

    Returns what went wrong, never raises for a storage problem (the driver gathers every node's answer).
    """
    node_id, ip, hostname = this_node_identity()
    report = NodeReport(node_id, ip, hostname)
    report.missing_env = [name for name in env_names if not os.environ.get(name)]
    driver_file = storage.join(root, PROBE_DIR, f"{token}.driver")
    try:
        seen = storage.read_text(driver_file) if storage.exists(driver_file) else None
    except OSError as err:
        seen = None
        report.problems.append(f"cannot read {driver_file}: {err}")
    if seen is None and not report.problems:
        report.problems.append(f"does not see {driver_file}, which the driver wrote under the root {root}: "
                               "the root is not shared with this node (a node-local directory?)")
    elif seen is not None and seen.strip() != token:
        report.problems.append(f"reads other content at {driver_file}: not the driver's file")
    if write and not report.problems:
        mine = storage.join(root, PROBE_DIR, f"{token}.{node_id}")
        try:
            storage.write_text(mine, f"{token}:{node_id}\n")
            if storage.read_text(mine).strip() != f"{token}:{node_id}":
                report.problems.append(f"wrote {mine} but read back something else")
        except OSError as err:
            report.problems.append(f"cannot write under the root ({mine}): {err}")
    return report


def driver_write_token(root: str, token: str) -> str:
    """Write the driver's token under the root (made if missing); returns its path."""
    path = storage.join(root, PROBE_DIR, f"{token}.driver")
    try:
        storage.makedirs(storage.join(root, PROBE_DIR))
        storage.write_text(path, token + "\n")
    except OSError as err:
        raise PreflightError(f"the driver's node ({socket.gethostname()}) cannot write under the root {root}: "
                             f"{err}\n  {FIX_ROOT}") from None
    return path


def driver_confirm(root: str, token: str, reports: list[NodeReport]) -> None:
    """The driver reads each node's probe (it must see the nodes' files too), then removes them all."""
    for report in reports:
        if report.problems or report.is_driver_node:
            continue
        path = storage.join(root, PROBE_DIR, f"{token}.{report.node_id}")
        try:
            ok = storage.exists(path) and storage.read_text(path).strip() == f"{token}:{report.node_id}"
        except OSError:
            ok = False
        if not ok:
            report.problems.append(f"wrote {path}, but the driver does not see it: the root is not shared")


def cleanup(root: str, token: str, node_ids: Iterable[str]) -> None:
    """Remove the probes (best effort: a probe left behind is harmless and named after its run)."""
    for name in [f"{token}.driver", *(f"{token}.{node_id}" for node_id in node_ids)]:
        try:
            storage.remove(storage.join(root, PROBE_DIR, name))
        except OSError:
            pass
    if not storage.is_remote(root):  # object stores have no directories to leave behind
        try:
            os.rmdir(storage.local_path(storage.join(root, PROBE_DIR)))
        except OSError:
            pass  # not empty: another run's probes are in flight


def failure_message(root: str, reports: list[NodeReport], needs: list[EnvNeed]) -> str | None:
    """One error listing every node's problems and the fix, or None when every node passed."""
    why = {need.name: need.why for need in needs}
    lines = []
    for report in reports:
        for problem in report.problems:
            lines.append(f"{report.label}: {problem}")
        for name in report.missing_env:
            lines.append(f"{report.label}: environment variable {name} is not set ({why.get(name, 'needed')})")
    if not lines:
        return None
    fixes = []
    if any(r.problems for r in reports):
        fixes.append(FIX_ROOT)
    if any(r.missing_env for r in reports):
        fixes.append(FIX_ENV)
    return (f"preflight failed for the root {root}; nothing was submitted or paid for:\n  - "
            + "\n  - ".join(lines) + "\n  " + "\n  ".join(fixes))


def format_reports(root: str, reports: list[NodeReport]) -> str:
    """The table the preflight prints when every node passed."""
    lines = [f"preflight: root {root} is shared by all {len(reports)} alive node(s)"]
    for report in reports:
        role = "driver" if report.is_driver_node else "worker"
        lines.append(f"  {report.ip:<15} {report.hostname:<20} {role:<6} root ok, environment ok")
    return "\n".join(lines)


# --- the Ray part -------------------------------------------------------------------------------------


def run_preflight(root: str, needs: list[EnvNeed] | None = None, timeout_s: float = 120,
                  say=print) -> NodeCheck:
    """Check every alive node of the connected Ray cluster; raise :class:`PreflightError` on any problem.

    Returns the :class:`NodeCheck` that the stage's workers verify on the nodes they start on (nodes the
    autoscaler adds later were not alive now). Its token file stays under the root until :func:`finish`.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    needs = list(needs or [])
    driver_env = [n.name for n in needs if n.where == "driver"]
    worker_env = [n.name for n in needs if n.where == "workers"]
    token = secrets.token_hex(8)
    driver_write_token(root, token)
    driver_node = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    probe = ray.remote(num_cpus=0, max_retries=0)(probe_this_node)
    refs = []
    for node in nodes:
        env = driver_env + worker_env if node["NodeID"] == driver_node else worker_env
        strategy = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        refs.append(probe.options(scheduling_strategy=strategy).remote(root, token, env))
    ready, pending = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    reports = []
    for node, ref in zip(nodes, refs):
        if ref in pending:
            ray.cancel(ref, force=True)
            reports.append(NodeReport(node["NodeID"], node.get("NodeManagerAddress", "?"), node.get(
                "NodeManagerHostname", "?"), problems=[f"the probe did not finish within {timeout_s:.0f}s"]))
            continue
        try:
            report = ray.get(ref)
        except Exception as err:  # noqa: BLE001 - a node whose probe crashed is a failed node
            report = NodeReport(node["NodeID"], node.get("NodeManagerAddress", "?"),
                                node.get("NodeManagerHostname", "?"),
                                problems=[f"the probe failed: {str(err).splitlines()[0]}"])
        report.is_driver_node = node["NodeID"] == driver_node
        reports.append(report)
    driver_confirm(root, token, reports)
    # The nodes' probes go now; the driver's token stays for the workers that start later (finish()).
    for report in reports:
        try:
            storage.remove(storage.join(root, PROBE_DIR, f"{token}.{report.node_id}"))
        except OSError:
            pass
    message = failure_message(root, reports, needs)
    if message:
        cleanup(root, token, [])
        raise PreflightError(message)
    say(format_reports(root, reports))
    return NodeCheck(root, token, tuple(worker_env))


def finish(check: NodeCheck | None) -> None:
    """Remove the token the workers checked against, once the stage is done."""
    if check is not None:
        cleanup(check.root, check.token, [])


# --- what each stage needs (plain dicts of a stage's config fields: no stage is imported) ------------


def looks_like_hub_name(name: str) -> bool:
    """``org/model`` that is no path here and no URI: something ``from_pretrained`` downloads."""
    name = str(name or "")
    return ("/" in name and not name.startswith(("/", ".", "~")) and not storage.is_remote(name)
            and not os.path.exists(name) and name.count("/") == 1)


def stage_needs(stage: str, values: dict, teacher_keys: Iterable[str] = ()) -> list[EnvNeed]:
    """The environment variables ``stage`` needs on the cluster, and where (driver or workers).

    ``teacher_keys``: key variables the pipeline fills in itself (its own deployed teacher takes any key).
    Secrets read by a stage's driver and handed to its workers (the teacher and judge keys) are needed on
    the driver's node only; ``HF_TOKEN`` where a rank or replica downloads a hub model, when this
    process has one (a gated model: the workers need it too); the moderation key on the serve replicas.
    """
    teacher_keys = set(teacher_keys)
    needs: list[EnvNeed] = []

    def need(name: str | None, why: str, where: str) -> None:
        if name and name not in teacher_keys and all(n.name != name or n.where != where for n in needs):
            needs.append(EnvNeed(name, why, where))

    if stage == "generate":
        need(values.get("api_key_env", "OPENAI_API_KEY"), "generate: the teacher's API key", "driver")
    elif stage == "train":
        if looks_like_hub_name(values.get("base_model", "")) and os.environ.get("HF_TOKEN"):
            need("HF_TOKEN", f"train: every rank downloads {values['base_model']} from the hub", "workers")
    elif stage == "serve":
        if values.get("content_filter") == "openai":
            need(values.get("moderation_api_key_env") or "OPENAI_API_KEY", "serve: the moderation API key of "
                 "--content-filter openai, read by every replica", "workers")
        if looks_like_hub_name(values.get("model", "")) and os.environ.get("HF_TOKEN"):
            need("HF_TOKEN", f"serve: every replica downloads {values['model']} from the hub", "workers")
    elif stage == "evaluate":
        if values.get("judge_model") and not values.get("judge_answers"):
            need(values.get("judge_api_key_env", "OPENAI_API_KEY"), "evaluate: the judge's API key", "driver")
        for side in ("a", "b"):
            need(values.get(f"model_{side}_api_key_env"), f"evaluate: model {side.upper()}'s API key", "driver")
    return needs


def alive_node_count() -> int:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive"))


def preflight_stage(stage: str, root: str, values: dict, say=print, **init_kwargs) -> NodeCheck | None:
    """A stage run on an existing cluster (a Ray job, ``RAY_ADDRESS``): check it before doing anything.

    Returns the check the stage's workers repeat on the nodes they start on, or None where there is
    nothing to prove: a stage that starts its own local cluster, or a cluster of one node (which sees
    its own disk by definition; the stage's own checks cover its driver's environment there).
    """
    if not os.environ.get("RAY_ADDRESS"):
        return None
    from alpaca_ray.cluster.ray_cluster import ensure_ray

    ensure_ray(**init_kwargs)
    if alive_node_count() <= 1:
        return None
    return run_preflight(root, stage_needs(stage, values), say=say)

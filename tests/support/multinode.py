"""A real multi-node Ray cluster on one machine: a CPU-less head and two worker nodes, each a ``ray start``.

Why: on a real cluster job drivers run on a head with no CPUs, while tasks, actors, Train ranks and Serve
replicas run on worker nodes that each have a disk of their own and a loopback of their own. A single local
Ray instance hides every mistake of that kind (a path written on one node and read on another, a server
bound to 127.0.0.1 and called from elsewhere). Here each node lives in Linux namespaces of its own:

* mount namespace: ``node_local_dir`` is the same path on every node, but each worker mounts a private
  tmpfs over it (the head, and the pytest process with it, use the plain host directory), while
  ``shared_root`` is the one directory every node sees, standing for a shared file system;
* network namespace (when the kernel allows it): each node gets its own ``lo`` and an address on a
  bridge that lives in the host namespace (``10.77.S.1`` head, ``.11``/``.12`` workers, ``.254`` host),
  so the pytest process reaches the head's dashboard, job API and any node's Serve proxy by address,
  while 127.0.0.1 means a different machine on every node. Where network namespaces fail, every node
  shares the host's network on its own loopback address (127.0.0.1, 127.0.0.11, 127.0.0.12) and
  ``private_loopback`` is False.

A "laptop" is one more mount namespace where the whole cluster base directory (shared root included)
is hidden: it can only talk to the cluster over the job API, as a user's machine would.

Every node runs ``ray start --block`` in a session of its own, so stopping it stops only this cluster
(``ray stop`` would stop every Ray cluster on the machine). Each node is also a mount namespace of its
own, which names all its processes exactly: teardown kills what is left in it, and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

WORKER_CPUS = 4
# The object store is allocated lazily, but Ray checks each node's share against /dev/shm, which all
# nodes share here; small stores keep three nodes well inside it.
OBJECT_STORE_BYTES = 300 * 1024 * 1024
WORKER_PORTS = 100  # one port per worker process (task or actor) a node may run at once
SUBNET_PREFIX = "10.77"
HOST_OCTET, HEAD_OCTET = 254, 1
NODE_LOCAL_TMPFS_SIZE = "1g"


class MultinodeUnavailable(RuntimeError):
    """This machine cannot build the cluster (not root, no ``unshare``/``nsenter``): tests should skip."""


def unavailable_reason() -> str | None:
    """Why a multi-node cluster cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "multinode cluster needs root (mount and network namespaces)"
    for tool in ("unshare", "nsenter", "mount"):
        if shutil.which(tool) is None:
            return f"multinode cluster needs `{tool}` (util-linux), which is not installed"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
        return f"`unshare --mount` fails here: {probe.stderr.strip()}"
    return None


@dataclass
class Node:
    """One ``ray start --block`` process and what names it."""

    name: str  # "head", "worker1", "worker2"
    ip: str  # --node-ip-address: how other nodes (and the pytest process) reach it
    temp_dir: Path  # --temp-dir: logs and session files, visible from the host for debugging
    log_path: Path  # stdout/stderr of ``ray start``
    resource: str | None = None  # custom resource naming a worker ({resource: 0.01} pins a task to it)
    netns: str | None = None  # name under /var/run/netns, None on the shared host network
    process: subprocess.Popen | None = None
    mnt_ns: str = ""  # readlink /proc/PID/ns/mnt once started: every process of this node shares it
    node_id: str = ""  # Ray's node id (hex), known once the node has registered
    launch: tuple[list[str], dict[str, str]] = ((), {})  # (command, env) to (re)start it
    log_offset: int = 0  # where the current attempt's output begins in log_path
    start_attempts: int = 0  # launches so far (more than one per start means ray start gave up and was retried)

    @property
    def pid(self) -> int:
        """Pid of this node's ``ray start --block`` (stays alive as long as the node does)."""
        assert self.process is not None, f"{self.name} was never started"
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class MultiNodeCluster:
    base: Path
    auth_token: str
    head: Node
    workers: list[Node]
    private_loopback: bool  # True: 127.0.0.1 is a different host on every node (own network namespaces)
    network_note: str  # how the network was set up, or why private namespaces were not used
    dashboard_port: int
    gcs_port: int
    bridge: str | None = None
    start_phases: dict[str, float] = field(default_factory=dict)  # seconds from start to each milestone
    _stopped: bool = field(default=False, repr=False)

    # ---- addresses and environments -------------------------------------------------------------
    @property
    def shared_root(self) -> Path:
        """The directory every node sees (a shared file system); the laptop does not see it."""
        return self.base / "shared"

    @property
    def node_local_dir(self) -> Path:
        """Same path on every node, private contents per node (the head's is the host directory)."""
        return self.base / "node-local"

    @property
    def head_ip(self) -> str:
        return self.head.ip

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.head.ip}:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.gcs_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client subprocess (``ray job submit``, the alpaca-ray CLI) of this cluster.

        In the pytest process itself use :meth:`job_client` instead of setting os.environ.
        """
        return {**_base_env(), "RAY_ADDRESS": self.dashboard_url, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.auth_token, **extra}

    def driver_env(self, **extra: str) -> dict[str, str]:
        """Environment for a Ray driver (``ray.init()``) run on the head with :meth:`run_on_head`."""
        return {**_base_env(), "RAY_ADDRESS": self.gcs_address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.auth_token, **extra}

    def auth_headers(self) -> dict[str, str]:
        """HTTP headers that authenticate to this cluster's dashboard, job API included."""
        return {"Authorization": f"Bearer {self.auth_token}"}

    def job_client(self):
        """A ``JobSubmissionClient`` for this cluster, usable inside the pytest process.

        The token goes in an explicit header: Ray's own token lookup (RAY_AUTH_MODE / RAY_AUTH_TOKEN) is
        cached per process by a C++ singleton, so setting os.environ for one cluster would leak into any
        other cluster this process talks to (the repo's ``ray_local``, another head) and not be undone.
        """
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url, headers=self.auth_headers())

    # ---- running commands on nodes ----------------------------------------------------------------
    def run_on_head(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
                    cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on the head node (its network namespace), as a job driver would run.

        ``env`` defaults to :meth:`driver_env`, so ``ray.init()`` joins this cluster on the head's raylet.
        """
        return self._run_in(self.head, argv, self.driver_env() if env is None else env, timeout, cwd)

    def run_in_worker(self, i: int, argv: Sequence[str], env: dict[str, str] | None = None,
                      timeout: float = 300, cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` inside worker ``i``'s namespaces (``i`` indexes :attr:`workers`, from 0).

        It sees that worker's ``node_local_dir`` and, with private networking, that worker's 127.0.0.1.
        """
        return self._run_in(self.workers[i], argv, _base_env() if env is None else env, timeout, cwd)

    def worker_argv(self, i: int, argv: Sequence[str], cwd: str | Path | None = None) -> list[str]:
        """``argv`` wrapped to run inside worker ``i``'s namespaces, for a long-lived ``Popen`` of your own."""
        return self._argv_in(self.workers[i], argv, cwd)

    def _argv_in(self, node: Node, argv: Sequence[str], cwd: str | Path | None) -> list[str]:
        if not node.alive():
            raise RuntimeError(f"{node.name} is not running")
        # -m: the node's mounts (its node-local tmpfs); -n: its network. nsenter chdirs to / when it
        # enters a mount namespace, hence the explicit working directory.
        return ["nsenter", "-t", str(node.pid), "-m", *(["-n"] if node.netns else []),
                f"--wd={cwd or os.getcwd()}", "--", *argv]

    def _run_in(self, node: Node, argv: Sequence[str], env: dict[str, str], timeout: float,
                cwd: str | Path | None) -> subprocess.CompletedProcess:
        return subprocess.run(self._argv_in(node, argv, cwd), capture_output=True, text=True, timeout=timeout,
                              env=env)

    def run_as_laptop(self, argv: Sequence[str], env: dict[str, str] | None = None, timeout: float = 300,
                      cwd: str | Path | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` as a user's laptop: the cluster's directories (shared root included) are hidden.

        The laptop stays on the host network, so it reaches the dashboard / job API at
        :attr:`dashboard_url` like any client. ``env`` defaults to :meth:`env`.
        """
        return subprocess.run(self.laptop_argv(argv), capture_output=True, text=True, timeout=timeout,
                              env=self.env() if env is None else env, cwd=cwd)

    def laptop_argv(self, argv: Sequence[str]) -> list[str]:
        """``argv`` wrapped to run as the laptop (see :meth:`run_as_laptop`), for a ``Popen`` of your own."""
        # A tmpfs over the whole base directory hides the shared root, the head's node-local disk and
        # every node's temp dir at once: anything the laptop hands the cluster must go over the API.
        script = 'mount -t tmpfs -o size=16m laptop "$1" && shift && exec "$@"'
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                str(self.base), *argv]

    # ---- cluster state ------------------------------------------------------------------------------
    def nodes(self) -> list[dict]:
        """Every node the GCS knows (dead ones too), from the dashboard's state API."""
        request = urllib.request.Request(f"{self.dashboard_url}/api/v0/nodes?detail=true&limit=1000",
                                         headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=10) as response:
            payload = json.load(response)
        return payload["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [node for node in self.nodes() if node.get("state") == "ALIVE"]

    def wait_for_nodes(self, n: int, timeout: float = 60) -> list[dict]:
        """Poll the state API until exactly ``n`` nodes are alive; returns them."""
        deadline = time.monotonic() + timeout
        last: object = None
        while True:
            try:
                alive = self.alive_nodes()
                if len(alive) == n:
                    return alive
                last = [(node.get("node_name"), node.get("node_ip")) for node in alive]
            except (OSError, KeyError, ValueError) as error:  # dashboard not (yet) answering
                last = error
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} alive nodes not reached in {timeout}s; last: {last!r}\n"
                                   + "\n".join(f"--- {node.name}:\n{node.log_tail(1500)}"
                                               for node in [self.head, *self.workers]))
            time.sleep(0.5)

    # ---- faults -------------------------------------------------------------------------------------
    def kill_worker_raylet(self, i: int) -> int:
        """SIGKILL worker ``i``'s raylet (a node failure); returns its pid.

        Its ``ray start --block`` notices and takes down the rest of the node, so the node is gone until
        :meth:`restart_worker`. Wait for the GCS to notice with ``wait_for_nodes(n - 1)``.
        """
        node = self.workers[i]
        raylets = [pid for pid in _pids_in_mnt_ns(node.mnt_ns) if _comm(pid) == "raylet"]
        if not raylets:
            raise RuntimeError(f"no raylet found on {node.name}")
        for pid in raylets:
            _signal(pid, signal.SIGKILL)
        return raylets[0]

    def restart_worker(self, i: int, timeout: float = 120) -> Node:
        """Replace worker ``i`` with a fresh node (empty node-local disk, new node id), same name and IP."""
        node = self.workers[i]
        _stop_node(node)
        node.node_id = ""
        _bring_up(node, timeout)
        self._identify_nodes(self.wait_for_nodes(1 + sum(w.alive() for w in self.workers), timeout))
        return node

    def _identify_nodes(self, alive: list[dict]) -> None:
        for node in [self.head, *self.workers]:
            for info in alive:
                resources = info.get("resources_total") or {}
                if (node is self.head and info.get("is_head_node")) or (node.resource and node.resource in resources):
                    node.node_id = info["node_id"]

    # ---- teardown -----------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop every node, kill what is left of them, remove the network and the base directory."""
        if self._stopped:
            return
        self._stopped = True
        strays: list[int] = []
        try:
            with ThreadPoolExecutor(len(self.workers) or 1) as pool:  # workers first: they hang on a dead head
                list(pool.map(_stop_node, self.workers))
            _stop_node(self.head)
            # A last sweep by path: every Ray process of this cluster names its node's temp dir (under base)
            # on its command line, so nothing of ours can outlive stop() unnoticed.
            strays = _pids_with_arg(str(self.base))
            for pid in strays:
                _signal(pid, signal.SIGKILL)
        finally:
            _teardown_network([node.netns for node in [self.head, *self.workers] if node.netns], self.bridge)
            if os.environ.get("ALPACA_MULTINODE_KEEP") == "1":  # keep the nodes' logs to debug a failure
                print(f"multinode: kept {self.base}", file=sys.stderr)
            else:
                shutil.rmtree(self.base, ignore_errors=True)
        if strays:
            raise RuntimeError(f"processes outlived their node and were killed: {strays}")


# ---- process helpers --------------------------------------------------------------------------------------

def _base_env() -> dict[str, str]:
    # A RAY_ADDRESS from the surrounding session (e.g. the repo's ray_local fixture) must not leak in.
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _mnt_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return ""


def _pids_in_mnt_ns(ns: str) -> list[int]:
    if not ns or ns == _mnt_ns(os.getpid()):  # never sweep the host's own namespace
        return []
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit() and _mnt_ns(int(entry)) == ns]


def _pids_with_arg(text: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            try:
                if text.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
            except OSError:
                pass
    return found


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _stop_node(node: Node, grace: float = 20, timeout: float = 30) -> None:
    """SIGTERM the node's ``ray start --block`` (it stops its own processes), then SIGKILL leftovers.

    Leftovers are found by the node's mount namespace, which every process it started inherits, so
    workers that left the process group are caught too and no other cluster is touched.
    """
    process = node.process
    if process is None:
        return
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    deadline = time.monotonic() + timeout
    while True:
        left = _pids_in_mnt_ns(node.mnt_ns)
        if not left:
            break
        for pid in left:
            _signal(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.name}: processes {left} survive SIGKILL")
        time.sleep(0.1)
    process.wait(timeout=timeout)  # reap it (no zombie left behind)


def _wait_until_exec(node: Node, timeout: float = 30) -> None:
    """Wait until the node's process is ``ray start`` itself (past nsenter, unshare, mount), then record its
    mount namespace. Before that moment /proc would still show the launcher's namespace."""
    python = os.path.realpath(sys.executable)
    deadline = time.monotonic() + timeout
    while True:
        if node.process.poll() is not None:
            raise RuntimeError(f"{node.name} exited early ({node.process.returncode}):\n{node.log_tail()}")
        try:
            exe = os.path.realpath(f"/proc/{node.pid}/exe")
        except OSError:
            exe = ""
        if exe == python:
            node.mnt_ns = _mnt_ns(node.pid)
            if node.mnt_ns in ("", _mnt_ns(os.getpid())):
                raise RuntimeError(f"{node.name} runs in the host's mount namespace")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{node.name} never started ray:\n{node.log_tail()}")
        time.sleep(0.05)


# ---- ports ------------------------------------------------------------------------------------------------

def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


class _Ports:
    """Hands out distinct ports that are free on the host right now.

    With private network namespaces any port would do, but on the shared network fallback the nodes'
    agents would collide, so every node gets its own block either way.
    """

    def __init__(self) -> None:
        self.taken: set[int] = set()

    def one(self) -> int:
        while True:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            if port not in self.taken:
                self.taken.add(port)
                return port

    def block(self, size: int) -> tuple[int, int]:
        """A run of ``size`` consecutive free ports, below the kernel's ephemeral range (32768 and up), where
        ports of passing connections would otherwise land in the block."""
        for _ in range(200):
            start = random.randrange(20000, 31000 - size)
            ports = range(start, start + size)
            if not self.taken.intersection(ports) and all(_port_free(p) for p in ports):
                self.taken.update(ports)
                return start, start + size - 1
        raise RuntimeError(f"no block of {size} free ports found")


# ---- network ----------------------------------------------------------------------------------------------

def _ip(*args: str, netns: str | None = None) -> None:
    command = ["ip", *(["-n", netns] if netns else []), *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)}: {result.stderr.strip()}")


def _setup_network(names: list[str]) -> tuple[str, str, dict[str, str]]:
    """A bridge on the host (address .254) and one network namespace per node, joined by veth pairs.

    Returns (bridge, subnet prefix, {node name: netns name}). The subnet is claimed by creating the
    bridge named after it: ``ip link add`` fails if another session holds it, which is atomic.
    """
    if shutil.which("ip") is None:
        raise RuntimeError("`ip` (iproute2) is not installed")
    third_octets = random.sample(range(1, 255), 254)
    bridge = ""
    for octet in third_octets:
        candidate = f"mnbr{octet}"
        result = subprocess.run(["ip", "link", "add", candidate, "type", "bridge"], capture_output=True,
                                text=True)
        if result.returncode == 0:
            bridge = candidate
            break
        if "exists" not in result.stderr:
            raise RuntimeError(f"cannot create a bridge: {result.stderr.strip()}")
    if not bridge:
        raise RuntimeError("every 10.77.S.0/24 subnet is taken")
    subnet = f"{SUBNET_PREFIX}.{octet}"
    namespaces: dict[str, str] = {}
    try:
        _ip("addr", "add", f"{subnet}.{HOST_OCTET}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for index, name in enumerate(names):
            netns = f"mn{octet}-{name}"
            host_end, node_end = f"mn{octet}h{index}", f"mn{octet}n{index}"
            _ip("netns", "add", netns)
            namespaces[name] = netns
            _ip("link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            _ip("link", "set", node_end, "netns", netns)
            _ip("addr", "add", f"{subnet}.{_octet(index)}/24", "dev", node_end, netns=netns)
            _ip("link", "set", node_end, "up", netns=netns)
            _ip("link", "set", "lo", "up", netns=netns)  # Ray and user code use 127.0.0.1 inside the node
            # A default route via the host, so Ray's "which address routes out" probe (a UDP connect to a
            # public address) finds the node's own address instead of failing.
            _ip("route", "add", "default", "via", f"{subnet}.{HOST_OCTET}", netns=netns)
    except Exception:
        _teardown_network(list(namespaces.values()), bridge)
        raise
    return bridge, subnet, namespaces


def _octet(index: int) -> int:
    return HEAD_OCTET if index == 0 else 10 + index  # head .1, worker1 .11, worker2 .12


def _teardown_network(namespaces: list[str], bridge: str | None) -> None:
    # Deleting a namespace destroys the veth ends inside it, and with them their host-side peers.
    for netns in namespaces:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    if bridge:
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)


# ---- starting nodes ---------------------------------------------------------------------------------------

def _node_env(cluster: MultiNodeCluster) -> dict[str, str]:
    return {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.auth_token,
            "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # tests need no drain on shutdown
            "RAY_USAGE_STATS_ENABLED": "0"}


def _node_ports(ports: _Ports) -> list[str]:
    low, high = ports.block(WORKER_PORTS)
    return [f"--node-manager-port={ports.one()}", f"--object-manager-port={ports.one()}",
            f"--dashboard-agent-listen-port={ports.one()}", f"--dashboard-agent-grpc-port={ports.one()}",
            f"--metrics-export-port={ports.one()}", f"--runtime-env-agent-port={ports.one()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}"]


def _launch(node: Node) -> None:
    """Start the node's ``ray start --block`` in its namespaces, in a session of its own.

    nsenter, unshare and ``sh -c ... exec`` all exec in turn, so the Popen pid ends as ``ray start``.
    """
    command, env = node.launch
    node.temp_dir.mkdir(parents=True, exist_ok=True)
    with open(node.log_path, "a") as log:
        log.write(f"===== {' '.join(command)}\n")
        log.flush()
        node.log_offset = log.tell()
        node.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, env=env, cwd="/")


def _command(node: Node, propagation: str, script: str, script_args: list[str], ray_args: list[str]
             ) -> list[str]:
    prefix, uts = [], []
    if node.netns:
        prefix = ["nsenter", f"--net=/var/run/netns/{node.netns}", "--"]
        # A host name of its own that resolves to the node's address, as on a real cluster: this machine's
        # name resolves to 127.0.0.1 (/etc/hosts), and libraries that bind "this host's address" (Gloo,
        # for one) would otherwise all pick loopback and never reach each other across nodes.
        hosts = node.temp_dir.parent / f"hosts-{node.name}"
        hosts.write_text(f"127.0.0.1 localhost\n{node.ip} {node.name}\n")
        script = f'hostname {node.name} && mount --bind {hosts} /etc/hosts && {script}'
        uts = ["--uts"]
    return [*prefix, "unshare", "--mount", *uts, "--propagation", propagation, "--", "sh", "-c", script, "sh",
            *script_args, sys.executable, "-m", "ray.scripts.scripts", "start", "--block", *ray_args]


def _bring_up(node: Node, timeout: float, attempts: int = 3) -> None:
    """Launch the node and wait until ``ray start`` reports it registered with the GCS, retrying.

    Why retry: ``ray start`` gives a raylet a fixed 30 s to register and then gives up ("The current node
    timed out during startup"). On a busy 2-core machine (other test sessions training models) that
    happens now and then; a second try almost always makes it.
    """
    deadline = time.monotonic() + timeout
    for attempt in range(1, attempts + 1):
        node.start_attempts += 1
        _launch(node)
        _wait_until_exec(node)
        while node.process.poll() is None:
            if _STARTED in node.log_path.read_bytes()[node.log_offset:]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.name} not started in {timeout}s:\n{node.log_tail()}")
            time.sleep(0.2)
        _stop_node(node)  # whatever the failed attempt left running in its namespace
        if attempt == attempts or time.monotonic() > deadline:
            raise RuntimeError(f"{node.name} failed to start {attempt} times:\n{node.log_tail()}")


_STARTED = b"Ray runtime started."  # printed by ``ray start`` once its raylet has registered


def _prepare_head(cluster: MultiNodeCluster, ports: _Ports) -> None:
    head = cluster.head
    dashboard_host = "0.0.0.0" if head.netns else head.ip  # 0.0.0.0 only inside its own namespace
    args = ["--head", f"--node-ip-address={head.ip}", f"--port={cluster.gcs_port}",
            f"--dashboard-port={cluster.dashboard_port}", f"--dashboard-host={dashboard_host}",
            "--include-dashboard=true", "--num-cpus=0", "--num-gpus=0", f"--temp-dir={head.temp_dir}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats",
            f"--ray-client-server-port={ports.one()}", *_node_ports(ports)]
    # The head sees the host's directories unchanged (slave propagation follows host mounts); the mount
    # namespace is there to name all of the head's processes for teardown.
    head.launch = (_command(head, "slave", 'exec "$@"', [], args), _node_env(cluster))


def _prepare_worker(cluster: MultiNodeCluster, node: Node, ports: _Ports) -> None:
    args = [f"--address={cluster.gcs_address}", f"--node-ip-address={node.ip}", f"--num-cpus={WORKER_CPUS}",
            "--num-gpus=0", f"--resources={json.dumps({node.resource: 1})}", f"--temp-dir={node.temp_dir}",
            f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats", *_node_ports(ports)]
    # The worker's "local disk": a tmpfs of its own over node_local_dir, seen by its processes only. It
    # goes away with the namespace when the node's last process exits, so there is nothing to unmount.
    mount = f'mount -t tmpfs -o size={NODE_LOCAL_TMPFS_SIZE},mode=1777 {node.name}-local "$1" && shift && exec "$@"'
    node.launch = (_command(node, "private", mount, [str(cluster.node_local_dir)], args), _node_env(cluster))


def start_multinode_cluster(n_workers: int = 2, private_network: bool | None = None,
                            ready_timeout: float = 180) -> MultiNodeCluster:
    """Start a head (0 CPUs) and ``n_workers`` worker nodes; returns once all have registered.

    ``private_network=None`` tries network namespaces and falls back to the shared host network
    (``ALPACA_MULTINODE_SHARED_NET=1`` forces the fallback); True insists on them.
    """
    reason = unavailable_reason()
    if reason:
        raise MultinodeUnavailable(reason)
    if private_network is None and os.environ.get("ALPACA_MULTINODE_SHARED_NET") == "1":
        private_network = False
    # Short, under /tmp: Ray puts Unix sockets under each temp dir, and their paths are limited to 107 bytes.
    base = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))
    for sub in ("shared", "node-local", "logs"):
        (base / sub).mkdir()
    (base / "shared").chmod(0o1777)
    (base / "node-local").chmod(0o1777)
    names = ["head", *[f"worker{i + 1}" for i in range(n_workers)]]

    bridge, namespaces, note = None, {}, ""
    if private_network is not False:
        try:
            bridge, subnet, namespaces = _setup_network(names)
            ips = {name: f"{subnet}.{_octet(i)}" for i, name in enumerate(names)}
            note = f"private network namespaces on bridge {bridge} ({subnet}.0/24, host .{HOST_OCTET})"
        except Exception as error:
            if private_network:
                shutil.rmtree(base, ignore_errors=True)
                raise
            note = f"shared host network (network namespaces failed: {error})"
    if not namespaces:
        ips = {name: ("127.0.0.1" if i == 0 else f"127.0.0.{10 + i}") for i, name in enumerate(names)}
        note = note or "shared host network (asked for)"

    def node(name: str) -> Node:
        return Node(name=name, ip=ips[name], temp_dir=base / name,
                    log_path=base / "logs" / f"{name}.log", netns=namespaces.get(name),
                    resource=None if name == "head" else name)

    ports = _Ports()
    cluster = MultiNodeCluster(base=base, auth_token=secrets.token_hex(32), head=node("head"),
                               workers=[node(name) for name in names[1:]], private_loopback=bool(namespaces),
                               network_note=note, dashboard_port=ports.one(), gcs_port=ports.one(),
                               bridge=bridge)
    started = time.monotonic()

    def phase(name: str) -> None:
        cluster.start_phases[name] = round(time.monotonic() - started, 1)

    try:
        _prepare_head(cluster, ports)
        _bring_up(cluster.head, ready_timeout)
        phase("head")
        # Workers join once the head has registered; its dashboard keeps loading meanwhile. (Starting them
        # as soon as the GCS listens saves ~3 s but fails under load: they give up looking for the head.)
        for worker in cluster.workers:
            _prepare_worker(cluster, worker, ports)
        with ThreadPoolExecutor(len(cluster.workers) or 1) as pool:
            list(pool.map(lambda worker: _bring_up(worker, ready_timeout), cluster.workers))
        phase("workers")
        _wait_for_dashboard(cluster, ready_timeout)
        phase("dashboard")
        cluster._identify_nodes(cluster.wait_for_nodes(1 + n_workers, ready_timeout))
        phase("all_alive")
        missing = [n.name for n in [cluster.head, *cluster.workers] if not n.node_id]
        if missing:
            raise RuntimeError(f"nodes registered but not identified: {missing}")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for_dashboard(cluster: MultiNodeCluster, timeout: float) -> None:
    """Poll until the head's job API answers (a 401 without a token also means it is up)."""
    deadline = time.monotonic() + timeout
    while True:
        if not cluster.head.alive():
            raise RuntimeError(f"ray start --head exited early:\n{cluster.head.log_tail()}")
        try:
            with urllib.request.urlopen(f"{cluster.dashboard_url}/api/version", timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ray head not ready in {timeout}s:\n{cluster.head.log_tail()}")
        time.sleep(0.25)

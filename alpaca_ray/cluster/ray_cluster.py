"""Which Ray cluster a stage runs on: the one every stage uses the same rule for.

An existing session is kept; otherwise ``address``, else ``RAY_ADDRESS`` (set inside a Ray job, or
``auto`` to join a running cluster), else a new local cluster. Never a cluster guessed from
``/tmp/ray/ray_current_cluster``, as a bare ``ray.init()`` would: it may be someone else's, or dead.
"""

from __future__ import annotations

import os
from typing import Any


def ensure_ray(address: str | None = None, local_num_cpus: int | None = None, **init_kwargs: Any):
    """Initialise Ray by the rule above and return the module; ``local_num_cpus`` sizes a new local cluster."""
    import ray

    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if not address and local_num_cpus:
            init_kwargs["num_cpus"] = local_num_cpus
        ray.init(address=address or "local", **init_kwargs)
    return ray


def this_node_address() -> str:
    """The address this process's node registered with the cluster: what every other node reaches it at.

    Not ``ray.util.get_node_ip_address()``, which guesses from this process's routes and can name another
    interface than the one the node was started on (``ray start --node-ip-address``).
    """
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id and node.get("NodeManagerAddress"):
            return node["NodeManagerAddress"]
    return ray.util.get_node_ip_address()

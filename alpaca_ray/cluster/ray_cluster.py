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

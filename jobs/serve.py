"""``ray job submit -- python jobs/serve.py --model DIR --no-blocking``: deploy the serve stage's app.

With ``--no-blocking`` the job ends once the app is healthy and the app stays on the cluster; without it
the job serves until it is stopped (``ray job stop`` sends SIGTERM), then deletes the app.

Reports from every replica go to one writer deployment on the head node: ``--reports-db`` is a path on the
head's disk (``alpaca-ray reports export --db`` it there) or on a filesystem every node mounts; never an
object store. ``--max-replicas-per-node 1`` spreads the model replicas over distinct nodes.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""``ray job submit -- python jobs/pipeline.py --config configs/alpaca-7b.yaml``: the pipeline's driver on the cluster.

``alpaca-ray pipeline`` submits this job itself; it checks every node (the preflight), deploys the run's
teacher, and submits each stage as its own job to the cluster it runs on (found from ``RAY_ADDRESS``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.pipeline.cli import DRIVER_ENV, main  # noqa: E402

if __name__ == "__main__":
    os.environ[DRIVER_ENV] = "1"
    sys.exit(main(sys.argv[1:]))

"""``ray job submit -- python jobs/pipeline.py --config configs/alpaca-7b.yaml``: the pipeline from inside the cluster.

Each stage is then submitted as its own job to the cluster this job runs on (found from ``RAY_ADDRESS``).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

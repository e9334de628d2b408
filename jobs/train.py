"""``ray job submit -- python jobs/train.py ARGS``: the train stage as a Ray job (same flags as the CLI)."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``ray job submit -- python jobs/evaluate.py ARGS``: the evaluate stage as a Ray job (same flags as the CLI)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout or a job's working dir

from alpaca_ray.evaluate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

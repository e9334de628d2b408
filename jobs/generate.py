"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/generate.py --output DIR --target N ...``.

Takes the same flags as ``alpaca-ray generate``; inside a job, ``ray.init()`` joins the job's cluster.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.generate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

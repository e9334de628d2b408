"""Ray job entry point: ``ray job submit --working-dir . -- python jobs/dedup.py --input F --output F ...``.

With ``--num-workers N`` the pool is spread over N actors of the cluster the job runs on.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.dedup.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

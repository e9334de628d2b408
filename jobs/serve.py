"""``ray job submit -- python jobs/serve.py --model DIR --no-blocking``: deploy the serve stage's app.

With ``--no-blocking`` the job ends once the app is healthy and the app stays on the cluster; without it
the job serves until it is stopped (``ray job stop``), then deletes the app.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from alpaca_ray.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

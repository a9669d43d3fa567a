"""`python jobs/train_policy.py ...` = `python -m qpo_ray.jobs.train ...`: training only (same arguments as `qpo-ray train`)."""

import sys
from pathlib import Path

# The repository beside this script, ahead of any installed qpo_ray: with `ray job submit --working-dir .`
# the job runs the code that was uploaded.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpo_ray.jobs.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

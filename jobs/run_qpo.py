"""`python jobs/run_qpo.py ...` = `python -m qpo_ray.jobs.run ...`: the full QPO pipeline (same arguments as `qpo-ray run`)."""

import sys
from pathlib import Path

# The repository beside this script, ahead of any installed qpo_ray: with `ray job submit --working-dir .`
# the job runs the code that was uploaded.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qpo_ray.jobs.run import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

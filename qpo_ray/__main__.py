"""``python -m qpo_ray COMMAND ...`` is ``qpo-ray COMMAND ...``.

It is the entrypoint of a ``ray job submit --working-dir . -- python -m qpo_ray run ...``: the job runs in the
cluster's copy of the working directory, and ``-m`` puts the current directory first on ``sys.path``, so the
job imports the uploaded qpo_ray ahead of any installed one.
"""

import sys

from qpo_ray.cli import main

if __name__ == "__main__":
    sys.exit(main())

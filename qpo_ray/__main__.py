import sys

from qpo_ray.cli import main

sys.exit(main())

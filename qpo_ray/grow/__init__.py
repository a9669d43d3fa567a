"""Stage 5 — grow: merge newly scored rows into the next dataset version."""

from qpo_ray.grow.merge import merge_rows

__all__ = ["merge_rows"]

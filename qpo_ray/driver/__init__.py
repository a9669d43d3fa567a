"""The driver: runs the QPO loops as persisted, resumable steps (DESIGN §1)."""

from qpo_ray.driver.run import run

__all__ = ["run"]

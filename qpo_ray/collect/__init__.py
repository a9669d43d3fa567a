"""Stage 3 — collect: sample new prompts for the loop's collect queries with the trained policy."""

from qpo_ray.collect.sample import pick_collect_queries, sample_prompts

__all__ = ["pick_collect_queries", "sample_prompts"]

"""Tasks: queries, labels, prompt pools, rendering of target text, and math answer checking."""

from qpo_ray.tasks.answers import answers_match, extract_number, parse_number
from qpo_ray.tasks.task import SPLITS, Demo, Example, Task, builtin_tasks, fill, load_task

__all__ = [
    "SPLITS", "Demo", "Example", "Task", "answers_match", "builtin_tasks", "extract_number", "fill", "load_task",
    "parse_number",
]

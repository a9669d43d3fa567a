"""The docs match the repository: every relative link and heading anchor resolves, every file path they name
exists, and the README names every command and built-in task the code has. No Ray, no models: milliseconds."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "cluster" / "README.md",
        ROOT / "benchmarks" / "README.md"]
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# Paths the docs name that a run or a benchmark writes, not the repository.
GENERATED = ("benchmarks/results",)


def _prose(md: Path) -> str:
    return FENCE.sub("", md.read_text(encoding="utf-8"))


def _anchors(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation but '-' and '_' dropped, spaces as '-'."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", _prose(md), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in heads}


def _links(md: Path) -> list[str]:
    return [t for t in re.findall(r"\]\(([^)\s]+)\)", _prose(md)) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(md):
    broken = []
    for link in _links(md):
        path, _, anchor = link.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{link}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{link}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, f"{md.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_repository_path_named_exists(md):
    named = re.findall(r"\b((?:qpo_ray|tests|scripts|benchmarks|cluster|docs)/[\w./-]*\w)", md.read_text("utf-8"))
    missing = sorted({p for p in named if not p.startswith(GENERATED) and not (ROOT / p).exists()})
    assert not missing, f"{md.relative_to(ROOT)} names paths that do not exist: {missing}"


def test_the_readme_names_every_command_and_builtin_task():
    from qpo_ray.cli import build_parser
    from qpo_ray.tasks.task import builtin_tasks

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    readme = (ROOT / "README.md").read_text("utf-8")
    assert [c for c in sub.choices if f"qpo-ray {c}" not in readme] == []
    config_doc = (ROOT / "docs" / "configuration.md").read_text("utf-8")
    for doc in (readme, config_doc):
        assert [t for t in builtin_tasks() if f"`{t}`" not in doc] == []

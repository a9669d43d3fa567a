"""A run directory moved mid-way resumes in its new place: its config, its Ray Train checkpoints and
its run names follow it, and nothing is written in its old place.

The run is the session's reference run moved to another folder (its config still names the old folder, its
Ray Train runs were checkpointed there), with loop 2's steps but its collect marked undone: the resume enters Ray
Train's ``fit`` again, which must find the run's checkpoints in the new place (nothing trained again), finds
every pair of the loop scored in the run's score cache and the loop's version committed, then evaluates and
reports there."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from qpo_ray.config import load_config
from qpo_ray.data.store import DatasetStore
from tests.e2e import qpo, scored_keys

pytestmark = pytest.mark.slow


def test_a_moved_run_resumes_where_it_is_now(reference_run, tmp_path):
    new = tmp_path / "new" / "run"
    shutil.copytree(reference_run, new, symlinks=True)
    for step in ("loop-2.train", "loop-2.score", "loop-2.merge", "loop-2.eval"):
        (new / "steps" / f"{step}.json").unlink()
    (new / "report.md").unlink()
    run_id = (new / "run_id").read_text()
    assert load_config(new / "config.yaml").run_dir == str(reference_run)
    # The copy's old location is gone while it resumes, as after a move: the shared reference run steps aside
    # (a rename in the same folder) and comes back afterwards.
    aside = reference_run.with_name(reference_run.name + ".aside")
    reference_run.rename(aside)
    try:
        qpo("run", "--resume", str(new))
        assert not reference_run.exists(), "the resumed run wrote into its old location"
    finally:
        if reference_run.exists():
            shutil.rmtree(reference_run)
        aside.rename(reference_run)

    # The train step found its checkpoints in the moved storage: nothing was trained again.
    train = json.loads((new / "steps" / "loop-2.train.json").read_text())
    assert train["resumed_from_epoch"] == load_config("tiny").train.finetune.epochs
    assert train["policy"] == str(new / "policy" / "loop-2")
    assert (new / "run_id").read_text() == run_id
    assert load_config(new / "config.yaml").run_dir == str(new)
    store = DatasetStore(new)
    assert store.versions() == [0, 1, 2]
    for v in store.versions():
        store.verify(v)
    # Scored and committed before the move: no target call, and v002 is the merge's.
    assert json.loads((new / "steps" / "loop-2.score.json").read_text())["target_calls"] == 0
    assert store.manifest(2).new_rows == json.loads((new / "steps" / "loop-2.merge.json").read_text())["added"]
    assert (new / "steps" / "loop-2.eval.json").is_file() and (new / "report.md").is_file()
    assert max(Counter(scored_keys(new)).values()) == 1, "a pair was sent to the target twice"

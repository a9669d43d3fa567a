"""A run directory moved mid-way resumes in its new place: its config, its Ray Train checkpoints and
its run names follow it, and nothing is written in its old place."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from qpo_ray.config import load_config
from qpo_ray.data.store import DatasetStore
from tests.e2e import qpo, scored_keys

pytestmark = pytest.mark.slow


def test_a_moved_run_resumes_where_it_is_now(tmp_path):
    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    # Killed once loop 1's policy is trained and exported, before that step is marked done.
    killed = qpo("run", "--config", "tiny", "--set", f"run_dir={old}", "--set", "loops=1",
                 fault="loop-1.train.before-mark", check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert list((old / "train").glob("qpo-*-loop-1/epoch-0002"))
    run_id = (old / "run_id").read_text()
    new.parent.mkdir()
    shutil.move(old, new)

    qpo("run", "--resume", str(new))

    assert not old.exists(), "the resumed run wrote into its old location"
    # The train step found its checkpoints in the moved storage: nothing was trained again.
    train = json.loads((new / "steps" / "loop-1.train.json").read_text())
    assert train["resumed_from_epoch"] == 2 and train["policy"] == str(new / "policy" / "loop-1")
    assert (new / "run_id").read_text() == run_id
    assert load_config(new / "config.yaml").run_dir == str(new)
    store = DatasetStore(new)
    assert store.versions() == [0, 1]
    for v in store.versions():
        store.verify(v)
    assert store.manifest(1).new_rows == json.loads((new / "steps" / "loop-1.merge.json").read_text())["kept"]
    assert max(Counter(scored_keys(new)).values()) == 1, "a pair was sent to the target twice"
    assert (new / "report.md").is_file()

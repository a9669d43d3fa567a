"""The dataset store: schema validation names file/row/column, versions commit atomically."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.data.schema import SCHEMA, pair_key, rows_to_table
from qpo_ray.data.store import DatasetStore, normalize_reward
from qpo_ray.errors import DataError


def row(i: int, reward: float = 1.0, **kw) -> dict:
    r = {"task": "t", "setting": "zero_shot", "target": "m", "query": f"q{i}", "label": "a", "prompt": f"p{i % 3}",
         "reward": reward, "correct": 1.0, "source": "offline:x", "loop": 0}
    r.update(kw)
    return r


def test_ids_are_content_hashes():
    t = rows_to_table([row(1)])
    assert t.schema == SCHEMA
    assert t.column("key")[0].as_py() == pair_key("t", "m", "zero_shot", "q1", "p1")
    assert rows_to_table([row(1)]).column("key")[0] != rows_to_table([row(1, prompt="other")]).column("key")[0]


@pytest.mark.parametrize(
    "bad, column",
    [
        ({"reward": float("nan")}, "reward"),
        ({"reward": float("inf")}, "reward"),
        ({"reward": "high"}, "reward"),
        ({"query": ""}, "query"),
        ({"query": None}, "query"),
        ({"setting": "three_shot"}, "setting"),
        ({"loop": -1}, "loop"),
        ({"prompt": "bad \ufffd bytes"}, "prompt"),
    ],
)
def test_bad_rows_name_row_and_column(bad, column):
    rows = [row(0), row(1, **bad)]
    with pytest.raises(DataError, match=rf"f\.parquet: row 1, column '{column}'"):
        rows_to_table(rows, source="f.parquet")


def test_commit_and_child_version(tmp_path):
    store = DatasetStore(tmp_path)
    m0 = store.commit([rows_to_table([row(i, reward=i) for i in range(10)])], source="d0")
    assert (m0.version, m0.rows, m0.reward_min, m0.reward_max) == (0, 10, 0.0, 9.0)
    # child: parent rows + new ones; a duplicate of a parent row is dropped; range inherited
    new = [row(100, reward=50.0, loop=1, source="loop-1"), row(3, reward=3.0)]
    m1 = store.commit([rows_to_table(new)], parent=0, source="loop-1")
    assert (m1.version, m1.rows, m1.new_rows, m1.duplicates_dropped) == (1, 11, 1, 1)
    assert (m1.reward_min, m1.reward_max) == (0.0, 9.0)
    assert store.versions() == [0, 1]
    assert set(store.keys(1)) == set(store.keys(0)) | {rows_to_table(new[:1]).column("key")[0].as_py()}
    store.verify(0)
    store.verify(1)
    # versions are immutable
    with pytest.raises(DataError, match="already exists"):
        store.commit([rows_to_table([row(5)])], version=1, parent=0)


def test_duplicates_in_d0_are_dropped_with_a_warning(tmp_path, caplog):
    store = DatasetStore(tmp_path)
    m = store.commit([rows_to_table([row(1), row(2)]), rows_to_table([row(1)])], source="d0.jsonl")
    assert m.rows == 2 and m.duplicates_dropped == 1
    assert "dropped 1 duplicate" in caplog.text


def test_failure_mid_write_leaves_no_visible_version(tmp_path):
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    with pytest.raises(RuntimeError, match="injected"):
        store.commit([rows_to_table([row(i) for i in range(10, 20)])], parent=0, _fail_after_rows=5)
    assert store.versions() == [0]
    assert not list((tmp_path / "data").glob(".tmp-*"))
    # A crash that killed the process (no cleanup) leaves a temp folder: invisible, and removed on open.
    (tmp_path / "data" / ".tmp-v001-dead").mkdir()
    assert store.versions() == [0] and store.latest() == 0
    store.clean_tmp()
    assert not list((tmp_path / "data").glob(".tmp-*"))


def test_verify_detects_corruption(tmp_path):
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    f = store.files(0)[0]
    pq.write_table(rows_to_table([row(9)]), f)
    with pytest.raises(DataError, match="checksum mismatch"):
        store.verify(0)


def test_schema_errors_name_the_column(tmp_path):
    store = DatasetStore(tmp_path)
    t = rows_to_table([row(1)]).drop(["reward"])
    with pytest.raises(DataError, match="missing column 'reward'"):
        store.commit([t], source="in.parquet")
    t = rows_to_table([row(1)]).set_column(SCHEMA.get_field_index("query"), "query", pa.array([3]))
    with pytest.raises(DataError, match="column 'query' has type int64"):
        store.commit([t], source="in.parquet")
    with pytest.raises(DataError, match="no rows"):
        store.commit([], source="empty.parquet")


def test_normalize_reward():
    assert normalize_reward(5, 0, 10) == 50.0
    assert normalize_reward(15, 0, 10) == 150.0  # not clipped: better than anything offline
    assert not math.isnan(normalize_reward(3, 3, 3))


def test_keyset_keeps_first_occurrences_and_answers_membership():
    from qpo_ray.data.store import KeySet

    ks = KeySet()
    np.testing.assert_array_equal(ks.add_new(["b", "a", "b", "é"]), [True, True, False, True])
    np.testing.assert_array_equal(ks.add_new(np.array(["é", "c", "a", "c"], dtype=object)), [False, True, False, False])
    assert len(ks) == 4 and "c" in ks and "é" in ks and "z" not in ks
    assert sorted(ks) == ["a", "b", "c", "é"]

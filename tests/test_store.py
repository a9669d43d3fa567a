"""The dataset store: schema validation names file/row/column, versions commit atomically."""

from __future__ import annotations

import errno
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import qpo_ray.data.store as store_mod
from qpo_ray.data.schema import SCHEMA, pair_key, rows_to_table
from qpo_ray.data.store import DatasetStore, normalize_reward
from qpo_ray.errors import DataError, ResourceError


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


def _fail_after(monkeypatch, limit: int, error: BaseException) -> list[int]:
    """Make the store's row writer raise ``error`` once ``limit`` rows have reached files; returns the count."""
    written = [0]
    real = store_mod.write_rows

    def write_rows(writer, table):
        real(writer, table)
        written[0] += table.num_rows
        if written[0] >= limit:
            raise error

    monkeypatch.setattr(store_mod, "write_rows", write_rows)
    return written


@pytest.mark.parametrize("error", [RuntimeError("injected failure"), OSError(errno.ENOSPC, "No space left on device")])
def test_failure_mid_write_leaves_no_visible_version(tmp_path, monkeypatch, error):
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    real_write_rows = store_mod.write_rows
    written = _fail_after(monkeypatch, 5, error)
    # Two chunks, and a part file rolled over every 3 rows: the failure comes after whole files were written.
    monkeypatch.setattr(store_mod, "ROWS_PER_FILE", 3)
    chunks = [rows_to_table([row(i) for i in range(10, 13)]), rows_to_table([row(i) for i in range(13, 20)])]
    with pytest.raises(ResourceError if isinstance(error, OSError) else RuntimeError,
                       match="No space left on device" if isinstance(error, OSError) else "injected"):
        store.commit(chunks, parent=0)
    assert written[0] >= 5  # the writer did fail midway, not before writing
    assert store.versions() == [0] and store.latest() == 0
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["v000"]
    monkeypatch.setattr(store_mod, "write_rows", real_write_rows)
    m = store.commit(chunks, parent=0)  # the same rows commit as v001 once the writer works
    assert (m.version, m.rows, m.new_rows) == (1, 14, 10)
    # the parent's file, then the new rows in files of at most 3 rows, numbered on from it
    assert [(f.name, f.rows) for f in m.files] == [(store.manifest(0).files[0].name, 4), ("part-00001.parquet", 3),
                                                   ("part-00002.parquet", 3), ("part-00003.parquet", 3),
                                                   ("part-00004.parquet", 1)]
    store.verify(1)


def test_a_crashed_writers_temporary_version_is_invisible_and_cleaned(tmp_path):
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
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
    from qpo_ray.data.keyset import KeySet

    ks = KeySet()
    np.testing.assert_array_equal(ks.add_new(["b", "a", "b", "é"]), [True, True, False, True])
    np.testing.assert_array_equal(ks.add_new(np.array(["é", "c", "a", "c"], dtype=object)), [False, True, False, False])
    assert len(ks) == 4 and "c" in ks and "é" in ks and "z" not in ks
    assert sorted(ks) == ["a", "b", "c", "é"]


def _relist(store: DatasetStore, version: int, **entry) -> None:
    """Rewrite the manifest's first file entry (name, rows, sha256) as an attacker or a bad tool would."""
    import json

    path = store.path(version) / "manifest.json"
    m = json.loads(path.read_text())
    m["files"][0].update(entry)
    path.write_text(json.dumps(m))


def _tamper(store: DatasetStore, version: int, data: bytes) -> None:
    """Replace the version's first file and update its checksum (and row count, when still parquet) to match:
    damage that a checksum check alone cannot see."""
    from qpo_ray.data.integrity import sha256_file

    f = Path(store.files(version)[0])
    f.write_bytes(data)
    try:
        rows = pq.ParquetFile(f).metadata.num_rows
    except Exception:
        rows = store.manifest(version).files[0].rows
    _relist(store, version, sha256=sha256_file(f), rows=rows)


@pytest.mark.parametrize("name", ["../../../outside.parquet", "../v001/part-00000.parquet", "/tmp/x.parquet",
                                  "sub/part-00000.parquet", "..", "", "link.parquet"])
def test_manifest_file_names_cannot_leave_the_version_folder(tmp_path, name):
    from qpo_ray.data.integrity import sha256_file

    run = tmp_path / "a" / "b" / "run"
    store = DatasetStore(run)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    part = Path(store.files(0)[0])
    outside = tmp_path / "outside.parquet"  # right bytes, right checksum, right row count: only the place is wrong
    outside.write_bytes(part.read_bytes())
    if name == "link.parquet":
        (part.parent / name).symlink_to(outside)
    _relist(store, 0, name=name, sha256=sha256_file(part))
    with pytest.raises(DataError, match="is not a file of the version folder"):
        store.verify(0)
    with pytest.raises(DataError, match="is not a file of the version folder"):
        store.files(0)
    with pytest.raises(DataError, match="is not a file of the version folder"):
        store.commit([rows_to_table([row(9)])], parent=0)
    assert store.versions() == [0]


def _file_with(**column) -> bytes:
    """A 4-row file of SCHEMA with one column replaced (no row validation on the way)."""
    (name, values), = column.items()
    table = rows_to_table([row(i) for i in range(4)])
    table = table.set_column(SCHEMA.get_field_index(name), name, pa.array(values))
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


CORRUPT = {
    "truncated": (lambda b: b[: len(b) // 2], r"not a readable parquet file"),
    "not parquet": (lambda b: b"PAR1 this is not parquet PAR1", r"not a readable parquet file"),
    "NaN reward": (lambda b: _file_with(reward=[1.0, float("nan"), 1.0, 1.0]),
                   r"row 1, column 'reward': nan is not a finite number"),
    "inf nll": (lambda b: _file_with(nll=[0.1, 0.2, float("inf"), None]), r"row 2, column 'nll': inf is not"),
    "null query": (lambda b: _file_with(query=["a", None, "c", "d"]), r"row 1, column 'query': None is missing"),
    "blank label": (lambda b: _file_with(label=["a", "b", "c", "  "]), r"row 3, column 'label': '  ' is empty"),
    "bad setting": (lambda b: _file_with(setting=["zero_shot"] * 3 + ["9_shot"]), r"row 3, column 'setting'"),
    "negative loop": (lambda b: _file_with(loop=pa.array([0, -1, 0, 0], pa.int32())), r"row 1, column 'loop'"),
    "reward as text": (lambda b: _file_with(reward=["1", "2", "3", "4"]), r"column 'reward' has type string"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_verify_reads_what_the_checksums_vouch_for(tmp_path, case):
    damage, message = CORRUPT[case]
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    _tamper(store, 0, damage(Path(store.files(0)[0]).read_bytes()))
    with pytest.raises(DataError, match=message):
        store.verify(0)
    # A child version would inherit the damage with the parent's checksums: it is refused.
    with pytest.raises(DataError, match=message):
        store.commit([rows_to_table([row(9)])], parent=0)
    assert store.versions() == [0] and not list((tmp_path / "data").glob(".tmp-*"))


def test_readers_that_skip_verify_still_get_a_data_error(tmp_path):
    from qpo_ray.grow import merge_rows

    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i) for i in range(4)])])
    _tamper(store, 0, Path(store.files(0)[0]).read_bytes()[:200])
    with pytest.raises(DataError, match="part-00000.parquet: not a readable parquet file"):
        store.keys(0)
    with pytest.raises(DataError, match="not a readable parquet file"):  # the merge reads its parent's keys first
        merge_rows(store, 0, 1, [rows_to_table([row(9, loop=1, source="loop-1")]).to_pylist()[0]], threshold=0.0)
    assert store.versions() == [0]


def test_verify_checks_the_manifest_itself(tmp_path):
    import json

    store = DatasetStore(tmp_path)
    store.commit([rows_to_table([row(i, reward=i) for i in range(4)])])
    path = store.path(0) / "manifest.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({**good, "reward_max": float("nan")}))
    with pytest.raises(DataError, match=r"reward range \[0.0, nan\] is not a finite range"):
        store.verify(0)
    path.write_text(json.dumps({**good, "files": good["files"] * 2, "rows": 8}))
    with pytest.raises(DataError, match="listed twice"):
        store.verify(0)
    path.write_text(json.dumps(good))
    assert store.verify(0).rows == 4

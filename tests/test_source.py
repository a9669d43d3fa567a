"""Reading a dataset version into Ray Data (``qpo_ray.data.source``): every row once, files checked against
the manifest, a new reproducible file order on every execution."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.source import VersionSource, read_file
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError


def rows(lo: int, hi: int) -> pa.Table:
    return rows_to_table([{"task": "t", "setting": "zero_shot", "target": "m", "query": f"q{i}", "label": "a",
                           "prompt": "p", "reward": float(i), "correct": 1.0, "source": "offline:x", "loop": 0}
                          for i in range(lo, hi)])


def test_read_file_yields_the_rows_and_checks_the_manifest_count(tmp_path):
    path = tmp_path / "f.parquet"
    pq.write_table(rows(0, 10), path, row_group_size=3)
    parts = list(read_file(str(path), 10, ["query", "reward"], 4))
    assert [t.num_rows for t in parts] == [4, 4, 2]  # batch_rows at a time
    assert pa.concat_tables(parts).column("query").to_pylist() == [f"q{i}" for i in range(10)]
    assert parts[0].column_names == ["query", "reward"]
    with pytest.raises(DataError, match=r"f\.parquet: 10 rows, but the manifest lists 11"):
        list(read_file(str(path), 11, ["query"], 4))
    path.write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"f\.parquet: not a readable parquet file"):
        list(read_file(str(path), 10, ["query"], 4))


def test_every_row_once_and_a_new_file_order_per_execution(tmp_path, ray_local):
    import ray.data

    store = DatasetStore(tmp_path)
    store.commit([rows(0, 5)], source="d0")
    for v in range(1, 6):  # every child version adds one file
        store.commit([rows(v * 5, v * 5 + 5)], parent=v - 1, source=f"loop-{v}")
    files = store.file_rows(5)
    assert len(files) == 6
    src = VersionSource(files, ["query"], seed=3)
    ds = ray.data.read_datasource(src, concurrency=1, override_num_blocks=len(files))
    runs = [[r["query"] for r in ds.take_all()] for _ in range(3)]
    for got in runs:
        assert sorted(got) == sorted(f"q{i}" for i in range(30))  # each row exactly once
    # Manifest file i holds q{5i}..q{5i+4}; with one read task at a time they arrive in the source's order.
    order = [[int(q[1:]) // 5 for q in got[::5]] for got in runs]
    assert order == [src.file_order(e) for e in range(3)]
    assert len({tuple(o) for o in order}) == 3
    assert src.file_order(1) == VersionSource(files, ["query"], seed=3).file_order(1)  # reproducible
    assert src.file_order(1) != VersionSource(files, ["query"], seed=4).file_order(1)

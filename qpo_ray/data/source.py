"""A DatasetStore version as a Ray Data datasource: one read task per parquet file.

``ray.data.read_parquet`` learns what the store's manifest already says (the files, their rows) by
reading footers and sampling files in remote tasks: its V2 reader starts 32 ``FooterReader`` actors on
every execution, and its V1 reader samples up to two files in one more worker process each (a ~100 MiB
process left idle for the rest of the session). This source reads only what it is told, from the
manifest.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from qpo_ray.data.store import read_batches


def read_file(path: str, rows: int, columns: list[str], batch_rows: int) -> Iterator[pa.Table]:
    """A read task's blocks: the file ``batch_rows`` rows at a time, checked against its manifest entry."""
    for batch in read_batches(path, rows, columns, batch_rows):
        yield pa.Table.from_batches([batch])


class VersionSource(Datasource):
    """The files of one dataset version, their order shuffled anew, reproducibly, on every execution.

    ``files`` are ``(path, rows)`` pairs from the version's manifest (``DatasetStore.file_rows``)."""

    def __init__(self, files: list[tuple[str, int]], columns: list[str], *, seed: int, batch_rows: int = 8192):
        super().__init__()
        self.files, self.columns, self.seed, self.batch_rows = list(files), list(columns), seed, batch_rows

    def get_name(self) -> str:
        return "Version"  # Ray Data names the read "ReadVersion"

    def estimate_inmemory_data_size(self) -> int | None:
        return None  # unknown before reading; Ray Data only uses it to pick a block count, which the caller sets

    def file_order(self, execution: int) -> list[int]:
        """The order the files are read in on the ``execution``-th run of the dataset (an epoch)."""
        return np.random.default_rng([self.seed, execution]).permutation(len(self.files)).tolist()

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context=None) -> list[ReadTask]:
        # Ray Data counts the executions of a dataset in its context; its own file shuffle reads the same.
        execution = getattr(data_context, "_execution_idx", 0) if data_context is not None else 0
        tasks = []
        for i in self.file_order(execution):
            path, rows = self.files[i]
            meta = BlockMetadata(num_rows=rows, size_bytes=None, exec_stats=None, input_files=(path,))
            read = functools.partial(read_file, path, rows, self.columns, self.batch_rows)
            tasks.append(ReadTask(read, meta, per_task_row_limit=per_task_row_limit))
        return tasks


__all__ = ["VersionSource", "read_file"]

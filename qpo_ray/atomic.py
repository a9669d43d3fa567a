"""The one way to write a run file: to a temporary file beside it, fsync, then rename over it.

A reader (or a resumed run) sees the old file or the new one, never a half-written one, even after a crash
or power loss. Every writer of run files goes through ``AtomicFile``: report.md, config.yaml, eval and step
JSON, the ``score`` and ``generate`` commands' outputs, the dataset's evaluation queries.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from qpo_ray.errors import ResourceError, os_reason

if TYPE_CHECKING:
    import pyarrow as pa


class AtomicFile:
    """A file handle on ``path``'s temporary twin: ``commit()`` makes it ``path``, ``discard()`` drops it.

    As a context manager it commits when the block ends normally and discards when it raises. A write the
    OS refuses (full disk, file-size limit, unwritable folder) leaves no temporary file and is a
    ``ResourceError`` naming ``path`` and the OS's reason."""

    def __init__(self, path: str | Path, mode: str = "wb"):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Open beyond this call: commit() or discard() closes it.
            self.file: IO[Any] = open(self.tmp, mode, encoding=None if "b" in mode else "utf-8")  # noqa: SIM115
        except OSError as e:
            raise write_error(self.path, e) from e

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except OSError as e:
            self.discard()
            raise write_error(self.path, e) from e

    def discard(self) -> None:
        try:
            self.file.close()  # flushes what is buffered: on a full disk that fails too, and closes anyway
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> IO[Any]:
        return self.file

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None:
            self.commit()
            return
        self.discard()
        if isinstance(exc, OSError):
            raise write_error(self.path, exc) from exc


def write_error(path: Path, e: OSError) -> ResourceError:
    """The one-line error of a write the OS refused."""
    return ResourceError(f"cannot write {path}: {os_reason(e)}")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with AtomicFile(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=str))


def atomic_write_table(path: str | Path, table: pa.Table) -> None:
    """A parquet file, written atomically."""
    import pyarrow.parquet as pq  # here, so that writing text never imports pyarrow

    with AtomicFile(path) as f:
        pq.write_table(table, f)


__all__ = ["AtomicFile", "atomic_write_bytes", "atomic_write_json", "atomic_write_table", "atomic_write_text",
           "write_error"]

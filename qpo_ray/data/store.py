"""The versioned dataset store of a run directory (docs/design.md §4).

Layout::

    RUN_DIR/data/v000/part-00000.parquet ... manifest.json
    RUN_DIR/data/v001/...

A version is written to ``data/.tmp-vNNN-*`` and renamed into place only when complete, so a reader sees
the old set of versions or the new one, never half of one. Writing takes the run directory's writer lock
(``qpo_ray.locks``): one writer at a time, so a temporary version is removed only when its writer is gone. A
child version holds its parent's files (hard links, copied where links are unsupported) plus the new rows, so
each version is self-contained.
The reward range used for normalisation is fixed by v000 and inherited by every later version.

A manifest's file names are bare names inside their version folder: a name that leads anywhere else is an
error, however right its checksum. ``verify`` checks a version's files against the manifest and then reads
them: parquet that cannot be read, another schema, or rows that break it (a NaN reward) are errors even
when a checksum was updated to match the damage.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qpo_ray.data.integrity import read_checked, sha256_file
from qpo_ray.data.keyset import KeySet
from qpo_ray.data.schema import COLUMNS, MAX_ABS_REWARD, SCHEMA, check_table
from qpo_ray.errors import DataError, ResourceError, os_reason
from qpo_ray.faults import fault_point
from qpo_ray.locks import writer_lock

log = logging.getLogger(__name__)


_VERSION_RE = re.compile(r"^v(\d{3,})$")
MANIFEST = "manifest.json"
ROWS_PER_FILE = 250_000
# Readers decode a row group at a time (Ray Data reads ahead several): small groups keep a reader's
# memory small whatever the size of the chunks handed to commit.
ROW_GROUP_ROWS = 8192


@dataclass
class FileEntry:
    name: str
    rows: int
    sha256: str


@dataclass
class Manifest:
    version: int
    parent: int | None
    rows: int
    new_rows: int
    reward_min: float
    reward_max: float
    files: list[FileEntry] = field(default_factory=list)
    duplicates_dropped: int = 0
    note: str = ""
    created: float = 0.0

    @classmethod
    def read(cls, path: Path) -> Manifest:
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            d["files"] = [FileEntry(**f) for f in d["files"]]
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise DataError(f"{path}: unreadable manifest ({e})") from None


def normalize_reward(r: float, lo: float, hi: float) -> float:
    """Map a raw reward to [0, 100] with the dataset's offline range (docs/design.md §2). Not clipped: a new row
    better than anything offline maps above 100."""
    return 100.0 * (r - lo) / (hi - lo) if hi > lo else 50.0


def parse_version_path(path: str | Path) -> tuple[Path, int] | None:
    """``(run_dir, version)`` when ``path`` names a dataset version folder ``RUN_DIR/data/vNNN``, else None."""
    p = Path(path).resolve()
    m = re.fullmatch(r"v(\d+)", p.name)
    if m is None or p.parent.name != "data":
        return None
    return p.parent.parent, int(m.group(1))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_batches(path: str, rows: int, columns: list[str] | None, batch_size: int) -> Iterator[pa.RecordBatch]:
    """One file of a version, ``batch_size`` rows at a time; a DataError when it cannot be read or does not
    hold the ``rows`` its manifest entry lists."""
    seen = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
            seen += batch.num_rows
            yield batch
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
    if seen != rows:
        raise DataError(f"{path}: {seen} rows, but the manifest lists {rows}: the file changed after its commit")


class DatasetStore:
    """The dataset versions of one run directory."""

    def __init__(self, run_dir: str | Path):
        self.root = Path(run_dir) / "data"

    # -- reading -------------------------------------------------------------------------------------
    def versions(self) -> list[int]:
        if not self.root.is_dir():
            return []
        out = []
        for p in self.root.iterdir():
            m = _VERSION_RE.match(p.name)
            if m and (p / MANIFEST).is_file():
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> int | None:
        vs = self.versions()
        return vs[-1] if vs else None

    def path(self, version: int) -> Path:
        return self.root / f"v{version:03d}"

    def manifest(self, version: int) -> Manifest:
        path = self.path(version) / MANIFEST
        if not path.is_file():
            raise DataError(f"dataset version v{version:03d} does not exist in {self.root}")
        return Manifest.read(path)

    def file_path(self, version: int, entry: FileEntry) -> Path:
        """Where a manifest entry's file lies: a bare file name inside the version folder, or a DataError."""
        folder = self.path(version)
        name = entry.name
        bare = isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
        # resolve(): a symlink inside the folder that points out of it is refused too
        if not bare or (folder / name).resolve().parent != folder.resolve():
            raise DataError(f"{folder / MANIFEST}: file name {name!r} is not a file of the version folder {folder}")
        return folder / name

    def files(self, version: int) -> list[str]:
        """Absolute paths of the version's parquet files."""
        return [path for path, _ in self.file_rows(version)]

    def file_rows(self, version: int) -> list[tuple[str, int]]:
        """Each parquet file of the version, as an absolute path, with the rows its manifest entry lists."""
        return [(str(self.file_path(version, f)), f.rows) for f in self.manifest(version).files]

    def iter_batches(self, version: int, batch_size: int = 8192,
                     columns: list[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Stream a version batch by batch; never holds the whole dataset. A file that cannot be read, or
        holds other than its manifest's rows, is a DataError here too, for readers that did not ``verify``."""
        for path, rows in self.file_rows(version):
            yield from read_batches(path, rows, columns, batch_size)

    def read_table(self, version: int, columns: list[str] | None = None) -> pa.Table:
        """The whole version as one table. For small data and tests; training streams with Ray Data."""
        batches = list(self.iter_batches(version, columns=columns))
        schema = SCHEMA if columns is None else pa.schema([SCHEMA.field(c) for c in columns])
        return pa.Table.from_batches(batches, schema=schema)

    def keys(self, version: int) -> KeySet:
        """Every pair key of a version."""
        out = KeySet()
        for b in self.iter_batches(version, batch_size=65536, columns=["key"]):
            out.add_new(b.column(0).to_numpy(zero_copy_only=False))
        return out

    def verify(self, version: int) -> Manifest:
        """Check a version before it is used: its files against the manifest (names, checksums, row counts),
        then their content (readable parquet, SCHEMA, every row valid). Reads the whole version once."""
        m = self.manifest(version)
        where = self.path(version) / MANIFEST
        if not (-MAX_ABS_REWARD <= m.reward_min <= m.reward_max <= MAX_ABS_REWARD):  # False for NaN too
            raise DataError(f"{where}: reward range [{m.reward_min}, {m.reward_max}] is not a finite range within "
                            f"[-{MAX_ABS_REWARD:g}, {MAX_ABS_REWARD:g}]")
        names = [f.name for f in m.files]
        if len(set(names)) != len(names):
            raise DataError(f"{where}: a file is listed twice ({sorted(n for n in set(names) if names.count(n) > 1)})")
        total = 0
        for f in m.files:
            p = self.file_path(version, f)
            if not p.is_file():
                raise DataError(f"{p}: listed in the manifest but missing")
            if sha256_file(p) != f.sha256:
                raise DataError(f"{p}: checksum mismatch (file changed or corrupt)")
            read_checked(p, f.rows)
            total += f.rows
        if total != m.rows:
            raise DataError(f"v{version:03d}: files hold {total} rows, manifest says {m.rows}")
        return m

    # -- writing -------------------------------------------------------------------------------------
    def clean_tmp(self) -> None:
        """Remove half-written versions left by a crash (they were never visible). Under the writer lock: a
        version another process is writing now is never removed (that process is refused instead)."""
        if self.root.is_dir():
            with writer_lock(self.root.parent):
                for p in self.root.glob(".tmp-v*"):
                    shutil.rmtree(p, ignore_errors=True)

    def commit(
        self,
        chunks: Iterable[pa.Table | pa.RecordBatch],
        *,
        version: int | None = None,
        parent: int | None = None,
        reward_range: tuple[float, float] | None = None,
        source: str = "<rows>",
        note: str = "",
    ) -> Manifest:
        """Write a new version atomically: the parent's rows (if any) plus the given rows.

        Rows are validated chunk by chunk (errors name source, row and column). A row whose key is
        already in the parent or earlier in ``chunks`` is dropped and counted. The reward
        range is the parent's; for a root version it is ``reward_range`` or the min/max of its rows.
        Holds the run directory's writer lock (re-entrant: a command that holds it already keeps it).
        """
        with writer_lock(self.root.parent):
            version = self._new_version(version)
            tmp = self._make_tmp(version)
            try:
                files, pm = self._link_parent(parent, tmp)
                seen = self.keys(parent) if parent is not None else KeySet()
                tally = _Tally()
                files += write_parts(_new_tables(chunks, source=source, seen=seen, tally=tally), tmp, len(files))
                # Arrow's allocator keeps the freed chunk and page buffers of a big commit (~80 MiB per 100k
                # rows) for reuse; the driver lives for the whole run, so give them back.
                pa.default_memory_pool().release_unused()
                if tally.dropped:
                    log.warning("%s: dropped %d duplicate row(s) (same task/target/setting/query/prompt key)",
                                source, tally.dropped)
                lo, hi = _reward_range(pm, reward_range, tally, source)
                m = Manifest(version=version, parent=parent, rows=sum(f.rows for f in files), new_rows=tally.rows,
                             reward_min=float(lo), reward_max=float(hi), files=files,
                             duplicates_dropped=tally.dropped, note=note, created=time.time())
                self._publish(tmp, m)
                return m
            except OSError as e:  # a full disk, a file-size limit: one line, and the half-written version is gone
                shutil.rmtree(tmp, ignore_errors=True)
                raise ResourceError(f"cannot write dataset v{version:03d} in {self.root}: {os_reason(e)}") from e
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def _new_version(self, version: int | None) -> int:
        """The version to write: ``version``, or the one after the latest; an existing one is an error."""
        if version is None:
            latest = self.latest()
            version = 0 if latest is None else latest + 1
        if (self.path(version) / MANIFEST).exists():
            raise DataError(f"dataset version v{version:03d} already exists in {self.root}")
        return version

    def _make_tmp(self, version: int) -> Path:
        """A fresh hidden folder the version is written in (readers never list it)."""
        tmp = self.root / f".tmp-v{version:03d}-{uuid.uuid4().hex[:8]}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
        except OSError as e:
            raise ResourceError(f"cannot write dataset v{version:03d} in {self.root}: {os_reason(e)}") from None
        return tmp

    def _link_parent(self, parent: int | None, tmp: Path) -> tuple[list[FileEntry], Manifest | None]:
        """The parent's files in ``tmp`` (hard links, else copies) and its manifest; none for a root version."""
        if parent is None:
            return [], None
        # The child takes the parent's files and checksums as they are: they must be sound.
        pm = self.verify(parent)
        for f in pm.files:
            src, dst = self.file_path(parent, f), tmp / f.name
            try:
                os.link(src, dst)
            except OSError:
                shutil.copy2(src, dst)
        return list(pm.files), pm

    def _publish(self, tmp: Path, m: Manifest) -> None:
        """Write the manifest, sync, and rename ``tmp`` into place: the commit point."""
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(asdict(m), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        fault_point("store.commit.before-rename")
        os.rename(tmp, self.path(m.version))
        _fsync_dir(self.root)


@dataclass
class _Tally:
    """What the new rows of a commit came to."""

    rows: int = 0
    dropped: int = 0
    lo: float = float("inf")
    hi: float = float("-inf")


def _new_tables(chunks: Iterable[pa.Table | pa.RecordBatch], *, source: str, seen: KeySet,
                tally: _Tally) -> Iterator[pa.Table]:
    """The chunks as validated tables of SCHEMA, without the rows whose key ``seen`` holds (the others' keys
    are added to it). Counts into ``tally``; empty tables are skipped."""
    offset = 0
    for chunk in chunks:
        table = chunk if isinstance(chunk, pa.Table) else pa.Table.from_batches([chunk])
        table = check_table(table, source=source, row_offset=offset)
        offset += table.num_rows
        keep = seen.add_new(table.column("key").to_numpy(zero_copy_only=False))
        if not keep.all():
            tally.dropped += int((~keep).sum())
            table = table.filter(pa.array(keep))
        if table.num_rows == 0:
            continue
        rewards = table.column("reward")
        tally.lo = min(tally.lo, pa.compute.min(rewards).as_py())
        tally.hi = max(tally.hi, pa.compute.max(rewards).as_py())
        tally.rows += table.num_rows
        yield table


def write_rows(writer: pq.ParquetWriter, table: pa.Table) -> None:
    """The one place a commit's rows reach a file (a seam: tests replace it to fail a commit midway)."""
    writer.write_table(table, row_group_size=ROW_GROUP_ROWS)


def write_parts(tables: Iterable[pa.Table], folder: Path, first_part: int) -> list[FileEntry]:
    """The tables as ``part-NNNNN.parquet`` files of at most ROWS_PER_FILE rows in ``folder``, numbered from
    ``first_part``, each synced and checksummed."""
    entries: list[FileEntry] = []
    writer, path, rows = None, folder, 0
    for table in tables:
        while table.num_rows:
            if writer is None:
                path = folder / f"part-{first_part + len(entries):05d}.parquet"
                writer, rows = pq.ParquetWriter(path, SCHEMA), 0
            take = min(table.num_rows, ROWS_PER_FILE - rows)
            write_rows(writer, table.slice(0, take))
            rows += take
            table = table.slice(take)
            if rows >= ROWS_PER_FILE:
                writer.close()
                entries.append(_entry(path, rows))
                writer = None
    if writer is not None:
        writer.close()
        entries.append(_entry(path, rows))
    return entries


def _reward_range(pm: Manifest | None, given: tuple[float, float] | None, tally: _Tally,
                  source: str) -> tuple[float, float]:
    """A version's reward range: its parent's, else the given one, else its own rows'."""
    if pm is not None:
        return pm.reward_min, pm.reward_max
    if given is not None:
        return given
    if tally.rows == 0:
        raise DataError(f"{source}: no rows — an empty dataset cannot start a run")
    return tally.lo, tally.hi


def _entry(path: Path, rows: int) -> FileEntry:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return FileEntry(name=path.name, rows=rows, sha256=sha256_file(path))


__all__ = ["COLUMNS", "DatasetStore", "Manifest", "normalize_reward", "read_batches"]

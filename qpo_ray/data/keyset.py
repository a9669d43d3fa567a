"""The pair keys of a dataset version, held compactly for deduplication."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


class KeySet:
    """A set of pair keys held as one sorted bytes array: ~32 bytes a key where a ``set[str]`` takes ~120, so
    deduplicating a million-row version costs tens of MiB, not hundreds."""

    def __init__(self) -> None:
        self._sorted = np.array([], dtype=np.bytes_)

    def _has(self, keys: np.ndarray) -> np.ndarray:
        if not len(self._sorted):
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self._sorted, keys), len(self._sorted) - 1)
        return self._sorted[at] == keys

    def add_new(self, keys) -> np.ndarray:
        """Add ``keys``; True where a key was not in the set before (for repeats within ``keys``: the first)."""
        arr = _utf8(keys)
        uniq, first = np.unique(arr, return_index=True)
        fresh = ~self._has(uniq)
        mask = np.zeros(len(arr), dtype=bool)
        mask[first[fresh]] = True
        if fresh.any():
            # Two sorted runs: the stable sort merges them in about linear time.
            self._sorted = np.sort(np.concatenate([self._sorted, uniq[fresh]]), kind="stable")
        return mask

    def __contains__(self, key: str) -> bool:
        return bool(self._has(_utf8([key]))[0])

    def __len__(self) -> int:
        return len(self._sorted)

    def __iter__(self) -> Iterator[str]:
        return (k.decode("utf-8") for k in self._sorted.tolist())


def _utf8(keys) -> np.ndarray:
    arr = np.asarray(keys)
    return np.char.encode(arr.astype(np.str_), "utf-8") if arr.dtype.kind in "UO" else arr.astype(np.bytes_)


__all__ = ["KeySet"]

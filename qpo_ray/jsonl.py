"""The one JSONL reader (lenient or strict) and writer, with the line each record came from.

Lenient (``jsonl_lines``): a bad line is yielded with why it is bad, so an importer can skip and report it.
Strict (``read_jsonl``): the first bad line is a ``DataError`` naming the file and line. Both decode line
by line, so one bad byte costs one line, and both refuse an object that repeats a key (the json module would
silently keep the last value, e.g. pick one of two labels).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from qpo_ray.atomic import atomic_write_text
from qpo_ray.errors import DataError


class DuplicateKey(ValueError):
    """A JSON object names one key twice; which value is meant is ambiguous."""


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def loads_strict(text: str) -> Any:
    """``json.loads`` that raises DuplicateKey (carrying the key) where an object repeats a key."""
    return json.loads(text, object_pairs_hook=_unique_keys)


def text_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """Yield ``(line number, text, None)`` per line, or ``(n, None, why)`` for a line that is not UTF-8."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield n, None, f"not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if n == 1:
                text = text.lstrip("\ufeff")
            yield n, text.rstrip("\r\n"), None


def jsonl_lines(path: str | Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(line number, object, None)`` per non-blank line, or ``(n, None, why)`` for a line that is not one
    JSON object."""
    for n, text, why in text_lines(Path(path)):
        if why is None and not text.strip():
            continue
        rec = None
        if why is None:
            try:
                rec = loads_strict(text)
            except json.JSONDecodeError as e:
                why = f"not JSON ({e.msg} at column {e.colno})"
            except DuplicateKey as e:
                why = f"key '{e}' appears twice in the JSON object"
            else:
                if not isinstance(rec, dict):
                    why, rec = f"expected a JSON object, got {type(rec).__name__}", None
        yield n, rec, why


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-blank line; a DataError ``"FILE line N: why"`` at the first bad one."""
    for n, rec, why in jsonl_lines(path):
        if rec is None:
            raise DataError(f"{path} line {n}: {why}")
        yield n, rec


def write_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object a line (UTF-8, not ASCII-escaped), written atomically."""
    atomic_write_text(path, "".join(json.dumps(dict(r), ensure_ascii=False, default=str) + "\n" for r in rows))


__all__ = ["DuplicateKey", "jsonl_lines", "loads_strict", "read_jsonl", "text_lines", "write_jsonl"]

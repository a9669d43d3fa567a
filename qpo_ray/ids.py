"""Stable content ids: a short hash of text parts, the same on every machine and in every run."""

from __future__ import annotations

import hashlib


def content_id(*parts: str, n: int = 16) -> str:
    """A stable id from text parts (sha256, hex prefix). Parts are length-prefixed so ("ab","c") != ("a","bc")."""
    h = hashlib.sha256()
    for p in parts:
        b = p.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:n]

"""The one JSONL reader/writer and the one atomic-write helper."""

import pytest

from qpo_ray.atomic import AtomicFile, atomic_write_json
from qpo_ray.errors import DataError
from qpo_ray.jsonl import jsonl_lines, read_jsonl, write_jsonl


def test_atomic_file_replaces_whole_or_not_at_all(tmp_path):
    p = tmp_path / "sub" / "report.md"
    atomic_write_json(p, {"a": 1})
    with pytest.raises(RuntimeError), AtomicFile(p, "w") as f:
        f.write("half a rep")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == '{\n "a": 1\n}'  # the old file, untouched
    assert [q.name for q in p.parent.iterdir()] == ["report.md"]  # no temporary left behind


def test_jsonl_round_trip_and_line_numbers(tmp_path):
    p = tmp_path / "rows.jsonl"
    write_jsonl(p, [{"query": "é"}, {"query": "b"}])
    assert [(n, r["query"]) for n, r in read_jsonl(p)] == [(1, "é"), (2, "b")]
    p.write_bytes(b'{"q": 1}\n\n[1]\n{"q": 1, "q": 2}\nnope\n\xff\n')
    assert [(n, why.split(" (")[0] if why else None) for n, _, why in jsonl_lines(p)] == [
        (1, None), (3, "expected a JSON object, got list"), (4, "key 'q' appears twice in the JSON object"),
        (5, "not JSON"), (6, "not valid UTF-8")]
    with pytest.raises(DataError, match=r"rows\.jsonl line 3: expected a JSON object"):
        list(read_jsonl(p))

"""Tracker: metrics.jsonl and the TensorBoard event files carry the same scalars at the same global steps.

`tensorboard` (and its event reader) is not a dependency, so the event files are read back here with a small
TFRecord reader over tensorboardX's protobufs. The reader checks every record's CRCs with a CRC-32C of its
own, itself checked against the standard check value and against tensorboardX's writer; what it reads is
checked against content known in advance (the file-version record every event file starts with).
"""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.record_writer import masked_crc32c as tbx_masked_crc32c

from qpo_ray.tracking import Tracker, read_metrics


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli polynomial, reflected
        table.append(c)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC32C_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15, add a constant (tensorflow/core/lib/hash/crc32c.h)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[Event]:
    """Every Event in one TFRecord file: [len u64][crc(len) u32][data][crc(data) u32], little-endian."""
    data, pos, out = path.read_bytes(), 0, []
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        assert hcrc == masked_crc32c(header), f"{path}: bad length CRC at byte {pos}"
        payload = data[pos + 12:pos + 12 + n]
        (dcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        assert len(payload) == n and dcrc == masked_crc32c(payload), f"{path}: bad data CRC at byte {pos}"
        ev = Event()
        ev.ParseFromString(payload)
        out.append(ev)
        pos += 16 + n
    return out


def tb_scalars(run_dir: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file under run_dir/tb."""
    files = sorted((run_dir / "tb").rglob("events.out.tfevents.*"))
    assert files, "no TensorBoard event files written"
    return [(v.tag, ev.step, v.simple_value) for f in files for ev in read_events(f)
            if ev.HasField("summary") for v in ev.summary.value]


def jsonl_scalars(run_dir: Path) -> list[tuple[str, int, float]]:
    """What the Tracker promises TensorBoard gets: each numeric (non-bool) metric as event/name."""
    return [(f"{r['event']}/{k}", r["global_step"], float(v)) for r in read_metrics(run_dir)
            for k, v in r.items() if k not in ("event", "loop", "global_step", "time")
            and isinstance(v, int | float) and not isinstance(v, bool)]


def _as_float32(rows: list[tuple[str, int, float]]) -> Counter:
    # simple_value is a float32: compare both sides after the same rounding.
    return Counter((t, s, struct.unpack("<f", struct.pack("<f", v))[0]) for t, s, v in rows)


def _train_loop(tracker: Tracker, loop: int, base: int, losses: list[float]) -> int:
    # The driver's numbering: global_step = epochs of all earlier loops + this epoch (1-based).
    for i, loss in enumerate(losses):
        tracker.log("train", {"loss": loss, "lr": 1e-3 / loop, "epoch": i + 1, "note": "text", "ok": True},
                    loop=loop, global_step=base + i + 1)
    return base + len(losses)


def test_crc_is_the_standard_crc32c_and_tensorboardx_agrees():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720, B.4)
    assert crc32c(b"") == 0
    for data in (b"", b"a", b"123456789", bytes(range(256)) * 3):
        assert masked_crc32c(data) == tbx_masked_crc32c(data)


def test_every_event_file_starts_with_its_file_version(tmp_path):
    t = Tracker(tmp_path, {}, None)
    t.log("train", {"loss": 2.5}, loop=1, global_step=7)
    t.close()
    (f,) = (tmp_path / "tb").rglob("events.out.tfevents.*")
    first, *rest = read_events(f)
    assert first.file_version == "brain.Event:2"  # what TensorBoard requires first in a file
    assert [(v.tag, ev.step, v.simple_value) for ev in rest for v in ev.summary.value] == [("train/loss", 7, 2.5)]


def test_jsonl_and_tensorboard_agree_across_loops_and_a_resume(tmp_path):
    t = Tracker(tmp_path, {}, {"run_dir": str(tmp_path)})
    base = _train_loop(t, 1, 0, [3.5, 2.25, 1.125])
    t.log("eval/qpo", {"accuracy": 0.5, "mean_reward": 42.0}, loop=1, global_step=1)
    t.close()
    # A resumed run is a new process with a new Tracker on the same run directory: a second event file.
    t = Tracker(tmp_path, {}, None)
    base = _train_loop(t, 2, base, [0.9, 0.7])
    t.log("eval/qpo", {"accuracy": 0.75, "mean_reward": 55.5}, loop=2, global_step=2)
    t.close()

    recs = read_metrics(tmp_path)
    assert len(recs) == 7 and all({"event", "loop", "global_step", "time"} <= set(r) for r in recs)
    assert recs[0]["note"] == "text" and recs[0]["ok"] is True  # non-numbers stay in the JSONL only

    tb, js = tb_scalars(tmp_path), jsonl_scalars(tmp_path)
    assert _as_float32(tb) == _as_float32(js)
    tags = {tag for tag, _, _ in tb}
    assert tags == {"train/loss", "train/lr", "train/epoch", "eval/qpo/accuracy", "eval/qpo/mean_reward"}

    # Global steps keep increasing across loops, and JSONL and TensorBoard agree on them.
    train = [r for r in recs if r["event"] == "train"]
    steps = [r["global_step"] for r in train]
    assert steps == list(range(1, base + 1))
    assert [r["loop"] for r in train] == [1, 1, 1, 2, 2]
    assert sorted(s for tag, s, _ in tb if tag == "train/loss") == steps
    by_step = {s: v for tag, s, v in tb if tag == "train/loss"}
    assert by_step[4] == pytest.approx(0.9) and by_step[3] == pytest.approx(1.125)
    assert sorted(s for tag, s, _ in tb if tag == "eval/qpo/accuracy") == [1, 2]


def test_reopening_within_a_second_keeps_both_event_files(tmp_path):
    for step in (1, 2):
        t = Tracker(tmp_path, {}, None)
        t.log("train", {"loss": float(step)}, loop=1, global_step=step)
        t.close()
    assert sorted(s for _, s, _ in tb_scalars(tmp_path)) == [1, 2]


def test_reader_rejects_a_corrupt_record(tmp_path):
    t = Tracker(tmp_path, {}, None)
    t.log("train", {"loss": 1.0}, loop=1, global_step=1)
    t.close()
    f = next((tmp_path / "tb").rglob("events.out.tfevents.*"))
    raw = bytearray(f.read_bytes())
    raw[-6] ^= 0xFF  # a byte inside the last record's payload
    f.write_bytes(bytes(raw))
    with pytest.raises(AssertionError, match="CRC"):
        read_events(f)

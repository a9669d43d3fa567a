"""The benchmark runner end to end at its smallest sizes (collect and dedupe: no Ray cluster needed with
--quick), checking the result lines and the JSON it writes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<name>[a-z]+): ratio=(?P<ratio>\d+\.\d\d) \(goal (?P<op>[≥≤=<]) (?P<goal>[\d.]+)[^)]*\) "
                  r"\| ours=(?P<ours>[-\d.]+) baseline=(?P<base>[-\d.]+) (?P<units>\S.*)$")


@pytest.mark.timeout(300)
def test_runner_quick_collect_and_dedupe(tmp_path):
    out = tmp_path / "latest.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "collect,dedupe", "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = {m["name"]: m for m in (LINE.match(x) for x in proc.stdout.splitlines()) if m}
    assert set(lines) == {"collect", "dedupe"}, proc.stdout
    assert lines["collect"]["op"] == "≥" and float(lines["collect"]["goal"]) == 4
    assert lines["collect"]["units"] == "prompts/s"
    assert lines["dedupe"]["op"] == "=" and float(lines["dedupe"]["goal"]) == 0

    doc = json.loads(out.read_text())
    assert doc["quick"] is True and doc["threads"] >= 1 and doc["host"]["cpus"] >= 1
    res = doc["results"]
    assert set(res) == {"collect", "dedupe"}
    for name, r in res.items():
        assert "error" not in r, r
        for key in ("ratio", "goal", "goal_op", "ours", "baseline", "units", "ok", "raw", "seconds", "wall_s", "log"):
            assert key in r, (name, key)
        assert f"{r['ratio']:.2f}" == lines[name]["ratio"]
        assert r["raw"]["threads"] == doc["threads"]
        assert Path(r["log"]).is_file()
    # Collect: both sides did the same work, and batched greedy decoding equals unbatched.
    c = res["collect"]
    assert c["ratio"] == pytest.approx(c["ours"] / c["baseline"])
    n, k = c["raw"]["greedy_equal"].split("/")
    assert n == k
    # Dedupe: the repeat loop made no target calls, the mixed loop exactly one per new pair.
    d = res["dedupe"]
    assert d["ratio"] == 0 and d["ok"] is True
    assert d["raw"]["repeat_calls"] == 0 and d["raw"]["first_calls"] == d["raw"]["pairs"]
    assert d["raw"]["mixed_calls"] == d["raw"]["new_pairs"] and d["raw"]["rows_equal"] is True
    table = proc.stdout[proc.stdout.index("\nbenchmark "):]  # the closing table: one row per benchmark
    assert re.search(r"^collect\s+\d+\.\d\d\s", table, re.M) and re.search(r"^dedupe\s+0\.00\s", table, re.M)


def test_runner_rejects_unknown_benchmark():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--only", "nope"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "unknown benchmark" in proc.stderr


def test_train_baseline_brackets_ours_with_two_plain_runs():
    from benchmarks.bench_train import bracket

    before = {"tokens_per_s": 100.0, "epoch_time_s": [1.0], "cores": 2.0, "steps_per_epoch": [16]}
    after = {"tokens_per_s": 80.0, "epoch_time_s": [1.25], "cores": 1.9, "steps_per_epoch": [16]}
    b = bracket(before, after)
    assert b["tokens_per_s"] == 90.0 and b["drift"] == pytest.approx(20 / 90, abs=1e-3)
    assert (b["before_tokens_per_s"], b["after_tokens_per_s"]) == (100.0, 80.0)
    assert b["steps_per_epoch"] == [16] and b["after"] == {"epoch_time_s": [1.25], "cores": 1.9}


def test_stream_growth_counts_an_actor_busy_in_one_run_and_idle_in_the_other_as_one_process():
    from benchmarks.bench_stream import growth

    small = {"pss_at_peak_mib": [["driver", 500.0], ["ray::Coordinator.get_reserved_resources", 124.0],
                                 ["ray::ReadVersion->MapBatches(tokenize_batch)", 330.0]]}
    big = {"pss_at_peak_mib": [["driver", 550.0], ["ray::Coordinator", 124.0],
                               ["ray::ReadVersion->MapBatches(tokenize_batch)", 370.0], ["ray::IDLE", 100.0]]}
    assert growth(big, small) == [("ray::IDLE", 100.0), ("driver", 50.0),
                                  ("ray::ReadVersion->MapBatches(tokenize_batch)", 40.0)]

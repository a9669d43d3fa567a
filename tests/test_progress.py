"""The progress meter: a redrawn bar on a terminal, whole periodic lines anywhere else."""

from __future__ import annotations

import io

from qpo_ray.progress import bar, restart_clock


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_terminal_it_writes_whole_lines_with_count_rate_and_eta():
    out = io.StringIO()
    meter = bar(40, "score bootstrap", unit="req", stream=out, every_s=3600)
    for _ in range(40):
        meter.update(1)
    meter.set_postfix_str("2 retried", refresh=False)
    meter.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # every_s far above the run's length: the opening line and the closing one, nothing in between
    assert len(lines) == 2, lines
    assert lines[0].startswith("score bootstrap: 0/40 req (0%)")
    assert lines[-1].startswith("score bootstrap: 40/40 req (100%)")
    assert "ETA" in lines[-1] and "req/s" in lines[-1] and lines[-1].endswith("2 retried")


def test_without_a_terminal_it_prints_again_once_every_s_has_passed():
    out = io.StringIO()
    meter = bar(3, "train", unit="step", stream=out, every_s=0)
    for _ in range(3):
        meter.update(1)
    meter.close()
    counts = [line.split(":")[1].split()[0] for line in out.getvalue().splitlines()]
    assert counts[:4] == ["0/3", "1/3", "2/3", "3/3"]


def test_on_a_terminal_it_redraws_one_bar():
    out = _Terminal()
    meter = bar(10, "sample loop-1", unit="query", stream=out)
    meter.update(10)
    meter.close()
    text = out.getvalue()
    assert "\r" in text and "10/10" in text and "sample loop-1" in text


def test_a_disabled_meter_prints_nothing():
    out = io.StringIO()
    with bar(5, "x", stream=out, enabled=False) as meter:
        meter.update(5)
    assert out.getvalue() == ""


def test_restart_clock_keeps_a_start_up_out_of_the_rate_and_eta():
    out = io.StringIO()
    meter = bar(100, "train", unit="step", stream=out, every_s=0)
    meter.start_t -= 3600  # an hour of start-up before the first step
    meter.last_print_t -= 3600
    restart_clock(meter, 1)
    for _ in range(9):
        meter.update(1)
    meter.close()
    lines = out.getvalue().splitlines()
    counts = [line.split(":")[1].split()[0] for line in lines]
    assert counts == sorted(counts, key=lambda c: int(c.split("/")[0])), lines  # never counts backwards
    assert lines[-1].startswith("train: 10/100 step (10%)") and "00:00 elapsed, ETA 00:00" in lines[-1], lines

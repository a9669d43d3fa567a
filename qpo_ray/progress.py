"""Progress of a long step, for a person watching the run: a live tqdm bar on a terminal; on anything else
(CI, ``ray job logs``, a file) the same meter as a plain line every ``every_s`` seconds and at the end."""

from __future__ import annotations

import sys
import time
from typing import IO, Any

from tqdm import tqdm

PLAIN_EVERY_S = 30.0
_last_progress = time.monotonic()
# Without a terminal there is no bar to redraw: count, share, rate, elapsed and ETA in one line.
PLAIN_FORMAT = ("{desc}: {n_fmt}/{total_fmt} {unit} ({percentage:.0f}%), {rate_fmt}, {elapsed} elapsed, "
                "ETA {remaining}{postfix}")


class _Lines:
    """A stream for tqdm that turns its carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def last_progress() -> float:
    """When (``time.monotonic``) any meter of this process last moved: what the step watchdog reads."""
    return _last_progress


def touch() -> None:
    global _last_progress
    _last_progress = time.monotonic()


class _Meter(tqdm):
    """A tqdm whose every advance is noted as progress (``last_progress``)."""

    def update(self, n: float | None = 1) -> bool | None:
        if n:
            touch()
        return super().update(n)


def _is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-like stream without a terminal
        return False


def bar(total: int, desc: str, unit: str = "it", *, stream: IO[str] | None = None,
        every_s: float = PLAIN_EVERY_S, enabled: bool = True) -> tqdm:
    """A progress meter for ``total`` units of work."""
    stream = stream if stream is not None else sys.stderr
    if _is_tty(stream):
        return _Meter(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                      disable=not enabled)
    # miniters=0: print whenever every_s has passed, however few units came in since.
    return _Meter(total=total, desc=desc, unit=unit, file=_Lines(stream), mininterval=every_s,
                  maxinterval=every_s, miniters=0, ascii=True, bar_format=PLAIN_FORMAT, disable=not enabled)


def restart_clock(meter: tqdm, done: int) -> None:
    """Count ``done`` units as already done and time the rate, ETA and elapsed time from now on: for work
    whose first units show up only after a start-up (a Ray Train worker's first step), which would otherwise
    make the first ETA absurd (hours, after one step)."""
    touch()
    meter.unpause()  # tqdm's clock restarts at its last print; the meter has counted nothing since
    meter.n = meter.last_print_n = meter.initial = done

"""Stopping a run on SIGINT or SIGTERM.

Inside :func:`stop_on_signals` both signals raise :class:`Stopped` in the main thread. It is a
KeyboardInterrupt: no ``except Exception`` catches it, every ``finally`` runs (the scoring pool is deleted, a
half-written file or dataset version is removed) and the step it interrupts never gets its marker, so
``qpo-ray run --resume`` redoes that step and nothing else. A KeyboardInterrupt because Ray's blocking calls
(``ray.get``) take only that from a signal handler (anything else ends in a SystemError) and raise a
KeyboardInterrupt of their own: the block turns it back into :class:`Stopped` for the signal that came. Ray's
driver sets a SIGTERM handler of its own (exit, then a native stack dump as its threads die): :func:`install`
is called again after ``ray.init`` to take SIGTERM back. A signal that some library swallowed is still seen at
the next :func:`check_stop` (between steps, between scoring chunks). Ray Train's ``fit`` sets a SIGINT handler
of its own and leaves it set (``qpo_ray.train.trainer`` keeps ours: :func:`keep_signal_handlers`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []
_active = False


class Stopped(KeyboardInterrupt):
    """A run stopped by a signal; ``exit_code`` is the shell's 128 + signal number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, run_dir: Path | None = None):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.run_dir = run_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _handler(signum: int, frame: FrameType | None) -> None:
    _received.append(signum)
    raise Stopped(signum)


def install() -> None:
    """(Re)install the handlers inside :func:`stop_on_signals`; a no-op outside it or off the main thread."""
    if _active and threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _handler)


def stopping_signals() -> bool:
    """Whether this thread is inside :func:`stop_on_signals` (its handlers are the ones that should run)."""
    return _active and threading.current_thread() is threading.main_thread()


@contextmanager
def keep_signal_handlers() -> Iterator[None]:
    """Around a library call that sets SIGINT/SIGTERM handlers of its own and leaves them set (Ray Train's
    ``fit``): the handlers from before are back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            if h is not None and signal.getsignal(s) is not h:
                signal.signal(s, h)


def check_stop() -> None:
    """Raise :class:`Stopped` if a signal arrived inside :func:`stop_on_signals` and was swallowed."""
    if _active and _received:
        raise Stopped(_received[0])


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Stopped` inside the block; the previous handlers come back after it."""
    global _active
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {s: signal.getsignal(s) for s in SIGNALS}
    _received.clear()
    _active = True
    install()
    try:
        yield
    except KeyboardInterrupt as e:
        if isinstance(e, Stopped):
            raise
        raise Stopped(_received[0] if _received else signal.SIGINT) from None
    finally:
        _active = False
        _received.clear()
        for s, h in old.items():
            signal.signal(s, h)


__all__ = ["Stopped", "check_stop", "install", "keep_signal_handlers", "stop_on_signals", "stopping_signals"]

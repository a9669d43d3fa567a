"""Named crash points for fault-injection tests (``$QPO_RAY_FAULT``)."""

from __future__ import annotations

import os
import signal

FAULT_ENV = "QPO_RAY_FAULT"


def fault_point(name: str) -> None:
    """Named crash point for fault-injection tests: SIGKILL this process when ``$QPO_RAY_FAULT == name``.

    Nothing else in the code knows about faults; the kill is as abrupt as a node loss.
    """
    if os.environ.get(FAULT_ENV) == name:
        print(f"[qpo-ray] fault injection: SIGKILL at '{name}'", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

"""Training progress from the Ray Train worker to the driver's display.

``ray.train.report`` is collective and carries checkpoints, so it runs once per epoch; a person needs the
step, the loss and an ETA in between. Rank 0 posts its step to a small actor (fire and forget, at most
every ``POST_EVERY_S``), and a thread on the driver reads it into a ``qpo_ray.progress`` meter while
``trainer.fit()`` blocks."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from qpo_ray.progress import bar, restart_clock

POST_EVERY_S = 0.5
POLL_EVERY_S = 1.0


class _Board:
    """The latest step a training run posted (a Ray actor: see ``board``)."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def post(self, state: dict[str, Any]) -> None:
        self.state = state

    def read(self) -> dict[str, Any]:
        return self.state


class StepPoster:
    """Worker side: posts (global step, epoch, running loss) to the board, throttled."""

    def __init__(self, board: Any, steps_per_epoch: int):
        self.board, self.steps_per_epoch = board, steps_per_epoch
        self.last = 0.0

    def __call__(self, epoch: int, step: int, loss: Any, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.board is None or (not force and now - self.last < POST_EVERY_S):
            return
        self.last = now
        self.board.post.remote({"step": epoch * self.steps_per_epoch + step, "epoch": epoch + 1, "loss": float(loss)})


@contextmanager
def training_progress(desc: str, *, epochs: int, steps_per_epoch: int, enabled: bool = True) -> Iterator[Any]:
    """Yield a board handle for the workers' config (None when disabled) and show its steps until the block
    ends. Steps of epochs a resumed run skips show up at once, as the worker posts them."""
    if not enabled:
        yield None
        return
    import ray

    board = ray.remote(num_cpus=0)(_Board).remote()
    meter = bar(epochs * steps_per_epoch, desc, unit="step")
    stop = threading.Event()
    started = threading.Event()

    def show() -> None:
        try:
            state = ray.get(board.read.remote(), timeout=10)
        except Exception:  # a slow or lost read only delays the display; the run does not depend on it
            return
        if state:
            if not started.is_set():
                # The rate starts at the first posted step: the wait before it was Ray starting the workers.
                started.set()
                restart_clock(meter, state["step"])
            meter.set_postfix_str(f"epoch {state['epoch']}/{epochs}, loss {state['loss']:.4f}", refresh=False)
            meter.update(max(0, state["step"] - meter.n))

    def poll() -> None:
        while not stop.wait(POLL_EVERY_S):
            show()

    thread = threading.Thread(target=poll, name="qpo-train-progress", daemon=True)
    thread.start()
    try:
        yield board
    finally:
        stop.set()
        thread.join(timeout=POLL_EVERY_S + 15)
        show()
        meter.close()
        ray.kill(board)

"""One writer per run directory and per dataset (qpo_ray.locks), what `run --resume` may change, and how a
signal stops a run (qpo_ray.stopping).

Another writer is a real second process (a few lines of Python holding the lock, as an import or a run
would); the command refused is run in this process through the CLI's ``main``: no Ray starts for a refusal.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from qpo_ray.cli import main
from qpo_ray.config import dump_config, load_config
from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.driver.run import resume_config
from qpo_ray.errors import ConfigError
from qpo_ray.locks import HOLDER_FILE, LOCK_FILE, LockedError, writer_lock
from qpo_ray.runs import RunDir, run_dir_of
from qpo_ray.stopping import Stopped, check_stop, keep_signal_handlers, stop_on_signals

REPO = Path(__file__).resolve().parents[1]
HOLDING = "held"
# What a second process runs: take the lock as `qpo-ray data import` would, say so, hold it until stdin closes.
HOLDER = ("import sys\nfrom qpo_ray.locks import writer_lock\n"
          "with writer_lock(sys.argv[1], 'qpo-ray data import --run-dir ' + sys.argv[1]):\n"
          f"    print({HOLDING!r}, flush=True)\n    sys.stdin.read()\n")


def _rows(n: int, start: int = 0):
    return rows_to_table([{"task": "emotion", "setting": "zero_shot", "target": "m", "query": f"query {i}",
                           "label": "joy", "prompt": f"prompt {i % 3}", "reward": float(i % 5),
                           "source": "offline:x", "loop": 0} for i in range(start, start + n)])


def _hold(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(run_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, env=env)
    assert p.stdout.readline().strip() == HOLDING
    return p


def _release(p: subprocess.Popen) -> None:
    p.stdin.close()
    assert p.wait(timeout=30) == 0


@pytest.fixture
def run(tmp_path) -> Path:
    """A started tiny run (config.yaml, steps/, dataset v000) that no process writes now."""
    rd = tmp_path / "run"
    (rd / "steps").mkdir(parents=True)
    dump_config(load_config("tiny", [f"run_dir={rd}"]), rd / "config.yaml")
    DatasetStore(rd).commit([_rows(20)], source="d0")
    return rd


@pytest.fixture
def held(run) -> Iterator[subprocess.Popen]:
    """``run`` with its writer lock held by another process."""
    p = _hold(run)
    try:
        yield p
    finally:
        if p.poll() is None:
            _release(p)


def _one_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("qpo-ray: error:")]
    assert len(lines) == 1, err
    return lines[0]


def _import_args(tmp_path: Path, run_dir: Path, start: int = 100) -> list[str]:
    src = tmp_path / f"rows-{start}.jsonl"
    src.write_text("".join(json.dumps({"question": f"new query {i}", "instruction": "Be nice.", "score": 1.0,
                                       "gold": "joy"}) + "\n" for i in range(start, start + 5)))
    return ["data", "import", "--format", "jsonl", "--input", str(src), "--run-dir", str(run_dir), "--task", "t",
            "--target", "m", "--map", "query=question,prompt=instruction,reward=score,label=gold"]


# -- the lock ------------------------------------------------------------------------------------------------
def test_a_second_writer_is_refused_naming_the_holder(held, run):
    with pytest.raises(LockedError) as e, writer_lock(run):
        pass
    msg = str(e.value)
    assert f"PID {held.pid} on {socket.gethostname()} (qpo-ray data import --run-dir {run}) since " in msg
    assert "\n" not in msg
    with pytest.raises(LockedError, match=f"PID {held.pid}"):
        DatasetStore(run).commit([_rows(5, start=50)], parent=0)
    assert DatasetStore(run).versions() == [0]
    _release(held)
    with writer_lock(run):  # free again once the holder is done
        assert json.loads((run / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert not (run / HOLDER_FILE).exists()


def test_a_dead_holders_lock_is_taken_over_with_a_log_line(run, caplog):
    p = _hold(run)
    p.send_signal(signal.SIGKILL)  # dies holding it: no release, its holder record stays
    p.wait(timeout=30)
    assert json.loads((run / HOLDER_FILE).read_text())["pid"] == p.pid
    with caplog.at_level("INFO", logger="qpo_ray.locks"), writer_lock(run):
        assert json.loads((run / HOLDER_FILE).read_text())["pid"] == os.getpid()
    assert f"took over the lock left by PID {p.pid}" in caplog.text


def test_the_lock_is_reentrant_within_a_process(run):
    with writer_lock(run), writer_lock(run):
        DatasetStore(run).commit([_rows(5, start=50)], parent=0)
        assert (run / HOLDER_FILE).exists()
    assert not (run / HOLDER_FILE).exists() and (run / LOCK_FILE).exists()
    assert DatasetStore(run).versions() == [0, 1]


def test_a_failed_first_import_leaves_no_folder(tmp_path, capsys):
    """The lock creates the run directory; an import that fails inside it (no valid row) takes it away."""
    src, new = tmp_path / "bad.jsonl", tmp_path / "new"
    src.write_text('{"question": "q"}\n')
    assert main(["data", "import", "--format", "jsonl", "--input", str(src), "--run-dir", str(new), "--task", "t",
                 "--target", "m"]) == 2
    assert "no rows to import" in _one_error(capsys)
    assert not new.exists()


# -- who takes it ----------------------------------------------------------------------------------------
def test_resume_during_an_import_leaves_its_temporary_version(held, run, capsys):
    """The importer's half-written version survives a `run --resume`: only its writer may remove it."""
    tmp = run / "data" / ".tmp-v001-0123abcd"
    tmp.mkdir()
    assert main(["run", "--resume", str(run)]) == 2
    assert f"PID {held.pid}" in _one_error(capsys)
    assert tmp.is_dir()
    with pytest.raises(LockedError):
        DatasetStore(run).clean_tmp()
    assert tmp.is_dir()


def test_two_imports_at_once_the_second_is_refused(held, run, tmp_path, capsys):
    assert main(_import_args(tmp_path, run)) == 2
    line = _one_error(capsys)
    assert f"PID {held.pid}" in line and "one writer at a time" in line
    assert DatasetStore(run).versions() == [0]
    _release(held)
    assert main(_import_args(tmp_path, run)) == 0
    assert DatasetStore(run).versions() == [0, 1]


def test_train_into_a_run_takes_its_lock(held, run, capsys):
    assert main(["train", "--data", str(run / "data" / "v000"), "--out", str(run / "policy" / "mine")]) == 2
    assert f"PID {held.pid}" in _one_error(capsys)
    assert run_dir_of(run / "policy" / "mine") == run and run_dir_of(run.parent) is None


# -- what --resume may change ------------------------------------------------------------------------------
def test_resume_raises_loops_and_saves_them(run):
    rd = RunDir(run)
    cfg = resume_config(rd, ["loops=3"])
    assert cfg.loops == 3 and cfg.run_dir == str(run)
    assert yaml.safe_load((run / "config.yaml").read_text())["loops"] == 3
    assert resume_config(rd, None).loops == 3
    # Setting a value to what the run has is no change.
    assert resume_config(rd, ["loops=3", f"run_dir={run}", "seed=0"]).loops == 3


def test_resume_refuses_other_changes_naming_them(run):
    with pytest.raises(ConfigError, match=r"--set seed, train\.scratch\.lr cannot change a run that has started"):
        resume_config(RunDir(run), ["loops=3", "seed=7", "train.scratch.lr=0.5"])
    with pytest.raises(ConfigError, match="fewer than the run's 2 loops"):
        resume_config(RunDir(run), ["loops=1"])
    assert yaml.safe_load((run / "config.yaml").read_text())["loops"] == 2  # refused: nothing saved


# argv (RUN stands for the run directory) -> what the one `qpo-ray: error:` line says; exit 2, no traceback.
MISTAKES = [
    (["run", "--resume", "RUN", "--config", "paper"], "--config cannot be used with --resume"),
    (["run", "--resume", "RUN", "--config", "paper", "--set", "loops=3"], "to run more loops: --resume"),
    (["run", "--resume", "RUN", "--set", "seed=3"], "--set seed cannot change a run that has started"),
    (["run", "--resume", "RUN", "--set", "run_dir=/elsewhere"], "--set run_dir cannot change"),
    (["run", "--resume", "RUN", "--set", "loops=1"], "loops can only be raised on --resume"),
    (["run", "--resume", "RUN/missing"], "not a qpo-ray run directory"),
    (["run", "--set", "run_dir=RUN"], "already holds a run: use --resume"),
]
# The same refusals while another process writes RUN: each names it.
LOCKED = [
    ["run", "--resume", "RUN"],
    ["run", "--resume", "RUN", "--set", "loops=3"],
    ["data", "import", "--format", "jsonl", "--input", "RUN/../rows-100.jsonl", "--run-dir", "RUN", "--task", "t",
     "--target", "m", "--map", "query=question,prompt=instruction,reward=score,label=gold"],
    ["eval", "--target", "live", "--run-dir", "RUN"],
    ["train", "--data", "RUN/data/v000", "--out", "RUN/policy/other"],
    ["eval", "--target", "replay", "--data", "RUN/../other", "--out", "RUN"],
]


def _argv(argv: list[str], run: Path) -> list[str]:
    return [a.replace("RUN", str(run)) for a in argv]


@pytest.mark.parametrize("argv, says", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_cli_mistakes(argv, says, run, capsys):
    assert main(_argv(argv, run)) == 2
    assert says in _one_error(capsys)
    assert not list(run.glob(HOLDER_FILE))  # the lock went with the refusal


def test_cli_refusals_while_another_process_writes(held, run, tmp_path, capsys):
    _import_args(tmp_path, run)  # writes RUN/../rows-100.jsonl
    for argv in LOCKED:
        assert main(_argv(argv, run)) == 2, argv
        assert f"PID {held.pid}" in _one_error(capsys), argv


# -- signals (in this process; tests/test_signals.py stops a real run) ----------------------------------------
def test_a_signal_inside_the_block_is_stopped_with_its_exit_code():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped) as e, stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
    assert (e.value.signum, e.value.exit_code) == (signal.SIGTERM, 143)
    assert signal.getsignal(signal.SIGTERM) is before  # the handlers from before are back


def _like_ray_get() -> None:
    """Ray's blocking calls turn whatever a signal handler raised into a KeyboardInterrupt of their own."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    except KeyboardInterrupt:
        raise KeyboardInterrupt from None


def test_a_signal_that_ray_reraises_is_still_the_signal_received():
    with pytest.raises(Stopped) as e, stop_on_signals():
        _like_ray_get()
    assert e.value.exit_code == 143


def test_a_swallowed_signal_stops_at_the_next_check():
    with pytest.raises(Stopped) as e, stop_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt:
            pass  # a library that goes on
        check_stop()
    assert e.value.exit_code == 130


def test_a_library_that_replaces_the_handlers_gets_them_back():
    with stop_on_signals():
        ours = signal.getsignal(signal.SIGINT)
        with keep_signal_handlers():
            signal.signal(signal.SIGINT, lambda *_: None)  # what Ray Train's fit() does
        assert signal.getsignal(signal.SIGINT) is ours


def test_a_stopped_run_says_how_to_resume(run, monkeypatch, capsys):
    import qpo_ray.driver.run as driver

    def stopped_mid_step(cfg, rd):
        _like_ray_get()

    monkeypatch.setattr(driver, "ensure_cluster", lambda *a: None)
    monkeypatch.setattr(driver, "_run_steps", stopped_mid_step)
    assert main(["run", "--resume", str(run)]) == 143
    err = capsys.readouterr().err
    assert err.strip() == f"qpo-ray: stopped by SIGTERM; resume with: qpo-ray run --resume {run}"
    assert not (run / HOLDER_FILE).exists()

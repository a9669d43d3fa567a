"""Helpers for end-to-end tests: run the real CLI in a subprocess (so a SIGKILL hits only the driver), and a
private local Ray head (own ports, own temp dir, own auth token) stopped by signalling its own process,
never with `ray stop` (which would stop every Ray instance on the machine)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq

from qpo_ray.data.store import DatasetStore

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: its `ray`, and `python` for a job
RAY = BIN / "ray"


def qpo(*args: str, fault: str | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    if fault:
        env["QPO_RAY_FAULT"] = fault
    else:
        env.pop("QPO_RAY_FAULT", None)
    p = subprocess.run([sys.executable, "-m", "qpo_ray", *args], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"qpo-ray {' '.join(args)} exited {p.returncode}\n--- stdout\n{p.stdout[-4000:]}"
                             f"\n--- stderr\n{p.stderr[-8000:]}")
    return p


def dataset_rows(run_dir: Path, version: int | None = None) -> list[tuple]:
    """(key, reward, source) of every row of a version, sorted by key: the identity of a dataset."""
    store = DatasetStore(run_dir)
    v = store.latest() if version is None else version
    t = store.read_table(v, columns=["key", "reward", "source"])
    return sorted(zip(t.column("key").to_pylist(), t.column("reward").to_pylist(), t.column("source").to_pylist(),
                      strict=True))


def same_rows(a: list[tuple], b: list[tuple], tol: float = 1e-4) -> bool:
    """Same keys and sources in the same order, rewards equal within ``tol``.

    The target scores requests in whatever batches Serve forms; a different padding changes float32 sums
    in the last bits (seen: 1e-6), never which pairs exist or their outcome.
    """
    return len(a) == len(b) and all(x[0] == y[0] and x[2] == y[2] and abs(x[1] - y[1]) <= tol
                                    for x, y in zip(a, b, strict=True))


def scored_keys(run_dir: Path, steps: tuple[str, ...] | None = None) -> list[str]:
    """Every pair key sent to the target in a run (the persisted score chunks, ``<step>-<id>.parquet``), with
    repeats; only those of ``steps`` (``bootstrap``, ``loop-1``, ``eval-0``, ...) when given."""
    keys: list[str] = []
    for f in sorted((run_dir / "scores").glob("*.parquet")):
        if steps is None or f.stem.rsplit("-", 1)[0] in steps:
            keys += pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return keys


# -- a private Ray head ------------------------------------------------------------------------------------
def free_ports(n: int) -> list[int]:
    """``n`` distinct free TCP ports on 127.0.0.1."""
    socks = []
    try:
        for _ in range(n):  # held open together so the n ports differ
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def ray_env(token: str) -> dict[str, str]:
    """The environment for a private Ray head and its clients: the venv's PATH, our own auth token."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        # The entrypoint's `python` must be the venv's: the raylet passes its PATH on to the job.
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # A token of our own (not ~/.ray/auth_token): the head and every client of it agree on it.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
        # A SIGTERMed `ray start --block` first drains its node for up to 30 s (for Serve behind a load
        # balancer), which never ends while Serve's controller holds a worker: the tests' nodes stop at once.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    })
    return env


def ray_cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the venv's ``ray`` command line."""
    return subprocess.run([str(RAY), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_status(env: dict[str, str], address: str, job_id: str) -> str:
    # `ray job status` words the terminal states ("Job 'x' succeeded") and prints the others as
    # "Status for job 'x': RUNNING".
    out = ray_cli(env, "job", "status", "--address", address, job_id).stdout
    for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {word}" in out:
            return status
    m = re.search(r"Status for job '[^']+': (\w+)", out)
    return m.group(1) if m else "UNKNOWN"


@contextmanager
def ray_head(temp_dir: Path, env: dict[str, str], num_cpus: int = 4,
             ports: dict[str, int] | None = None) -> Iterator[str]:
    """A head node with a dashboard on free ports; yields the job-submission address (and puts the GCS port
    in ``ports["gcs"]``, for ``ray_node``)."""
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env, nm, om = free_ports(9)
    if ports is not None:
        ports["gcs"] = gcs
    log = open(temp_dir.parent / "head.log", "w")  # noqa: SIM115 - the head writes it for its lifetime
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}",
         f"--object-manager-port={om}", f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.time() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}: {log_tail(temp_dir.parent / 'head.log')}")
            if ray_cli(env, "job", "list", "--address", address, timeout=60).returncode == 0:
                break
            if time.time() > deadline:
                raise TimeoutError(f"the dashboard at {address} did not come up: "
                                   f"{log_tail(temp_dir.parent / 'head.log')}")
            time.sleep(2)
        yield address
    finally:
        stop_head(head, temp_dir)
        log.close()


@contextmanager
def ray_node(temp_dir: Path, env: dict[str, str], gcs: int, num_cpus: int) -> Iterator[subprocess.Popen]:
    """Another node of the head at ``127.0.0.1:gcs`` (its ``temp_dir``), on this machine, with ports of its own;
    stopped like the head, by signalling its own ``ray start --block``."""
    agent_http, agent_grpc, metrics, rt_env, nm, om = free_ports(6)
    log = open(temp_dir.parent / f"node-{nm}.log", "w")  # noqa: SIM115 - the node writes it for its lifetime
    node = subprocess.Popen(
        [str(RAY), "start", "--block", f"--address=127.0.0.1:{gcs}", f"--num-cpus={num_cpus}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}",
         f"--object-manager-port={om}", f"--temp-dir={temp_dir}"],
        env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield node
    finally:
        _stop_block(node)
        log.close()


def _stop_block(proc: subprocess.Popen) -> None:
    """SIGTERM a ``ray start --block`` (it then stops what it started); its process group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    """Stop a head started with ``ray start --block`` and every process still using its temp dir."""
    # `ray start --block` kills the processes it started when it gets SIGTERM; its process group and any
    # process still naming our temp dir (workers) are cleaned up after it, by id.
    _stop_block(head)
    for pid in pids_using(temp_dir):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def pids_using(temp_dir: Path) -> list[int]:
    mine, out = str(temp_dir).encode(), []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if mine in (p / "cmdline").read_bytes():
                out.append(int(p.name))
        except OSError:
            continue
    return [pid for pid in out if pid != os.getpid()]


def log_tail(path: Path, n: int = 4000) -> str:
    """The last ``n`` characters of a log file, or a placeholder when it cannot be read."""
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"

"""`ray job submit` end to end: a real local Ray head (own ports, own temp dir, own auth token), the full tiny
QPO run submitted as a job from this repository as its working_dir, polled until SUCCEEDED.

Nothing here calls ray.init: the session's embedded Ray (ray_local) and this cluster never meet. The head
is stopped by signalling its own `ray start --block` process, never with `ray stop` (which would stop
every Ray instance on the machine).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv running the tests: its `ray`, and `python` for the job
RAY = BIN / "ray"
EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_TIMEOUT_S = 1500


def _free_ports(n: int) -> list[int]:
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


def _env(token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")}
    env.update({
        # The entrypoint's `python` must be the venv's: the raylet passes its PATH on to the job.
        "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        # A token of our own (not ~/.ray/auth_token): the head and every client of it agree on it.
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    return env


def _ray(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


@contextmanager
def ray_head(temp_dir: Path, env: dict[str, str], num_cpus: int = 4) -> Iterator[str]:
    """A head node with a dashboard on free ports; yields the job-submission address."""
    gcs, dash, client, agent_http, agent_grpc, metrics, rt_env, nm, om = _free_ports(9)
    log = open(temp_dir.parent / "head.log", "w")
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
                raise RuntimeError(f"ray start exited with {head.returncode}: {_tail(temp_dir.parent / 'head.log')}")
            if _ray(env, "job", "list", "--address", address, timeout=60).returncode == 0:
                break
            if time.time() > deadline:
                raise TimeoutError(f"the dashboard at {address} did not come up: {_tail(temp_dir.parent / 'head.log')}")
            time.sleep(2)
        yield address
    finally:
        _stop_head(head, temp_dir)
        log.close()


def _stop_head(head: subprocess.Popen, temp_dir: Path) -> None:
    # `ray start --block` kills the processes it started when it gets SIGTERM; its process group and any
    # process still naming our temp dir (workers) are cleaned up after it, by id.
    if head.poll() is None:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    for pid in _pids_using(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _pids_using(temp_dir: Path) -> list[int]:
    mine, out = str(temp_dir).encode(), []
    for p in Path("/proc").glob("[0-9]*"):
        try:
            if mine in (p / "cmdline").read_bytes():
                out.append(int(p.name))
        except OSError:
            continue
    return [pid for pid in out if pid != os.getpid()]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def _status(env: dict[str, str], address: str, job_id: str) -> str:
    # `ray job status` words the terminal states ("Job 'x' succeeded") and prints the others as
    # "Status for job 'x': RUNNING".
    out = _ray(env, "job", "status", "--address", address, job_id).stdout
    for word, status in (("succeeded", "SUCCEEDED"), ("failed", "FAILED"), ("was stopped", "STOPPED")):
        if f"Job '{job_id}' {word}" in out:
            return status
    m = re.search(r"Status for job '[^']+': (\w+)", out)
    return m.group(1) if m else "UNKNOWN"


@pytest.mark.timeout(JOB_TIMEOUT_S + 600)
def test_full_tiny_run_as_a_ray_job():
    with ExitStack() as stack:
        # Short root: Ray's unix sockets live under the temp dir and have a ~107-byte path limit.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qj", dir="/tmp")))
        env = _env(secrets.token_hex(16))
        address = stack.enter_context(ray_head(root / "r", env))
        run_dir = root / "run"
        job_id = f"qpo-test-{secrets.token_hex(4)}"
        runtime_env = {"excludes": EXCLUDES, "env_vars": {"DS_ACCELERATOR": "cpu"}}
        cmd = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "qpo_ray.jobs.run", "--config", "tiny", "--set", f"run_dir={run_dir}",
               "--set", "loops=1"]
        print("$ ray " + " ".join(cmd), flush=True)
        sub = _ray(env, *cmd, timeout=300)
        print(sub.stdout + sub.stderr, flush=True)
        assert sub.returncode == 0, sub.stdout + sub.stderr

        t0, status = time.time(), "PENDING"
        while time.time() - t0 < JOB_TIMEOUT_S:
            status = _status(env, address, job_id)
            if status in TERMINAL:
                break
            time.sleep(5)
        logs = _ray(env, "job", "logs", "--address", address, job_id).stdout
        print(f"job {job_id}: {status} after {time.time() - t0:.0f} s\n{logs[-6000:]}", flush=True)
        if status not in TERMINAL:
            _ray(env, "job", "stop", "--address", address, job_id)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}; last log lines:\n{logs[-6000:]}"

        assert (run_dir / "report.md").is_file()
        manifest = json.loads((run_dir / "data" / "v001" / "manifest.json").read_text())
        assert manifest  # the loop's merge committed dataset version 1
        assert (run_dir / "policy" / "loop-1" / "policy_config.json").is_file()
        # The job ran the uploaded copy of this repository with the venv's interpreter.
        assert "report:" in logs

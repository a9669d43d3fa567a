"""`ray job submit` end to end: a real local Ray head (own ports, own temp dir, own auth token), the full tiny
QPO run submitted as a job from this repository as its working_dir, polled until SUCCEEDED.

Nothing here calls ray.init: the session's embedded Ray (ray_local) and this cluster never meet. The head
is stopped by signalling its own `ray start --block` process, never with `ray stop` (which would stop
every Ray instance on the machine).
"""

from __future__ import annotations

import json
import re
import secrets
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.e2e import REPO, ray_cli, ray_env, ray_head

pytestmark = pytest.mark.slow

EXCLUDES = [".venv", "runs", ".git", "**/__pycache__", ".pytest_cache", ".ruff_cache", "*.egg-info"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
JOB_TIMEOUT_S = 1500


def _status(env: dict[str, str], address: str, job_id: str) -> str:
    # `ray job status` words the terminal states ("Job 'x' succeeded") and prints the others as
    # "Status for job 'x': RUNNING".
    out = ray_cli(env, "job", "status", "--address", address, job_id).stdout
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
        env = ray_env(secrets.token_hex(16))
        address = stack.enter_context(ray_head(root / "r", env))
        run_dir = root / "run"
        job_id = f"qpo-test-{secrets.token_hex(4)}"
        runtime_env = {"excludes": EXCLUDES, "env_vars": {"DS_ACCELERATOR": "cpu"}}
        cmd = ["job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
               "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--",
               "python", "-m", "qpo_ray.jobs.run", "--config", "tiny", "--set", f"run_dir={run_dir}",
               "--set", "loops=1"]
        print("$ ray " + " ".join(cmd), flush=True)
        sub = ray_cli(env, *cmd, timeout=300)
        print(sub.stdout + sub.stderr, flush=True)
        assert sub.returncode == 0, sub.stdout + sub.stderr

        t0, status = time.time(), "PENDING"
        while time.time() - t0 < JOB_TIMEOUT_S:
            status = _status(env, address, job_id)
            if status in TERMINAL:
                break
            time.sleep(5)
        logs = ray_cli(env, "job", "logs", "--address", address, job_id).stdout
        print(f"job {job_id}: {status} after {time.time() - t0:.0f} s\n{logs[-6000:]}", flush=True)
        if status not in TERMINAL:
            ray_cli(env, "job", "stop", "--address", address, job_id)
        assert status == "SUCCEEDED", f"job {job_id} ended {status}; last log lines:\n{logs[-6000:]}"

        assert (run_dir / "report.md").is_file()
        manifest = json.loads((run_dir / "data" / "v001" / "manifest.json").read_text())
        assert manifest  # the loop's merge committed dataset version 1
        assert (run_dir / "policy" / "loop-1" / "policy_config.json").is_file()
        # The job ran the uploaded copy of this repository with the venv's interpreter.
        assert "report:" in logs

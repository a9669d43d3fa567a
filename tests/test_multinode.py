"""A run on a two-node Ray cluster of exactly the preflight's size, submitted with `ray job submit`.

Two `ray start` nodes on this machine (own ports, own temp dir, own auth token), 1 CPU each: the preflight's
figure for 2 train workers, 2 scoring replicas and 1 sampling actor of 1 CPU. The pool is released while the
policy trains and samples; the workers are SPREAD over both nodes. The driver is killed after the loop's
collect step and the run resumed by a second job; then nothing of the run is left on the cluster. Before the
second node joins (one CPU short) the same run fails at once with the preflight's line.

Nothing here calls ray.init: the session's embedded Ray (ray_local) and this cluster never meet.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.e2e import EXCLUDES, REPO, TERMINAL, job_status, ray_cli, ray_env, ray_head, ray_node

pytestmark = pytest.mark.slow

# The smallest run that still trains, samples, scores, merges and evaluates: one loop, one epoch.
RUN = ["--config", "tiny", "--set", "loops=1", "--set", "train.num_workers=2", "--set", "train.cpus_per_worker=1",
       "--set", "train.placement_strategy=SPREAD", "--set", "target.num_replicas=2", "--set", "train.batch_size=16",
       "--set", "train.scratch.epochs=1", "--set", "task.max_train_queries=8", "--set", "task.max_prompts=3",
       "--set", "collect.num_queries=4", "--set", "collect.compare_pool=false", "--set", "eval.max_test_queries=4",
       "--set", "resource_wait_s=900"]
# Ray's own detached bookkeeping actors (Serve's controller; Ray Data's stats, autoscaling coordinator and
# actor location tracker): they outlive a job by design and hold no CPU or GPU.
RAY_INTERNAL = re.compile(r"ServeController|ActorLocationTracker|_\w+")
JOB_TIMEOUT_S = 600


def _job(env: dict[str, str], address: str, args: list[str], fault: str | None = None,
         timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str, float]:
    """Submit ``python -m qpo_ray run ARGS`` and wait for it; returns its status, its logs, its seconds.

    ``ray job submit`` without ``--no-wait`` follows the job's logs until it ends: one idle client instead of a
    ``ray job status`` process every few seconds, which would take CPU from the run on a small machine."""
    job_id = f"qpo-mn-{secrets.token_hex(4)}"
    env_vars = {"DS_ACCELERATOR": "cpu", **({"QPO_RAY_FAULT": fault} if fault else {})}
    cmd = ["job", "submit", "--address", address, "--submission-id", job_id, "--working-dir", str(REPO),
           "--runtime-env-json", json.dumps({"excludes": EXCLUDES, "env_vars": env_vars}), "--",
           "python", "-m", "qpo_ray", "run", *args]
    print("$ ray " + " ".join(cmd), flush=True)
    t0 = time.time()
    try:
        sub = ray_cli(env, *cmd, timeout=timeout_s)
        # 1: the job failed (its status says so); anything else: the submission itself failed.
        assert sub.returncode in (0, 1), sub.stdout[-4000:] + sub.stderr[-4000:]
    except subprocess.TimeoutExpired:
        pass
    status = job_status(env, address, job_id)
    while status not in TERMINAL and time.time() - t0 < timeout_s:  # the log stream ended early
        time.sleep(5)
        status = job_status(env, address, job_id)
    logs = ray_cli(env, "job", "logs", "--address", address, job_id).stdout
    if status not in TERMINAL:
        ray_cli(env, "job", "stop", "--address", address, job_id)
    print(f"job {job_id}: {status} after {time.time() - t0:.0f} s", flush=True)
    return status, logs, time.time() - t0


def _state(env: dict[str, str], address: str, what: str, *filters: str) -> list[dict]:
    args = ["list", what, "--address", address, "--format", "json", "--detail", "--limit", "1000"]
    for f in filters:
        args += ["--filter", f]
    for _ in range(10):  # the dashboard's API server answers late on a loaded machine
        p = ray_cli(env, *args)
        if p.returncode == 0:
            break
        time.sleep(3)
    assert p.returncode == 0, p.stdout + p.stderr
    return [] if p.stdout.startswith("No resource") else json.loads(p.stdout)  # an empty list is said in words


def _wait_for_cpus(env: dict[str, str], address: str, cpus: float, deadline_s: float = 120) -> None:
    t0 = time.time()
    while True:
        nodes = _state(env, address, "nodes", "state=ALIVE")
        have = sum(n.get("resources_total", {}).get("CPU", 0.0) for n in nodes)
        if have == cpus:
            return
        assert time.time() - t0 < deadline_s, f"the cluster has {have} CPU, not {cpus}"
        time.sleep(1)


@pytest.mark.timeout(3 * JOB_TIMEOUT_S)
def test_two_nodes_of_exactly_the_preflight_size_run_resume_and_clean_up():
    t_start = time.time()
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qm", dir="/tmp")))
        env = ray_env(secrets.token_hex(16))
        ports: dict[str, int] = {}
        address = stack.enter_context(ray_head(root / "r", env, num_cpus=1, ports=ports))

        # One CPU short (the head alone): the run fails at once with the preflight's line.
        _wait_for_cpus(env, address, 1.0)
        status, logs, seconds = _job(env, address, [*RUN, "--set", f"run_dir={root / 'short'}"], timeout_s=300)
        error = next((ln for ln in logs.splitlines() if ln.startswith("qpo-ray: error:")), "")
        print(error, flush=True)
        # Fast: the job's start-up only, never resource_wait_s (900 s).
        assert status == "FAILED" and seconds < 240, (status, seconds, logs[-4000:])
        assert re.search(r"2 target replica\(s\) need 2 CPU and 0 GPU at once .*the cluster has 1 CPU .*no "
                         r"autoscaler that adds nodes", error), logs[-4000:]
        assert not (root / "short").exists()

        # The second node joins: exactly the preflight's size.
        stack.enter_context(ray_node(root / "r", env, ports["gcs"], num_cpus=1))
        _wait_for_cpus(env, address, 2.0)
        run_dir = root / "run"
        args = [*RUN, "--set", f"run_dir={run_dir}"]

        status, logs, _ = _job(env, address, args, fault="loop-1.collect.done")
        print("\n".join(ln for ln in logs.splitlines() if " INFO " in ln or "fault" in ln), flush=True)
        preflight = next((ln for ln in logs.splitlines() if "preflight:" in ln), "")
        assert status == "FAILED" and "fault injection: SIGKILL at 'loop-1.collect.done'" in logs, logs[-6000:]
        assert "the run needs 2 CPU and 0 GPU at once" in preflight
        assert "the scoring pool is released while the policy trains and samples" in preflight
        assert "storage: 2 node(s) see run_dir=" in logs
        # The two train workers ran on different nodes (SPREAD).
        workers = _state(env, address, "actors", "class_name=RayTrainWorker")
        assert len({w["node_id"] for w in workers}) == 2, workers

        status, logs, seconds = _job(env, address, ["--resume", str(run_dir)])
        print("\n".join(ln for ln in logs.splitlines() if " INFO " in ln), flush=True)
        assert status == "SUCCEEDED", logs[-6000:]
        assert "[loop-1.collect] done earlier: skipped" in logs and "report:" in logs
        assert (run_dir / "report.md").is_file() and (run_dir / "data" / "v001" / "manifest.json").is_file()

        # Nothing of the run is left: no live actor but Ray's own, none holding a CPU, no placement group.
        alive = _state(env, address, "actors", "state=ALIVE")
        print("alive after the run:", sorted(a["class_name"] for a in alive), flush=True)
        assert [a for a in alive if not RAY_INTERNAL.fullmatch(a["class_name"])] == [], alive
        assert not [a for a in alive if {"CPU", "GPU"} & set(a.get("required_resources") or {})], alive
        assert _state(env, address, "placement-groups", "state=CREATED") == []
        usage = ray_cli(env, "status", "--address", f"127.0.0.1:{ports['gcs']}").stdout
        assert re.search(r"\b0\.0/2\.0 CPU\b", usage), usage

    print(f"two-node test: {time.time() - t_start:.0f} s", flush=True)

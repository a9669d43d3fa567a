"""Reliability: runs sharing one Ray cluster, and determinism.

A real local Ray head (own ports, own temp dir, own auth token) shared by several drivers (RAY_ADDRESS):
two scoring pools started at the same moment, then two `qpo-ray run --config tiny` drivers started together,
each in its own run directory; the first stops after one loop, so it tears its Serve app down while the
other still needs Serve. Both must finish, and every dataset version of each must equal the session's
reference run (one uninterrupted run on an embedded Ray): the same config and seed give the same data,
whatever else shares the cluster.

The head is stopped by signalling its own `ray start --block` process, never with `ray stop` (which would
stop every Ray instance on the machine).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from qpo_ray.data.store import DatasetStore
from qpo_ray.ids import content_id
from tests.e2e import (
    RAY,
    REPO,
    dataset_rows,
    free_ports,
    log_tail,
    ray_env,
    same_rows,
    scored_keys,
    stop_head,
)

pytestmark = pytest.mark.slow

RUNS = 2
LOOPS = [1, 2]  # the first run ends while the second still trains, scores and evaluates its loop 2
RUN_TIMEOUT_S = 1200


@contextmanager
def gcs_head(temp_dir: Path, env: dict[str, str], num_cpus: int) -> Iterator[str]:
    """A head node without a dashboard on free ports; yields its GCS address (what RAY_ADDRESS names)."""
    gcs, client, agent_http, agent_grpc, metrics, rt_env, nm, om = free_ports(8)
    log_path = temp_dir.parent / "head.log"
    with open(log_path, "w") as log:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", f"--port={gcs}", "--include-dashboard=false",
             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_http}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
             f"--runtime-env-agent-port={rt_env}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
             f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while "Ray runtime started" not in log_path.read_text(errors="replace"):  # printed once it is up
                if head.poll() is not None:
                    raise RuntimeError(f"ray start exited with {head.returncode}: {log_tail(log_path)}")
                if time.time() > deadline:
                    raise TimeoutError(f"the Ray head did not come up: {log_tail(log_path)}")
                time.sleep(0.5)
            yield f"127.0.0.1:{gcs}"
        finally:
            stop_head(head, temp_dir)


@pytest.fixture(scope="module")
def head() -> Iterator[tuple[Path, dict[str, str]]]:
    """One Ray head for the module: (a scratch folder, the environment of a driver that uses it)."""
    with ExitStack() as stack:
        # Short root: Ray's unix sockets live under the temp dir and have a ~107-byte path limit.
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="qc", dir="/tmp")))
        env = ray_env(secrets.token_hex(16))
        address = stack.enter_context(gcs_head(root / "r", env, num_cpus=16))
        env.update(RAY_ADDRESS=address, PYTHONUNBUFFERED="1")
        env.pop("QPO_RAY_FAULT", None)
        yield root, env


def _run_together(cmds: list[list[str]], env: dict[str, str], logs: list[Path], timeout: float) -> list[int]:
    """Start every command at once; their exit codes (a command still running at the deadline is killed)."""
    with ExitStack() as stack:
        files = [stack.enter_context(open(log, "w")) for log in logs]
        procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
                 for cmd, f in zip(cmds, files, strict=True)]
        deadline = time.time() + timeout
        try:
            return [p.wait(timeout=max(1.0, deadline - time.time())) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=60)


# A driver that enters a ScoringPool once every driver of the test has connected to Ray (a file barrier),
# so that the pools start Serve at the same moment, then scores one request.
POOL_DRIVER = """
import sys, time
from pathlib import Path
import ray
from qpo_ray.config import TargetConfig
from qpo_ray.score.engines.base import ScoreRequest
from qpo_ray.score.pool import ScoringPool
from qpo_ray.tasks import load_task

barrier, me, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
ray.init()
task = load_task("emotion")
cfg = TargetConfig(model="tiny-llama", max_length=256, max_new_tokens=4, num_replicas=1, max_batch_size=4)
(barrier / me).touch()
while len(list(barrier.iterdir())) < n:
    time.sleep(0.001)
with ScoringPool(cfg, task, run_id=f"race-{me}") as pool:
    q, label = task.queries()[0]
    out = pool.score([ScoreRequest(task.name, "zero_shot", q, "", label)], progress=False)
    print(f"pool {me}: started Serve {pool._started_serve}, {len(out)} scored", flush=True)
"""


@pytest.mark.timeout(900)
def test_two_drivers_start_scoring_pools_at_the_same_moment(head):
    """Two runs reach their first scoring together on a cluster without Serve: both pools start (one of
    them creates Serve's controller, the other connects to it) instead of one failing on the name."""
    root, env = head
    barrier = root / "barrier"
    barrier.mkdir()
    cmds = [[sys.executable, "-c", POOL_DRIVER, str(barrier), str(i), str(RUNS)] for i in range(RUNS)]
    logs = [root / f"pool{i}.log" for i in range(RUNS)]
    codes = _run_together(cmds, env, logs, timeout=600)
    outs = [log_tail(log, 6000) for log in logs]
    for code, out in zip(codes, outs, strict=True):
        assert code == 0, out
    assert sorted("started Serve True" in out for out in outs) == [False, True], outs
    # Neither pool stopped Serve on its way out: on a shared cluster another driver may be about to deploy
    # (ScoringPool.__exit__). Stop it here, so that the runs below start on a cluster without Serve.
    stop = subprocess.run([sys.executable, "-c", "import ray; from ray import serve; "
                           "from qpo_ray.score.pool import serve_running; ray.init(); "
                           "print('serve running:', serve_running()); serve.shutdown()"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert stop.returncode == 0 and "serve running: True" in stop.stdout, stop.stdout + stop.stderr[-3000:]


@pytest.fixture(scope="module")
def concurrent_runs(head) -> tuple[list[Path], list[int], list[str]]:
    """Two tiny runs started together on the head (run dirs, exit codes, output tails). The first stops after
    one loop, so its driver ends (and tears its Serve app down) while the other is still running."""
    root, env = head
    run_dirs = [root / f"run{i}" for i in range(RUNS)]
    cmds = [[sys.executable, "-m", "qpo_ray", "run", "--config", "tiny", "--set", f"run_dir={d}", "--set",
             f"loops={n}"] for d, n in zip(run_dirs, LOOPS, strict=True)]
    logs = [root / f"run{i}.log" for i in range(RUNS)]
    codes = _run_together(cmds, env, logs, timeout=RUN_TIMEOUT_S)
    return run_dirs, codes, [log_tail(log, 6000) for log in logs]


@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_concurrent_runs_on_one_cluster_both_finish(concurrent_runs):
    run_dirs, codes, tails = concurrent_runs
    for d, code, tail, loops in zip(run_dirs, codes, tails, LOOPS, strict=True):
        assert code == 0, f"the run in {d.name} exited {code} while another run shared its cluster:\n{tail}"
        assert (d / "report.md").is_file()
        keys = scored_keys(d)
        assert len(keys) == len(set(keys)), f"{d.name}: a pair was sent to the target twice"
        # Ray Train runs: one per loop, checkpointed in the run's own storage
        assert sorted(p.name for p in (d / "train").iterdir()) == [
            f"qpo-{content_id(str(d.resolve()), n=8)}-loop-{t}" for t in range(1, loops + 1)]
    # The short run's driver ended (deleting its Serve app) before the other scored its loop 2: that one
    # kept scoring through its own app.
    assert (run_dirs[0] / "report.md").stat().st_mtime < (run_dirs[1] / "steps" / "loop-2.score.json").stat().st_mtime


@pytest.mark.timeout(RUN_TIMEOUT_S)  # may be the first user of reference_run: one more tiny run
def test_same_config_and_seed_give_the_same_datasets(concurrent_runs, reference_run):
    """Every dataset version of both concurrent runs equals the reference run's (one uninterrupted run on an
    embedded Ray): keys, sources, and rewards within 1e-4 (Serve's batching changes float32 sums in the last
    bits)."""
    run_dirs, codes, _ = concurrent_runs
    assert codes == [0] * RUNS, "see test_concurrent_runs_on_one_cluster_both_finish"
    assert DatasetStore(reference_run).versions() == [0, 1, 2]
    for d, loops in zip(run_dirs, LOOPS, strict=True):
        store = DatasetStore(d)
        assert store.versions() == list(range(loops + 1))
        for v in store.versions():
            store.verify(v)
            rows, expected = dataset_rows(d, v), dataset_rows(reference_run, v)
            assert same_rows(rows, expected), (
                f"{d.name} v{v:03d} differs from the reference run: {len(rows)} vs {len(expected)} rows, "
                f"sources {Counter(s for *_, s in rows)} vs {Counter(s for *_, s in expected)}")

"""A run on a real cluster, in seconds on the session's embedded Ray: the step watchdog on a forced pending
demand, the shared-storage check with a node that cannot see run_dir, ingest that needs no CPU, and the
train placement strategy. tests/test_multinode.py runs the whole thing on two Ray nodes."""

from __future__ import annotations

import signal
import threading
import time

import pytest

from qpo_ray.config import load_config
from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.driver.storage import MARKER, check_shared_storage, probe_nodes, shared_paths
from qpo_ray.driver.watch import Watchdog, pending_demands, watch
from qpo_ray.errors import ConfigError
from qpo_ray.resources import run_phases

SPREAD_RUN = ["train.num_workers=2", "train.cpus_per_worker=1", "target.num_replicas=2", "train.batch_size=16"]
NEEDS = [n for phase in run_phases(load_config("tiny", SPREAD_RUN)) for n in phase]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the watchdog, on an injected clock ------------------------------------------------------------------
def test_a_stall_with_pending_demands_is_reported_then_fails_on_a_fixed_cluster(caplog):
    clock, moved = Clock(), {"at": 0.0}
    demands = [[]]  # what Ray reports pending, poll by poll (the last one repeats)
    dog = Watchdog("loop-1.train", NEEDS, fail_s=60, can_grow=False, clock=clock,
                   demands=lambda: demands[0], last_progress=lambda: moved["at"])
    with caplog.at_level("WARNING", logger="qpo_ray"):
        assert dog.check() is None  # nothing pending: no stall, however long
        clock.now += 100
        assert dog.check() is None and not caplog.records
        demands[0] = [({"CPU": 1.0}, 1)]
        assert dog.check() is None  # pending from now on
        clock.now += 29
        assert dog.check() is None and not caplog.records
        clock.now += 2  # 31 s pending, no meter moved: said within a minute
        assert dog.check() is None
        warned = caplog.records[-1].getMessage()
        assert warned.startswith("[loop-1.train] no progress for 31 s while Ray waits for 1 × {CPU: 1} (")
        for key in ("train.num_workers=2", "train.cpus_per_worker=1", "target.num_replicas=2",
                    "target.num_cpus_per_replica=1", "collect.num_cpus_per_actor=1"):
            assert key in warned
        moved["at"] = clock.now  # a meter moved: the clock of the stall restarts
        clock.now += 40
        assert dog.check() is None and len(caplog.records) == 2  # 40 s: warned again
        clock.now += 21
        failure = dog.check()
    assert failure is not None and failure.startswith("[loop-1.train] no progress for 61 s while Ray waits for")
    assert "the cluster has no autoscaler to add them" in failure


def test_a_growing_cluster_is_waited_for_and_an_unknown_shape_is_named(caplog):
    clock = Clock()
    dog = Watchdog("loop-1.collect", NEEDS, fail_s=900, can_grow=True, clock=clock,
                   demands=lambda: [({"CPU": 3.0, "GPU": 1.0}, 2)], last_progress=lambda: 0.0)
    with caplog.at_level("WARNING", logger="qpo_ray"):
        dog.check()
        clock.now += 600
        assert dog.check() is None
    assert "2 × {CPU: 3, GPU: 1} (no key of this run asks for that shape" in caplog.records[-1].getMessage()
    assert "waiting up to 300 s more (resource_wait_s)" in caplog.records[-1].getMessage()
    clock.now += 300
    assert "its autoscaler added nothing in resource_wait_s" in dog.check()


# -- a real pending demand on the session's Ray ----------------------------------------------------------
@pytest.fixture
def every_cpu_held(ray_local):
    """An actor holding every free CPU of the session's Ray: anything else asking for a CPU waits."""
    ray = ray_local
    free = ray.available_resources().get("CPU", 0.0)
    holder = ray.remote(num_cpus=free)(type("CpuHolder", (), {"ready": lambda self: True})).remote()
    ray.get(holder.ready.remote(), timeout=60)
    yield ray
    ray.kill(holder)


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt, as inside a run (``stop_on_signals``), even when pytest was started
    where SIGINT is ignored (a background job of a shell without job control)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_a_step_waiting_for_a_cpu_is_stopped_with_one_line(every_cpu_held, sigint_raises):
    ray = every_cpu_held
    ref = ray.remote(num_cpus=1)(lambda: "ran").remote()  # the ingest task of the hang: 1 CPU, none free
    t0 = time.monotonic()
    while not any(b.get("CPU") == 1.0 for b, _ in pending_demands()):
        assert time.monotonic() - t0 < 30, "Ray never reported the pending task"
        time.sleep(0.2)
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as err, watch("loop-1.train", NEEDS, fail_s=1.0, can_grow=False, poll_s=0.1,
                                                  warn_s=0.5):
        ray.get(ref)  # blocks until the watchdog interrupts it
    print(f"\nhang message: {err.value}")
    assert time.monotonic() - t0 < 15
    assert str(err.value).startswith("[loop-1.train] no progress for ")
    assert "while Ray waits for 1 × {CPU: 1} (" in str(err.value) and "train.cpus_per_worker=1" in str(err.value)
    ray.cancel(ref, force=True)


def test_ingest_runs_while_every_cpu_is_held(every_cpu_held, tmp_path):
    """The read+tokenise tasks run beside Train workers and a scoring pool that hold every CPU."""
    from qpo_ray.train.loader import training_dataset

    rows = [dict(task="emotion", setting="zero_shot", target="tiny-llama", label="happy", query=f"q {i}",
                 prompt=f"p {i % 3}", reward=float(i % 5), source="offline:manual", loop=0) for i in range(24)]
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table(rows)], note="test")
    ds = training_dataset(store, 0, load_config("tiny").policy, tokenize_tasks=2)
    out: dict = {}
    reader = threading.Thread(target=lambda: out.update(rows=ds.take_all()), daemon=True)
    reader.start()
    reader.join(timeout=90)
    assert not reader.is_alive(), "ingest waited for a CPU"
    assert len(out["rows"]) == 24


# -- shared storage ----------------------------------------------------------------------------------------
def test_a_node_that_cannot_see_run_dir_is_one_error_naming_it(ray_local, tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}"])
    here, elsewhere = ray_local.get_runtime_context().get_node_id(), "b" * 56

    def hide(path: str) -> str:
        return path.replace(str(tmp_path), str(tmp_path / "not-mounted"))

    def probe(node_ids, markers):
        # Both tasks run on this node. "node-b" mounts no shared volume: its task looks for the marker where
        # run_dir would be on that node and finds nothing.
        assert node_ids == [here, elsewhere]
        missing_b = probe_nodes([here], [(hide(p), t) for p, t in markers])[0]
        return [probe_nodes([here], markers)[0], [p for p, _ in markers if hide(p) in missing_b]]

    with pytest.raises(ConfigError) as err:
        check_shared_storage(cfg, nodes=lambda: [(here, "10.0.0.1"), (elsewhere, "10.0.0.2")], probe=probe)
    print(f"\nstorage error: {err.value}")
    msg = str(err.value)
    assert msg.startswith(f"storage not shared by every node: node bbbbbbbbbbbb (10.0.0.2) cannot read "
                          f"{tmp_path / 'run'} (run_dir={tmp_path / 'run'})")
    assert "10.0.0.1" not in msg
    assert not list((tmp_path / "run").glob(f"{MARKER}*"))  # the markers are removed

    # Both nodes see it: no error; one node: nothing to check.
    check_shared_storage(cfg, nodes=lambda: [(here, "10.0.0.1"), (here, "10.0.0.1")])
    check_shared_storage(cfg, nodes=lambda: [(here, "10.0.0.1")], probe=lambda *a: pytest.fail("one node"))


def test_storage_path_is_checked_when_local_and_left_to_ray_when_a_uri(tmp_path):
    run = tmp_path / "run"
    assert shared_paths(load_config("tiny", [f"run_dir={run}"])) == [("run_dir", run)]  # <run_dir>/train
    assert shared_paths(load_config("tiny", [f"run_dir={run}", f"train.storage_path={tmp_path / 'ckpt'}"])) == [
        ("run_dir", run), ("train.storage_path", tmp_path / "ckpt")]
    for uri in ("s3://bucket/qpo", "gs://bucket/qpo"):
        assert shared_paths(load_config("tiny", [f"run_dir={run}", f"train.storage_path={uri}"])) == [("run_dir", run)]


# -- train placement ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, strategy", [([], "PACK"), (["train.placement_strategy=SPREAD"], "SPREAD")])
def test_placement_strategy_reaches_ray_train(monkeypatch, overrides, strategy):
    import ray.train.torch

    from qpo_ray.train import trainer

    seen = {}

    class Recorder:
        def __init__(self, *a, scaling_config, **kw):
            seen["scaling"] = scaling_config

        def fit(self):
            return None

    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Recorder)
    trainer._fit(load_config("tiny", overrides), None, run_name="x", storage="/tmp/x", config={})
    assert seen["scaling"].placement_strategy == strategy


def test_placement_strategy_is_validated():
    with pytest.raises(ConfigError, match="train.placement_strategy"):
        load_config("tiny", ["train.placement_strategy=STRICT_SPREAD"])

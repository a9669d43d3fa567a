"""The cluster preflight: what a config asks Ray for, checked against the nodes before any Ray work.

The node lists here are what ``ray.nodes()`` reports; tests/test_bad_input.py runs the same check on a real
embedded Ray through the CLI.
"""

from __future__ import annotations

import re
import time

import pytest

from qpo_ray.config import load_config
from qpo_ray.errors import ConfigError
from qpo_ray.resources import (
    autoscaler_adds_nodes,
    check_cluster,
    peak,
    plan_pool,
    run_phases,
    shortfalls,
)

LAPTOP = [{"CPU": 8.0, "memory": 1e10}]
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


@pytest.mark.parametrize("profile, overrides, nodes, problem", [
    ("tiny", [], LAPTOP, None),
    ("demo", [], LAPTOP, None),
    ("paper", [], LAPTOP, r"no node can hold one target replica \(1 CPU, 1 GPU; .*target\.num_gpus_per_replica=1\)"),
    ("paper", [], [GPU_NODE], None),  # the pool is released while the policy trains: one GPU takes turns
    ("paper", ["target.num_replicas=2"], [GPU_NODE], r"2 target replica\(s\) need 2 CPU and 2 GPU at once"),
    ("paper", [], [GPU_NODE, GPU_NODE], None),
    ("demo", ["train.num_workers=2", "train.micro_batch_size=16"], [{"CPU": 3.0}],
     r"2 train worker\(s\) need 4 CPU and 0 GPU at once .* the cluster has 3 CPU"),
    # 8 CPUs in all, but no single node holds a 6-CPU replica
    ("tiny", ["target.num_cpus_per_replica=6"], [{"CPU": 4.0}, {"CPU": 4.0}],
     r"no node can hold one target replica \(6 CPU, 0 GPU; .*target\.num_cpus_per_replica=6"),
    ("tiny", ["train.use_gpu=true"], LAPTOP, r"one train worker .*train\.use_gpu=true"),
    ("tiny", ["collect.num_gpus_per_actor=0.5"], LAPTOP, r"one sampling actor \(1 CPU, 0\.5 GPU"),
    ("tiny", ["loops=0", "train.use_gpu=true"], LAPTOP, None),  # no loop: no training, no sampling
    ("tiny", ["target.autoscaling={min_replicas: 3, max_replicas: 9}"], [{"CPU": 2.0}],
     r"3 target replica\(s\) need 3 CPU"),
    ("tiny", [], [], r"no alive node"),
])
def test_what_a_run_needs_against_the_nodes(profile, overrides, nodes, problem):
    found = shortfalls(run_phases(load_config(profile, overrides)), nodes)
    if problem is None:
        assert found == []
    else:
        assert found and any(re.search(problem, p) for p in found), found


def test_embedded_ray_fails_at_once_naming_the_keys():
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"cannot host .*target\.num_gpus_per_replica=1.*embedded Ray"):
        check_cluster(run_phases(load_config("paper")), wait_s=600, can_grow=False, nodes=lambda: LAPTOP,
                      request=lambda b: pytest.fail("embedded Ray has no autoscaler to ask"))
    assert time.monotonic() - t0 < 1


def test_a_growing_cluster_is_asked_for_the_missing_nodes_and_waited_for():
    seen = iter([LAPTOP, LAPTOP, LAPTOP, [*LAPTOP, GPU_NODE, GPU_NODE]])
    current = {"nodes": LAPTOP}
    asked: list[list[dict]] = []

    def nodes():
        current["nodes"] = next(seen, current["nodes"])
        return current["nodes"]

    check_cluster(run_phases(load_config("paper")), wait_s=10, can_grow=True, nodes=nodes, request=asked.append,
                  poll_s=0.01)
    # The first group that did not fit (the pool: 1 GPU bundle) was asked for, then withdrawn.
    assert asked == [[{"CPU": 1.0, "GPU": 1.0}], []]


def test_a_cluster_that_does_not_grow_in_time_is_an_error_naming_the_wait():
    asked: list[list[dict]] = []
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"one train worker .*train\.use_gpu=true.*waited 0\.3 s: resource_wait_s"):
        check_cluster(run_phases(load_config("tiny", ["train.use_gpu=true"])), wait_s=0.3, can_grow=True,
                      nodes=lambda: LAPTOP, request=asked.append, poll_s=0.05)
    assert 0.3 <= time.monotonic() - t0 < 5
    assert asked[-1] == []  # no standing request left behind


def test_no_wait_on_a_cluster_says_which_key_would_wait():
    with pytest.raises(ConfigError, match=r"set resource_wait_s"):
        check_cluster(run_phases(load_config("paper")), wait_s=0, can_grow=True, nodes=lambda: LAPTOP,
                      request=lambda b: None)


# Two train workers and two scoring replicas of 1 CPU each, one sampling actor.
SPREAD_RUN = ["train.num_workers=2", "train.cpus_per_worker=1", "target.num_replicas=2", "train.batch_size=16"]


def test_the_preflight_figure_is_the_largest_group_and_a_cluster_of_that_size_runs_it():
    cfg = load_config("tiny", SPREAD_RUN)
    assert peak(run_phases(cfg)) == (2.0, 0.0)
    exact = [{"CPU": 1.0}, {"CPU": 1.0}]
    assert shortfalls(run_phases(cfg), exact) == []
    # At that size the pool cannot stay up beside the workers: it is released while they train and sample.
    assert shortfalls(run_phases(cfg, hold_pool=True), exact)
    assert plan_pool(cfg, nodes=lambda: exact) is False
    # With room for both (4 CPUs: 2 replicas + 2 workers), it stays up.
    assert plan_pool(cfg, nodes=lambda: [{"CPU": 2.0}, {"CPU": 2.0}]) is True
    # One CPU short is the preflight's line.
    assert any(re.search(r"2 target replica\(s\) need 2 CPU and 0 GPU at once .*the cluster has 1 CPU", p)
               for p in shortfalls(run_phases(cfg), [{"CPU": 1.0}]))


def test_the_preflight_line_says_what_runs_at_once_and_whether_the_pool_stays(caplog):
    cfg = load_config("tiny", SPREAD_RUN)
    with caplog.at_level("INFO", logger="qpo_ray"):
        plan_pool(cfg, nodes=lambda: [{"CPU": 1.0}, {"CPU": 1.0}])
    line = caplog.records[-1].getMessage()
    assert line.startswith("preflight: the run needs 2 CPU and 0 GPU at once (2 target replica(s) 2 CPU/0 GPU; "
                           "2 train worker(s) 2 CPU/0 GPU; 1 sampling actor(s) 1 CPU/0 GPU, one group at a time)")
    assert "released while the policy trains and samples (beside them it would need 4 CPU/0 GPU)" in line


READONLY = {"autoscaler_report": {"active_nodes": {"node_6f1c": 1, "node_a03b": 1}, "idle_nodes": {},
                                  "pending_launches": {}}}
KUBERAY = {"autoscaler_report": {"active_nodes": {"headgroup": 1}, "idle_nodes": {"cpu-workers": 1},
                                 "pending_launches": {"gpu-workers": 1}}}


@pytest.mark.parametrize("address, status, grows", [
    (None, KUBERAY, False),  # embedded Ray never grows
    ("10.0.0.1:6379", READONLY, False),  # `ray start` by hand: the autoscaler only mirrors the nodes
    ("10.0.0.1:6379", KUBERAY, True),
    ("10.0.0.1:6379", None, True),  # nothing reported (yet): may grow, so the preflight waits
])
def test_whether_the_cluster_can_grow(monkeypatch, address, status, grows):
    if address:
        monkeypatch.setenv("RAY_ADDRESS", address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert autoscaler_adds_nodes(lambda: status) is grows


def test_a_fixed_cluster_fails_at_once_naming_the_keys(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"2 target replica\(s\) need 2 CPU .*no autoscaler that adds nodes"):
        check_cluster(run_phases(load_config("tiny", SPREAD_RUN)), wait_s=900, can_grow=False,
                      nodes=lambda: [{"CPU": 1.0}], request=lambda b: pytest.fail("nothing to ask"))
    assert time.monotonic() - t0 < 1

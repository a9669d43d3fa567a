"""The cluster preflight (issue 18): what a config asks Ray for, checked against the nodes before any Ray work.

The node lists here are what ``ray.nodes()`` reports; tests/test_bad_input.py runs the same check on a real
embedded Ray through the CLI.
"""

from __future__ import annotations

import re
import time

import pytest

from qpo_ray.config import load_config
from qpo_ray.driver.resources import check_cluster, run_phases, shortfalls
from qpo_ray.errors import ConfigError

LAPTOP = [{"CPU": 8.0, "memory": 1e10}]
GPU_NODE = {"CPU": 16.0, "GPU": 1.0}


@pytest.mark.parametrize("profile, overrides, nodes, problem", [
    ("tiny", [], LAPTOP, None),
    ("demo", [], LAPTOP, None),
    ("paper", [], LAPTOP, r"no node can hold one target replica \(1 CPU, 1 GPU; .*target\.num_gpus_per_replica=1\)"),
    ("paper", [], [GPU_NODE], r"1 target replica\(s\) \+ 1 train worker\(s\) need 2 CPU and 2 GPU at once"),
    ("paper", [], [GPU_NODE, GPU_NODE], None),
    ("demo", [], [{"CPU": 3.0}], r"need 4 CPU and 0 GPU at once .* the cluster has 3 CPU"),
    # 8 CPUs in all, but no single node holds a 6-CPU replica
    ("tiny", ["target.num_cpus_per_replica=6"], [{"CPU": 4.0}, {"CPU": 4.0}],
     r"no node can hold one target replica \(6 CPU, 0 GPU; .*target\.num_cpus_per_replica=6"),
    ("tiny", ["train.use_gpu=true"], LAPTOP, r"one train worker .*train\.use_gpu=true"),
    ("tiny", ["collect.num_gpus_per_actor=0.5"], LAPTOP, r"one sampling actor \(1 CPU, 0\.5 GPU"),
    ("tiny", ["loops=0", "train.use_gpu=true"], LAPTOP, None),  # no loop: no training, no sampling
    ("tiny", ["target.autoscaling={min_replicas: 3, max_replicas: 9}"], [{"CPU": 3.0}],
     r"3 target replica\(s\) \+ 1 train worker\(s\) need 4 CPU"),
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
    # The first phase that did not fit (pool + train: 2 GPU bundles) was asked for, then withdrawn.
    assert asked == [[{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}], []]


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

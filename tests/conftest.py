"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """One embedded Ray instance for the whole session (starting Ray costs seconds; 4 logical CPUs so two
    Train workers, a Ray Data reader and a tokenizer actor fit at once on a small machine)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def serve_as_found(ray_local):
    """Stops Serve at the module's end if the module started it: a closed ScoringPool deletes its app but leaves
    Serve running without HTTP, and a later module may start Serve with HTTP on the same Ray."""
    from ray import serve

    from qpo_ray.score.pool import serve_running

    running = serve_running()
    yield
    if not running and serve_running():
        serve.shutdown()


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory):
    """One uninterrupted 2-loop tiny run (the real CLI in a subprocess), shared by the end-to-end and
    fault-injection tests as the expected outcome for the same config and seed."""
    from tests.e2e import qpo

    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = qpo("run", "--config", "tiny", "--set", f"run_dir={run_dir}")
    # What a person saw on the console (stdout, then stderr), for the tests of the run's output.
    (run_dir.parent / "console.txt").write_text(p.stdout + "\n--- stderr\n" + p.stderr, encoding="utf-8")
    return run_dir

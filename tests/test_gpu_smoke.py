"""The GPU smoke script's CPU-checkable parts: the shell wrapper parses, and its dry run validates the smoke's
config (paper with the smoke's overrides) and inputs, refusing a bad override with one line."""

from __future__ import annotations

import importlib.util
import subprocess

import pytest

from tests.kuberay_schema import REPO


@pytest.fixture(scope="module")
def smoke():
    spec = importlib.util.spec_from_file_location("gpu_smoke", REPO / "scripts" / "gpu_smoke.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wrapper_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "gpu_smoke.sh")]).returncode == 0


def test_dry_run_validates_the_config_and_inputs(smoke, tmp_path, capsys):
    assert smoke.main(["--dry-run", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "paper + smoke overrides" in out and "dry run: config and inputs are valid" in out
    cfg = smoke.smoke_config(smoke.parse(["--out", str(tmp_path / "s")]))
    # Two epochs, so the second trains from the in-memory shard (the path that must put its batches on the GPU).
    assert cfg.train.scratch.epochs == 2 and cfg.train.use_gpu and cfg.collect.num_gpus_per_actor == 1
    assert cfg.target.engine == "vllm" and cfg.target.dtype == "bfloat16"
    assert len(smoke.training_rows(smoke.ROWS_DEFAULT)) // cfg.train.batch_size >= 2
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_dry_run_refuses_an_inconsistent_override(smoke, tmp_path, capsys):
    assert smoke.main(["--dry-run", "--out", str(tmp_path), "--set", "target.max_in_flight=4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpu_smoke: error: ") and "target.max_in_flight (4)" in err[-1]

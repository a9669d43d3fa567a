"""Device placement without a GPU: torch's ``meta`` device stands for the accelerator. A model there refuses
inputs on the CPU (the crash of a cached batch meeting DeepSpeed's GPU module), so every batch source must
hand out tensors on the device it is asked for, and the training loop must feed the engine on its own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpo_ray.config import load_config
from qpo_ray.train.loader import TRAIN_COLUMNS, WIRE_DTYPES, cached_batches, model_dtypes, train_batches
from qpo_ray.train.worker import _epoch_batches, _run_epoch

META = torch.device("meta")


def rows(n: int = 12, lq: int = 6, lp: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    width = {"query_ids": lq, "query_mask": lq, "prompt_ids": lp, "prompt_mask": lp}
    out = {}
    for k in TRAIN_COLUMNS:
        shape = (n, width[k]) if k in width else (n,)
        out[k] = (rng.integers(1, 50, shape) if "ids" in k else np.ones(shape)).astype(WIRE_DTYPES[k])
    return out


def test_a_model_on_the_accelerator_refuses_cpu_inputs():
    from qpo_ray.policy.model import QPOPolicy

    cfg = load_config("tiny")
    policy = QPOPolicy.from_config(cfg.policy).to(META)
    batch = next(cached_batches(rows(), 4, 0))  # left on the CPU: the model must refuse them, not run
    with pytest.raises(RuntimeError, match="device"):
        policy(**{k: batch[k] for k in ("query_ids", "query_mask", "prompt_ids", "prompt_mask", "reward")})


def test_cached_batches_come_on_the_asked_device():
    batches = list(cached_batches(rows(), 4, 0, device=META))
    assert len(batches) == 3
    dtypes = model_dtypes()
    for b in batches:
        assert {k: (v.device, v.dtype) for k, v in b.items()} == {k: (META, dtypes[k]) for k in TRAIN_COLUMNS}


def test_streamed_batches_ask_ray_data_for_the_device():
    seen = {}

    class Shard:
        def iter_torch_batches(self, **kw):
            seen.update(kw)
            return iter(())

    list(train_batches(Shard(), 4, 0, device=META))
    assert seen["device"] == "meta" and seen["dtypes"] == model_dtypes()


def test_every_epoch_source_follows_the_engine_device():
    tcfg = load_config("tiny", ["train.micro_batch_size=4", "train.batch_size=8"]).train
    cached = _epoch_batches(None, rows(), epoch=1, tcfg=tcfg, seed=0, rank=0, device=META)
    assert all(v.device == META for b in cached for v in b.values())
    seen = {}

    class Shard:
        def iter_torch_batches(self, **kw):
            seen.update(kw)
            return iter(())

    _epoch_batches(Shard(), None, epoch=1, tcfg=tcfg, seed=0, rank=0, device=META)
    assert seen["device"] == "meta"


class Reached(Exception):
    pass


class MetaEngine:
    """A DeepSpeed engine whose module sits on the accelerator: it refuses any input that is not there."""

    device = META

    def __call__(self, **inputs):
        off = {k: str(v.device) for k, v in inputs.items() if v.device != self.device}
        if off:
            raise RuntimeError(f"Expected all tensors to be on the same device, got {off}")
        raise Reached


def test_the_training_loop_feeds_the_engine_on_its_device():
    """CPU batches (any source that forgot the device) reach the engine on the engine's device."""
    tcfg = load_config("tiny", ["train.micro_batch_size=4", "train.batch_size=8"]).train
    with pytest.raises(Reached):
        _run_epoch(MetaEngine(), cached_batches(rows(), 4, 0), epoch=0, tcfg=tcfg, gas=2, rank=0)


def test_the_sampler_loads_the_policy_on_the_gpu_it_reserved(monkeypatch):
    from qpo_ray.collect import sample
    from qpo_ray.errors import ConfigError
    from qpo_ray.policy.model import QPOPolicy

    assert sample.actor_device(1) == sample.actor_device(0.5) == "cuda" and sample.actor_device(0) == "cpu"
    loaded = []
    monkeypatch.setattr(QPOPolicy, "load", classmethod(lambda cls, path, device="cpu": loaded.append(device)))
    sample._Sampler("p", {}, device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sample._Sampler("p", {}, device="cuda")
    assert loaded == ["cpu", "cuda"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="sees no CUDA device"):
        sample._Sampler("p", {}, device="cuda")


"""Extreme rewards never make a NaN policy: a row is imported and trains to a finite loss, or it is refused with
one error naming its row; and training stops on a non-finite loss before any weight takes it.

Property tests (hypothesis) over the reward values; no Ray.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qpo_ray.config import load_config
from qpo_ray.data.importers import ImportOptions, import_to_store
from qpo_ray.data.integrity import sha256_file
from qpo_ray.data.schema import MAX_ABS_REWARD, SCHEMA, normalize_row, rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError
from qpo_ray.policy.loss import qpo_loss
from qpo_ray.train.loader import tokenize_batch, tokenizer_source
from qpo_ray.train.worker import NonFiniteLoss, _run_epoch

# Any finite double, with the edges of the accepted range and the values that overflowed a range.
EDGES = [MAX_ABS_REWARD, -MAX_ABS_REWARD, np.nextafter(MAX_ABS_REWARD, math.inf), 1e308, -1e308,
         1.7976931348623157e308, 5e-324, 0.0]
FINITE = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from(EDGES),
                   st.floats(-100, 100))
ANY = st.one_of(FINITE, st.sampled_from([math.nan, math.inf, -math.inf]))
# No example database: a test run writes nothing into the checkout.
FEW = settings(max_examples=40, deadline=None, database=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture])

ROW = {"task": "emotion", "setting": "zero_shot", "target": "m", "label": "joy", "source": "offline:x"}


@given(ANY)
@settings(max_examples=200, deadline=None, database=None)
def test_a_row_keeps_its_reward_or_is_refused_naming_the_row(r):
    try:
        row = normalize_row({**ROW, "query": "q", "prompt": "p", "reward": r}, source="f.jsonl", row=3)
    except DataError as e:
        assert not (math.isfinite(r) and abs(r) <= MAX_ABS_REWARD)
        assert re.fullmatch(r"f\.jsonl: row 3, column 'reward': \S+ is "
                            r"(not a finite number|outside \[-1e\+06, 1e\+06\])", str(e))
    else:
        assert row["reward"] == r and abs(r) <= MAX_ABS_REWARD


@pytest.fixture(scope="module")
def policy():
    from qpo_ray.policy.model import QPOPolicy

    torch.manual_seed(0)
    return QPOPolicy.from_config(load_config("tiny").policy)


@pytest.fixture(scope="module")
def source(policy):
    return tokenizer_source(policy.pcfg.tokenizer, policy.pcfg.model)


def _loss(policy, source, version_rows: list[dict], lo: float, hi: float) -> float:
    """The training loss of one batch of a version's rows, through the trainer's own tokenisation."""
    pcfg = policy.pcfg
    batch = {"query": np.array([r["query"] for r in version_rows], dtype=object),
             "prompt": np.array([r["prompt"] for r in version_rows], dtype=object),
             "reward": np.array([r["reward"] for r in version_rows])}
    arrays = tokenize_batch(batch, source=source,
                            max_query_tokens=pcfg.max_query_tokens, max_prompt_tokens=pcfg.max_prompt_tokens,
                            reward_min=lo, reward_max=hi)
    b = {k: torch.as_tensor(v).long() if "reward" not in k else torch.as_tensor(v) for k, v in arrays.items()}
    with torch.no_grad():
        logits, pred = policy(query_ids=b["query_ids"], query_mask=b["query_mask"], prompt_ids=b["prompt_ids"],
                              prompt_mask=b["prompt_mask"], reward=b["reward"])
        targets = dict(b, prompt_ids=policy.head_targets(b["prompt_ids"], b["prompt_mask"]), reward=b["reward_target"])
        _, m = qpo_loss(logits, pred, targets)
    return m["loss"]


@given(st.lists(FINITE, min_size=1, max_size=6))
@FEW
def test_any_finite_rewards_import_and_train_to_a_finite_loss_or_are_refused(policy, source, rewards):
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "logs.jsonl"
        src.write_text("".join(json.dumps({"query": f"query {i}", "prompt": f"prompt {i % 2}", "reward": r,
                                           "label": "joy"}) + "\n" for i, r in enumerate(rewards)))
        try:
            report = import_to_store(Path(tmp) / "run", "jsonl", path=src,
                                     opts=ImportOptions(constants={"task": "t", "target": "m"}, strict=True))
        except DataError as e:
            bad = next(i for i, r in enumerate(rewards) if abs(r) > MAX_ABS_REWARD)
            assert re.search(rf"logs\.jsonl: row {bad + 1}, column 'reward': \S+ is outside", str(e)), str(e)
            return
        assert all(abs(r) <= MAX_ABS_REWARD for r in rewards)
        store = DatasetStore(Path(tmp) / "run")
        m = store.verify(report.version)
        rows = store.read_table(report.version).to_pylist()
        loss = _loss(policy, source, rows, m.reward_min, m.reward_max)
        assert math.isfinite(loss), (rewards, loss)


def test_verify_refuses_an_extreme_reward_written_behind_the_importer(tmp_path):
    """A parquet file edited after its import (checksum updated to match) with a reward of 1e308."""
    store = DatasetStore(tmp_path / "run")
    store.commit([rows_to_table([{**ROW, "query": f"q{i}", "prompt": "p", "reward": float(i)} for i in range(4)])])
    mpath = store.path(0) / "manifest.json"
    manifest = json.loads(mpath.read_text())
    part = store.path(0) / manifest["files"][0]["name"]
    t = pq.read_table(part)
    t = t.set_column(SCHEMA.get_field_index("reward"), "reward", pa.array([1e308, 1.0, 2.0, 3.0]))
    pq.write_table(t, part)
    manifest["files"][0]["sha256"] = sha256_file(part)
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"part-00000\.parquet: row 0, column 'reward': 1e\+308 is outside"):
        store.verify(0)
    manifest["reward_max"] = 1e308  # the range itself, as an old import would have recorded it
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"reward range \[0\.0, 1e\+308\] is not a finite range within"):
        store.verify(0)


class _Engine:
    """The slice of a DeepSpeed engine ``_run_epoch`` uses, around a plain policy and SGD."""

    def __init__(self, policy):
        self.module, self.device = policy, torch.device("cpu")
        self.opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
        self.steps = 0

    def __call__(self, **kw):
        return self.module(**kw)

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.opt.step()
        self.opt.zero_grad()
        self.steps += 1


def _batches(policy, n: int, bad_at: int | None):
    from qpo_ray.policy.tokenize import encode_rows

    for i in range(n):
        b = {k: torch.as_tensor(v) for k, v in encode_rows(policy.tokenizer, ["a query", "another"], ["Be brief.", ""],
                                                          [10.0, 90.0], 8, 9).items()}
        b = {k: v.long() if "reward" not in k else v.float() for k, v in b.items()}
        b["reward_target"] = b["reward"].clone()
        if i == bad_at:
            b["reward_target"][0] = math.inf  # e.g. a reward scale that overflows float32
        yield b


def test_training_stops_at_the_first_non_finite_loss_before_its_step(policy):
    import copy

    tcfg = load_config("tiny").train
    engine = _Engine(copy.deepcopy(policy).train())
    before = [p.detach().clone() for p in engine.module.parameters()]
    with pytest.raises(NonFiniteLoss) as stop:
        _run_epoch(engine, _batches(policy, 3, bad_at=1), epoch=0, tcfg=tcfg, gas=1, rank=0)
    assert stop.value.info["step"] == 2 and stop.value.info["epoch"] == 1
    assert not math.isfinite(stop.value.info["loss"])
    assert engine.steps == 1  # the bad batch never reached the optimizer
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, engine.module.parameters(), strict=True))
    metrics = _run_epoch(engine, _batches(policy, 1, bad_at=None), epoch=0, tcfg=tcfg, gas=1, rank=0)
    assert math.isfinite(metrics["loss"]) and metrics["steps"] == 1

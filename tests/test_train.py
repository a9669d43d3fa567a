"""Policy training on Ray Train V2 + DeepSpeed (CPU, gloo): real Ray, real DeepSpeed, tiny-gpt2.

The slow tests share one Ray session and a handful of ``train_policy`` calls (each one starts a worker
group, a DeepSpeed engine and a Ray Data pipeline, which dominates the time on a small machine).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from qpo_ray.config import load_config
from qpo_ray.data.schema import rows_to_table
from qpo_ray.data.store import DatasetStore
from qpo_ray.errors import DataError
from qpo_ray.train.checkpoints import COMPLETE_DIR, EPOCH_FILE, newest_complete_checkpoint
from qpo_ray.train.trainer import check_trainable, steps_per_epoch, storage_path, train_policy
from qpo_ray.train.worker import deepspeed_config, grad_accum_steps, step_lr

PROMPTS = ["Classify the emotion of the text.", "Which feeling is expressed?", "Answer with one word.", ""]
FEELINGS = ["happy", "sad", "angry", "calm"]


def _rows(n: int) -> list[dict]:
    # Reward depends on the prompt, so there is something to learn besides the prompt tokens themselves.
    return [dict(task="emotion", setting="zero_shot", target="tiny-llama", label=FEELINGS[i % 4],
                 query=f"Today I felt {FEELINGS[i % 4]} after call number {i}.", prompt=PROMPTS[i % 4],
                 reward=-5.0 + 4.0 * (i % 4) + 0.1 * (i % 7), source="offline:manual", loop=0)
            for i in range(n)]


def _cfg(run_dir: Path, *overrides: str):
    return load_config("tiny", [f"run_dir={run_dir}", "train.batch_size=16", "train.micro_batch_size=8",
                                "train.max_failures=0", *overrides])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("train-run")
    DatasetStore(d).commit([rows_to_table(_rows(64))], note="test D0")
    return d


@pytest.fixture(scope="module")
def ray_quiet(ray_local):
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray_local


@pytest.fixture(scope="module")
def zero2(run_dir, ray_quiet):
    """A ZeRO-2 run on 2 workers interrupted after epoch 1, then called again for 2 epochs. StepLR steps
    every epoch here, so the resumed epoch must derive its own learning rate."""
    store = DatasetStore(run_dir)
    kw = dict(store=store, version=0, schedule="scratch", run_name="z2", out_dir=run_dir / "policy-z2")
    # Streamed every epoch (cache_mib=0); the worker-kill drill below trains from the in-memory shard.
    common = ("train.num_workers=2", "train.zero_stage=2", "train.lr_step_epochs=1", "train.lr_gamma=0.5",
              "train.cache_mib=0")
    first = train_policy(_cfg(run_dir, *common, "train.scratch.epochs=1"), **kw)
    second = train_policy(_cfg(run_dir, *common, "train.scratch.epochs=2"), **kw)
    return first, second


# -- fast: pure helpers ---------------------------------------------------------------------------------
def test_step_lr_is_a_function_of_the_epoch():
    assert step_lr(1e-3, 0, 20, 0.65) == 1e-3
    assert step_lr(1e-3, 19, 20, 0.65) == 1e-3
    assert math.isclose(step_lr(1e-3, 20, 20, 0.65), 6.5e-4)
    assert math.isclose(step_lr(1e-3, 45, 20, 0.65), 1e-3 * 0.65**2)


def test_deepspeed_config_batch_arithmetic_and_precision():
    cfg = load_config("tiny", ["train.batch_size=64", "train.micro_batch_size=8", "train.num_workers=2",
                               "train.zero_stage=3", "train.precision=bf16"])
    assert grad_accum_steps(cfg.train, 2) == 4
    ds = deepspeed_config(cfg.train, 2)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 3
    assert ds["gradient_clipping"] == cfg.train.grad_clip
    assert not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]  # CPU: always fp32
    cfg.train.use_gpu = True
    assert deepspeed_config(cfg.train, 2)["bf16"]["enabled"]


@pytest.mark.parametrize("spec", ["gpt2", "smollm2"])
def test_fast_tokenizer_gives_the_transformers_ids(spec):
    from qpo_ray.policy.tokenize import encode_rows
    from qpo_ray.pretrained import load_tokenizer
    from qpo_ray.tasks import load_task
    from qpo_ray.train.loader import _tokenizer, tokenizer_source

    hf = load_tokenizer(spec, spec)
    source = tokenizer_source(spec, spec)
    assert source[0] == "fast"
    fast = _tokenizer(source)
    task = load_task("emotion")
    queries = [q for q, _ in task.queries()][:20] + ["  spaces  and ünïcödé — “quotes” 🙂", ""]
    prompts = ([t for _, t in task.prompts] * 10)[:len(queries)]
    a = encode_rows(hf, queries, prompts, None, 24, 16)  # short limits: truncation on both sides
    b = encode_rows(fast, queries, prompts, None, 24, 16)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def test_tokenize_batch_normalises_rewards():
    from qpo_ray.train.loader import TRAIN_COLUMNS, tokenize_batch, tokenizer_source

    pcfg = load_config("tiny").policy
    kw = dict(source=tokenizer_source(pcfg.tokenizer, pcfg.model), max_query_tokens=pcfg.max_query_tokens,
              max_prompt_tokens=pcfg.max_prompt_tokens, reward_min=-5.0, reward_max=15.0)
    out = tokenize_batch({"query": np.array(["a query", "another one"], dtype=object),
                          "prompt": np.array(["Be brief.", ""], dtype=object), "reward": np.array([-5.0, 15.0])}, **kw)
    assert set(out) == set(TRAIN_COLUMNS)
    assert out["query_ids"].dtype == np.int32 and out["prompt_mask"].dtype == np.uint8  # compact on the wire
    assert out["query_ids"].shape == (2, pcfg.max_query_tokens)
    assert out["prompt_ids"].shape == (2, pcfg.max_prompt_tokens + 1)
    np.testing.assert_allclose(out["reward"], [0.0, 100.0])
    np.testing.assert_allclose(out["reward_target"], out["reward"])  # no query means: the reward itself
    means = {"a query": 0.0, "another one": 10.0}  # raw means -> normalised 25 and 75
    adv = tokenize_batch({"query": np.array(["a query", "another one"], dtype=object),
                          "prompt": np.array(["Be brief.", ""], dtype=object), "reward": np.array([-5.0, 15.0])},
                         **kw, query_means=means)
    np.testing.assert_allclose(adv["reward"], [0.0, 100.0])  # conditioning stays the reward
    np.testing.assert_allclose(adv["reward_target"], [-25.0, 25.0])  # the head learns the advantage
    kw.update(max_query_tokens=8, max_prompt_tokens=8, reward_min=3.0, reward_max=3.0)
    out = tokenize_batch({"query": np.array(["q"], dtype=object), "prompt": np.array(["p"], dtype=object),
                          "reward": np.array([3.0])}, **kw)  # degenerate range → 50 for all
    np.testing.assert_allclose(out["reward"], [50.0])
    assert out["query_ids"].shape == (1, 8)  # the cached tokenizer is shared; the lengths are per call


def test_tokenize_batch_drops_prompts_that_do_not_fit():
    """A prompt longer than max_prompt_tokens is dropped, never cut: its reward was earned by the whole text."""
    from qpo_ray.train.loader import tokenize_batch, tokenizer_source

    pcfg = load_config("tiny").policy
    src = tokenizer_source(pcfg.tokenizer, pcfg.model)
    prompts = ["one two three", "one two three four", "", "a b c d e f g h i j"]  # 3, 4, 0 and 10 GPT-2 tokens
    out = tokenize_batch({"query": np.array(["q"] * 4, dtype=object), "prompt": np.array(prompts, dtype=object),
                          "reward": np.array([1.0, 2.0, 3.0, 4.0])}, source=src, max_query_tokens=4,
                         max_prompt_tokens=3, reward_min=0.0, reward_max=4.0)
    np.testing.assert_allclose(out["reward"], [25.0, 75.0])  # the rows of "one two three" and ""
    assert out["prompt_ids"].shape == (2, 4) and out["prompt_mask"].sum(axis=1).tolist() == [4, 1]


def test_plan_prompts_counts_drops_and_builds_the_vocabulary(tmp_path):
    from qpo_ray.pretrained import load_tokenizer
    from qpo_ray.train.loader import plan_prompts

    store = DatasetStore(tmp_path)
    rows = [dict(r, prompt=p) for r, p in zip(_rows(12), ["Be brief.", "Be brief.", "a b c d e f g h i j", ""] * 3,
                                               strict=True)]
    store.commit([rows_to_table(rows)])
    pcfg = load_config("tiny", ["policy.max_prompt_tokens=4"]).policy
    tok = load_tokenizer(pcfg.tokenizer, pcfg.model)
    plan = plan_prompts(store, 0, tok, pcfg, base_vocab=[7], query_means=True)
    assert (plan.rows, plan.dropped, plan.longest) == (9, 3, 10)
    assert plan.prompts == ["Be brief.", ""]  # kept prompts, most rows first
    brief = tok("Be brief.", add_special_tokens=False)["input_ids"]
    assert plan.vocab_ids == sorted({*brief, tok.eos_token_id, 7})  # kept prompts, EOS, the base vocabulary
    by_query = {r["query"]: [x["reward"] for x in rows if x["query"] == r["query"] and x["prompt"] != rows[2]["prompt"]]
                for r in rows}
    assert plan.query_means == pytest.approx({q: sum(v) / len(v) for q, v in by_query.items() if v})
    assert plan_prompts(store, 0, tok, pcfg.model_copy(update={"prompt_vocab": "full"})).vocab_ids is None


class _Shard:
    """What ``cache_shard`` reads: a Train worker's shard yields numpy batches in whatever order Ray Data ran."""

    def __init__(self, batches):
        self.batches = batches

    def iter_batches(self, batch_size=None, batch_format="numpy"):
        assert batch_size is None and batch_format == "numpy"
        yield from self.batches


def test_cached_shard_is_canonical_and_every_epoch_is_a_seeded_permutation():
    from qpo_ray.train.loader import TRAIN_COLUMNS, cache_shard, cached_batches

    rng = np.random.default_rng(0)
    n = 40
    rows = {"query_ids": rng.integers(0, 500, (n, 6)), "query_mask": rng.integers(0, 2, (n, 6)),
            "prompt_ids": rng.integers(0, 500, (n, 5)), "prompt_mask": rng.integers(0, 2, (n, 5)),
            "reward": rng.uniform(0, 100, n).astype(np.float32), "reward_target": rng.normal(size=n).astype(np.float32)}
    rows["query_ids"][:, 0] = np.arange(n)  # every row distinct

    def batches(order, cuts):
        return [{k: v[order[a:b]] for k, v in rows.items()} for a, b in zip(cuts, cuts[1:], strict=False)]

    one = cache_shard(_Shard(batches(np.arange(n), [0, 7, 30, n])))
    other = cache_shard(_Shard(batches(rng.permutation(n), [0, 25, n])))  # another order and batching
    for k in TRAIN_COLUMNS:
        np.testing.assert_array_equal(one[k], other[k])
    assert one["query_ids"].dtype == np.int32 and one["prompt_mask"].dtype == np.uint8
    assert sorted(one["query_ids"][:, 0].tolist()) == list(range(n))

    def epoch(seed):
        return list(cached_batches(one, 8, seed))

    e1, e2 = epoch(11), epoch(12)
    assert len(e1) == n // 8 and all(b["query_ids"].shape == (8, 6) for b in e1)
    assert e1[0]["query_ids"].dtype == torch.long and e1[0]["reward"].dtype == torch.float32
    seen = torch.cat([b["query_ids"][:, 0] for b in e1])
    assert sorted(seen.tolist()) == list(range(n))  # each row once per epoch
    assert torch.equal(seen, torch.cat([b["query_ids"][:, 0] for b in epoch(11)]))  # seeded
    assert not torch.equal(seen, torch.cat([b["query_ids"][:, 0] for b in e2]))  # reshuffled per epoch
    assert len(list(cached_batches(one, 16, 0))) == 2  # the last partial batch is dropped
    assert list(cached_batches(cache_shard(_Shard([])), 8, 0)) == []


def test_train_policy_checks_arguments(tmp_path):
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table(_rows(8))])
    cfg = _cfg(tmp_path, "train.num_workers=2")
    with pytest.raises(DataError, match="too few"):  # before Ray starts: a clear error line, not a traceback
        train_policy(cfg, store=store, version=0, out_dir=tmp_path / "p", schedule="scratch", run_name="x")
    with pytest.raises(ValueError, match="init_policy"):
        train_policy(cfg, store=store, version=0, out_dir=tmp_path / "p", schedule="finetune", run_name="x")


def test_trainable_rows_give_the_steps_per_epoch(tmp_path):
    two = _cfg(tmp_path, "train.num_workers=2").train  # global batch 16 = 8 rows × 2 workers
    assert steps_per_epoch(two, 16, "d") == 1 and steps_per_epoch(two, 47, "d") == 2  # a partial batch is dropped
    accum = _cfg(tmp_path, "train.batch_size=32").train  # one worker, 4 micro-batches of 8 per optimizer step
    assert steps_per_epoch(accum, 64, "d") == 2
    with pytest.raises(DataError, match=r"^the rows of d has 31 rows whose x: too few for one optimizer step "
                                        r"\(train\.batch_size=32 rows across 1 worker\(s\)\); add rows or lower "
                                        r"train\.batch_size$"):
        steps_per_epoch(accum, 31, "the rows of d", " whose x")
    store = DatasetStore(tmp_path)
    store.commit([rows_to_table(_rows(40))])
    assert check_trainable(_cfg(tmp_path), store, 0) == 2  # what the CLI checks before Ray starts: 40 // 16
    with pytest.raises(DataError, match=r"^dataset v000 in .* has 40 rows: too few .*batch_size=64"):
        check_trainable(_cfg(tmp_path, "train.batch_size=64"), store, 0)


def test_newest_complete_checkpoint_needs_a_marker_and_the_folder(tmp_path):
    run = tmp_path / "run"
    assert newest_complete_checkpoint(str(tmp_path), "run") is None  # nothing there yet
    for n in (1, 2, 3, 10):
        (run / f"epoch-{n:04d}").mkdir(parents=True)
        (run / f"epoch-{n:04d}" / EPOCH_FILE).write_text("{}")
    (run / COMPLETE_DIR).mkdir()
    for n in (1, 2, 3):
        (run / COMPLETE_DIR / f"epoch-{n:04d}").touch()
    # epoch 10 has no marker (a rank was still uploading); epoch 3's folder lost its epoch.json (deleted by
    # Ray Train's num_to_keep while the marker stayed): epoch 2 is the newest complete one.
    (run / "epoch-0003" / EPOCH_FILE).unlink()
    found = newest_complete_checkpoint(str(tmp_path), "run")
    assert found is not None and Path(found.path).name == "epoch-0002"
    (run / COMPLETE_DIR / "epoch-0010").touch()  # numeric order, not text order
    assert Path(newest_complete_checkpoint(str(tmp_path), "run").path).name == "epoch-0010"


# -- slow: real Ray Train + DeepSpeed ---------------------------------------------------------------------
@pytest.mark.slow
def test_zero2_two_workers_lowers_the_loss(zero2):
    _, second = zero2
    losses = [h["loss"] for h in second.history]
    ces = [h["ce"] for h in second.history]
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert all(math.isfinite(x) for x in losses)
    assert losses[1] < losses[0] and ces[1] < ces[0]
    assert all(h["steps"] == 4 for h in second.history)  # 64 rows / global batch 16
    assert second.metrics["epoch"] == 2


@pytest.mark.slow
def test_interrupted_run_resumes_at_the_next_epoch(zero2, run_dir):
    first, second = zero2
    assert first.epochs_run == 1 and first.resumed_from_epoch is None
    assert second.resumed_from_epoch == 1 and second.epochs_run == 1
    assert second.history[0] == first.history[0]  # epoch 1 came from the checkpoint, not a rerun
    assert [h["epoch"] for h in second.epoch_metrics] == [2]
    lr = load_config("tiny").train.scratch.lr
    assert [h["lr"] for h in second.history] == pytest.approx([lr, lr * 0.5])  # read back from the engine
    ckpts = sorted(p.name for p in (Path(storage_path(_cfg(run_dir))) / "z2").glob("epoch-*"))
    assert ckpts == ["epoch-0001", "epoch-0002"]
    state = json.loads((Path(second.checkpoint_path) / EPOCH_FILE).read_text())
    assert state["epoch"] == 2 and state["final"]


@pytest.mark.slow
def test_exported_policy_loads_and_generates(zero2):
    from qpo_ray.policy import QPOPolicy, generate_prompts

    _, second = zero2
    policy = QPOPolicy.load(second.policy_dir)
    out = generate_prompts(policy, ["Today I felt happy after call number 3.", "I am calm."], max_new_tokens=6)
    assert len(out) == 2 and all(isinstance(t, str) for t in out)
    # tiny trains the CPU setup: a head over the prompts' tokens, and the prompts travel with the policy
    tok = policy.tokenizer
    prompt_tokens = {i for p in PROMPTS for i in tok(p, add_special_tokens=False)["input_ids"]}
    assert policy.vocab_ids.tolist() == sorted(prompt_tokens | {tok.eos_token_id})
    assert sorted(QPOPolicy.candidates(second.policy_dir)) == sorted(PROMPTS)


@pytest.mark.slow
def test_reference_path_trains_the_whole_vocabulary_with_the_reward_slot_head(run_dir, ray_quiet):
    """The paper's setup: full-vocabulary head, reward-slot head regressing the reward itself."""
    import torch

    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.tokenize import encode_rows

    cfg = _cfg(run_dir, "policy.prompt_vocab=full", "policy.reward_head=reward_slot", "train.reward_target=reward",
               "train.mse_scale=1", "eval.best_of_n=1", "train.scratch.epochs=1")
    res = train_policy(cfg, store=DatasetStore(run_dir), version=0, out_dir=run_dir / "policy-ref",
                       schedule="scratch", run_name="reference")
    assert res.epochs_run == 1 and math.isfinite(res.metrics["loss"])
    policy = QPOPolicy.load(res.policy_dir)
    assert policy.vocab_ids is None and policy.pcfg.reward_head == "reward_slot"
    b = {k: torch.as_tensor(v) for k, v in encode_rows(policy.tokenizer, ["q"], ["Be brief."], [50.0], 8, 8).items()}
    assert policy(**b)[0].shape[-1] == policy.base.config.vocab_size


@pytest.mark.slow
@pytest.mark.parametrize("stage,workers", [(3, 2)])
def test_other_zero_stages_train_one_epoch(stage, workers, zero2, run_dir):
    """ZeRO-3 on two workers (sharded parameters, gathered for the export), fine-tuning the ZeRO-2 policy for
    one epoch. ZeRO-0 on one worker (gradient accumulation 2) is the tiny profile's: every end-to-end run
    trains and fine-tunes with it (test_driver_e2e.py checks its schedules)."""
    from qpo_ray.policy import QPOPolicy

    _, base = zero2
    cfg = _cfg(run_dir, f"train.num_workers={workers}", f"train.zero_stage={stage}", "train.finetune.epochs=1")
    res = train_policy(cfg, store=DatasetStore(run_dir), version=0, out_dir=run_dir / f"policy-ft{stage}",
                       schedule="finetune", init_policy=base.policy_dir, run_name=f"ft-zero{stage}")
    assert res.epochs_run == 1 and res.resumed_from_epoch is None
    assert math.isfinite(res.metrics["loss"]) and res.metrics["lr"] == cfg.train.finetune.lr
    assert res.metrics["steps"] == 4  # 64 rows / global batch 16, whatever the worker count
    policy = QPOPolicy.load(res.policy_dir)  # strict load: the ZeRO-3 export holds full tensors
    assert sum(p.numel() for p in policy.parameters()) == sum(
        p.numel() for p in QPOPolicy.load(base.policy_dir).parameters())


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_killed_worker_restarts_from_its_last_checkpoint(run_dir, ray_quiet, monkeypatch):
    """A training worker dies (SIGKILL, as on a node loss) after training epoch 2 and before reporting it.
    Ray Train's FailureConfig restarts the worker group, which loads epoch 1's checkpoint and trains epoch 2
    again: the run finishes, and its history shows the resume, not a restart from scratch.

    With epochs of a second the worker often dies before Ray Train's controller has registered epoch 1's
    report, so ``get_checkpoint()`` returns nothing; the restarted worker must find epoch 1 in storage by its
    completion marker. Either way the outcome is the same, on a fast machine or a loaded one."""
    cfg = _cfg(run_dir, "train.scratch.epochs=2", "train.max_failures=1")
    # train_policy passes the variable to its workers in their config (the raylet's environment was fixed
    # when Ray started). The point only fires past a worker's start epoch, so the restarted one passes it.
    monkeypatch.setenv("QPO_RAY_FAULT", "train.epoch-2.end")
    res = train_policy(cfg, store=DatasetStore(run_dir), version=0, out_dir=run_dir / "policy-drill",
                       schedule="scratch", run_name="worker-drill")
    assert [h["epoch"] for h in res.history] == [1, 2]
    # epoch 1 by the first worker group (fresh start), epoch 2 by the restarted one from epoch 1's checkpoint
    assert [h["resumed_from_epoch"] for h in res.history] == [0, 1]
    assert res.epochs_run == 2 and res.resumed_from_epoch is None  # one call: nothing was there before it
    state = json.loads((Path(res.checkpoint_path) / EPOCH_FILE).read_text())
    assert state["epoch"] == 2 and state["final"]
    # Dropout is seeded per epoch, so the resumed run ends with the weights of one never interrupted.
    monkeypatch.delenv("QPO_RAY_FAULT")
    ref = train_policy(cfg, store=DatasetStore(run_dir), version=0, out_dir=run_dir / "policy-drill-ref",
                       schedule="scratch", run_name="worker-drill-ref")
    assert ref.epochs_run == 2
    drilled, clean = (load_file(p / "model.safetensors") for p in (res.policy_dir, ref.policy_dir))
    assert drilled.keys() == clean.keys()
    assert all(torch.equal(drilled[k], clean[k]) for k in clean)


@pytest.mark.slow
def test_a_non_finite_loss_stops_every_rank_with_one_error_and_no_policy(run_dir, ray_quiet):
    """A reward scale that overflows float32 makes the first loss infinite: both ranks stop before their
    first optimizer step, Ray Train does not retry (max_failures=2), and no policy is written."""
    from qpo_ray.errors import TrainingError
    from qpo_ray.train.checkpoints import STOP_DIR

    cfg = _cfg(run_dir, "train.num_workers=2", "train.mse_scale=1e-300", "train.scratch.epochs=2",
               "train.max_failures=2")
    with pytest.raises(TrainingError, match=r"^training stopped at epoch 1, step 1 of run 'nan-loss' on dataset "
                                            r"v000: the loss \((inf|nan)\) is not a finite number .*no policy"):
        train_policy(cfg, store=DatasetStore(run_dir), version=0, out_dir=run_dir / "policy-nan",
                     schedule="scratch", run_name="nan-loss")
    assert not (run_dir / "policy-nan").exists()
    run = Path(storage_path(cfg)) / "nan-loss"
    assert len(list((run / STOP_DIR).iterdir())) == 1
    assert not list(run.glob("epoch-*"))  # nothing of the stopped state was reported as a checkpoint

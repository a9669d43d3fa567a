"""The policy-training input pipeline: a dataset version streamed through Ray Data and tokenised.

``training_dataset`` is lazy: nothing is read until Ray Train's DataConfig splits it among the workers
(``streaming_split(world_size, equal=True)``, so every rank sees the same number of rows and therefore the
same number of ``drop_last`` micro-batches — a DDP/ZeRO collective can never wait on a rank that ran out).
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import ray.data

from qpo_ray.config import PolicyConfig
from qpo_ray.data.source import VersionSource
from qpo_ray.data.store import DatasetStore, normalize_reward
from qpo_ray.policy.tokenize import FastTokenizer, encode_rows

log = logging.getLogger(__name__)

READ_COLUMNS = ["query", "prompt", "reward"]
MAX_CANDIDATES = 256
# What a training batch holds (names and shapes are the policy package's encode_rows contract).
TRAIN_COLUMNS = ("query_ids", "query_mask", "prompt_ids", "prompt_mask", "reward", "reward_target")
# The read+tokenise tasks ask Ray for no CPU. They run while the Train workers they feed hold their CPUs
# (and the scoring pool its own), so a task that asked for one could wait for ever on a cluster of exactly the
# run's size. They are short: a worker whose shard fits train.cache_mib reads it once; tokenising shares the
# workers' cores for that moment, at most train.num_workers tasks at once.
INGEST_CPUS = 0
BLOCK_BYTES = 8 << 20  # Ray Data target block size of the training pipeline (Ray's default: 128 MiB)
# Through the object store token ids travel as int32 and masks as uint8, a third of int64's bytes;
# train_batches() widens them again as the batches reach the model.
WIRE_DTYPES = {"query_ids": np.int32, "query_mask": np.uint8, "prompt_ids": np.int32, "prompt_mask": np.uint8,
               "reward": np.float32, "reward_target": np.float32}


def model_dtypes() -> dict[str, Any]:
    """The torch dtypes the policy and the loss take, per training column: float32 rewards, int64 tokens."""
    import torch

    return {k: torch.float32 if k.startswith("reward") else torch.long for k in TRAIN_COLUMNS}


def train_batches(data, micro_batch_size: int, shuffle_seed: int, device: Any = "auto"):
    """Training micro-batches from a Ray Dataset or a Train worker's shard: torch tensors in the dtypes the
    policy and the loss take, on ``device`` ("auto": the Train worker's device), mixed by a seeded local
    shuffle buffer, the last partial batch dropped."""
    return data.iter_torch_batches(
        batch_size=micro_batch_size,
        drop_last=True,
        local_shuffle_buffer_size=max(16 * micro_batch_size, 2048),
        local_shuffle_seed=shuffle_seed,
        dtypes=model_dtypes(),
        device=str(device),
    )


def row_bytes(pcfg: PolicyConfig) -> int:
    """Bytes of one tokenised training row as the pipeline delivers it (``WIRE_DTYPES``)."""
    width = {"query_ids": pcfg.max_query_tokens, "query_mask": pcfg.max_query_tokens,
             "prompt_ids": pcfg.max_prompt_tokens + 1, "prompt_mask": pcfg.max_prompt_tokens + 1}
    return sum(width.get(k, 1) * np.dtype(d).itemsize for k, d in WIRE_DTYPES.items())


def cache_shard(shard) -> dict[str, np.ndarray]:
    """Every tokenised row of a worker's shard, read once (one Ray Data execution), in a canonical order.

    The rows are sorted by their bytes, so the epochs that follow (``cached_batches``) depend on which rows
    the shard holds, not on the order Ray Data delivered them: a restarted worker trains on the same batches."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in TRAIN_COLUMNS}
    for b in shard.iter_batches(batch_size=None, batch_format="numpy"):
        for k in TRAIN_COLUMNS:
            parts[k].append(np.asarray(b[k], dtype=WIRE_DTYPES[k]))
    if not parts["reward"]:
        return {k: np.empty((0,), WIRE_DTYPES[k]) for k in TRAIN_COLUMNS}
    rows = {k: np.concatenate(v) for k, v in parts.items()}
    n = len(rows["reward"])
    flat = np.hstack([rows[k].reshape(n, -1).view(np.uint8) for k in TRAIN_COLUMNS])  # concatenate: contiguous
    order = np.argsort(flat.view(np.dtype((np.void, flat.shape[1]))).ravel(), kind="stable")
    return {k: v[order] for k, v in rows.items()}


def cached_batches(rows: dict[str, np.ndarray], micro_batch_size: int, shuffle_seed: int, device: Any = "cpu"):
    """``train_batches`` over rows held in memory: a seeded permutation of all of them (a global shuffle),
    the same tensors and dtypes on ``device`` (the engine's: DeepSpeed moves the module, not its inputs),
    the last partial batch dropped."""
    import torch

    dtypes = model_dtypes()
    n = len(rows["reward"])
    perm = np.random.default_rng(shuffle_seed).permutation(n)
    for i in range(0, n - micro_batch_size + 1, micro_batch_size):
        idx = perm[i:i + micro_batch_size]
        yield {k: torch.from_numpy(v[idx]).to(device=device, dtype=dtypes[k]) for k, v in rows.items()}


@functools.lru_cache(maxsize=4)
def _tokenizer(source: tuple) -> Any:
    # Ray reuses its task worker processes, so each process builds a tokenizer once, not once per batch or
    # per epoch (an actor pool would be torn down and rebuilt, tokenizer and all, on every execution).
    if source[0] == "fast":
        return FastTokenizer(*source[1:])
    from qpo_ray.pretrained import load_tokenizer

    return load_tokenizer(*source[1:])


def tokenizer_source(tokenizer: str | None, model: str) -> tuple:
    """What a tokenise task needs to rebuild the policy tokenizer: its Rust core when it is a fast tokenizer
    (``("fast", spec, pad_id, eos_id)``: no transformers or torch in the worker), else its name."""
    from qpo_ray.pretrained import load_tokenizer

    state = FastTokenizer.state(load_tokenizer(tokenizer, model))
    if state is None:
        return ("hf", tokenizer, model)
    return ("fast", state["spec"], state["pad_token_id"], state["eos_token_id"])


@dataclass
class PromptPlan:
    """What a dataset version's prompts mean for training, decided once on the driver before training."""

    rows: int  # rows that train
    dropped: int  # rows whose prompt is longer than policy.max_prompt_tokens (the pipeline drops them)
    longest: int  # the longest prompt, in policy tokens
    vocab_ids: list[int] | None  # the prompt head's vocabulary (policy.prompt_vocab = "data"), else None
    prompts: list[str]  # the kept distinct prompts, most rows first (at most MAX_CANDIDATES): rerank's candidates
    query_means: dict[str, float] | None = None  # raw mean reward per query (train.reward_target = "advantage")


def plan_prompts(store: DatasetStore, version: int, tokenizer: Any, pcfg: PolicyConfig,
                 base_vocab: list[int] | None = None, query_means: bool = False) -> PromptPlan:
    """Count every prompt of ``version`` once (streamed) and tokenise each distinct one.

    A row whose prompt does not fit ``max_prompt_tokens`` is dropped, not cut: its reward was measured on the
    whole prompt, and a cut one would teach the policy that the fragment earned it. The vocabulary is every
    token of the kept prompts plus EOS, widened by ``base_vocab`` (the vocabulary of the policy a later loop
    fine-tunes). With ``query_means``, also each query's mean reward over the rows that train."""
    counts: Counter[str] = Counter()
    for b in store.iter_batches(version, columns=["prompt"]):
        counts.update(b.column("prompt").to_pylist())
    texts = list(counts)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    limit = pcfg.max_prompt_tokens
    dropped = sum(counts[t] for t, x in zip(texts, ids, strict=True) if len(x) > limit)
    vocab: set[int] | None = None
    if pcfg.prompt_vocab == "data":
        vocab = {i for x in ids if len(x) <= limit for i in x} | {tokenizer.eos_token_id} | set(base_vocab or ())
    fits = {t for t, x in zip(texts, ids, strict=True) if len(x) <= limit}
    kept = sorted(fits, key=lambda t: (-counts[t], t))
    plan = PromptPlan(rows=sum(counts.values()) - dropped, dropped=dropped, longest=max(map(len, ids), default=0),
                      vocab_ids=sorted(vocab) if vocab is not None else None, prompts=kept[:MAX_CANDIDATES],
                      query_means=_query_means(store, version, fits) if query_means else None)
    if dropped:
        log.warning("dataset v%03d: %d of %d rows have a prompt longer than policy.max_prompt_tokens=%d (the "
                    "longest has %d tokens): they are left out of training, since their reward belongs to the "
                    "whole prompt; raise policy.max_prompt_tokens to train on them", version, dropped,
                    plan.rows + dropped, limit, plan.longest)
    return plan


def _query_means(store: DatasetStore, version: int, prompts: set[str]) -> dict[str, float]:
    """Mean raw reward per query text over its rows whose prompt is in ``prompts`` (those that train)."""
    sums: dict[str, list[float]] = {}
    for b in store.iter_batches(version, columns=["query", "prompt", "reward"]):
        for q, p, r in zip(b.column("query").to_pylist(), b.column("prompt").to_pylist(),
                           b.column("reward").to_pylist(), strict=True):
            if p in prompts:
                acc = sums.setdefault(q, [0.0, 0])
                acc[0] += r
                acc[1] += 1
    return {q: s / n for q, (s, n) in sums.items()}


def tokenize_batch(batch: dict[str, np.ndarray], *, source: tuple, max_query_tokens: int, max_prompt_tokens: int,
                   reward_min: float, reward_max: float,
                   query_means: dict[str, float] | None = None) -> dict[str, np.ndarray]:
    """Raw (query, prompt, reward) rows → fixed-shape token arrays with rewards normalised to [0, 100].

    Rows whose prompt is longer than ``max_prompt_tokens`` are dropped (``plan_prompts`` counts them): the
    prompts are encoded one token wider than kept, so a prompt that fills the extra column did not fit.

    ``reward_target`` is what the reward head learns: the normalised reward, or with ``query_means`` the
    row's advantage over its query's mean (a prompt's effect for that query, its difficulty taken out)."""
    raw = np.asarray(batch["reward"], dtype=np.float64)
    # normalize_reward is plain arithmetic, so it maps the whole array; a degenerate range gives a scalar.
    norm = np.broadcast_to(normalize_reward(raw, reward_min, reward_max), raw.shape)
    out = encode_rows(_tokenizer(source), batch["query"], batch["prompt"], norm.astype(np.float32),
                      max_query_tokens, max_prompt_tokens + 1)
    target = norm
    if query_means is not None:
        # A query missing from the means has no row that fits the prompt budget: its rows are dropped below.
        means = np.array([query_means.get(str(q), r) for q, r in zip(batch["query"], raw, strict=True)],
                         dtype=np.float64)
        target = norm - np.broadcast_to(normalize_reward(means, reward_min, reward_max), raw.shape)
    out["reward_target"] = np.asarray(target, dtype=np.float32)
    width = max_prompt_tokens + 1  # the prompt, then its EOS
    fits = out["prompt_mask"].sum(axis=1) <= width
    out["prompt_ids"], out["prompt_mask"] = out["prompt_ids"][:, :width], out["prompt_mask"][:, :width]
    out = {k: v[fits].astype(WIRE_DTYPES[k], copy=False) for k, v in out.items()}
    # Arrow's allocator keeps freed parquet buffers for reuse; hand them back so a worker that sits idle
    # between epochs (or never gets the next task) does not hold a reader's peak.
    pa.default_memory_pool().release_unused()
    return out


def training_dataset(store: DatasetStore, version: int, pcfg: PolicyConfig, *, tokenizer: str | None = None,
                     seed: int = 0, tokenize_tasks: int = 1,
                     query_means: dict[str, float] | None = None) -> ray.data.Dataset:
    """A lazy, streaming Ray Dataset of tokenised training rows for one dataset version.

    ``tokenizer`` overrides ``pcfg.tokenizer`` (e.g. the folder of a policy being fine-tuned). Rewards are
    normalised to [0, 100] with the version's manifest range (fixed by v000, docs/design.md §2). At most
    ``tokenize_tasks`` read+tokenise tasks run at once, each asking for ``INGEST_CPUS``.

    Shuffling stays streaming: the file order is shuffled at read time with a seed that advances on every
    execution (a different, reproducible order per epoch), and the trainer mixes rows with a seeded local
    shuffle buffer. ``randomize_block_order`` would be an all-to-all barrier that reads every block of the
    version into the object store before the first batch.
    """
    manifest = store.manifest(version)
    files = store.file_rows(version)
    tasks = max(1, tokenize_tasks)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.target_max_block_size
    # The dataset keeps a copy of the context as it is at read time, so this setting is its own. Small
    # blocks: a reader yields a file a few thousand rows at a time, so memory is bounded by the block size,
    # not by the file or dataset size.
    ctx.target_max_block_size = BLOCK_BYTES
    try:
        ds = ray.data.read_datasource(VersionSource(files, READ_COLUMNS, seed=seed), concurrency=tasks,
                                      override_num_blocks=len(files), num_cpus=INGEST_CPUS)
    finally:
        ctx.target_max_block_size = saved
    # Whole blocks (batch_size=None), one read task per file (no output split) and the same task cap on both
    # sides: Ray Data fuses read and tokenisation into one task, so no raw text waits in the object store
    # for a slower tokeniser (an unfused read ran ahead and buffered every file's text: memory grew with
    # the dataset).
    return ds.map_batches(
        tokenize_batch,
        fn_kwargs=dict(
            source=tokenizer_source(tokenizer if tokenizer is not None else pcfg.tokenizer, pcfg.model),
            max_query_tokens=pcfg.max_query_tokens,
            max_prompt_tokens=pcfg.max_prompt_tokens,
            reward_min=manifest.reward_min,
            reward_max=manifest.reward_max,
            query_means=query_means,
        ),
        batch_size=None,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=tasks),
        num_cpus=INGEST_CPUS,
        udf_modifying_row_count=True,  # rows with too long a prompt are dropped
    )

"""The policy-training input pipeline: a dataset version streamed through Ray Data and tokenised.

``training_dataset`` is lazy: nothing is read until Ray Train's DataConfig splits it among the workers
(``streaming_split(world_size, equal=True)``, so every rank sees the same number of rows and therefore the
same number of ``drop_last`` micro-batches — a DDP/ZeRO collective can never wait on a rank that ran out).
"""

from __future__ import annotations

import numpy as np
import ray.data
from ray.data import FileShuffleConfig

from qpo_ray.config import PolicyConfig
from qpo_ray.data.store import DatasetStore, normalize_reward

READ_COLUMNS = ["query", "prompt", "reward"]
# What a training batch holds (names and shapes are the policy package's encode_rows contract).
TRAIN_COLUMNS = ("query_ids", "query_mask", "prompt_ids", "prompt_mask", "reward")


class TokenizeBatch:
    """Ray Data callable class: raw (query, prompt, reward) rows → fixed-shape token arrays.

    A class (not a function) so each actor of the pool loads the tokenizer once, not once per batch.
    """

    def __init__(self, tokenizer: str | None, model: str, max_query_tokens: int, max_prompt_tokens: int,
                 reward_min: float, reward_max: float):
        from qpo_ray.models import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer, model)
        self.max_query_tokens = max_query_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.reward_min = reward_min
        self.reward_max = reward_max

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from qpo_ray.policy.tokenize import encode_rows

        raw = np.asarray(batch["reward"], dtype=np.float64)
        # normalize_reward is plain arithmetic, so it maps the whole array; a degenerate range gives a scalar.
        norm = np.broadcast_to(normalize_reward(raw, self.reward_min, self.reward_max), raw.shape)
        return encode_rows(self.tokenizer, batch["query"], batch["prompt"], norm.astype(np.float32),
                           self.max_query_tokens, self.max_prompt_tokens)


def training_dataset(store: DatasetStore, version: int, pcfg: PolicyConfig, *, tokenizer: str | None = None,
                     seed: int = 0, tokenize_actors: int = 1, tokenize_batch_size: int = 256) -> ray.data.Dataset:
    """A lazy, streaming Ray Dataset of tokenised training rows for one dataset version.

    ``tokenizer`` overrides ``pcfg.tokenizer`` (e.g. the folder of a policy being fine-tuned). Rewards are
    normalised to [0, 100] with the version's manifest range (fixed by v000, DESIGN §2).

    Shuffling stays streaming: the file order is shuffled at read time with a seed that advances on every
    execution (a different, reproducible order per epoch), and the trainer mixes rows with a seeded local
    shuffle buffer. ``randomize_block_order`` would be an all-to-all barrier that reads every block of the
    version into the object store before the first batch.
    """
    manifest = store.manifest(version)
    ds = ray.data.read_parquet(store.files(version),
                               shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True))
    ds = ds.select_columns(READ_COLUMNS)  # pushed down into the parquet read: other columns are never read
    return ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs=dict(
            tokenizer=tokenizer if tokenizer is not None else pcfg.tokenizer,
            model=pcfg.model,
            max_query_tokens=pcfg.max_query_tokens,
            max_prompt_tokens=pcfg.max_prompt_tokens,
            reward_min=manifest.reward_min,
            reward_max=manifest.reward_max,
        ),
        batch_size=tokenize_batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, tokenize_actors)),
        udf_modifying_row_count=False,
    )

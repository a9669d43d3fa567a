"""Turn (query, prompt, reward) rows into the fixed-shape arrays the policy consumes.

Pure numpy + tokenizer, so it runs inside a Ray Data ``map_batches`` as well as in a plain loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # transformers imports torch: keep both out of the data workers
    from transformers import PreTrainedTokenizerBase


class FastTokenizer:
    """The Rust tokenizer inside a Hugging Face *fast* tokenizer, usable without transformers.

    It offers what this module needs of a tokenizer (``__call__(texts, add_special_tokens)``,
    ``pad_token_id``, ``eos_token_id``) and gives the same ids. Ray Data's tokenise tasks use it so their
    worker processes load neither transformers nor torch (about 250 MiB each).
    """

    def __init__(self, spec: str, pad_token_id: int | None, eos_token_id: int | None):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_str(spec)
        # transformers sets these per call; a tokenizer.json may carry its own defaults.
        self.backend.no_padding()
        self.backend.no_truncation()
        self.pad_token_id, self.eos_token_id = pad_token_id, eos_token_id

    @staticmethod
    def state(tokenizer: PreTrainedTokenizerBase) -> dict[str, Any] | None:
        """Constructor arguments for ``tokenizer``'s Rust core, or None when it is not a fast tokenizer."""
        if not getattr(tokenizer, "is_fast", False):
            return None
        return {"spec": tokenizer.backend_tokenizer.to_str(), "pad_token_id": tokenizer.pad_token_id,
                "eos_token_id": tokenizer.eos_token_id}

    def __call__(self, texts: Sequence[str], add_special_tokens: bool = True) -> dict[str, list[list[int]]]:
        enc = self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return {"input_ids": [e.ids for e in enc]}


# Texts per tokenizer call. A call returns an Encoding per text (ids, tokens, offsets, masks: ~100 bytes a
# token) and a Python list of ints for its ids; tokenising a whole Ray Data block (~25k rows) in one call
# held ~115 MiB of them at once in every tokenise worker.
ENCODE_CHUNK = 1024


def _ids(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> Iterator[list[int]]:
    for i in range(0, len(texts), ENCODE_CHUNK):
        # No BOS/EOS from the tokenizer: the policy adds the one EOS that ends a prompt itself.
        yield from tokenizer([str(t) for t in texts[i:i + ENCODE_CHUNK]], add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def encode_queries(tokenizer: PreTrainedTokenizerBase, queries: Sequence[str],
                   max_query_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(query_ids, query_mask)``, both ``[B, max_query_tokens]``, LEFT-padded.

    Long queries keep their first tokens (the question usually opens the text)."""
    lq = max_query_tokens
    ids = np.full((len(queries), lq), _pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((len(queries), lq), dtype=np.int64)
    for i, toks in enumerate(_ids(tokenizer, queries)):
        toks = toks[:lq]
        if toks:
            ids[i, lq - len(toks):] = toks
            mask[i, lq - len(toks):] = 1
    return ids, mask


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                   max_prompt_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """``(prompt_ids, prompt_mask)``, both ``[B, max_prompt_tokens + 1]``, RIGHT-padded.

    Each row is the (truncated) prompt tokens followed by exactly one EOS, so the policy learns to stop;
    an empty prompt ("no instruction") is just that EOS."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the policy tokenizer has no EOS token; prompts cannot be terminated")
    width = max_prompt_tokens + 1
    ids = np.full((len(prompts), width), _pad_id(tokenizer), dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for i, toks in enumerate(_ids(tokenizer, prompts)):
        toks = list(toks[:max_prompt_tokens]) + [tokenizer.eos_token_id]
        ids[i, :len(toks)] = toks
        mask[i, :len(toks)] = 1
    return ids, mask


def encode_rows(tokenizer: PreTrainedTokenizerBase, queries: Sequence[str], prompts: Sequence[str] | None,
                rewards: Sequence[float] | None, max_query_tokens: int,
                max_prompt_tokens: int) -> dict[str, np.ndarray]:
    """Encode a batch of rows into numpy arrays.

    Returns ``query_ids``/``query_mask`` ``[B, Lq]`` (left-padded), and when given, ``prompt_ids``/
    ``prompt_mask`` ``[B, Lp+1]`` (right-padded, prompt + one EOS; mask is 1 on real tokens incl. EOS)
    and ``reward`` ``[B]`` float32. Inputs may be lists or numpy arrays (as Ray Data passes them).
    """
    out: dict[str, np.ndarray] = {}
    out["query_ids"], out["query_mask"] = encode_queries(tokenizer, list(queries), max_query_tokens)
    if prompts is not None:
        if len(prompts) != len(queries):
            raise ValueError(f"{len(prompts)} prompts for {len(queries)} queries")
        out["prompt_ids"], out["prompt_mask"] = encode_prompts(tokenizer, list(prompts), max_prompt_tokens)
    if rewards is not None:
        if len(rewards) != len(queries):
            raise ValueError(f"{len(rewards)} rewards for {len(queries)} queries")
        out["reward"] = np.asarray(rewards, dtype=np.float32).reshape(len(queries))
    return out

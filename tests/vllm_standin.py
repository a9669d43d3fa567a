"""A stand-in for vLLM 0.33's offline ``LLM``: its output shapes and rules, computed by a Hugging Face model.

What it copies from vLLM (``vllm/outputs.py``, ``vllm/sampling_params.py``, ``vllm/v1/engine/input_processor.py``):
``prompt_logprobs`` is a list over the prompt with ``None`` first and a ``{token id: Logprob}`` dict per position
(the prompt token plus the top ``prompt_logprobs``); a generated position's ``logprobs`` dict holds the chosen
token, the top ``logprobs`` and every ``logprob_token_ids`` id; greedy generation stops on the tokenizer's EOS
and on every ``eos_token_id`` of the generation config and keeps that token in ``token_ids``; ``text`` skips
special tokens; a prompt that is empty or of ``max_model_len`` tokens or more is refused (one token must be
generated).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import torch


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class SamplingParamsWithoutIds:
    """A vLLM whose SamplingParams has no ``logprob_token_ids``."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None


@dataclass
class SamplingParams(SamplingParamsWithoutIds):
    """The fields of vLLM's SamplingParams the engine sets."""

    logprob_token_ids: list[int] | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, Logprob] | None] | None
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class StandInLLM:
    model: Any
    tokenizer: Any
    max_model_len: int
    generation_config: dict[str, Any] = field(default_factory=dict)
    calls: list[tuple[list[int], Any]] = field(default_factory=list)

    def __post_init__(self):
        config = SimpleNamespace(try_get_generation_config=lambda: dict(self.generation_config),
                                 dtype=self.model.dtype)
        self.llm_engine = SimpleNamespace(model_config=config)

    def get_tokenizer(self):
        return self.tokenizer

    def _stops(self) -> set[int]:
        eos = self.generation_config.get("eos_token_id")
        ids = set([eos] if isinstance(eos, int) else eos or [])
        return ids | {self.tokenizer.eos_token_id}

    @torch.no_grad()
    def _logprobs(self, ids: list[int], last: int = 0) -> torch.Tensor:
        """Log-softmax rows of every position (``last`` = 0) or of the last ``last`` ones. One thread: these
        one-row passes are too small to split, and a busy machine made two threads ten times slower."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self.model(torch.tensor([ids]), logits_to_keep=last).logits[0].float().log_softmax(-1)
        finally:
            torch.set_num_threads(threads)

    @staticmethod
    def _entry(lp: torch.Tensor, ids: set[int], top: int) -> dict[int, Logprob]:
        chosen = set(ids) | set(lp.topk(top).indices.tolist() if top > 0 else [])
        return {t: Logprob(float(lp[t])) for t in sorted(chosen)}

    def generate(self, prompts, sampling_params, use_tqdm: bool = True) -> list[RequestOutput]:
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        out = []
        for n, (p, sp) in enumerate(zip(prompts, params, strict=True)):
            ids = list(p["prompt_token_ids"])
            self.calls.append((ids, sp))
            if not ids:
                raise ValueError("The decoder prompt cannot be empty")
            if len(ids) > self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                                 f"length of {self.max_model_len}.")
            if len(ids) == self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) plus the number of requested output "
                                 f"tokens (at least 1) is longer than the maximum model length of "
                                 f"{self.max_model_len}.")
            prompt_lps = None
            if sp.prompt_logprobs is not None:
                lp = self._logprobs(ids)[:-1]  # row j predicts prompt token j + 1
                got = lp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()
                top_v, top_i = (x.tolist() for x in lp.topk(max(1, sp.prompt_logprobs), dim=-1))
                prompt_lps = [None] + [{**{t: Logprob(v) for t, v in zip(ti[:sp.prompt_logprobs], tv, strict=False)},
                                        ids[j + 1]: Logprob(got[j])}
                                       for j, (tv, ti) in enumerate(zip(top_v, top_i, strict=True))]
            gen: list[int] = []
            gen_lps: list[dict[int, Logprob]] = []
            budget = min(sp.max_tokens or self.max_model_len, self.max_model_len - len(ids))
            finish = "length"
            while len(gen) < budget:
                lp = self._logprobs(ids + gen, last=1)[-1]
                nxt = int(lp.argmax())
                wanted = {nxt} | set(getattr(sp, "logprob_token_ids", None) or [])
                if sp.logprobs is not None or getattr(sp, "logprob_token_ids", None):
                    gen_lps.append(self._entry(lp, wanted, sp.logprobs or 0))
                gen.append(nxt)
                if nxt in self._stops():
                    finish = "stop"
                    break
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            want_lps = sp.logprobs is not None or getattr(sp, "logprob_token_ids", None)
            out.append(RequestOutput(str(n), None, ids, prompt_lps, [CompletionOutput(
                0, text, gen, None, gen_lps if want_lps else None, finish)]))
        return out

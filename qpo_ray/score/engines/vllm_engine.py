"""Target engine on vLLM's offline ``LLM`` (GPU). vLLM is imported only when this engine is built.

Token ids are built exactly as the transformers engine builds them, and scored the same way:

- Classification, every verbalizer one token: the text alone, ``max_tokens=1`` and ``logprob_token_ids`` =
  the labels' tokens, so vLLM returns just those logprobs at the first generated position (where the
  transformers engine reads them). No prompt logprobs are asked for, so vLLM may read the text's prefix from
  its prefix cache (a request with ``prompt_logprobs`` or ``prompt_logprob_token_ids`` skips the cache).
- Classification with a longer verbalizer (or a vLLM without ``logprob_token_ids``): text + verbalizer with
  ``prompt_logprobs=1``; the label's NLL is the mean logprob of its tokens. Every label re-reads its text.
- Math: greedy ``generate`` with ``logprobs=0``. vLLM stops on the tokenizer's EOS and on every
  ``eos_token_id`` of the model's generation config, and keeps the stop token in ``token_ids``: it is cut
  off before scoring, as the transformers engine cuts it.

Lengths follow vLLM's rule (``InputProcessor._validate_prompt_len``): a prompt of ``max_model_len`` tokens is
rejected when a token must be generated, so a text + label must leave room for that one token.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.pretrained import resolve_path
from qpo_ray.score.engines.base import (
    Components,
    ScoreRequest,
    TaskBook,
    chat_ids,
    check_label,
    classify,
    encode,
    grade_math,
    mean_nll,
    oversized,
    request_text,
)
from qpo_ray.tasks import Task

log = logging.getLogger(__name__)


def picked_logprobs(entries: list[Any], token_ids: list[int]) -> list[float]:
    """The logprob of each given token from vLLM's per-position ``{token_id: Logprob}`` entries."""
    return [float(entries[j][t].logprob) for j, t in enumerate(token_ids)]


def prompt_fits(n_tokens: int, max_model_len: int) -> bool:
    """vLLM's rule for a decoder prompt that must generate at least one token: not empty, and shorter than
    ``max_model_len`` (one of exactly ``max_model_len`` tokens leaves no room for the generated token)."""
    return 0 < n_tokens < max_model_len


def stop_token_ids(tok: Any, generation_config: dict[str, Any] | None) -> set[int]:
    """The token ids a greedy vLLM generation stops on and keeps in ``token_ids``: the tokenizer's EOS and
    every ``eos_token_id`` of the model's generation config (an int or a list)."""
    ids: set[int] = set()
    eos = (generation_config or {}).get("eos_token_id")
    for e in [eos] if isinstance(eos, int) else eos or []:
        if e is not None:
            ids.add(int(e))
    if getattr(tok, "eos_token_id", None) is not None:
        ids.add(int(tok.eos_token_id))
    return ids


def _generation_config(llm: Any, model_path: str) -> dict[str, Any]:
    """The generation config vLLM applies (``ModelConfig.try_get_generation_config``); read with
    transformers when the engine does not expose it."""
    try:
        return dict(llm.llm_engine.model_config.try_get_generation_config() or {})
    except AttributeError:
        pass
    try:
        from transformers import GenerationConfig

        return GenerationConfig.from_pretrained(model_path).to_dict()
    except Exception:  # no generation_config.json: the tokenizer's EOS is the only stop token
        return {}


def _has_field(params_cls: Any, name: str) -> bool:
    fields = getattr(params_cls, "__struct_fields__", None) or getattr(params_cls, "__dataclass_fields__", {})
    return name in fields


class VLLMEngine:
    """``llm``/``sampling_params``: an already built ``vllm.LLM`` and its ``SamplingParams`` class (tests pass
    a stand-in with vLLM's output shapes)."""

    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task] | None = None, *, llm: Any = None,
                 sampling_params: Any = None, **llm_kwargs: Any):
        if llm is None:
            try:
                from vllm import LLM, SamplingParams
            except ImportError as e:
                raise TargetError(f"target.engine='vllm' needs vLLM on a CUDA machine (pip install "
                                  f"'qpo-ray[vllm]'): {e}") from None
            llm_kwargs.setdefault("dtype", cfg.dtype)
            llm = LLM(model=resolve_path(cfg.model), max_model_len=cfg.max_length, seed=0, **llm_kwargs)
            sampling_params = SamplingParams
        self.cfg = cfg
        self.target = cfg.model
        self.book = TaskBook(tasks)
        self._params = sampling_params
        self.llm = llm
        self.tok = llm.get_tokenizer()
        self.stop_ids = stop_token_ids(self.tok, _generation_config(llm, resolve_path(cfg.model)))
        self.label_ids = _has_field(sampling_params, "logprob_token_ids")
        try:
            self.dtype = str(llm.llm_engine.model_config.dtype).removeprefix("torch.")
        except AttributeError:
            self.dtype = cfg.dtype
        log.info("vLLM target %s: dtype %s, stop tokens %s, label logprobs %s", cfg.model, self.dtype,
                 sorted(self.stop_ids), "by token id" if self.label_ids else "from prompt logprobs")

    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        out: list[Components | None] = [None] * len(requests)
        cls = [i for i, r in enumerate(requests) if self.book.task(r).type == "classification"]
        is_cls = set(cls)
        rest = [i for i in range(len(requests)) if i not in is_cls]
        if cls:
            for i, c in zip(cls, self._classify([requests[i] for i in cls], cls), strict=True):
                out[i] = c
        if rest:
            for i, c in zip(rest, self._math([requests[i] for i in rest], rest), strict=True):
                out[i] = c
        return out  # type: ignore[return-value]

    def _classify(self, reqs: list[ScoreRequest], where: list[int]) -> list[Components]:
        limit = self.cfg.max_length
        ctxs, verbs = [], []
        for n, r in zip(where, reqs, strict=True):
            task = self.book.task(r)
            check_label(task, r)
            ctx = encode(self.tok, request_text(task, r))
            v = [encode(self.tok, task.verbalizers[lab], special=False) for lab in task.labels]
            need = len(ctx) + max(len(x) for x in v)
            if not prompt_fits(need, limit):
                raise oversized(n, need + 1, limit, "text + label + the token vLLM must generate")
            ctxs.append(ctx)
            verbs.append(v)
        prompts: list[dict[str, Any]] = []
        params: list[Any] = []
        plan: list[tuple[str, int, list[int]]] = []  # per request: ("ids", first prompt, label ids) | ("prompt", …)
        for ctx, v in zip(ctxs, verbs, strict=True):
            if self.label_ids and all(len(x) == 1 for x in v):
                ids = sorted({x[0] for x in v})
                plan.append(("ids", len(prompts), [x[0] for x in v]))
                prompts.append({"prompt_token_ids": ctx})
                params.append(self._params(max_tokens=1, temperature=0.0, logprob_token_ids=ids))
            else:
                plan.append(("prompt", len(prompts), []))
                for x in v:
                    prompts.append({"prompt_token_ids": ctx + x})
                    params.append(self._params(max_tokens=1, temperature=0.0, prompt_logprobs=1))
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out = []
        for r, ctx, v, (how, k, ids) in zip(reqs, ctxs, verbs, plan, strict=True):
            if how == "ids":
                first = results[k].outputs[0].logprobs[0]  # {token id: Logprob} at the first generated position
                nll, tokens = [-float(first[t].logprob) for t in ids], len(ctx)
            else:
                # prompt_logprobs[0] is None (nothing predicts the first token); entry j scores prompt token j.
                nll = [mean_nll(picked_logprobs(results[k + j].prompt_logprobs[len(ctx):], x))
                       for j, x in enumerate(v)]
                tokens = sum(len(ctx) + len(x) for x in v)
            out.append(classify(self.book.task(r), r, nll, tokens, calls=1))
        return out

    def _math(self, reqs: list[ScoreRequest], where: list[int]) -> list[Components]:
        new = self.cfg.max_new_tokens
        prompts = []
        for n, r in zip(where, reqs, strict=True):
            ids = chat_ids(self.tok, request_text(self.book.task(r), r))
            if len(ids) + new > self.cfg.max_length:
                raise oversized(n, len(ids) + new, self.cfg.max_length, f"prompt + max_new_tokens={new}")
            prompts.append({"prompt_token_ids": ids})
        params = self._params(max_tokens=new, temperature=0.0, logprobs=0)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        out = []
        for r, p, res in zip(reqs, prompts, results, strict=True):
            gen = res.outputs[0]
            ids = list(gen.token_ids)
            # The reply without its stop token, as the transformers engine scores and decodes it.
            if ids and ids[-1] in self.stop_ids:
                ids.pop()
            lps = picked_logprobs(gen.logprobs[:len(ids)], ids)
            reply = self.tok.decode(ids, skip_special_tokens=True)
            out.append(grade_math(self.book.task(r), r, reply, mean_nll(lps),
                                  len(p["prompt_token_ids"]) + len(ids), calls=1))
        return out

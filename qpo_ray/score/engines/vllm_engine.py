"""Target engine on vLLM's offline ``LLM`` (GPU). vLLM is imported only when this engine is built.

Classification: every text+verbalizer is sent as token ids with ``SamplingParams(max_tokens=1,
prompt_logprobs=1)``; a label's NLL is the mean of the prompt logprobs of its verbalizer tokens (vLLM's
prefix cache shares the text among the labels). Math: greedy ``generate`` with ``logprobs=0`` (the chosen
token's logprob only). Token ids are built exactly as the transformers engine builds them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.models import resolve_path
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


def picked_logprobs(entries: list[Any], token_ids: list[int]) -> list[float]:
    """The logprob of each given token from vLLM's per-position ``{token_id: Logprob}`` entries."""
    return [float(entries[j][t].logprob) for j, t in enumerate(token_ids)]


class VLLMEngine:
    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task] | None = None, **llm_kwargs: Any):
        try:
            from vllm import LLM, SamplingParams
        except ImportError as e:
            raise TargetError(f"target.engine='vllm' needs vLLM on a CUDA machine (pip install 'qpo-ray[vllm]'): "
                              f"{e}") from None
        self.cfg = cfg
        self.target = cfg.model
        self.book = TaskBook(tasks)
        self._params = SamplingParams
        self.llm = LLM(model=resolve_path(cfg.model), max_model_len=cfg.max_length, seed=0, **llm_kwargs)
        self.tok = self.llm.get_tokenizer()

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
        prompts, spans = [], []
        for n, r in zip(where, reqs, strict=True):
            task = self.book.task(r)
            check_label(task, r)
            ctx = encode(self.tok, request_text(task, r))
            for lab in task.labels:
                v = encode(self.tok, task.verbalizers[lab], special=False)
                if len(ctx) + len(v) > self.cfg.max_length:
                    raise oversized(n, len(ctx) + len(v), self.cfg.max_length, "text + label")
                prompts.append({"prompt_token_ids": ctx + v})
                spans.append((len(ctx), v))
        params = self._params(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        nll = [mean_nll(picked_logprobs(res.prompt_logprobs[start:], v))
               for res, (start, v) in zip(results, spans, strict=True)]
        out, k = [], 0
        for r in reqs:
            task = self.book.task(r)
            n_labels = len(task.labels)
            tokens = sum(start + len(v) for start, v in spans[k:k + n_labels])
            out.append(classify(task, r, nll[k:k + n_labels], tokens, calls=1))
            k += n_labels
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
            if ids and ids[-1] == self.tok.eos_token_id:  # the reply without EOS, as the other engines score it
                ids.pop()
            lps = picked_logprobs(gen.logprobs[:len(ids)], ids)
            out.append(grade_math(self.book.task(r), r, gen.text, mean_nll(lps),
                                  len(p["prompt_token_ids"]) + len(gen.token_ids), calls=1))
        return out

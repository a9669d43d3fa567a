"""Target engine on a Hugging Face causal LM, batched, CPU or GPU.

Classification never generates: the label is the verbalizer with the lowest mean token NLL after the
rendered text. When every verbalizer is one token, one forward pass per request gives all labels (read at
the last position); otherwise the text+verbalizer sequences are batched. Math: greedy batched generation,
then the reply tokens are re-scored in one teacher-forced pass for their NLL.

Batches are left-padded with explicit position ids (right for absolute and rotary positions alike) and
sorted by length so little compute goes to padding; only the trailing positions that are needed go
through the LM head (``logits_to_keep``), which keeps memory at rows × kept positions × vocabulary.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterable

import torch
from transformers import DynamicCache

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.pretrained import load_causal_lm, load_tokenizer
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

# target.dtype → the weights' dtype ("auto": float32, the precision the engine was checked in).
TORCH_DTYPES = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# At most this many float32 log-probabilities (rows × kept positions × vocabulary) live at once: ~512 MiB.
LOGIT_BUDGET = 1 << 27


# Share prefixes only when that runs fewer than this fraction of the plain pass's (padded) tokens: the
# split costs a second, smaller forward and a cache copy.
SHARE_IF_BELOW = 0.8
MIN_SHARED_TOKENS = 4


def prefix_groups(seqs: list[list[int]]) -> list[tuple[int, list[int]]]:
    """Sequences grouped by a shared token prefix: ``(prefix length, row indices)``.

    Neighbours in sorted order share the longest prefixes. A group's prefix is its members' common prefix,
    at least ``MIN_SHARED_TOKENS`` long and always leaving each member one token of its own (the position
    whose next-token distribution is read). A sequence sharing nothing is a group of one.
    """
    groups: list[tuple[int, list[int]]] = []
    for i in sorted(range(len(seqs)), key=lambda j: seqs[j]):
        s = seqs[i]
        if groups:
            p, rows = groups[-1]
            first = seqs[rows[0]]
            n = 0
            limit = min(p, len(s) - 1)
            while n < limit and first[n] == s[n]:
                n += 1
            if n >= MIN_SHARED_TOKENS:
                groups[-1] = (n, rows + [i])
                continue
        groups.append((len(s) - 1, [i]))
    return groups


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise TargetError(f"target.device='{spec}' but no CUDA device is available")
    return torch.device(spec)


class TransformersEngine:
    """Scores requests with a local model; also the backend of the OpenAI-compatible test server."""

    def __init__(self, cfg: TargetConfig, tasks: Task | Iterable[Task] | None = None, *, model=None,
                 tokenizer=None):
        self.cfg = cfg
        self.target = cfg.model
        self.book = TaskBook(tasks)
        self.device = resolve_device(cfg.device)
        self.tok = tokenizer if tokenizer is not None else load_tokenizer(None, cfg.model)
        self.model = (model if model is not None else load_causal_lm(cfg.model, dtype=TORCH_DTYPES[cfg.dtype]))
        self.model = self.model.to(self.device).eval()
        self.batch_size = cfg.max_batch_size
        self.pad_id = self.tok.pad_token_id
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = {e for e in ([eos] if isinstance(eos, int) else eos or []) if e is not None}
        if self.tok.eos_token_id is not None:
            self.eos_ids.add(self.tok.eos_token_id)
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self._lock = threading.Lock()  # one model call at a time (the server runs two batchers)
        self._verbalizers: dict[str, list[list[int]]] = {}
        # transformers 5.24 renamed `past_key_values` to `cache` (the old name goes in 5.40); we allow >=5.0.
        forward_params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    # -- tokenisation -------------------------------------------------------------------------------
    def encode(self, text: str, special: bool = True) -> list[int]:
        return encode(self.tok, text, special)

    def chat_ids(self, text: str) -> list[int]:
        return chat_ids(self.tok, text)

    def verbalizer_ids(self, task: Task) -> list[list[int]]:
        if task.name not in self._verbalizers:
            self._verbalizers[task.name] = [self.encode(task.verbalizers[lab], special=False) for lab in task.labels]
        return self._verbalizers[task.name]

    # -- model primitives ---------------------------------------------------------------------------
    def _batches(self, lengths: list[int], keep: list[int]) -> list[list[int]]:
        """Indices grouped longest-first into batches bounded by batch_size and the logit budget."""
        order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
        out: list[list[int]] = []
        cur: list[int] = []
        cur_keep = 0
        for i in order:
            k = max(cur_keep, keep[i])
            if cur and (len(cur) == self.batch_size or (len(cur) + 1) * k * self.vocab > LOGIT_BUDGET):
                out.append(cur)
                cur, k = [], keep[i]
            cur.append(i)
            cur_keep = k
        if cur:
            out.append(cur)
        return out

    def _padded(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _logprobs(self, seqs: list[list[int]], keep: int) -> torch.Tensor:
        """Log-softmax over the vocabulary at the last ``keep`` positions: [rows, keep, vocab]."""
        ids, mask = self._padded(seqs)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._lock, torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep,
                             use_cache=False)
        return out.logits.float().log_softmax(-1)

    def token_logprobs(self, seqs: list[list[int]], tails: list[int]) -> list[list[float]]:
        """For each sequence, log p(token | everything before it) of its last ``tails[i]`` tokens."""
        res: list[list[float]] = [[] for _ in seqs]
        todo = [i for i, n in enumerate(tails) if n > 0]
        if any(tails[i] >= len(seqs[i]) for i in todo):
            raise ValueError("a tail must leave at least one token of context")
        for batch in self._batches([len(seqs[i]) for i in todo], [tails[i] + 1 for i in todo]):
            rows = [todo[j] for j in batch]
            k = max(tails[i] for i in rows)
            lp = self._logprobs([seqs[i] for i in rows], k + 1)  # position t predicts token t + 1
            ids, _ = self._padded([seqs[i] for i in rows])
            got = lp[:, :-1, :].gather(-1, ids[:, -k:, None]).squeeze(-1).cpu()
            for r, i in enumerate(rows):
                res[i] = got[r, k - tails[i]:].tolist()
        return res

    def _last_logprobs(self, seqs: list[list[int]]) -> torch.Tensor:
        """Log-softmax at the last position of each sequence: [rows, vocab].

        Requests that share a prompt share a token prefix (instruction, few-shot demonstrations). When
        that saves enough tokens, the shared prefixes run once (one batched pass that returns their KV
        cache), the cache rows are copied to their requests, and only the differing tails run again.
        """
        groups = prefix_groups(seqs)
        longest_prefix = max(p for p, _ in groups)
        longest_tail = max(len(seqs[i]) - p for p, rows in groups for i in rows)
        plain_tokens = len(seqs) * max(len(s) for s in seqs)
        shared_tokens = len(groups) * longest_prefix + len(seqs) * longest_tail
        # A one-token sequence has no prefix to share: its prefix row would be all padding.
        if not self.cfg.share_prefix or shared_tokens > SHARE_IF_BELOW * plain_tokens or min(p for p, _ in groups) == 0:
            return self._logprobs(seqs, 1)[:, -1, :]
        owner = [0] * len(seqs)
        tails: list[list[int]] = [[] for _ in seqs]
        for g, (p, rows) in enumerate(groups):
            for i in rows:
                owner[i], tails[i] = g, seqs[i][p:]
        pre_ids, pre_mask = self._padded([seqs[rows[0]][:p] for p, rows in groups])
        tail_ids, tail_mask = self._padded(tails)
        idx = torch.tensor(owner, dtype=torch.long, device=self.device)
        # Tails continue the positions of their own prefix; pads (left of the prefix and between prefix and
        # tail) are masked, so every row sees exactly the tokens of its own unshared sequence.
        tail_pos = (tail_mask.cumsum(-1) - 1).clamp(min=0) + pre_mask.sum(-1)[idx][:, None]
        cache = DynamicCache(config=self.model.config)  # filled in place by the prefix pass
        with self._lock, torch.inference_mode():
            self.model(input_ids=pre_ids, attention_mask=pre_mask, position_ids=(pre_mask.cumsum(-1) - 1).clamp(min=0),
                       use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            cache.reorder_cache(idx)
            out = self.model(input_ids=tail_ids, attention_mask=torch.cat([pre_mask[idx], tail_mask], dim=1),
                             position_ids=tail_pos, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
        return out.logits[:, -1, :].float().log_softmax(-1)

    def next_logprobs(self, seqs: list[list[int]], candidates: list[int]) -> list[list[float]]:
        """log p(candidate | sequence) for each candidate token after each sequence (one pass each)."""
        res: list[list[float]] = [[] for _ in seqs]
        cand = torch.tensor(candidates, dtype=torch.long, device=self.device)
        for batch in self._batches([len(s) for s in seqs], [1] * len(seqs)):
            lp = self._last_logprobs([seqs[i] for i in batch])
            got = lp.index_select(-1, cand).cpu()
            for r, i in enumerate(batch):
                res[i] = got[r].tolist()
        return res

    def generate(self, seqs: list[list[int]], max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
        """Greedy continuations (cut before the first EOS) and whether each stopped at EOS."""
        from transformers import GenerationConfig

        gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                   pad_token_id=self.pad_id, eos_token_id=sorted(self.eos_ids) or None)
        outs: list[list[int]] = [[] for _ in seqs]
        stopped = [False] * len(seqs)
        for batch in self._batches([len(s) for s in seqs], [1] * len(seqs)):
            ids, mask = self._padded([seqs[i] for i in batch])
            with self._lock, torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
            for r, i in enumerate(batch):
                toks = out[r, ids.shape[1]:].tolist()
                cut = next((j for j, t in enumerate(toks) if t in self.eos_ids), None)
                outs[i], stopped[i] = (toks, False) if cut is None else (toks[:cut], True)
        return outs, stopped

    # -- scoring ------------------------------------------------------------------------------------
    def score(self, requests: list[ScoreRequest]) -> list[Components]:
        results: list[Components | None] = [None] * len(requests)
        cls = [i for i, r in enumerate(requests) if self.book.task(r).type == "classification"]
        is_cls = set(cls)
        math = [i for i in range(len(requests)) if i not in is_cls]
        for i, comp in zip(cls, self._classify([requests[i] for i in cls], cls), strict=True):
            results[i] = comp
        for i, comp in zip(math, self._math([requests[i] for i in math], math), strict=True):
            results[i] = comp
        return results  # type: ignore[return-value]

    def _classify(self, reqs: list[ScoreRequest], where: list[int]) -> list[Components]:
        if not reqs:
            return []
        ctx, verbs = [], []
        for n, r in zip(where, reqs, strict=True):
            task = self.book.task(r)
            check_label(task, r)
            ids, v = self.encode(request_text(task, r)), self.verbalizer_ids(task)
            need = len(ids) + max(len(x) for x in v)
            if need > self.cfg.max_length:
                raise oversized(n, need, self.cfg.max_length, "text + label")
            ctx.append(ids)
            verbs.append(v)
        out: list[Components] = []
        fast = [i for i, v in enumerate(verbs) if all(len(x) == 1 for x in v)]
        nll: dict[int, list[float]] = {}
        tokens: dict[int, int] = {}
        # Fast path, per task: every label read from one forward pass over the request's text.
        for name in {reqs[i].task for i in fast}:
            rows = [i for i in fast if reqs[i].task == name]
            cands = [x[0] for x in verbs[rows[0]]]
            for i, lp in zip(rows, self.next_logprobs([ctx[i] for i in rows], cands), strict=True):
                nll[i], tokens[i] = [-x for x in lp], len(ctx[i])
        slow = [i for i in range(len(reqs)) if i not in nll]
        seqs = [(i, ctx[i] + v) for i in slow for v in verbs[i]]
        tails = [len(v) for i in slow for v in verbs[i]]
        lps = self.token_logprobs([s for _, s in seqs], tails)
        for (i, s), lp in zip(seqs, lps, strict=True):
            nll.setdefault(i, []).append(mean_nll(lp))
            tokens[i] = tokens.get(i, 0) + len(s)
        for i, r in enumerate(reqs):
            out.append(classify(self.book.task(r), r, nll[i], tokens[i], calls=1))
        return out

    def _math(self, reqs: list[ScoreRequest], where: list[int]) -> list[Components]:
        if not reqs:
            return []
        new = self.cfg.max_new_tokens
        ids = []
        for n, r in zip(where, reqs, strict=True):
            x = self.chat_ids(request_text(self.book.task(r), r))
            if len(x) + new > self.cfg.max_length:
                raise oversized(n, len(x) + new, self.cfg.max_length, f"prompt + max_new_tokens={new}")
            ids.append(x)
        gens, _ = self.generate(ids, new)
        lps = self.token_logprobs([x + g for x, g in zip(ids, gens, strict=True)], [len(g) for g in gens])
        out = []
        for r, x, g, lp in zip(reqs, ids, gens, lps, strict=True):
            reply = self.tok.decode(g, skip_special_tokens=True)
            out.append(grade_math(self.book.task(r), r, reply, mean_nll(lp), len(x) + len(g), calls=1))
        return out

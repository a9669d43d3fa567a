"""Prompt generation with the policy: batched KV-cache decoding, conditioned on a target reward.

Unlike the reference, the attention mask and position ids stay correct at every step (query padding is
never visible) and each row's prompt is cut at its first EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from qpo_ray.config import TARGET_REWARD
from qpo_ray.data.prompts import prompt_identity
from qpo_ray.ids import content_id
from qpo_ray.policy.model import QPOPolicy
from qpo_ray.policy.tokenize import encode_prompts, encode_queries


def candidates(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k, then top-p (nucleus): ``(logits, token_ids)`` of each row's candidates, most likely first.

    Dropped candidates get -inf. With ``top_k`` set, only the k best of the vocabulary are sorted and sampled
    from: on a 49k-token vocabulary a full sort per step cost more than the model's forward at batch 32.
    ``top_k=0``/``top_p=1`` = off."""
    if top_k > 0:
        vals, ids = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1)  # sorted, descending
    elif top_p < 1.0:
        vals, ids = torch.sort(logits, dim=-1, descending=True)
    else:
        return logits, torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
    if top_p < 1.0:
        probs = torch.softmax(vals, dim=-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop = (probs.cumsum(-1) - probs) >= top_p
        drop[..., 0] = False
        vals = vals.masked_fill(drop, float("-inf"))
    return vals, ids


Generators = torch.Generator | Sequence[torch.Generator] | None


def sample_next(logits: torch.Tensor, *, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                generator: Generators = None) -> torch.Tensor:
    """One sampled token id per row of ``logits [B, V]``, from the temperature-scaled top-k/top-p candidates.

    ``generator``: one for the batch, or one per row (a row's draws then do not depend on its batch)."""
    vals, ids = candidates(logits / temperature, top_k, top_p)
    probs = torch.softmax(vals, dim=-1)
    if isinstance(generator, Sequence):
        pick = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generator)])
    else:
        pick = torch.multinomial(probs, 1, generator=generator)
    return ids.gather(-1, pick).squeeze(-1)


def row_generators(seed: int, queries: Sequence[str], device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per row, seeded from (``seed``, the query, how many times it came before in ``queries``):
    a query's samples are the same from every entry point, whatever batch it shares."""
    seen: dict[str, int] = {}
    out = []
    for q in queries:
        k = seen.get(q, 0)
        seen[q] = k + 1
        out.append(torch.Generator(device=device).manual_seed(int(content_id("sample", str(seed), q, str(k)), 16)))
    return out


@torch.no_grad()
def generate_ids(policy: QPOPolicy, query_ids: torch.Tensor, query_mask: torch.Tensor, *,
                 target_reward: float = TARGET_REWARD, greedy: bool = True, top_k: int = 0, top_p: float = 1.0,
                 temperature: float = 1.0, max_new_tokens: int = 40,
                 generator: Generators = None) -> torch.Tensor:
    """Token ids ``[B, max_new_tokens]``: each row up to and including its first EOS, pad after it.

    Stops early once every row has ended. The caller sets eval mode."""
    tok = policy.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    B, dev = query_ids.shape[0], query_ids.device
    reward = torch.full((B,), float(target_reward), device=dev)
    h, cache, mask, pos = policy.start(query_ids, query_mask, reward)
    out = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    for t in range(max_new_tokens):
        logits = policy.prompt_logits(h).float()
        if greedy:
            nxt = logits.argmax(-1)
        else:
            nxt = sample_next(logits, top_k=top_k, top_p=top_p, temperature=temperature, generator=generator)
        nxt = policy.head_token_ids(nxt)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out[:, t] = nxt
        done |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        # Ended rows keep stepping (the batch moves together) but their outputs are discarded.
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        h, cache = policy.step(nxt, cache, mask, pos)
        pos = pos + 1
    return out


@torch.no_grad()
def beam_ids(policy: QPOPolicy, query_ids: torch.Tensor, query_mask: torch.Tensor, *, num_beams: int,
             target_reward: float = TARGET_REWARD, max_new_tokens: int = 40, all_beams: bool = False,
             banned: Callable[[tuple[int, ...]], bool] | None = None) -> torch.Tensor:
    """The most likely prompt per row under ``p(prompt | query, r)`` by beam search: ``[B, max_new_tokens]``
    token ids like ``generate_ids``; with ``all_beams``, every beam, most likely first: ``[B, num_beams, T]``.
    ``banned(token_ids)``: True where a beam may not end (it must go on past those tokens): the search then
    finds the most likely prompts other than the banned ones.

    Greedy decoding commits to the most likely next token, so prompts that share an opening ("Let's think…",
    "Let's break…") pool their probability on it and win over a likelier prompt that starts alone. A beam
    keeps ``num_beams`` prefixes and ranks whole prompts (EOS included) by their summed log-probability.
    An ended beam stays in the set with its final score; live beams only lose score, so the best beam once
    every beam has ended is the best prompt found."""
    tok = policy.tokenizer
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    B, W, dev = query_ids.shape[0], num_beams, query_ids.device
    reward = torch.full((B,), float(target_reward), device=dev)
    h, cache, mask, pos = policy.start(query_ids, query_mask, reward)
    rows = torch.arange(B, device=dev).repeat_interleave(W)
    cache.reorder_cache(rows)
    h, mask, pos = h[rows], mask[rows], pos[rows]
    score = torch.full((B, W), float("-inf"), device=dev)
    score[:, 0] = 0.0  # the beams start identical: only the first may expand
    out = torch.full((B * W, max_new_tokens), pad, dtype=torch.long, device=dev)
    done = torch.zeros(B * W, dtype=torch.bool, device=dev)
    eos_pos = int(policy.head_targets(torch.tensor([eos], device=dev), torch.ones(1, device=dev))[0])
    prefix: list[tuple[int, ...]] = [()] * (B * W)
    for t in range(max_new_tokens):
        logp = torch.log_softmax(policy.prompt_logits(h).float(), dim=-1)
        if banned:
            ends = [i for i, p in enumerate(prefix) if banned(p)]
            if ends:
                logp[ends, eos_pos] = float("-inf")
        # An ended beam has one continuation (its own end), at no cost.
        logp[done] = float("-inf")
        logp[done, eos_pos] = 0.0
        V = logp.shape[-1]
        total = (score.reshape(-1, 1) + logp).reshape(B, W * V)
        score, flat = total.topk(W, dim=-1)
        src = (rows.reshape(B, W) * W + torch.div(flat, V, rounding_mode="floor")).reshape(-1)
        nxt = policy.head_token_ids(flat % V).reshape(-1)
        out, done = out[src], done[src]
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out[:, t] = nxt
        done = done | (nxt == eos)
        if banned:
            prefix = [prefix[j] + (n,) for j, n in zip(src.tolist(), nxt.tolist(), strict=True)]
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        cache.reorder_cache(src)
        mask = torch.cat([mask[src], torch.ones_like(mask[:, :1])], dim=1)
        h, cache = policy.step(nxt, cache, mask, pos[src])
        pos = pos[src] + 1
    if all_beams:
        order = score.argsort(-1, descending=True)
        return out.reshape(B, W, -1).gather(1, order[..., None].expand(-1, -1, out.shape[-1]))
    best = score.argmax(-1)
    return out.reshape(B, W, -1)[torch.arange(B, device=dev), best]


@torch.no_grad()
def likely_prompts(policy: QPOPolicy, queries: Sequence[str], num_beams: int, *, target_reward: float = TARGET_REWARD,
                   exclude: Sequence[str] = (), batch_size: int = 32) -> list[list[str]]:
    """Per query, the ``num_beams`` most likely prompts that beam search finds other than those in ``exclude``
    (most likely first, repeats after decoding dropped). A beam may not end as an excluded prompt: it goes on
    past it, so a policy sure of its training prompts offers its likeliest *other* prompts, such as a known
    prompt followed by what the training prompts say after a sentence like it."""
    pcfg, dev = policy.pcfg, policy.device
    banned = None
    if exclude:
        # By text identity, not token ids: other token paths (" Answer" for "Answer") decode to the same prompt.
        known = {prompt_identity(p) for p in exclude}
        ended: dict[tuple[int, ...], bool] = {}

        def banned(ids: tuple[int, ...]) -> bool:
            if ids not in ended:
                ended[ids] = prompt_identity(_text(policy, list(ids))) in known
            return ended[ids]

    was_training = policy.training
    policy.eval()
    try:
        out: list[list[str]] = []
        for i in range(0, len(queries), batch_size):
            q_ids, q_mask = encode_queries(policy.tokenizer, list(queries[i:i + batch_size]), pcfg.max_query_tokens)
            ids = beam_ids(policy, torch.as_tensor(q_ids, device=dev), torch.as_tensor(q_mask, device=dev),
                           num_beams=num_beams, target_reward=target_reward,
                           max_new_tokens=pcfg.max_prompt_tokens, all_beams=True, banned=banned)
            texts = [dict.fromkeys(_text(policy, b) for b in row) for row in ids.tolist()]
            # A beam cut at max_new_tokens never ended, so nothing stopped it there: drop excluded ones.
            out += [[t for t in row if banned is None or prompt_identity(t) not in known] for row in texts]
        return out
    finally:
        policy.train(was_training)


def _text(policy: QPOPolicy, ids: list[int]) -> str:
    eos = policy.tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: ids.index(eos)]
    return policy.tokenizer.decode(ids, skip_special_tokens=True).strip()


def generate_prompts(policy: QPOPolicy, queries: Sequence[str], *, target_reward: float = TARGET_REWARD,
                     greedy: bool = True, top_k: int = 0, top_p: float = 1.0, temperature: float = 1.0,
                     max_new_tokens: int | None = None, batch_size: int = 32,
                     seed: int | None = None, num_beams: int = 1) -> list[str]:
    """One prompt per query, conditioned on ``r = target_reward``: the most likely prompt (``greedy``; by beam
    search when ``num_beams`` > 1), or sampled with top-k then top-p.

    Sampling is deterministic for a given ``seed``: each query's draws come from its own generator
    (:func:`row_generators`), so they do not depend on the batch size or on the other queries."""
    pcfg = policy.pcfg
    n_new = max_new_tokens or pcfg.max_prompt_tokens
    dev = policy.device
    gens = row_generators(seed, queries, dev) if seed is not None and not greedy else None
    was_training = policy.training
    policy.eval()
    try:
        texts: list[str] = []
        for i in range(0, len(queries), batch_size):
            q_ids, q_mask = encode_queries(policy.tokenizer, list(queries[i:i + batch_size]), pcfg.max_query_tokens)
            q_ids, q_mask = torch.as_tensor(q_ids, device=dev), torch.as_tensor(q_mask, device=dev)
            if greedy and num_beams > 1:
                ids = beam_ids(policy, q_ids, q_mask, num_beams=num_beams, target_reward=target_reward,
                               max_new_tokens=n_new)
            else:
                ids = generate_ids(policy, q_ids, q_mask, target_reward=target_reward, greedy=greedy, top_k=top_k,
                                   top_p=top_p, temperature=temperature, max_new_tokens=n_new,
                                   generator=gens[i:i + batch_size] if gens is not None else None)
            texts += [_text(policy, row) for row in ids.tolist()]
        return texts
    finally:
        policy.train(was_training)


@torch.no_grad()
def reward_estimates(policy: QPOPolicy, queries: Sequence[str], prompts: Sequence[str], *,
                     batch_size: int = 256) -> list[float]:
    """``r̂(q, p)`` of each (query, prompt) pair from the "last_prompt" reward head (normalised reward scale)."""
    if len(queries) != len(prompts):
        raise ValueError(f"{len(queries)} queries but {len(prompts)} prompts")
    pcfg, tok, dev = policy.pcfg, policy.tokenizer, policy.device
    was_training = policy.training
    policy.eval()
    out: list[float] = []
    try:
        for i in range(0, len(queries), batch_size):
            q_ids, q_mask = encode_queries(tok, list(queries[i:i + batch_size]), pcfg.max_query_tokens)
            p_ids, p_mask = encode_prompts(tok, list(prompts[i:i + batch_size]), pcfg.max_prompt_tokens)
            est = policy.predict_reward(*(torch.as_tensor(a, device=dev) for a in (q_ids, q_mask, p_ids, p_mask)))
            out += est.float().tolist()
    finally:
        policy.train(was_training)
    return out


def candidate_scores(policy: QPOPolicy, queries: Sequence[str], candidates: Sequence[Sequence[str]], *,
                     batch_size: int = 256) -> list[list[float]]:
    """``r̂(q, p)`` of every candidate prompt of every query, in the candidates' order."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries but {len(candidates)} candidate lists")
    empty = [i for i, c in enumerate(candidates) if not c]
    if empty:
        raise ValueError(f"query {empty[0]} has no candidate prompt to rank")
    pairs = [(q, c) for q, cs in zip(queries, candidates, strict=True) for c in cs]
    scores = iter(reward_estimates(policy, [q for q, _ in pairs], [c for _, c in pairs], batch_size=batch_size))
    return [[next(scores) for _ in cs] for cs in candidates]


def pick(candidates: Sequence[str], scores: Sequence[float], default: str | None = None, margin: float = 0.0) -> str:
    """The candidate with the highest score (ties: the earlier one); with a ``default`` among the candidates,
    that one unless the best beats it by more than ``margin`` (an abstaining rerank: r̂ must be sure)."""
    best = max(range(len(candidates)), key=scores.__getitem__)
    if default is None or default not in candidates:
        return candidates[best]
    d = candidates.index(default)
    return candidates[best] if scores[best] - scores[d] > margin else default


def rerank(policy: QPOPolicy, queries: Sequence[str], candidates: Sequence[Sequence[str]], *,
           default: Sequence[str | None] | None = None, margin: float = 0.0, batch_size: int = 256) -> list[str]:
    """Per query, the candidate prompt with the highest ``r̂(q, p)`` (ties: the earlier candidate); with
    ``default`` (one prompt or None per query), :func:`pick`'s abstaining choice with ``margin``."""
    if default is not None and len(default) != len(queries):
        raise ValueError(f"{len(queries)} queries but {len(default)} default prompts")
    scores = candidate_scores(policy, queries, candidates, batch_size=batch_size)
    defaults = default if default is not None else [None] * len(queries)
    return [pick(cs, s, d, margin) for cs, s, d in zip(candidates, scores, defaults, strict=True)]


def best_of_n(policy: QPOPolicy, queries: Sequence[str], n: int, *, target_reward: float = TARGET_REWARD, top_k: int,
              top_p: float, temperature: float, max_new_tokens: int | None = None,
              seed: int | None = None, batch_size: int = 64) -> list[str]:
    """Per query, ``n`` prompts sampled at ``r = target_reward`` (top-k then top-p), the one ``r̂`` rates highest.
    The sampling settings are the config's ``collect.*`` ones (``InferenceSettings``): no defaults here."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    samples = generate_prompts(policy, [q for q in queries for _ in range(n)], target_reward=target_reward,
                               greedy=False, top_k=top_k, top_p=top_p, temperature=temperature,
                               max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    cands = [list(dict.fromkeys(samples[i * n:(i + 1) * n])) for i in range(len(queries))]
    return rerank(policy, queries, cands)

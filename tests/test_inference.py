"""The one inference function (``policy_prompts``) and what a policy folder records about its evaluation
(``inference.json``, ``load_served``): tiny random policies, no Ray."""

from __future__ import annotations

import json
import logging
from dataclasses import replace

import pytest

from qpo_ray import cli
from qpo_ray.config import load_config
from qpo_ray.errors import ConfigError
from qpo_ray.policy import QPOPolicy
from qpo_ray.policy.generate import best_of_n, generate_prompts, rerank
from qpo_ray.policy.inference import InferenceSettings, policy_prompts
from qpo_ray.policy.served import INFERENCE_JSON, load_served, read_inference, write_inference

QUERIES = ["I finally got the job I wanted!", "My dog died last night.", "Someone keyed my car again."]
CANDS = ("Be brief.", "Answer in one word.", "")


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny", ["policy.reward_head=last_prompt", "eval.best_of_n=3", "seed=7"])


@pytest.fixture(scope="module")
def policy(cfg):
    return QPOPolicy.from_config(cfg.policy, seed=0).eval()


def test_policy_prompts_is_each_method(policy, cfg):
    s = InferenceSettings.from_config(cfg, candidates=CANDS, default_prompt="Be brief.", margin=0.05)
    assert s.seed == 7 and s.method == "greedy" and s.top_k == cfg.collect.top_k
    assert policy_prompts(policy, QUERIES, s) == generate_prompts(policy, QUERIES)
    assert policy_prompts(policy, QUERIES, replace(s, num_beams=3, target_reward=40.0)) == generate_prompts(
        policy, QUERIES, num_beams=3, target_reward=40.0)
    bon = replace(s, method="best_of_n")
    assert policy_prompts(policy, QUERIES, bon) == best_of_n(policy, QUERIES, 3, top_k=s.top_k, top_p=s.top_p,
                                                             temperature=s.temperature, seed=7)
    rr = replace(s, method="rerank")
    assert policy_prompts(policy, QUERIES, rr) == rerank(policy, QUERIES, [CANDS] * 3, default=["Be brief."] * 3,
                                                         margin=0.05)
    per_query = [["Be brief.", "x"], ["y"], list(CANDS)]
    assert policy_prompts(policy, QUERIES, rr, candidates=per_query) == rerank(
        policy, QUERIES, per_query, default=["Be brief."] * 3, margin=0.05)
    with pytest.raises(ValueError, match="candidate prompts"):
        policy_prompts(policy, QUERIES, replace(rr, candidates=()))


def test_best_of_n_prompt_of_a_query_does_not_depend_on_its_batch(policy, cfg):
    """A query's sampled prompt is a function of (policy, query, settings): alone, in a batch, or repeated."""
    s = InferenceSettings.from_config(cfg)
    bon = replace(s, method="best_of_n")
    alone = [policy_prompts(policy, [q], bon)[0] for q in QUERIES]
    assert policy_prompts(policy, QUERIES, bon) == alone
    assert policy_prompts(policy, [QUERIES[1], QUERIES[0], QUERIES[1]], bon) == [alone[1], alone[0], alone[1]]
    assert policy_prompts(policy, QUERIES, bon, batch_size=2) == alone


def _saved(tmp_path, name: str = "run", train_prompts: list[str] | None = None):
    """A run directory holding config.yaml and a saved tiny policy at policy/loop-1."""
    run = tmp_path / name
    cfg = load_config("tiny", [f"run_dir={run}", "eval.best_of_n=3", "seed=5", "serve.max_batch_size=4"])
    run.mkdir()
    from qpo_ray.config import dump_config

    dump_config(cfg, run / "config.yaml")
    pdir = run / "policy" / "loop-1"
    QPOPolicy.from_config(cfg.policy).save(pdir)
    if train_prompts is not None:
        (pdir / "prompts.json").write_text(json.dumps(train_prompts))
    return cfg, run, pdir


def test_inference_json_is_served_and_set_overrides_win(tmp_path):
    cfg, run, pdir = _saved(tmp_path)
    ecfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"method": "rerank", "target_reward": 90.0})})
    settings = InferenceSettings.from_config(ecfg, candidates=CANDS, default_prompt="Answer in one word.",
                                             margin=0.25)
    write_inference(pdir, ecfg, settings, evaluation="replay evaluation", run_config=run / "config.yaml",
                    task="toy", sources={"margin": "fitted on 9 held-out queries"})
    rec = read_inference(pdir)
    assert rec is not None and rec.settings == settings and rec.task == "toy"
    assert rec.run_config == "../../config.yaml"

    served = load_served(pdir)  # no flags: the evaluation's settings on the run's config
    assert served.settings == settings and served.missing == ()
    assert served.cfg.task.name == "toy" and served.cfg.serve.max_batch_size == 4  # record, then run config
    assert served.sources["margin"] == "fitted on 9 held-out queries"
    assert served.sources["method"] == "eval.method of the replay evaluation"
    assert served.sources["default_prompt"] == "the replay evaluation"  # no source given: which evaluation
    info = served.describe()
    assert info["method"] == "rerank" and info["default_prompt"] == "Answer in one word." and info["margin"] == 0.25
    assert info["candidates"] == 3 and info["sources"]["margin"] == "fitted on 9 held-out queries"

    over = load_served(pdir, overrides=["eval.rerank_margin=0.5", "eval.method=greedy", "task.name=emotion"])
    assert over.settings.margin == 0.5 and over.settings.method == "greedy" and over.cfg.task.name == "emotion"
    assert over.sources["margin"] == "--set eval.rerank_margin" and over.sources["method"] == "--set eval.method"
    assert over.settings.default_prompt == "Answer in one word." and over.settings.target_reward == 90.0
    assert load_served(pdir, overrides=["eval.rerank_margin=fit"]).settings.margin == 0.25  # the recorded fit


def test_generate_reads_inference_json(tmp_path, capsys):
    cfg, run, pdir = _saved(tmp_path)
    bon = InferenceSettings.from_config(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"method": "best_of_n"})}))
    write_inference(pdir, cfg, bon, evaluation="live evaluation of loop 1", run_config=run / "config.yaml",
                    sources={})
    (tmp_path / "q.txt").write_text("\n".join(QUERIES + QUERIES[:1]))
    out = tmp_path / "p.jsonl"
    assert cli.main(["generate", "--policy", str(pdir), "--in", str(tmp_path / "q.txt"), "--out", str(out)]) == 0
    assert "method best_of_n" in capsys.readouterr().err
    got = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
    policy = QPOPolicy.load(pdir)
    assert bon.seed == 5 and got == policy_prompts(policy, QUERIES + QUERIES[:1], bon)
    assert got[-1] == got[0]
    # --set wins over the record.
    assert cli.main(["generate", "--policy", str(pdir), "--in", str(tmp_path / "q.txt"), "--out", str(out),
                     "--set", "eval.method=greedy", "--set", "eval.target_reward=30"]) == 0
    got = [json.loads(x)["prompt"] for x in out.read_text().splitlines()]
    assert got == generate_prompts(policy, QUERIES + QUERIES[:1], target_reward=30.0)


def test_a_folder_without_inference_json_serves_the_config_and_says_what_is_missing(tmp_path, caplog):
    cfg, _, pdir = _saved(tmp_path, train_prompts=["Be brief.", "Say it."])
    with caplog.at_level(logging.WARNING, logger="qpo_ray"):
        served = load_served(pdir, overrides=["eval.method=rerank"])
    assert served.missing == (INFERENCE_JSON,)
    assert served.settings.candidates == ("Be brief.", "Say it.") and served.settings.default_prompt is None
    assert served.cfg.serve.max_batch_size == 4 and served.settings.seed == 5  # the run's own config
    warning = caplog.text
    assert INFERENCE_JSON in warning and "default prompt" in warning and "margin" in warning
    assert "prompts.json" in served.sources["candidates"]
    (pdir / "prompts.json").unlink()
    with pytest.raises(ConfigError, match="neither inference.json nor prompts.json"):
        load_served(pdir, overrides=["eval.method=rerank"])
    (pdir / INFERENCE_JSON).write_text('{"settings": {"method": "sideways"}}')
    with pytest.raises(ConfigError, match="not a valid inference record"):
        load_served(pdir)


def test_a_record_without_a_setting_is_refused_not_filled_in(tmp_path):
    cfg, run, pdir = _saved(tmp_path)
    settings = InferenceSettings.from_config(cfg.model_copy(update={"eval": cfg.eval.model_copy(
        update={"target_reward": 30.0})}))
    write_inference(pdir, cfg, settings, evaluation="live evaluation of loop 1", run_config=run / "config.yaml",
                    sources={})
    doc = json.loads((pdir / INFERENCE_JSON).read_text())
    del doc["settings"]["target_reward"]  # a damaged record: serving it at some default reward would be a guess
    (pdir / INFERENCE_JSON).write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match="not a valid inference record.*target_reward"):
        load_served(pdir)


def test_presets_sit_between_the_file_and_the_overrides():
    cfg = load_config("tiny", ["eval.num_beams=4"], presets={"eval.num_beams": 2, "task.name": "math_demo"})
    assert cfg.eval.num_beams == 4 and cfg.task.name == "math_demo"

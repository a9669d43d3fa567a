"""Typed config: profiles load, overrides apply and are typed, unknown keys are named."""

from __future__ import annotations

import pytest

from qpo_ray.config import PROFILES, dump_config, load_config
from qpo_ray.errors import ConfigError


@pytest.mark.parametrize("name", PROFILES)
def test_profiles_load(name):
    cfg = load_config(name)
    assert cfg.train.batch_size % (cfg.train.micro_batch_size * cfg.train.num_workers) == 0


def test_paper_profile_has_reference_hyperparameters():
    c = load_config("paper")
    assert (c.train.scratch.lr, c.train.scratch.epochs) == (1e-3, 100)
    assert (c.train.finetune.lr, c.train.finetune.epochs) == (1e-4, 20)
    assert (c.train.lr_step_epochs, c.train.lr_gamma, c.train.batch_size, c.train.grad_clip) == (20, 0.65, 128, 0.25)
    assert (c.train.lambda_high, c.train.lambda_low, c.train.mse_switch) == (0.5, 0.1, 10.0)
    assert (c.collect.num_queries, c.collect.batch_size, c.collect.top_k, c.collect.top_p) == (1000, 100, 2, 0.9)
    assert (c.policy.max_query_tokens, c.policy.max_prompt_tokens) == (40, 40)
    assert c.policy.keep_layers is None and c.policy.freeze_layers == 0


def test_overrides_are_typed():
    c = load_config("tiny", ["train.scratch.lr=5e-4", "loops=3", "train.use_gpu=true", "eval.max_test_queries=null"])
    assert c.train.scratch.lr == 5e-4 and c.loops == 3 and c.train.use_gpu is True
    assert c.eval.max_test_queries is None


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown key 'train.lrr'"),
        ("trian.lr=1", "did you mean 'train'"),
        ("train.micro_batch_sze=4", "did you mean 'train.micro_batch_size'"),
        ("train.batch_size=abc", "'train.batch_size'"),
        ("train.zero_stage=5", "'train.zero_stage'"),
        ("train.batch_size=12", "must be a multiple"),
        ("nodot", "must look like section.key=value"),
        # every float of every section is finite; sizes have upper bounds
        ("train.scratch.lr=inf", "'train.scratch.lr': Input should be a finite number"),
        ("train.grad_clip=.nan", "'train.grad_clip': Input should be a finite number"),
        ("task.threshold=-.inf", "'task.threshold': Input should be a finite number"),
        ("policy.max_query_tokens=100000", "'policy.max_query_tokens': Input should be less than or equal to 4096"),
        ("train.micro_batch_size=2000000", "'train.micro_batch_size': Input should be less than or equal"),
        ("eval.target_reward=101", "'eval.target_reward': Input should be less than or equal to 100"),
        # a knob that another key holds: the error names that key
        ("train.seed=1", "unknown key 'train.seed' (the knob is 'seed')"),
        ("collect.target_reward=90", "unknown key 'collect.target_reward' (the knob is 'eval.target_reward')"),
        ("target.request_retries=2", "unknown key 'target.request_retries' (the knob is 'target.retries')"),
        ("resource_wait_s=-1", "'resource_wait_s': Input should be greater than or equal to 0"),
        ("eval.rerank_margin=-0.5", "eval.rerank_margin=-0.5: must be 'fit' or within"),
        ("eval.rerank_margin=fitted", "Input should be 'fit'"),
        ("eval.val_fraction=0.6", "'eval.val_fraction'"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", [override])


def test_yaml_with_base_profile_and_roundtrip(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("profile: tiny\nloops: 1\ntrain:\n  zero_stage: 2\n")
    c = load_config(p)
    assert c.loops == 1 and c.train.zero_stage == 2 and c.policy.model == "tiny-gpt2"
    dump_config(c, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == c


def test_missing_config_file():
    with pytest.raises(ConfigError, match="neither a profile"):
        load_config("no/such/file.yaml")


def test_config_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match="is a directory, not a YAML file"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path) + "/")


def test_a_fitted_rerank_margin_is_for_replay_only(tmp_path):
    from qpo_ray.driver.run import open_run

    assert load_config("offline").eval.rerank_margin == "fit" and load_config("demo").eval.rerank_margin == 0.0
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "policy.reward_head=last_prompt",
                               "eval.method=rerank", "eval.rerank_margin=fit"])
    with pytest.raises(ConfigError, match="only `qpo-ray eval --target replay`"), open_run(cfg, None):
        pass
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("overrides, message", [
    (["target.max_in_flight=32"], r"target\.max_in_flight \(32\) must be at least replicas × target\.max_batch_size "
                                  r"\(1 × 64 = 64\)"),
    (["target.num_replicas=2", "target.max_in_flight=100"], r"\(2 × 64 = 128\)"),
    (["target.num_gpus_per_replica=0"], r"target\.engine='vllm' runs on a GPU"),
    (["target.engine=transformers", "target.device=cpu"], r"reserves a GPU the model would not use"),
    (["target.engine=transformers", "target.num_gpus_per_replica=0"], r"target\.device='cuda' needs a GPU"),
])
def test_an_inconsistent_gpu_profile_is_refused_on_load(overrides, message):
    load_config("paper")  # the shipped profile is consistent
    with pytest.raises(ConfigError, match=message):
        load_config("paper", overrides)


def test_pool_rule_counts_the_autoscaling_floor():
    load_config("tiny", ["target.autoscaling={min_replicas: 3, max_replicas: 9}"])  # 3 × 8 ≤ 32
    with pytest.raises(ConfigError, match=r"\(5 × 8 = 40\)"):
        load_config("tiny", ["target.autoscaling={min_replicas: 5, max_replicas: 9}"])


def test_report_names_the_precision_that_scored():
    from qpo_ray.score.engines import target_precision

    assert target_precision(load_config("tiny").target) == "float32"
    assert target_precision(load_config("tiny", ["target.dtype=bfloat16"]).target) == "bfloat16"
    assert target_precision(load_config("paper").target).startswith("auto (vLLM")
    assert target_precision(load_config("paper", ["target.dtype=float16"]).target) == "float16"

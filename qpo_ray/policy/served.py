"""What a policy folder carries about its evaluation (``inference.json``), and what serving it resolves to.

An evaluation (live: ``RUN/policy/loop-N``; replay: ``OUT/policy``) writes ``inference.json`` beside the
weights: the task and setting, the headline method and its settings (``InferenceSettings``), rerank's
candidate pool, default prompt and margin, each with where it came from, and where the evaluation's config
is. ``qpo-ray generate``, ``qpo-ray serve`` and the RayService read it through :func:`load_served`:

    the run's config  <  inference.json  <  --set overrides

A folder without the file is served from the config alone (rerank then ranks the policy's training prompts,
``prompts.json``, with no default prompt), with a warning that names what is missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from qpo_ray.atomic import atomic_write_json
from qpo_ray.config import RunConfig, build_config, load_config
from qpo_ray.config_input import override_key
from qpo_ray.errors import ConfigError, QPOError
from qpo_ray.policy.inference import InferenceSettings

log = logging.getLogger("qpo_ray")

INFERENCE_JSON = "inference.json"
FORMAT = 1
# Settings that are config keys: inference.json presets them, and a --set of the key wins over the file.
CONFIG_KEYS = {
    "task": "task.name", "setting": "task.setting", "num_demos": "task.num_demos",
    "method": "eval.method", "target_reward": "eval.target_reward", "num_beams": "eval.num_beams",
    "best_of_n": "eval.best_of_n", "top_k": "collect.top_k", "top_p": "collect.top_p",
    "temperature": "collect.temperature", "seed": "seed", "margin": "eval.rerank_margin",
}
RECORDED_ONLY = ("candidates", "default_prompt")  # no config key: only an evaluation knows them


@dataclass(frozen=True)
class InferenceRecord:
    """The content of ``inference.json``."""

    settings: InferenceSettings
    task: str
    setting: str
    num_demos: int
    evaluation: str  # which evaluation wrote it, e.g. "live evaluation of loop 2"
    sources: Mapping[str, str] = field(default_factory=dict)  # setting → where its value came from
    run_config: str | None = None  # the evaluation's config.yaml, relative to the policy folder

    def presets(self) -> dict[str, Any]:
        """Config keys → recorded values (``load_config(presets=…)``)."""
        values = {**self.settings.to_dict(), "task": self.task, "setting": self.setting,
                  "num_demos": self.num_demos}
        return {key: values[name] for name, key in CONFIG_KEYS.items()}


def write_inference(policy_dir: str | Path, cfg: RunConfig, settings: InferenceSettings, *, evaluation: str,
                    sources: Mapping[str, str], run_config: str | Path | None = None,
                    task: str | None = None, setting: str | None = None) -> Path:
    """Record how the policy in ``policy_dir`` was evaluated (atomically). ``task``/``setting`` default to
    ``cfg.task``'s; a setting with no entry in ``sources`` came from the evaluation's config."""
    p = Path(policy_dir)
    src = {name: f"{key} of the {evaluation}" for name, key in CONFIG_KEYS.items()}
    src.update(sources)
    rel = os.path.relpath(Path(run_config).resolve(), p.resolve()) if run_config is not None else None
    doc = {"format": FORMAT, "evaluation": evaluation, "run_config": rel,
           "task": {"name": task or cfg.task.name, "setting": setting or cfg.task.setting,
                    "num_demos": cfg.task.num_demos},
           "settings": settings.to_dict(), "sources": src}
    path = p / INFERENCE_JSON
    atomic_write_json(path, doc)
    return path


def read_inference(policy_dir: str | Path) -> InferenceRecord | None:
    """The folder's ``inference.json``, validated; None when it has none."""
    path = Path(policy_dir) / INFERENCE_JSON
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        task = doc["task"]
        return InferenceRecord(settings=InferenceSettings.from_dict(doc["settings"]), task=str(task["name"]),
                               setting=str(task["setting"]), num_demos=int(task["num_demos"]),
                               evaluation=str(doc["evaluation"]), sources=dict(doc.get("sources") or {}),
                               run_config=doc.get("run_config"))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{path}: not a valid inference record (settings.{where}: {err['msg']})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"{path}: not a valid inference record ({detail})") from None


@dataclass(frozen=True)
class Served:
    """What a policy folder is served with: the config, the inference settings, where each came from, and
    what a folder that was never evaluated lacks (``missing``)."""

    cfg: RunConfig
    settings: InferenceSettings
    sources: Mapping[str, str]
    missing: tuple[str, ...] = ()

    def describe(self) -> dict[str, Any]:
        """What /healthz shows: every setting but the candidate list (its size instead), and the sources."""
        s = self.settings.to_dict()
        s["candidates"] = len(self.settings.candidates)
        return {"task": self.cfg.task.name, "setting": self.cfg.task.setting, **s, "sources": dict(self.sources),
                "missing": list(self.missing)}

    def to_dict(self) -> dict[str, Any]:
        return {"cfg": self.cfg.model_dump(mode="json"), "settings": self.settings.to_dict(),
                "sources": dict(self.sources), "missing": list(self.missing)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Served:
        return cls(cfg=build_config(d["cfg"], "served config"), settings=InferenceSettings.from_dict(d["settings"]),
                   sources=dict(d["sources"]), missing=tuple(d["missing"]))


def describe_settings(served: Served) -> str:
    """One line: the method served and what it depends on, with the sources of the rerank settings."""
    s, src = served.settings, served.sources
    if s.method == "rerank":
        default = "none" if s.default_prompt is None else repr(s.default_prompt)
        what = (f"{len(s.candidates)} candidates; default prompt {default} ({src.get('default_prompt')}); "
                f"margin {s.margin:g} ({src.get('margin')})")
    elif s.method == "best_of_n":
        what = f"N={s.best_of_n}, seed {s.seed}, r={s.target_reward:g}"
    else:
        what = f"num_beams {s.num_beams}, r={s.target_reward:g}"
    return f"method {s.method} ({src.get('method')}): {what}"


def _base_config(p: Path, rec: InferenceRecord | None) -> tuple[str | Path, str]:
    """The config under the record: the evaluation's own, else the run's (``RUN/policy/loop-N``), else tiny."""
    if rec is not None and rec.run_config:
        c = (p / rec.run_config).resolve()
        if c.is_file():
            return c, f"the evaluation's config {c}"
    c = p.parent.parent / "config.yaml"
    if p.parent.name == "policy" and c.is_file():
        return c, f"the run's config {c}"
    return "tiny", "profile 'tiny'"


def load_served(policy_dir: str | Path, config: str | Path | None = None,
                overrides: Sequence[str] | None = None) -> Served:
    """The config and inference settings to serve ``policy_dir`` with (module doc). ``config`` replaces the
    run's config under the record; ``overrides`` (``--set``) win over both."""
    p = Path(policy_dir).expanduser().resolve()
    if not (p / "policy_config.json").is_file():
        raise QPOError(f"policy {policy_dir}: not a saved QPO policy folder (no policy_config.json)")
    overrides = list(overrides or [])
    rec = read_inference(p)
    base, base_desc = _base_config(p, rec) if config is None else (config, f"--config {config}")
    cfg = load_config(base, overrides, presets=rec.presets() if rec is not None else None)
    user = {override_key(o) for o in overrides}
    sources: dict[str, str] = {}
    for name, key in CONFIG_KEYS.items():
        if key in user:
            sources[name] = f"--set {key}"
        elif rec is not None:
            sources[name] = rec.sources.get(name, f"{key} of the {rec.evaluation}")
        else:
            sources[name] = f"{key} of {base_desc}"
    if rec is not None:
        candidates, default = rec.settings.candidates, rec.settings.default_prompt
        sources.update({k: rec.sources.get(k, f"the {rec.evaluation}") for k in RECORDED_ONLY})
    else:
        from qpo_ray.policy.model import CANDIDATES, QPOPolicy

        candidates, default = tuple(QPOPolicy.candidates(p)), None
        sources["candidates"] = f"the prompts the policy was trained on ({CANDIDATES})"
        sources["default_prompt"] = "none: no evaluation recorded the best single prompt on train"
    margin = cfg.eval.rerank_margin
    if margin == "fit":  # fitted only by a replay evaluation: the number it recorded
        margin = rec.settings.margin if rec is not None else 0.0
        sources["margin"] = (rec.sources.get("margin", f"the {rec.evaluation}") if rec is not None
                             else "0: eval.rerank_margin is 'fit' and no evaluation recorded a fitted margin")
    settings = InferenceSettings.from_config(cfg, candidates=candidates, default_prompt=default, margin=margin)
    if settings.method == "rerank" and not settings.candidates:
        raise ConfigError(f"eval.method=rerank ranks candidate prompts, but {policy_dir} has neither "
                          f"{INFERENCE_JSON} nor prompts.json: serve another method (--set eval.method=greedy)")
    missing = () if rec is not None else (INFERENCE_JSON,)
    if missing:
        log.warning("policy %s has no %s (written when a policy is evaluated): serving the settings of %s "
                    "(eval.method=%s) without the evaluated method, rerank's default prompt (the best single "
                    "prompt on train), its margin or its candidate pool", policy_dir, INFERENCE_JSON, base_desc,
                    settings.method)
    return Served(cfg=cfg, settings=settings, sources=sources, missing=tuple(missing))


__all__ = ["CONFIG_KEYS", "INFERENCE_JSON", "InferenceRecord", "Served", "describe_settings", "load_served",
           "read_inference", "write_inference"]

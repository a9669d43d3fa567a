"""A task: its queries and labels, its offline prompt pool, and how a (prompt, query) becomes target text.

A task file (YAML or JSON)::

    name: emotion
    type: classification            # or math
    labels: [joy, sadness, anger, fear]
    verbalizers: {joy: " joy", ...}  # the continuation scored for each label
    template: "{prompt}\\nText: {query}\\nEmotion:"
    demo_template: "Text: {query}\\nEmotion: {label}"
    fewshot_template: "{prompt}\\n{demos}\\nText: {query}\\nEmotion:"
    threshold: 0.0
    tolerance: 1.0e-6                # math: |pred - gold| tolerance
    queries_file: data/emotion.jsonl # relative to the task file; lines {"query", "label", "split", "kind"?}
    queries: [...]                   # or inline, same fields
    prompts: [{id: none, text: ""}, ...]

Placeholders are ``{prompt}``, ``{query}``, ``{demos}`` (few-shot) and ``{label}`` (demo template). They are
substituted in one pass, so braces inside queries or prompts are never interpreted. When the prompt is
empty, every template line holding ``{prompt}`` is dropped (no blank instruction line).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from qpo_ray.errors import ConfigError, DataError
from qpo_ray.ids import content_id
from qpo_ray.jsonl import read_jsonl
from qpo_ray.yamlio import load_yaml, yaml_error_line

TaskType = Literal["classification", "math"]
SPLITS = ("train", "collect", "test")
Demo = tuple[str, str]  # (query, label)

_PLACEHOLDER = re.compile(r"\{(prompt|query|demos|label)\}")
_KNOWN_KEYS = {
    "name", "type", "description", "labels", "verbalizers", "template", "demo_template", "fewshot_template",
    "threshold", "tolerance", "queries_file", "queries", "prompts",
}


def fill(template: str, **values: str) -> str:
    """Substitute placeholders in one pass; a line holding ``{prompt}`` is dropped when the prompt is empty."""
    if "prompt" in values and not values["prompt"].strip():
        template = "\n".join(line for line in template.split("\n") if "{prompt}" not in line)

    def sub(m: re.Match[str]) -> str:
        key = m.group(1)
        return values[key] if key in values else m.group(0)

    return _PLACEHOLDER.sub(sub, template)


@dataclass(frozen=True)
class Example:
    query: str
    label: str
    split: str
    kind: str | None = None  # the query's kind, when a task mixes kinds (reports group examples by it)


@dataclass(frozen=True)
class Task:
    """A loaded, validated task. Build with :func:`load_task` or :meth:`from_dict`."""

    name: str
    type: TaskType
    template: str
    prompt_pool: tuple[tuple[str, str], ...]
    examples: tuple[Example, ...]
    labels: tuple[str, ...] = ()
    verbalizers: Mapping[str, str] = field(default_factory=dict)
    demo_template: str | None = None
    fewshot_template: str | None = None
    threshold: float = 0.0
    tolerance: float = 1e-6
    source: str = "<dict>"

    # -- data ---------------------------------------------------------------------------------------
    @property
    def prompts(self) -> list[tuple[str, str]]:
        """The offline prompt pool as ``(id, text)``."""
        return list(self.prompt_pool)

    def queries(self, split: str | None = None) -> list[tuple[str, str]]:
        """``(query, label)`` of a split (``train``/``collect``/``test``), or of all splits when None."""
        if split is not None and split not in SPLITS:
            raise ConfigError(f"task '{self.name}': unknown split '{split}' (one of {', '.join(SPLITS)})")
        return [(e.query, e.label) for e in self.examples if split is None or e.split == split]

    def kind_of(self, query: str) -> str | None:
        """The kind of a known query (tasks whose queries carry a ``kind``), or None."""
        e = self._by_query().get(query)
        return e.kind if e is not None else None

    def label_of(self, query: str) -> str | None:
        """The gold label of a known query (any split), or None."""
        e = self._by_query().get(query)
        return e.label if e is not None else None

    def _by_query(self) -> dict[str, Example]:
        cached = self.__dict__.get("_query_index")
        if cached is None:
            cached = {e.query: e for e in self.examples}
            object.__setattr__(self, "_query_index", cached)
        return cached

    # -- rendering ----------------------------------------------------------------------------------
    def demo_label(self, label: str) -> str:
        """How a label is written inside a demonstration: its verbalizer without leading space."""
        return self.verbalizers.get(label, label).strip() if self.type == "classification" else label

    def render(self, prompt: str, query: str, demos: Sequence[Demo] | None = None) -> str:
        """The text the target sees for (prompt, query), zero-shot or with demonstrations."""
        if not demos:
            return fill(self.template, prompt=prompt, query=query)
        if not self.fewshot_template or not self.demo_template:
            raise ConfigError(f"{self.source}: task '{self.name}' has no fewshot_template/demo_template")
        block = "\n".join(fill(self.demo_template, query=q, label=self.demo_label(lab)) for q, lab in demos)
        return fill(self.fewshot_template, prompt=prompt, query=query, demos=block)

    def demo_sets(self, m: int, k: int, seed: int, exclude_query: str | None = None) -> list[tuple[Demo, ...]]:
        """``m`` sets of ``k`` demonstrations drawn without replacement from the train split, never the query.

        Seeded by (seed, task, query): a query gets the same sets whatever batch it is scored in.
        """
        pool = [(q, lab) for q, lab in self.queries("train") if q != exclude_query]
        if len(pool) < k:
            raise ConfigError(f"task '{self.name}': {k} demonstrations asked but the train split has only "
                              f"{len(pool)} other queries (lower task.num_demos)")
        rng = random.Random(int(content_id("demos", str(seed), self.name, exclude_query or ""), 16))
        return [tuple(rng.sample(pool, k)) for _ in range(m)]

    # -- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "<dict>", base_dir: Path | None = None) -> Task:
        """Validate a task mapping; errors name ``source`` and the key."""
        return _build(data, source, base_dir or Path("."))


def _need(data: Mapping[str, Any], key: str, kind: type | tuple[type, ...], source: str) -> Any:
    if key not in data or data[key] is None:
        raise ConfigError(f"{source}: missing key '{key}'")
    val = data[key]
    if not isinstance(val, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise ConfigError(f"{source}: key '{key}' must be {names}, got {type(val).__name__}")
    return val


def _template(data: Mapping[str, Any], key: str, source: str, required: tuple[str, ...]) -> str:
    text = _need(data, key, str, source)
    for ph in required:
        if "{" + ph + "}" not in text:
            raise ConfigError(f"{source}: key '{key}' must contain '{{{ph}}}'")
    return text


def _build(data: Mapping[str, Any], source: str, base_dir: Path) -> Task:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    unknown = sorted(set(data) - _KNOWN_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}")
    name = _need(data, "name", str, source)
    kind = _need(data, "type", str, source)
    if kind not in ("classification", "math"):
        raise ConfigError(f"{source}: key 'type' must be 'classification' or 'math', got '{kind}'")
    template = _template(data, "template", source, ("query",))
    labels: tuple[str, ...] = ()
    verbalizers: dict[str, str] = {}
    demo_t = fewshot_t = None
    if kind == "classification":
        labels = tuple(str(x) for x in _need(data, "labels", list, source))
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ConfigError(f"{source}: key 'labels' needs at least two distinct labels")
        verbalizers = {str(k): v for k, v in _need(data, "verbalizers", dict, source).items()}
        missing = [lab for lab in labels if lab not in verbalizers]
        if missing:
            raise ConfigError(f"{source}: key 'verbalizers' has no entry for label(s) {missing}")
        bad = [k for k, v in verbalizers.items() if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(f"{source}: key 'verbalizers' has empty or non-text entries for {bad}")
    if data.get("demo_template") is not None or data.get("fewshot_template") is not None:
        demo_t = _template(data, "demo_template", source, ("query", "label"))
        fewshot_t = _template(data, "fewshot_template", source, ("query", "demos"))
    threshold = _number(data.get("threshold", 0.0), "threshold", source)
    tolerance = _number(data.get("tolerance", 1e-6), "tolerance", source)
    if tolerance < 0:
        raise ConfigError(f"{source}: key 'tolerance' must be >= 0")
    prompts = _prompts(_need(data, "prompts", list, source), source)
    examples = _examples(data, source, base_dir, kind, labels)
    return Task(name=name, type=kind, template=template, prompt_pool=prompts, examples=examples, labels=labels,
                verbalizers=verbalizers, demo_template=demo_t, fewshot_template=fewshot_t, threshold=threshold,
                tolerance=tolerance, source=source)


def _number(val: Any, key: str, source: str) -> float:
    if isinstance(val, bool) or not isinstance(val, int | float):
        raise ConfigError(f"{source}: key '{key}' must be a number, got {val!r}")
    return float(val)


def _prompts(items: list[Any], source: str) -> tuple[tuple[str, str], ...]:
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"{source}: prompts[{i}]"
        if (not isinstance(item, Mapping) or not isinstance(item.get("id"), str)
                or not isinstance(item.get("text"), str)):
            raise ConfigError(f"{where}: expected {{id: <text>, text: <text>}}, got {item!r}")
        if item["id"] in seen:
            raise ConfigError(f"{where}: duplicate prompt id '{item['id']}'")
        seen.add(item["id"])
        out.append((item["id"], item["text"]))
    if not out:
        raise ConfigError(f"{source}: key 'prompts' is empty")
    return tuple(out)


def _examples(data: Mapping[str, Any], source: str, base_dir: Path, kind: str,
              labels: tuple[str, ...]) -> tuple[Example, ...]:
    if ("queries_file" in data) == ("queries" in data):
        raise ConfigError(f"{source}: give exactly one of 'queries_file' or 'queries'")
    if "queries" in data:
        rows = [(f"{source}: queries[{i}]", r) for i, r in enumerate(_need(data, "queries", list, source))]
    else:
        path = base_dir / _need(data, "queries_file", str, source)
        if not path.is_file():
            raise ConfigError(f"{source}: key 'queries_file': {path} not found")
        rows = [(f"{path}: line {n}", rec) for n, rec in read_jsonl(path)]
    out: list[Example] = []
    seen: dict[str, tuple[str, str]] = {}
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: expected an object with query, label, split")
        q, lab, split, qkind = row.get("query"), row.get("label"), row.get("split"), row.get("kind")
        if not isinstance(q, str) or not q.strip():
            raise DataError(f"{where}: 'query' must be non-empty text")
        if isinstance(lab, int | float) and not isinstance(lab, bool) and kind == "math":
            lab = str(lab)
        if not isinstance(lab, str):
            raise DataError(f"{where}: 'label' must be text")
        if split not in SPLITS:
            raise DataError(f"{where}: 'split' must be one of {SPLITS}, got {split!r}")
        if qkind is not None and (not isinstance(qkind, str) or not qkind.strip()):
            raise DataError(f"{where}: 'kind', when given, must be non-empty text")
        if kind == "classification" and lab not in labels:
            raise DataError(f"{where}: label '{lab}' is not one of {list(labels)}")
        if kind == "math" and parse_label_number(lab) is None:
            raise DataError(f"{where}: label '{lab}' is not a number")
        if q in seen and seen[q][0] != lab:
            raise DataError(f"{where}: query also at {seen[q][1]} with a different label")
        seen.setdefault(q, (lab, where))
        out.append(Example(q, lab, split, qkind))
    if not out:
        raise ConfigError(f"{source}: the task has no queries")
    return tuple(out)


def parse_label_number(label: str) -> float | None:
    """A math gold label as a float (``"1,234"``, ``"3/4"``, ``"12.5"``)."""
    from qpo_ray.tasks.answers import parse_number

    return parse_number(label.strip())


def tasks_dir() -> Path:
    return Path(__file__).resolve().parent


def builtin_tasks() -> list[str]:
    return sorted(p.stem for p in tasks_dir().glob("*.yaml"))


def load_task(name_or_path: str | Path) -> Task:
    """A built-in task name (``qpo_ray/tasks/<name>.yaml``) or a path to a task YAML/JSON file."""
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if not path.is_file():
        if path.suffix.lower() in (".yaml", ".yml", ".json") or "/" in spec:
            raise ConfigError(f"task file not found: {spec}")
        path = tasks_dir() / f"{spec}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown task '{spec}': not a file and not a built-in task "
                              f"(built-in: {', '.join(builtin_tasks()) or 'none'})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"task file {path} cannot be read: {e}") from None
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else load_yaml(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(e)}") from None
    return _build(data or {}, str(path), path.parent)

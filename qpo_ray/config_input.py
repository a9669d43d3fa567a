"""What a user hands the configuration: YAML files and ``a.b.c=value`` overrides, as nested dicts.

``qpo_ray.config`` validates the result; nothing here knows the knobs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from qpo_ray.errors import ConfigError
from qpo_ray.yamlio import load_yaml, yaml_error_line


def read_yaml(path: Path) -> dict[str, Any]:
    """A config file's top-level mapping, or a ConfigError naming the file and what is wrong with it."""
    if path.is_dir():
        raise ConfigError(f"config {path} is a directory, not a YAML file (a run's config is RUN_DIR/config.yaml)")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config {path} cannot be read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {yaml_error_line(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def parse_scalar(text: str) -> Any:
    # YAML gives ints, floats, bools, null and [lists] the way a user types them on a command line.
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and value.strip().lower().lstrip("+-") in ("nan", "inf", "infinity"):
        return float(value)  # typed as a number, so validation can say "not finite" rather than "not a number"
    return value


def known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config model, sections and their fields."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += known_keys(ann, prefix + name + ".")
    return keys


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` of a nested dict in place, creating sections on the way."""
    parts = dotted.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def override_key(assignment: str) -> str:
    """The dotted key of a ``a.b.c=value`` override."""
    return assignment.partition("=")[0].strip()


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``a.b.c=value`` override to a nested dict in place."""
    if "=" not in assignment:
        raise ConfigError(f"override '{assignment}' must look like section.key=value")
    set_dotted(data, override_key(assignment), parse_scalar(assignment.partition("=")[2]))


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` laid on ``base``, section by section (a base profile under a config file)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out

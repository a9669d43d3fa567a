"""The one YAML reader of configs and task files: plain data, no aliases or repeated keys, YAML 1.2 numbers,
one-line errors.

Aliases (``*name``) are refused outright: a 1.6 KB file of nested aliases ("billion laughs") expands to
billions of nodes in whatever walks the loaded data (validation, merging, dumping), and no config or task
needs to repeat a node. ``1e-4`` is a float, as in YAML 1.2 and as a user means it (PyYAML's YAML 1.1 reads
it as the text "1e-4", which strict config validation would then refuse).
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses aliases and reads exponent floats without a dot (``1e-4``)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"YAML aliases (*{event.anchor}) are not allowed: write the value out",
                event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        # PyYAML keeps the last of two equal keys without a word: which one was meant is the user's to say.
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice in one mapping",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


NoAliasLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def load_yaml(text: str) -> Any:
    """Parse one YAML document with :class:`NoAliasLoader`; raises ``yaml.YAMLError``."""
    return yaml.load(text, Loader=NoAliasLoader)  # a SafeLoader subclass: plain data only


def yaml_error_line(e: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        what = " ".join(x for x in (e.context, e.problem) if x)
        return f"{what} (line {mark.line + 1}, column {mark.column + 1})" if mark else what
    return " ".join(str(e).split())


__all__ = ["NoAliasLoader", "load_yaml", "yaml_error_line"]

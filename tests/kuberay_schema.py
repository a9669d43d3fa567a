"""KubeRay manifests against the KubeRay CRDs: the loaders (manifests, CRDs as JSON Schema) and the two schema
checks, ``schema_errors`` (types, required fields, enums, patterns, int32 ranges) and ``unknown_keys`` (a
key the schema does not declare), each returning the problems it finds as readable strings.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
MANIFESTS = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayService": "ray.io_rayservices.yaml",
}
CRDS_ENV = "QPO_RAY_KUBERAY_CRDS"
OBJECT_META_KEYS = frozenset({"name", "namespace", "labels", "annotations", "generateName"})


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~3 MB: libyaml loads them in ~1 s


def load_yaml_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


_MANIFEST_CACHE: dict[str, dict[str, Any]] = {}


def load_manifest(name: str) -> dict[str, Any]:
    """A fresh copy of the one document in cluster/<name>."""
    if name not in _MANIFEST_CACHE:
        docs = load_yaml_docs(CLUSTER / name)
        assert len(docs) == 1, f"cluster/{name}: expected one YAML document, found {len(docs)}"
        _MANIFEST_CACHE[name] = docs[0]
    return copy.deepcopy(_MANIFEST_CACHE[name])


def crd_dir() -> Path | None:
    """$QPO_RAY_KUBERAY_CRDS if set (it must then exist), else ../shared/kuberay-crds if present, else None."""
    env = os.environ.get(CRDS_ENV)
    if env:
        return Path(env)
    default = REPO.parent / "shared" / "kuberay-crds"
    return default if default.is_dir() else None


def openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI v3 → JSON Schema, in place: `nullable: true` adds a `null` type. x-kubernetes-* keys and
    `format` stay; jsonschema ignores keywords it does not know (int32/int64 get a format checker below)."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, dict):
            if n.get("nullable") is True and isinstance(n.get("type"), str):
                n["type"] = [n["type"], "null"]
            stack.extend(n.values())
        elif isinstance(n, list):
            stack.extend(n)
    return node


# ---------------------------------------------------------------------------------------------------------
# check 1: the CRD schema (types, required fields, enums, patterns, int32 ranges)
# ---------------------------------------------------------------------------------------------------------
def _path(parts: Iterator[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def schema_errors(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    import jsonschema

    checker = jsonschema.FormatChecker()

    @checker.checks("int32")
    def _int32(value: Any) -> bool:
        return not isinstance(value, int) or -(2**31) <= value < 2**31

    @checker.checks("int64")
    def _int64(value: Any) -> bool:
        return not isinstance(value, int) or -(2**63) <= value < 2**63

    validator = jsonschema.Draft7Validator(schema, format_checker=checker)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{_path(e.absolute_path)}: {e.message}" for e in errors]


# ---------------------------------------------------------------------------------------------------------
# check 2: every key the manifest uses is declared by the schema
# ---------------------------------------------------------------------------------------------------------
def unknown_keys(doc: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """Keys the schema does not declare. The API server prunes (or, with strict field validation,
    rejects) them, and jsonschema lets them through because the CRDs do not set additionalProperties.

    Also reports fields guarded by CEL rules (x-kubernetes-validations), which are not evaluated here.
    """
    problems: list[str] = []

    def walk(inst: Any, sch: dict[str, Any], path: str) -> None:
        if "x-kubernetes-validations" in sch:
            rules = "; ".join(v.get("rule", "?") for v in sch["x-kubernetes-validations"])
            problems.append(f"{path}: guarded by CEL rules this test does not evaluate ({rules})")
        if sch.get("x-kubernetes-preserve-unknown-fields") is True:
            return
        if isinstance(inst, dict):
            props = sch.get("properties")
            extra = sch.get("additionalProperties")
            if props is None and extra is None:
                if sch.get("type") == "object":
                    problems.append(f"{path}: free-form object in the schema, its keys cannot be checked")
                return
            for key, value in inst.items():
                sub = f"{path}.{key}" if path else str(key)
                if props is not None and key in props:
                    walk(value, props[key], sub)
                elif isinstance(extra, dict):  # a map: labels, annotations, rayStartParams, limits, …
                    walk(value, extra, f"{path}[{key!r}]")
                elif extra is True:
                    continue
                else:
                    close = difflib.get_close_matches(str(key), list(props or ()), n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    problems.append(f"{sub}: unknown key{hint}")
        elif isinstance(inst, list):
            items = sch.get("items")
            if isinstance(items, dict):
                for i, item in enumerate(inst):
                    walk(item, items, f"{path}[{i}]")
                list_type = sch.get("x-kubernetes-list-type")
                if list_type == "map":  # items are unique by their map keys (ports, env, volumes, …)
                    keys = sch.get("x-kubernetes-list-map-keys", [])
                    defaults = {k: items.get("properties", {}).get(k, {}).get("default") for k in keys}
                    seen = set()
                    for item in inst:
                        if isinstance(item, dict):
                            ident = tuple(item.get(k, defaults[k]) for k in keys)
                            if ident in seen:
                                problems.append(
                                    f"{path}: duplicate entry for {dict(zip(keys, ident, strict=True))}"
                                )
                            seen.add(ident)
                elif list_type == "set":
                    dupes = {repr(x) for x in inst if inst.count(x) > 1}
                    if dupes:
                        problems.append(f"{path}: duplicate set entries {sorted(dupes)}")

    # The top-level ObjectMeta is `type: object` without properties in every CRD; check it by hand.
    for key, value in doc.items():
        if key == "metadata" and isinstance(value, dict):
            for mkey, mval in value.items():
                if mkey not in OBJECT_META_KEYS:
                    problems.append(f"metadata.{mkey}: not an ObjectMeta field a manifest should set")
                elif mkey in ("labels", "annotations") and not (
                    isinstance(mval, dict) and all(isinstance(v, str) for v in mval.values())
                ):
                    problems.append(f"metadata.{mkey}: must map strings to strings")
        elif key in schema.get("properties", {}):
            walk(value, schema["properties"][key], key)
        else:
            problems.append(f"{key}: unknown top-level key")
    return problems

"""The KubeRay manifests in cluster/: valid against the KubeRay CRDs, free of unknown keys, and consistent
with the package (entrypoint module, Serve import path, config keys, shared volume, GPU counts).

The CRDs are not shipped with the repository: the schema tests look for them in ``../shared/kuberay-crds``
beside the checkout, or in the folder named by ``$QPO_RAY_KUBERAY_CRDS``, and skip when neither exists.
Everything else (the operator's own rules, the embedded YAML strings, the QPO-specific checks) runs
without them.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import math
import os
import re
import shlex
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
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

# What the rest of the project promises (DESIGN §3, the CLI): the manifests must name exactly these.
ENTRYPOINT_MODULE = "qpo_ray.jobs.run"
SERVE_IMPORT_PATH = "qpo_ray.serve.app:build_app"
SHARED_PVC = "qpo-runs"
SHARED_MOUNT = "/mnt/qpo"
GPU = "nvidia.com/gpu"

# `ray start` options of Ray 2.60.0 (the image's version); rayStartParams keys become `--<key>=<value>`,
# so a misspelt key only fails when the Pod starts.
RAY_START_OPTIONS = frozenset(
    "address autoscaling-config block cgroup-path dashboard-agent-grpc-port dashboard-agent-listen-port "
    "dashboard-host dashboard-port disable-usage-stats enable-object-reconstruction enable-resource-isolation "
    "head include-dashboard include-log-monitor labels labels-file log-color log-style max-worker-port memory "
    "metrics-export-port min-worker-port no-monitor no-redirect-output node-ip-address node-manager-port "
    "node-name num-cpus num-gpus object-manager-port object-spilling-directory object-store-memory "
    "plasma-directory port proxy-server-url ray-client-server-port ray-debugger-external redis-password "
    "redis-shard-ports redis-username resources runtime-env-agent-port system-config system-reserved-cpu "
    "system-reserved-memory temp-dir tracing-startup-hook verbose worker-port-list".split()
)
# ray.runtime_env.RuntimeEnv.known_fields of Ray 2.60.0, public ones.
RUNTIME_ENV_FIELDS = frozenset(
    "py_modules py_executable working_dir pip uv conda container image_uri env_vars excludes java_jars "
    "worker_process_setup_hook config".split()
)
OBJECT_META_KEYS = frozenset({"name", "namespace", "labels", "annotations", "generateName"})

# KubeRay operator rules (ray-operator/controllers/ray/utils/validation.go) that the CRD schema cannot express.
MAX_NAME_LENGTH = {"RayCluster": 53, "RayJob": 47, "RayService": 47}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYSERVICE_UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
RAYCLUSTER_UPGRADE_TYPES = {"Recreate", "None"}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
_PORT_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


# ---------------------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------------------
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~3 MB: libyaml loads them in ~1 s


def _load_yaml_docs(path: Path) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]


_MANIFEST_CACHE: dict[str, dict[str, Any]] = {}


def load_manifest(name: str) -> dict[str, Any]:
    """A fresh copy of the one document in cluster/<name>."""
    if name not in _MANIFEST_CACHE:
        docs = _load_yaml_docs(CLUSTER / name)
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


def _openapi_to_jsonschema(node: Any) -> Any:
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


@pytest.fixture(scope="session")
def schemas() -> dict[str, dict[str, Any]]:
    """kind → the v1 openAPIV3Schema of its CRD."""
    folder = crd_dir()
    if folder is None:
        pytest.skip(
            f"KubeRay CRDs not found: looked in {REPO.parent / 'shared' / 'kuberay-crds'} and ${CRDS_ENV} is "
            "unset. Point $QPO_RAY_KUBERAY_CRDS at a folder holding ray.io_rayclusters.yaml, "
            "ray.io_rayjobs.yaml and ray.io_rayservices.yaml (kuberay ray-operator/config/crd/bases/); CI has them."
        )
    if not folder.is_dir():
        pytest.fail(f"${CRDS_ENV}={folder} is not a folder")
    out = {}
    for kind, fname in CRD_FILES.items():
        path = folder / fname
        if not path.is_file():
            pytest.fail(f"{path}: missing (the CRD folder must hold {', '.join(CRD_FILES.values())})")
        (crd,) = _load_yaml_docs(path)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
        v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1, f"{path}: no v1 version"
        out[kind] = _openapi_to_jsonschema(v1[0]["schema"]["openAPIV3Schema"])
    return out


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


# ---------------------------------------------------------------------------------------------------------
# check 3: rules the KubeRay operator and Kubernetes enforce beyond the schema
# ---------------------------------------------------------------------------------------------------------
def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayJob":
        return spec.get("rayClusterSpec") or {}
    if kind == "RayService":
        return spec.get("rayClusterConfig") or {}
    return spec


def groups(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(name, group spec) for the head group and every worker group."""
    cs = cluster_spec(doc)
    out = [("head", cs.get("headGroupSpec") or {})]
    for i, g in enumerate(cs.get("workerGroupSpecs") or []):
        out.append((str(g.get("groupName", f"workerGroupSpecs[{i}]")), g))
    return out


def pod_spec(group: dict[str, Any]) -> dict[str, Any]:
    return ((group.get("template") or {}).get("spec")) or {}


def ray_container(group: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec(group).get("containers") or [{}]
    return containers[0]  # KubeRay treats the first container as the Ray container


def _int(x: Any) -> int | None:
    return x if isinstance(x, int) and not isinstance(x, bool) else None


def label_problems(labels: Any, where: str) -> list[str]:
    if not isinstance(labels, dict):
        return []
    out = []
    for key, value in labels.items():
        prefix, _, name = str(key).rpartition("/")
        if (prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix))) or not (
            len(name) <= 63 and _LABEL_NAME.match(name)
        ):
            out.append(f"{where}: invalid label key '{key}'")
        if not isinstance(value, str) or (value and not (len(value) <= 63 and _LABEL_NAME.match(value))):
            out.append(f"{where}: invalid value {value!r} for label '{key}'")
    return out


def kuberay_rule_problems(doc: dict[str, Any]) -> list[str]:
    kind = doc.get("kind")
    meta = doc.get("metadata") or {}
    spec = doc.get("spec") or {}
    out = []
    name = meta.get("name")
    if not isinstance(name, str) or not _DNS1035.match(name):
        out.append(f"metadata.name {name!r}: must be a DNS-1035 label (lower case, starts with a letter)")
    elif len(name) > MAX_NAME_LENGTH.get(kind, 63):
        out.append(f"metadata.name: at most {MAX_NAME_LENGTH[kind]} characters for a {kind}")
    out += label_problems(meta.get("labels"), "metadata.labels")

    cs = cluster_spec(doc)
    autoscaling = cs.get("enableInTreeAutoscaling") is True
    seen_groups: set[str] = set()
    for gname, group in groups(doc):
        where = "headGroupSpec" if gname == "head" else f"workerGroupSpecs[{gname}]"
        if gname != "head":
            if gname in seen_groups:
                out.append(f"{where}: duplicate groupName")
            seen_groups.add(gname)
            lo, hi, n = (_int(group.get(k)) for k in ("minReplicas", "maxReplicas", "replicas"))
            if not autoscaling and (lo is None or hi is None):
                out.append(f"{where}: minReplicas and maxReplicas must be set when autoscaling is off")
            if lo is not None and hi is not None and lo > hi:
                out.append(f"{where}: minReplicas {lo} > maxReplicas {hi}")
            if n is not None and ((lo is not None and n < lo) or (hi is not None and n > hi)):
                out.append(f"{where}: replicas {n} outside [minReplicas, maxReplicas]")
        params = group.get("rayStartParams") or {}
        if isinstance(params, dict):
            if "labels" in params:
                out.append(f"{where}.rayStartParams: 'labels' is not allowed, use the group's labels field")
            if group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params):
                out.append(f"{where}: resources set both in rayStartParams and in resources")
            for key in params:
                if str(key).startswith("-") or key not in RAY_START_OPTIONS:
                    close = difflib.get_close_matches(str(key).lstrip("-"), RAY_START_OPTIONS, n=1)
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    out.append(f"{where}.rayStartParams: '{key}' is not a `ray start` option{hint}")
        out += label_problems(group.get("labels"), f"{where}.labels")
        template = group.get("template") or {}
        out += label_problems(
            (template.get("metadata") or {}).get("labels"), f"{where}.template.metadata.labels"
        )
        pod = pod_spec(group)
        if not pod.get("containers"):
            out.append(f"{where}: the Pod template needs at least one container")
        volume_names = [v.get("name") for v in pod.get("volumes") or [] if isinstance(v, dict)]
        for vname in volume_names:
            if not isinstance(vname, str) or not _DNS1123_LABEL.match(vname):
                out.append(f"{where}: volume name {vname!r} is not a DNS-1123 label")
        for c in (pod.get("containers") or []) + (pod.get("initContainers") or []):
            if not isinstance(c, dict):
                continue
            cname = c.get("name")
            if not isinstance(cname, str) or not _DNS1123_LABEL.match(cname):
                out.append(f"{where}: container name {cname!r} is not a DNS-1123 label")
            for p in c.get("ports") or []:
                pname = p.get("name") if isinstance(p, dict) else None
                if pname is not None and not (
                    isinstance(pname, str)
                    and len(pname) <= 15
                    and _PORT_NAME.match(pname)
                    and re.search("[a-z]", pname)
                ):
                    out.append(
                        f"{where}.{cname}: port name {pname!r} is not an IANA service name (≤15 chars)"
                    )
            for e in c.get("env") or []:
                ename = e.get("name") if isinstance(e, dict) else None
                if not isinstance(ename, str) or not _ENV_NAME.match(ename):
                    out.append(f"{where}.{cname}: invalid env var name {ename!r}")
            for m in c.get("volumeMounts") or []:
                if not isinstance(m, dict):
                    continue
                if m.get("name") not in volume_names:
                    out.append(f"{where}.{cname}: volumeMount '{m.get('name')}' names no volume of the Pod")
                if not str(m.get("mountPath", "")).startswith("/"):
                    out.append(f"{where}.{cname}: mountPath {m.get('mountPath')!r} is not absolute")
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            for r in set(req) & set(lim):
                if "/" in r and r not in ("kubernetes.io/batch",) and str(req[r]) != str(lim[r]):
                    out.append(f"{where}.{cname}: extended resource {r}: requests must equal limits")

    if kind == "RayCluster":
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in RAYCLUSTER_UPGRADE_TYPES:
            out.append(f"spec.upgradeStrategy.type: {upgrade!r} not in {sorted(RAYCLUSTER_UPGRADE_TYPES)}")
    if kind == "RayJob":
        mode = spec.get("submissionMode", "K8sJobMode")
        if mode not in SUBMISSION_MODES:
            out.append(f"spec.submissionMode: {mode!r} not in {sorted(SUBMISSION_MODES)}")
        ttl = _int(spec.get("ttlSecondsAfterFinished"))
        if ttl is not None and ttl < 0:
            out.append("spec.ttlSecondsAfterFinished: must be >= 0")
        if ttl and not spec.get("shutdownAfterJobFinishes"):
            out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            v = _int(spec.get(key))
            if v is not None and v <= 0:
                out.append(f"spec.{key}: must be positive")
        backoff = _int(spec.get("backoffLimit"))
        if backoff is not None and backoff < 0:
            out.append("spec.backoffLimit: must be >= 0")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            out.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if mode == "InteractiveMode" and backoff:
            out.append("spec.backoffLimit: not allowed with InteractiveMode")
        if mode == "SidecarMode":
            for key in ("submitterPodTemplate", "submitterConfig"):
                if key in spec:
                    out.append(f"spec.{key}: not supported with SidecarMode")
            if (
                pod_spec(cluster_spec(doc).get("headGroupSpec") or {}).get("restartPolicy", "Never")
                != "Never"
            ):
                out.append("head restartPolicy must be Never (or unset) with SidecarMode")
        if not isinstance(spec.get("entrypoint"), str) or not spec["entrypoint"].strip():
            out.append("spec.entrypoint: missing")
    if kind == "RayService":
        head_service = (cluster_spec(doc).get("headGroupSpec") or {}).get("headService") or {}
        if (head_service.get("metadata") or {}).get("name"):
            out.append("rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade is not None and upgrade not in RAYSERVICE_UPGRADE_TYPES:
            out.append(f"spec.upgradeStrategy.type: {upgrade!r} not in {sorted(RAYSERVICE_UPGRADE_TYPES)}")
        if not isinstance(spec.get("serveConfigV2"), str):
            out.append("spec.serveConfigV2: must be a YAML string")
    return out


# ---------------------------------------------------------------------------------------------------------
# check 4: the YAML embedded in strings (runtimeEnvYAML, serveConfigV2)
# ---------------------------------------------------------------------------------------------------------
def serve_config(doc: dict[str, Any]) -> Any:
    return yaml.safe_load((doc.get("spec") or {}).get("serveConfigV2") or "")


def runtime_envs(doc: dict[str, Any]) -> list[tuple[str, Any]]:
    """(where, parsed runtime env) for the RayJob's runtimeEnvYAML and every Serve application's runtime_env."""
    spec = doc.get("spec") or {}
    if doc.get("kind") == "RayJob" and "runtimeEnvYAML" in spec:
        text = spec["runtimeEnvYAML"]
        return [("spec.runtimeEnvYAML", yaml.safe_load(text) if isinstance(text, str) else text)]
    if doc.get("kind") == "RayService":
        cfg = serve_config(doc)
        apps = cfg.get("applications") if isinstance(cfg, dict) else None
        return [
            (f"serveConfigV2.applications[{i}].runtime_env", app["runtime_env"])
            for i, app in enumerate(apps or [])
            if isinstance(app, dict) and "runtime_env" in app
        ]
    return []


def runtime_env_problems(where: str, env: Any) -> list[str]:
    if not isinstance(env, dict):
        return [f"{where}: must be a YAML mapping, got {type(env).__name__}"]
    out = []
    for key in env:
        if key not in RUNTIME_ENV_FIELDS:
            close = difflib.get_close_matches(str(key), RUNTIME_ENV_FIELDS, n=1)
            out.append(
                f"{where}.{key}: unknown runtime_env field"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
    env_vars = env.get("env_vars", {})
    if not isinstance(env_vars, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in env_vars.items()
    ):
        out.append(f"{where}.env_vars: must map strings to strings (quote numbers)")
    pip = env.get("pip", [])
    packages = pip.get("packages") if isinstance(pip, dict) else pip
    if not isinstance(packages, list) or not all(isinstance(p, str) for p in packages):
        out.append(f"{where}.pip: must be a list of requirement strings (or a mapping with `packages`)")
    return out


def serve_config_problems(cfg: Any) -> list[str]:
    if not isinstance(cfg, dict):
        return [f"serveConfigV2: must be a YAML mapping, got {type(cfg).__name__}"]
    apps = cfg.get("applications")
    if not isinstance(apps, list) or not apps:
        return ["serveConfigV2.applications: must be a non-empty list"]
    out = []
    names, prefixes = [], []
    for i, app in enumerate(apps):
        where = f"serveConfigV2.applications[{i}]"
        if not isinstance(app, dict):
            out.append(f"{where}: must be a mapping")
            continue
        names.append(app.get("name"))
        prefixes.append(app.get("route_prefix"))
        if not _IMPORT_PATH.match(str(app.get("import_path", ""))):
            out.append(
                f"{where}.import_path: missing or not `module.path:attribute` ({app.get('import_path')!r})"
            )
        if not str(app.get("route_prefix", "")).startswith("/"):
            out.append(f"{where}.route_prefix: must start with '/'")
        if "args" in app and not isinstance(app["args"], dict):
            out.append(f"{where}.args: must be a mapping")
        for j, dep in enumerate(app.get("deployments") or []):
            if not isinstance(dep, dict) or not dep.get("name"):
                out.append(f"{where}.deployments[{j}]: needs a name")
    if len(apps) > 1 and (None in names or len(set(map(str, names))) != len(names)):
        out.append("serveConfigV2.applications: several applications need distinct names")
    if len(set(map(str, prefixes))) != len(prefixes):
        out.append("serveConfigV2.applications: route_prefix values must be unique")
    return out


def embedded_problems(doc: dict[str, Any]) -> list[str]:
    out = []
    spec = doc.get("spec") or {}
    if (
        doc.get("kind") == "RayJob"
        and "runtimeEnvYAML" in spec
        and not isinstance(spec["runtimeEnvYAML"], str)
    ):
        out.append("spec.runtimeEnvYAML: must be a YAML string, not a mapping")
    for key in ("runtimeEnvYAML", "serveConfigV2"):
        if isinstance(spec.get(key), str):
            try:
                yaml.safe_load(spec[key])
            except yaml.YAMLError as e:
                return out + [f"spec.{key}: not valid YAML: {e}"]
    for where, env in runtime_envs(doc):
        out += runtime_env_problems(where, env)
    if doc.get("kind") == "RayService" and isinstance(spec.get("serveConfigV2"), str):
        out += serve_config_problems(serve_config(doc))
    return out


# ---------------------------------------------------------------------------------------------------------
# check 5: consistent with qpo_ray (shared volume, images, GPUs, entrypoint, Serve app)
# ---------------------------------------------------------------------------------------------------------
def _cpu(q: Any) -> float:
    s = str(q)
    return float(s[:-1]) / 1000 if s.endswith("m") else float(s)


def _gpus(container: dict[str, Any]) -> int:
    limits = (container.get("resources") or {}).get("limits") or {}
    try:
        return int(limits.get(GPU, 0))
    except (TypeError, ValueError):
        return 0


def parse_entrypoint(entrypoint: str) -> tuple[str | None, str, list[str], list[str]]:
    """`python -m MODULE --config C --set k=v …` → (module, config, overrides, flags used)."""
    argv = shlex.split(entrypoint)
    module = argv[2] if len(argv) > 2 and argv[0] in ("python", "python3") and argv[1] == "-m" else None
    config, overrides, flags = "tiny", [], []
    rest = argv[3:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--"):
            flag, eq, inline = arg.partition("=")
            flags.append(flag)
            value = inline if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            i += 1 if eq else 2
            if flag == "--config":
                config = value
            elif flag == "--set":
                overrides.append(value)
        else:
            i += 1
    return module, config, overrides, flags


def gpus_needed(cfg: Any) -> int:
    """Peak GPUs of a run: the scoring pool stays up, Train workers and sampling actors take turns."""
    replicas = cfg.target.num_replicas
    if cfg.target.autoscaling:
        replicas = max(replicas, int(cfg.target.autoscaling.get("max_replicas", replicas)))
    pool = replicas * cfg.target.num_gpus_per_replica
    train = cfg.train.num_workers if cfg.train.use_gpu else 0
    collect = cfg.collect.num_actors * cfg.collect.num_gpus_per_actor
    return math.ceil(pool + max(train, collect))


def gpu_capacity(doc: dict[str, Any]) -> int:
    cs = cluster_spec(doc)
    autoscaling = cs.get("enableInTreeAutoscaling") is True
    total = 0
    for name, group in groups(doc):
        if name == "head":
            continue
        pods = _int(group.get("maxReplicas" if autoscaling else "replicas")) or 0
        total += pods * (_int(group.get("numOfHosts")) or 1) * _gpus(ray_container(group))
    return total


def _under_mount(path: str) -> bool:
    return path == SHARED_MOUNT or path.startswith(SHARED_MOUNT + "/")


def qpo_problems(doc: dict[str, Any]) -> list[str]:
    from qpo_ray.config import load_config

    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    cs = cluster_spec(doc)
    out = []
    ray_version = str(cs.get("rayVersion", ""))
    if not ray_version:
        out.append("rayVersion: must be set (and match the images)")
    has_cpu_group = has_gpu_group = False
    for name, group in groups(doc):
        where = "headGroupSpec" if name == "head" else f"workerGroupSpecs[{name}]"
        pod, c = pod_spec(group), ray_container(group)
        gpus = _gpus(c)
        if name != "head":
            has_gpu_group |= gpus > 0
            has_cpu_group |= gpus == 0
        # Shared storage: the run directory and Train storage are read and written from every Pod.
        pvc_volumes = {
            v.get("name")
            for v in pod.get("volumes") or []
            if isinstance(v, dict) and (v.get("persistentVolumeClaim") or {}).get("claimName") == SHARED_PVC
        }
        if not any(
            m.get("name") in pvc_volumes and m.get("mountPath") == SHARED_MOUNT
            for m in c.get("volumeMounts") or []
        ):
            out.append(f"{where}: the Ray container must mount PVC '{SHARED_PVC}' at {SHARED_MOUNT}")
        image = str(c.get("image", ""))
        repo, _, tag = image.rpartition(":")
        if repo != "rayproject/ray" or not tag.startswith(ray_version + "-"):
            out.append(
                f"{where}: image {image!r} is not rayproject/ray:{ray_version}-… (rayVersion must match)"
            )
        elif tag.endswith("-gpu") != (gpus > 0):
            out.append(f"{where}: image {image!r}: use the -gpu image exactly on GPU groups")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            missing = {"cpu", "memory"} - set(res.get(part) or {})
            if missing:
                out.append(f"{where}: resources.{part} lacks {sorted(missing)}")
        if name == "head":
            if str((group.get("rayStartParams") or {}).get("num-cpus")) != "0":
                out.append('headGroupSpec.rayStartParams: num-cpus must be "0" (no work on the head)')
            if gpus:
                out.append("headGroupSpec: the head must not take a GPU")
        if gpus:
            tolerations = pod.get("tolerations") or []
            if not any(isinstance(t, dict) and t.get("key") == GPU for t in tolerations):
                out.append(f"{where}: GPU Pods need a toleration for the {GPU} taint")

    if kind in ("RayCluster", "RayJob"):
        if not (has_cpu_group and has_gpu_group):
            out.append("workerGroupSpecs: need a CPU group and a GPU group")
    if kind == "RayCluster":
        need = gpus_needed(load_config("paper"))
        if gpu_capacity(doc) < need:
            out.append(f"GPU groups hold {gpu_capacity(doc)} GPUs, the `paper` profile needs {need}")
    if kind == "RayJob":
        module, config, overrides, _ = parse_entrypoint(str(spec.get("entrypoint", "")))
        if module != ENTRYPOINT_MODULE:
            out.append(f"spec.entrypoint: must run `python -m {ENTRYPOINT_MODULE}`, runs {module!r}")
        try:
            cfg = load_config(config, overrides)
        except Exception as e:  # ConfigError names the bad key
            out.append(f"spec.entrypoint: the config does not load: {e}")
        else:
            if not _under_mount(cfg.run_dir):
                out.append(
                    f"spec.entrypoint: run_dir {cfg.run_dir!r} is not on the shared volume {SHARED_MOUNT}"
                )
            storage = cfg.train.storage_path or cfg.run_dir
            if not (_under_mount(storage) or storage.startswith(("s3://", "gs://"))):
                out.append(
                    f"spec.entrypoint: train.storage_path {storage!r} is neither under {SHARED_MOUNT} nor s3:// / gs://"
                )
            need = gpus_needed(cfg)
            if gpu_capacity(doc) < need:
                out.append(
                    f"GPU groups hold at most {gpu_capacity(doc)} GPUs, profile '{config}' needs {need}"
                )
        if not spec.get("shutdownAfterJobFinishes"):
            out.append("spec.shutdownAfterJobFinishes: should be true (a finished pipeline frees its GPUs)")
    if kind == "RayService":
        cfg = serve_config(doc) if isinstance(spec.get("serveConfigV2"), str) else None
        apps = (cfg.get("applications") or []) if isinstance(cfg, dict) else []
        head_ports = {
            p.get("containerPort") for p in ray_container(cs.get("headGroupSpec") or {}).get("ports") or []
        }
        if 8000 not in head_ports:
            out.append("headGroupSpec: the Ray container should expose the Serve port 8000")
        worker_cpus = [
            _cpu(((ray_container(g).get("resources") or {}).get("limits") or {}).get("cpu", 0))
            for n, g in groups(doc)
            if n != "head"
        ]
        for i, app in enumerate(apps):
            where = f"serveConfigV2.applications[{i}]"
            if not isinstance(app, dict):
                continue
            if app.get("import_path") != SERVE_IMPORT_PATH:
                out.append(f"{where}.import_path: must be {SERVE_IMPORT_PATH}")
            policy_dir = str((app.get("args") or {}).get("policy_dir", ""))
            if not _under_mount(policy_dir):
                out.append(f"{where}.args.policy_dir {policy_dir!r}: must be a folder under {SHARED_MOUNT}")
            for dep in app.get("deployments") or []:
                if not isinstance(dep, dict):
                    continue
                opts = dep.get("ray_actor_options") or {}
                if float(opts.get("num_cpus", 1)) > max(worker_cpus, default=0):
                    out.append(
                        f"{where}: deployment {dep.get('name')} wants more CPUs than any worker Pod has"
                    )
                if float(opts.get("num_gpus", 0)) > 0 and not has_gpu_group:
                    out.append(
                        f"{where}: deployment {dep.get('name')} wants a GPU but no worker group has one"
                    )
    return out


def all_problems(doc: dict[str, Any], schema: dict[str, Any] | None) -> list[str]:
    out = []
    if schema is not None:
        out += schema_errors(doc, schema) + unknown_keys(doc, schema)
    for check in (kuberay_rule_problems, embedded_problems, qpo_problems):
        try:
            out += check(doc)
        except Exception as e:  # a broken manifest must produce problems, not crash the checker
            out.append(f"{check.__name__} could not read the manifest: {type(e).__name__}: {e}")
    return out


# ---------------------------------------------------------------------------------------------------------
# the manifests as shipped
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_is_one_ray_io_v1_document(fname):
    doc = load_manifest(fname)
    assert doc.get("apiVersion") == "ray.io/v1"
    assert doc.get("kind") == MANIFESTS[fname]


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_validates_against_crd_schema(fname, schemas):
    doc = load_manifest(fname)
    assert schema_errors(doc, schemas[doc["kind"]]) == []


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_uses_only_keys_the_crd_declares(fname, schemas):
    doc = load_manifest(fname)
    assert unknown_keys(doc, schemas[doc["kind"]]) == []


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_follows_kuberay_operator_rules(fname):
    assert kuberay_rule_problems(load_manifest(fname)) == []


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_embedded_yaml_strings(fname):
    doc = load_manifest(fname)
    assert embedded_problems(doc) == []
    envs = runtime_envs(doc)
    if doc["kind"] in ("RayJob", "RayService"):
        assert envs, "the job and the Serve app say how qpo-ray gets installed (runtime_env pip)"
    for _, env in envs:
        assert isinstance(env, dict)
    if doc["kind"] == "RayService":
        cfg = serve_config(doc)
        assert cfg["applications"] and all(app["import_path"] for app in cfg["applications"])


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_is_consistent_with_qpo_ray(fname):
    assert qpo_problems(load_manifest(fname)) == []


def test_pip_pins_match_the_package_version():
    version = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)
    pins = []
    for fname in MANIFESTS:
        for where, env in runtime_envs(load_manifest(fname)):
            pip = env.get("pip", [])
            for req in pip.get("packages", []) if isinstance(pip, dict) else pip:
                m = re.match(r"^qpo[-_]ray(\[[^\]]*\])?\s*==\s*([^\s;]+)", req)
                if m:
                    pins.append((f"{fname}: {where}", m.group(2)))
    assert pins, "expected the manifests to pin qpo-ray in a runtime_env pip list"
    assert [p for p in pins if p[1] != version] == [], f"pyproject.toml says {version}"


def _env_var_literals_in_package() -> set[str]:
    """Env var names qpo_ray passes in `{"env_vars": {...}}` literals (e.g. ray.init's runtime_env)."""
    names = set()
    for path in (REPO / "qpo_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "env_vars" and isinstance(v, ast.Dict):
                        names |= {kk.value for kk in v.keys if isinstance(kk, ast.Constant)}
    return names


def test_job_runtime_env_does_not_clash_with_the_drivers():
    # Ray merges the job's runtime_env with the one the driver passes to ray.init(), and raises when
    # both set the same env var.
    driver_vars = _env_var_literals_in_package()
    for where, env in runtime_envs(load_manifest("rayjob.yaml")):
        clash = driver_vars & set(env.get("env_vars") or {})
        assert not clash, f"{where}: {sorted(clash)} are also set by qpo_ray's ray.init(runtime_env=…)"


def _pydantic_model(annotation: Any) -> type | None:
    """The pydantic model a field holds: directly, in a list, or as one member of a Union."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            model = _pydantic_model(arg)
            if model is not None:
                return model
    return None


def _unknown_model_keys(value: Any, model: type, path: str) -> list[str]:
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _unknown_model_keys(v, model, f"{path}[{i}]")]
    if not isinstance(value, dict):
        return []
    out = []
    for key, sub in value.items():
        field = model.model_fields.get(key)
        if field is None:
            close = difflib.get_close_matches(str(key), list(model.model_fields), n=1)
            out.append(
                f"{path}.{key}: not a field of {model.__name__}"
                + (f" (did you mean '{close[0]}'?)" if close else "")
            )
            continue
        inner = _pydantic_model(field.annotation)
        if inner is not None:
            out += _unknown_model_keys(sub, inner, f"{path}.{key}")
    return out


def test_serve_config_against_ray_serve_schema():
    schema = pytest.importorskip("ray.serve.schema")
    cfg = serve_config(load_manifest("rayservice.yaml"))
    schema.ServeDeploySchema.model_validate(cfg)  # types and Serve's own cross-field rules
    # Serve's models accept unknown keys silently (a misspelt `autoscaling_config` would be ignored).
    assert _unknown_model_keys(cfg, schema.ServeDeploySchema, "serveConfigV2") == []


def test_runtime_envs_against_ray():
    runtime_env = pytest.importorskip("ray.runtime_env")
    public = {f for f in runtime_env.RuntimeEnv.known_fields if not f.startswith("_")}
    for fname in MANIFESTS:
        for where, env in runtime_envs(load_manifest(fname)):
            assert set(env) <= public, f"{fname}: {where}: unknown fields {sorted(set(env) - public)}"
            runtime_env.RuntimeEnv(**env)  # raises on wrong types (pip, env_vars, working_dir URIs)


# ---------------------------------------------------------------------------------------------------------
# the code the manifests name
# ---------------------------------------------------------------------------------------------------------
def _module_file(dotted: str) -> Path | None:
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _skip_until_written(dotted: str) -> Path:
    path = _module_file(dotted)
    if path is None:
        pytest.skip(f"{dotted} is not written yet; this check runs once {dotted.replace('.', '/')}.py exists")
    return path


def _reachable_strings(path: Path) -> set[str]:
    """String constants of a module and of every qpo_ray module it imports, transitively (imports inside
    functions included: the job modules import the CLI lazily)."""
    seen: set[Path] = set()
    strings: set[str] = set()
    todo = [path]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        package = current.parent.relative_to(REPO).parts
        for node in ast.walk(ast.parse(current.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                strings.add(node.value)
            names = []
            if isinstance(node, ast.ImportFrom):
                base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (base, node.module or "") if p)
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                dep = _module_file(name) if name.startswith("qpo_ray") else None
                if dep is not None and dep not in seen:
                    todo.append(dep)
    return strings


def test_entrypoint_names_the_job_module():
    module, _, _, _ = parse_entrypoint(load_manifest("rayjob.yaml")["spec"]["entrypoint"])
    assert module == ENTRYPOINT_MODULE


def test_entrypoint_module_exists_and_takes_the_flags():
    module, _, _, flags = parse_entrypoint(load_manifest("rayjob.yaml")["spec"]["entrypoint"])
    path = _skip_until_written(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    runs = path.name == "__main__.py" or any(
        (
            isinstance(node, ast.If)
            and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name)
            and node.test.left.id == "__name__"
        )
        or (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call))  # a module-level main() call
        for node in tree.body
    )
    assert runs, f"{path.relative_to(REPO)}: `python -m {module}` would do nothing (no __main__ guard)"
    # The flags must be parsed by the module or by a qpo_ray module it imports (e.g. the CLI).
    known = _reachable_strings(path)
    missing = [f for f in flags if f not in known]
    assert not missing, (
        f"the entrypoint passes {missing}, which {module} (and the qpo_ray modules it imports) never mention"
    )


def test_serve_import_path_names_the_app_builder():
    for app in serve_config(load_manifest("rayservice.yaml"))["applications"]:
        assert app["import_path"] == SERVE_IMPORT_PATH


def _serve_package_trees() -> list[tuple[Path, ast.Module]]:
    pkg = REPO / "qpo_ray" / "serve"
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(pkg.rglob("*.py"))]


def _deployment_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Names of Serve deployments: @serve.deployment classes/functions (or name=...), .options(name=...)."""

    def is_deployment(dec: ast.expr) -> bool:
        target = dec.func if isinstance(dec, ast.Call) else dec
        return (isinstance(target, ast.Attribute) and target.attr == "deployment") or (
            isinstance(target, ast.Name) and target.id == "deployment"
        )

    names = set()
    for _, tree in trees:
        # Module-level string constants, for `name=DEPLOYMENT_NAME`.
        consts = {
            t.id: node.value.value
            for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant)
            for t in node.targets
            if isinstance(t, ast.Name) and isinstance(node.value.value, str)
        }

        def name_kw(call: ast.Call, consts: dict[str, str] = consts) -> str | None:
            for kw in call.keywords:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return kw.value.value
                if kw.arg == "name" and isinstance(kw.value, ast.Name):
                    return consts.get(kw.value.id)
            return None

        for node in ast.walk(tree):
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                for dec in node.decorator_list:
                    if is_deployment(dec):
                        names.add((name_kw(dec) if isinstance(dec, ast.Call) else None) or node.name)
            elif isinstance(node, ast.Call):
                func = node.func
                if (isinstance(func, ast.Attribute) and func.attr == "options") or is_deployment(node):
                    if name_kw(node):
                        names.add(name_kw(node))
    return names


def test_serve_app_builder_exists_with_the_deployments_and_args():
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    path = _skip_until_written(module)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Assign):
            defined |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.ImportFrom):
            defined |= {a.asname or a.name for a in node.names}
    assert attr in defined, (
        f"{path.relative_to(REPO)} defines no `{attr}` (serveConfigV2 imports {SERVE_IMPORT_PATH})"
    )

    trees = _serve_package_trees()
    found = _deployment_names(trees)
    source = "\n".join(p.read_text(encoding="utf-8") for p, _ in trees)
    for app in serve_config(load_manifest("rayservice.yaml"))["applications"]:
        wanted = {d["name"] for d in app.get("deployments") or []}
        assert wanted <= found, (
            f"serveConfigV2 configures deployments {sorted(wanted - found)}, qpo_ray/serve declares {sorted(found)}; "
            "Serve rejects options for a deployment the app does not have"
        )
        for key in app.get("args") or {}:
            assert re.search(rf"\b{re.escape(key)}\b", source), f"build_app never reads the arg '{key}'"


# ---------------------------------------------------------------------------------------------------------
# broken manifests are caught
# ---------------------------------------------------------------------------------------------------------
def test_schema_validation_alone_misses_typos(schemas):
    doc = load_manifest("raycluster.yaml")
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")
    assert schema_errors(doc, schemas["RayCluster"]) == []  # the CRD allows unknown keys …
    assert "spec.workerGroupSpec: unknown key (did you mean 'workerGroupSpecs'?)" in unknown_keys(
        doc, schemas["RayCluster"]
    )


Path_ = str | tuple  # "a.b.0.c", or a tuple of keys when a key holds a dot (labels, nvidia.com/gpu)


def _parts(path: Path_) -> list[Any]:
    return list(path) if isinstance(path, tuple) else [int(p) if p.isdigit() else p for p in path.split(".")]


def _set(path: Path_, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets (or, with value=_DELETE, deletes) the value at path."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = _parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


def _rename(path: Path_, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = _parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)

    return mutate


def _edit_string(path: Path_, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = _parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        assert old in node[last], f"{old!r} not in {path}"
        node[last] = node[last].replace(old, new)

    return mutate


_DELETE = object()
_RC_HEAD = "spec.headGroupSpec"
_RC_GPU = "spec.workerGroupSpecs.1"
_RJ = "spec.rayClusterSpec"


@dataclasses.dataclass
class Broken:
    id: str
    fname: str
    mutate: Callable[[dict[str, Any]], None]
    expect: str  # a substring of one reported problem
    needs_crds: bool = False


BROKEN = [
    # caught by the CRD schema
    Broken(
        "replicas-not-int",
        "raycluster.yaml",
        _set("spec.workerGroupSpecs.0.replicas", "two"),
        "'two' is not of type 'integer'",
        True,
    ),
    Broken(
        "rayStartParams-value-not-string",
        "raycluster.yaml",
        _set(f"{_RC_HEAD}.rayStartParams.num-cpus", 0),
        "0 is not of type 'string'",
        True,
    ),
    Broken(
        "gpu-quantity-garbage",
        "raycluster.yaml",
        _set((*_parts(f"{_RC_GPU}.template.spec.containers.0.resources.limits"), GPU), "one"),
        "'one' does not match",
        True,
    ),
    Broken(
        "missing-groupName",
        "rayjob.yaml",
        _set(f"{_RJ}.workerGroupSpecs.0.groupName", _DELETE),
        "'groupName' is a required property",
        True,
    ),
    Broken(
        "missing-containers",
        "rayservice.yaml",
        _set("spec.rayClusterConfig.headGroupSpec.template.spec.containers", _DELETE),
        "'containers' is a required property",
        True,
    ),
    Broken(
        "ttl-as-string",
        "rayjob.yaml",
        _set("spec.ttlSecondsAfterFinished", "600"),
        "'600' is not of type 'integer'",
        True,
    ),
    Broken(
        "serveConfigV2-as-mapping",
        "rayservice.yaml",
        _set("spec.serveConfigV2", {"applications": []}),
        "is not of type 'string'",
        True,
    ),
    Broken(
        "int32-overflow", "rayjob.yaml", _set("spec.activeDeadlineSeconds", 2**31), "is not a 'int32'", True
    ),
    # caught by the unknown-key walk (the schema accepts them)
    Broken(
        "workerGroupSpec-typo",
        "raycluster.yaml",
        _rename("spec.workerGroupSpecs", "workerGroupSpec"),
        "did you mean 'workerGroupSpecs'",
        True,
    ),
    Broken(
        "shutdownAfterJobFinish-typo",
        "rayjob.yaml",
        _rename("spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "did you mean 'shutdownAfterJobFinishes'",
        True,
    ),
    Broken(
        "volumeMount-typo",
        "raycluster.yaml",
        _rename(f"{_RC_HEAD}.template.spec.containers.0.volumeMounts", "volumeMount"),
        "did you mean 'volumeMounts'",
        True,
    ),
    Broken(
        "toleration-key-typo",
        "raycluster.yaml",
        _rename(f"{_RC_GPU}.template.spec.tolerations.0.effect", "efect"),
        "did you mean 'effect'",
        True,
    ),
    Broken(
        "duplicate-port",
        "rayservice.yaml",
        _set("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports.1.containerPort", 6379),
        "duplicate entry",
        True,
    ),
    Broken(
        "metadata-typo",
        "rayjob.yaml",
        _rename("metadata.labels", "label"),
        "metadata.label: not an ObjectMeta field",
        True,
    ),
    # caught by the operator's rules
    Broken(
        "rayStartParams-typo",
        "raycluster.yaml",
        _rename(f"{_RC_HEAD}.rayStartParams.num-cpus", "num-cpu"),
        "did you mean 'num-cpus'",
        False,
    ),
    Broken(
        "min-above-max",
        "raycluster.yaml",
        _set("spec.workerGroupSpecs.0.minReplicas", 9),
        "minReplicas 9 > maxReplicas 4",
        False,
    ),
    Broken(
        "submission-mode-typo",
        "rayjob.yaml",
        _set("spec.submissionMode", "K8sJob"),
        "spec.submissionMode",
        False,
    ),
    Broken(
        "ttl-without-shutdown",
        "rayjob.yaml",
        _set("spec.shutdownAfterJobFinishes", False),
        "needs shutdownAfterJobFinishes",
        False,
    ),
    Broken(
        "name-too-long", "rayservice.yaml", _set("metadata.name", "q" * 48), "at most 47 characters", False
    ),
    Broken(
        "mount-without-volume",
        "rayjob.yaml",
        _set(f"{_RJ}.headGroupSpec.template.spec.volumes", []),
        "names no volume",
        False,
    ),
    Broken(
        "bad-label",
        "raycluster.yaml",
        _set(("metadata", "labels", "app.kubernetes.io/name"), "qpo ray"),
        "invalid value",
        False,
    ),
    # caught in the embedded YAML strings
    Broken(
        "runtimeEnvYAML-not-mapping",
        "rayjob.yaml",
        _set("spec.runtimeEnvYAML", "- pip\n"),
        "must be a YAML mapping",
        False,
    ),
    Broken(
        "runtimeEnvYAML-field-typo",
        "rayjob.yaml",
        _edit_string("spec.runtimeEnvYAML", "env_vars:", "env_var:"),
        "did you mean 'env_vars'",
        False,
    ),
    Broken(
        "runtimeEnvYAML-env-not-string",
        "rayjob.yaml",
        _edit_string("spec.runtimeEnvYAML", 'PYTHONUNBUFFERED: "1"', "PYTHONUNBUFFERED: 1"),
        "must map strings to strings",
        False,
    ),
    Broken(
        "serveConfigV2-no-import_path",
        "rayservice.yaml",
        _edit_string("spec.serveConfigV2", "import_path:", "importpath:"),
        "import_path: missing",
        False,
    ),
    Broken(
        "serveConfigV2-bad-yaml",
        "rayservice.yaml",
        _edit_string("spec.serveConfigV2", "applications:", "applications: ["),
        "not valid YAML",
        False,
    ),
    # caught by the QPO consistency checks
    Broken(
        "wrong-entrypoint-module",
        "rayjob.yaml",
        _edit_string("spec.entrypoint", "qpo_ray.jobs.run", "qpo_ray.job.run"),
        "must run `python -m qpo_ray.jobs.run`",
        False,
    ),
    Broken(
        "unknown-config-key",
        "rayjob.yaml",
        _edit_string("spec.entrypoint", "train.storage_path", "train.storage"),
        "unknown key 'train.storage'",
        False,
    ),
    Broken(
        "run_dir-off-the-volume",
        "rayjob.yaml",
        _edit_string("spec.entrypoint", "run_dir=/mnt/qpo/runs", "run_dir=/tmp/runs"),
        "not on the shared volume",
        False,
    ),
    Broken("too-few-gpus", "rayjob.yaml", _set(f"{_RJ}.workerGroupSpecs.1.maxReplicas", 1), "needs 2", False),
    Broken(
        "gpu-without-toleration",
        "raycluster.yaml",
        _set(f"{_RC_GPU}.template.spec.tolerations", []),
        "toleration",
        False,
    ),
    Broken(
        "cpu-image-on-gpu-group",
        "raycluster.yaml",
        _set(f"{_RC_GPU}.template.spec.containers.0.image", "rayproject/ray:2.60.0-py311"),
        "-gpu image",
        False,
    ),
    Broken(
        "image-version-mismatch",
        "rayservice.yaml",
        _set("spec.rayClusterConfig.rayVersion", "2.59.0"),
        "rayVersion must match",
        False,
    ),
    Broken(
        "work-on-head",
        "rayjob.yaml",
        _set(f"{_RJ}.headGroupSpec.rayStartParams", {}),
        "num-cpus must be",
        False,
    ),
    Broken(
        "wrong-import-path",
        "rayservice.yaml",
        _edit_string("spec.serveConfigV2", "qpo_ray.serve.app:build_app", "qpo_ray.serve:build_app"),
        "import_path: must be",
        False,
    ),
    Broken(
        "policy_dir-off-the-volume",
        "rayservice.yaml",
        _edit_string("spec.serveConfigV2", "policy_dir: /mnt/qpo/", "policy_dir: /data/"),
        "must be a folder under",
        False,
    ),
]


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_broken_manifest_is_rejected(case, request):
    schema = request.getfixturevalue("schemas")[MANIFESTS[case.fname]] if case.needs_crds else None
    doc = load_manifest(case.fname)
    case.mutate(doc)
    problems = all_problems(doc, schema)
    assert any(case.expect in p for p in problems), "\n".join(problems) or "no problem reported"


def test_crd_folder_override(monkeypatch, tmp_path):
    monkeypatch.setenv(CRDS_ENV, str(tmp_path))
    assert crd_dir() == tmp_path
    monkeypatch.delenv(CRDS_ENV)
    default = REPO.parent / "shared" / "kuberay-crds"
    assert crd_dir() == (default if default.is_dir() else None)

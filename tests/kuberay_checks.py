"""KubeRay manifests against the rules the CRD schema cannot express: the KubeRay operator's and Kubernetes'
own (``kuberay_rule_problems``) and the YAML embedded in strings (``embedded_problems``: runtimeEnvYAML,
serveConfigV2), each returning the problems it finds as readable strings.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

import yaml

# `ray start` options of Ray 2.60.0 (the image's version); rayStartParams keys become `--<key>=<value>`,
# so a misspelt key only fails when the Pod starts.
# Both lists stay one space-separated string (noqa: SIM905): the names as Ray prints them, easy to compare.
RAY_START_OPTIONS = frozenset(
    "address autoscaling-config block cgroup-path dashboard-agent-grpc-port dashboard-agent-listen-port "  # noqa: SIM905
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
    "py_modules py_executable working_dir pip uv conda container image_uri env_vars excludes java_jars "  # noqa: SIM905
    "worker_process_setup_hook config".split()
)

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


def as_int(x: Any) -> int | None:
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
            lo, hi, n = (as_int(group.get(k)) for k in ("minReplicas", "maxReplicas", "replicas"))
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
        ttl = as_int(spec.get("ttlSecondsAfterFinished"))
        if ttl is not None and ttl < 0:
            out.append("spec.ttlSecondsAfterFinished: must be >= 0")
        if ttl and not spec.get("shutdownAfterJobFinishes"):
            out.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            v = as_int(spec.get(key))
            if v is not None and v <= 0:
                out.append(f"spec.{key}: must be positive")
        backoff = as_int(spec.get("backoffLimit"))
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

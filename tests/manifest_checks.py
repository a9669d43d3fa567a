"""Validators for the manifests in cluster/ against qpo_ray itself (``qpo_problems``: shared volume, images,
GPUs, entrypoint, Serve app) and the helpers that read the package's code the manifests name;
``all_problems`` runs these and the generic KubeRay checks (``tests.kuberay_checks``).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import io
import math
import re
import shlex
import types
import typing
from pathlib import Path
from typing import Any

from tests.kuberay_checks import (
    as_int,
    cluster_spec,
    embedded_problems,
    groups,
    kuberay_rule_problems,
    pod_spec,
    ray_container,
    runtime_envs,
    serve_config,
)
from tests.kuberay_schema import REPO, schema_errors, unknown_keys

# What the rest of the project promises (docs/design.md §5, the CLI): the manifests must name exactly these.
ENTRYPOINT_MODULE = "qpo_ray"  # `python -m qpo_ray run ...` is `qpo-ray run ...`: the CLI is the only launcher
ENTRYPOINT_COMMAND = "run"
SERVE_IMPORT_PATH = "qpo_ray.serve.app:build_app"
SHARED_PVC = "qpo-runs"
SHARED_MOUNT = "/mnt/qpo"
GPU = "nvidia.com/gpu"
IMAGE_NAME = "qpo-ray"  # the Dockerfile's image, pushed as REGISTRY/qpo-ray:VERSION-rayRAY_VERSION-cpu|gpu
INSTALLERS = ("pip", "uv", "conda")  # runtime_env fields that install packages when a worker starts


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


def parse_entrypoint(entrypoint: str) -> tuple[str | None, str | None, str, list[str], list[str]]:
    """`python -m MODULE COMMAND --config C --set k=v …` → (module, command, config, overrides, flags used)."""
    argv = shlex.split(entrypoint)
    module = argv[2] if len(argv) > 2 and argv[0] in ("python", "python3") and argv[1] == "-m" else None
    command = argv[3] if len(argv) > 3 and not argv[3].startswith("-") else None
    config, overrides, flags = "tiny", [], []
    rest = argv[4:] if command is not None else argv[3:]
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
    return module, command, config, overrides, flags


def cli_refusal(entrypoint: str) -> str | None:
    """What the qpo-ray CLI's parser says against the entrypoint's arguments (None: it takes them)."""
    from qpo_ray.cli import build_parser

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            build_parser().parse_args(shlex.split(entrypoint)[3:])
    except SystemExit:
        return err.getvalue().strip().splitlines()[-1]
    return None


def package_version() -> str:
    return re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M).group(1)


def image_tag(ray_version: str, gpu: bool) -> str:
    """The tag the Dockerfile's build is pushed with: package version, Ray version, variant."""
    return f"{package_version()}-ray{ray_version}-{'gpu' if gpu else 'cpu'}"


def image_problems(where: str, image: str, ray_version: str, gpu: bool) -> list[str]:
    """Every Ray container runs the qpo-ray image (Dockerfile): Ray's image at rayVersion with the package in
    it, the -gpu variant (vLLM, CUDA torch) exactly on GPU groups, the -cpu one elsewhere."""
    repo, _, tag = image.rpartition(":")
    if repo.rpartition("/")[2] != IMAGE_NAME:
        return [f"{where}: image {image!r} has no qpo-ray in it: use the image the Dockerfile builds "
                f"(…/{IMAGE_NAME}:{image_tag(ray_version, gpu)}; the -gpu image exactly on GPU groups)"]
    m = re.fullmatch(r"(.+)-ray(.+)-(cpu|gpu)", tag)
    if m is None:
        return [f"{where}: image {image!r}: the tag must be VERSION-rayRAY_VERSION-cpu|gpu"]
    out = []
    if m.group(2) != ray_version:
        out.append(f"{where}: image {image!r} holds Ray {m.group(2)}, not {ray_version} (rayVersion must match)")
    if m.group(1) != package_version():
        out.append(f"{where}: image {image!r} is not qpo-ray {package_version()} (pyproject.toml)")
    if (m.group(3) == "gpu") != gpu:
        out.append(f"{where}: image {image!r}: use the -gpu image exactly on GPU groups")
    return out


def gpus_needed(cfg: Any) -> int:
    """GPUs for a run whose scoring pool stays up beside the Train workers and the sampling actors (what the
    manifests are sized for: with fewer, the run releases the pool while the policy trains)."""
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
        pods = as_int(group.get("maxReplicas" if autoscaling else "replicas")) or 0
        total += pods * (as_int(group.get("numOfHosts")) or 1) * _gpus(ray_container(group))
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
        out += image_problems(where, str(c.get("image", "")), ray_version, gpus > 0)
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

    for where, env in runtime_envs(doc):
        if isinstance(env, dict) and any(env.get(k) for k in INSTALLERS):
            out.append(f"{where}: installs packages at start-up ({', '.join(k for k in INSTALLERS if env.get(k))}); "
                       "the qpo-ray image has them")
    if kind in ("RayCluster", "RayJob") and not (has_cpu_group and has_gpu_group):
        out.append("workerGroupSpecs: need a CPU group and a GPU group")
    if kind == "RayCluster":
        need = gpus_needed(load_config("paper"))
        if gpu_capacity(doc) < need:
            out.append(f"GPU groups hold {gpu_capacity(doc)} GPUs, the `paper` profile needs {need}")
    if kind == "RayJob":
        entrypoint = str(spec.get("entrypoint", ""))
        module, command, config, overrides, _ = parse_entrypoint(entrypoint)
        if (module, command) != (ENTRYPOINT_MODULE, ENTRYPOINT_COMMAND):
            out.append(f"spec.entrypoint: must run `python -m {ENTRYPOINT_MODULE} {ENTRYPOINT_COMMAND}`, "
                       f"runs `python -m {module} {command}`")
        elif (refusal := cli_refusal(entrypoint)) is not None:
            out.append(f"spec.entrypoint: the CLI refuses it: {refusal}")
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


def env_var_literals_in_package() -> set[str]:
    """Env var names qpo_ray passes in `{"env_vars": {...}}` literals (e.g. ray.init's runtime_env)."""
    names = set()
    for path in (REPO / "qpo_ray").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Dict):
                for k, v in zip(node.keys, node.values, strict=True):
                    if isinstance(k, ast.Constant) and k.value == "env_vars" and isinstance(v, ast.Dict):
                        names |= {kk.value for kk in v.keys if isinstance(kk, ast.Constant)}
    return names


def pydantic_model(annotation: Any) -> type | None:
    """The pydantic model a field holds: directly, in a list, or as one member of a Union."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (list, typing.Union, types.UnionType, typing.Annotated):
        for arg in typing.get_args(annotation):
            model = pydantic_model(arg)
            if model is not None:
                return model
    return None


def unknown_model_keys(value: Any, model: type, path: str) -> list[str]:
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in unknown_model_keys(v, model, f"{path}[{i}]")]
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
        inner = pydantic_model(field.annotation)
        if inner is not None:
            out += unknown_model_keys(sub, inner, f"{path}.{key}")
    return out


# ---------------------------------------------------------------------------------------------------------
# the code the manifests name
# ---------------------------------------------------------------------------------------------------------
def module_file(dotted: str) -> Path | None:
    base = REPO.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__main__.py", base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def module_path(dotted: str) -> Path:
    """The file of module ``dotted`` in this repository; an assertion error when there is none (a manifest
    names it, so it must exist)."""
    path = module_file(dotted)
    assert path is not None, f"{dotted}: no such module in {REPO} (a manifest names it)"
    return path


def serve_package_trees() -> list[tuple[Path, ast.Module]]:
    pkg = REPO / "qpo_ray" / "serve"
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(pkg.rglob("*.py"))]


def deployment_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
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
                if (((isinstance(func, ast.Attribute) and func.attr == "options") or is_deployment(node))
                        and name_kw(node)):
                    names.add(name_kw(node))
    return names

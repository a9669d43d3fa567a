"""Broken manifests: one mutation of a shipped manifest each, and the problem the checks must report."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from tests.manifest_checks import GPU

Path_ = str | tuple  # "a.b.0.c", or a tuple of keys when a key holds a dot (labels, nvidia.com/gpu)


def key_parts(path: Path_) -> list[Any]:
    return list(path) if isinstance(path, tuple) else [int(p) if p.isdigit() else p for p in path.split(".")]


def set_at(path: Path_, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation that sets (or, with value=DELETE, deletes) the value at path."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = key_parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value

    return mutate


def rename_key(path: Path_, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = key_parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        node[new] = node.pop(last)

    return mutate


def edit_string(path: Path_, old: str, new: str) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = key_parts(path)
        node: Any = doc
        for p in parents:
            node = node[p]
        assert old in node[last], f"{old!r} not in {path}"
        node[last] = node[last].replace(old, new)

    return mutate


DELETE = object()
RC_HEAD = "spec.headGroupSpec"
RC_GPU = "spec.workerGroupSpecs.1"
RJ = "spec.rayClusterSpec"


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
        set_at("spec.workerGroupSpecs.0.replicas", "two"),
        "'two' is not of type 'integer'",
        True,
    ),
    Broken(
        "rayStartParams-value-not-string",
        "raycluster.yaml",
        set_at(f"{RC_HEAD}.rayStartParams.num-cpus", 0),
        "0 is not of type 'string'",
        True,
    ),
    Broken(
        "gpu-quantity-garbage",
        "raycluster.yaml",
        set_at((*key_parts(f"{RC_GPU}.template.spec.containers.0.resources.limits"), GPU), "one"),
        "'one' does not match",
        True,
    ),
    Broken(
        "missing-groupName",
        "rayjob.yaml",
        set_at(f"{RJ}.workerGroupSpecs.0.groupName", DELETE),
        "'groupName' is a required property",
        True,
    ),
    Broken(
        "missing-containers",
        "rayservice.yaml",
        set_at("spec.rayClusterConfig.headGroupSpec.template.spec.containers", DELETE),
        "'containers' is a required property",
        True,
    ),
    Broken(
        "ttl-as-string",
        "rayjob.yaml",
        set_at("spec.ttlSecondsAfterFinished", "600"),
        "'600' is not of type 'integer'",
        True,
    ),
    Broken(
        "serveConfigV2-as-mapping",
        "rayservice.yaml",
        set_at("spec.serveConfigV2", {"applications": []}),
        "is not of type 'string'",
        True,
    ),
    Broken(
        "int32-overflow", "rayjob.yaml", set_at("spec.activeDeadlineSeconds", 2**31), "is not a 'int32'", True
    ),
    # caught by the unknown-key walk (the schema accepts them)
    Broken(
        "workerGroupSpec-typo",
        "raycluster.yaml",
        rename_key("spec.workerGroupSpecs", "workerGroupSpec"),
        "did you mean 'workerGroupSpecs'",
        True,
    ),
    Broken(
        "shutdownAfterJobFinish-typo",
        "rayjob.yaml",
        rename_key("spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish"),
        "did you mean 'shutdownAfterJobFinishes'",
        True,
    ),
    Broken(
        "volumeMount-typo",
        "raycluster.yaml",
        rename_key(f"{RC_HEAD}.template.spec.containers.0.volumeMounts", "volumeMount"),
        "did you mean 'volumeMounts'",
        True,
    ),
    Broken(
        "toleration-key-typo",
        "raycluster.yaml",
        rename_key(f"{RC_GPU}.template.spec.tolerations.0.effect", "efect"),
        "did you mean 'effect'",
        True,
    ),
    Broken(
        "duplicate-port",
        "rayservice.yaml",
        set_at("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.ports.1.containerPort", 6379),
        "duplicate entry",
        True,
    ),
    Broken(
        "metadata-typo",
        "rayjob.yaml",
        rename_key("metadata.labels", "label"),
        "metadata.label: not an ObjectMeta field",
        True,
    ),
    # caught by the operator's rules
    Broken(
        "rayStartParams-typo",
        "raycluster.yaml",
        rename_key(f"{RC_HEAD}.rayStartParams.num-cpus", "num-cpu"),
        "did you mean 'num-cpus'",
        False,
    ),
    Broken(
        "min-above-max",
        "raycluster.yaml",
        set_at("spec.workerGroupSpecs.0.minReplicas", 9),
        "minReplicas 9 > maxReplicas 4",
        False,
    ),
    Broken(
        "submission-mode-typo",
        "rayjob.yaml",
        set_at("spec.submissionMode", "K8sJob"),
        "spec.submissionMode",
        False,
    ),
    Broken(
        "ttl-without-shutdown",
        "rayjob.yaml",
        set_at("spec.shutdownAfterJobFinishes", False),
        "needs shutdownAfterJobFinishes",
        False,
    ),
    Broken(
        "name-too-long", "rayservice.yaml", set_at("metadata.name", "q" * 48), "at most 47 characters", False
    ),
    Broken(
        "mount-without-volume",
        "rayjob.yaml",
        set_at(f"{RJ}.headGroupSpec.template.spec.volumes", []),
        "names no volume",
        False,
    ),
    Broken(
        "bad-label",
        "raycluster.yaml",
        set_at(("metadata", "labels", "app.kubernetes.io/name"), "qpo ray"),
        "invalid value",
        False,
    ),
    # caught in the embedded YAML strings
    Broken(
        "runtimeEnvYAML-not-mapping",
        "rayjob.yaml",
        set_at("spec.runtimeEnvYAML", "- pip\n"),
        "must be a YAML mapping",
        False,
    ),
    Broken(
        "runtimeEnvYAML-field-typo",
        "rayjob.yaml",
        edit_string("spec.runtimeEnvYAML", "env_vars:", "env_var:"),
        "did you mean 'env_vars'",
        False,
    ),
    Broken(
        "runtimeEnvYAML-env-not-string",
        "rayjob.yaml",
        edit_string("spec.runtimeEnvYAML", 'PYTHONUNBUFFERED: "1"', "PYTHONUNBUFFERED: 1"),
        "must map strings to strings",
        False,
    ),
    Broken(
        "serveConfigV2-no-import_path",
        "rayservice.yaml",
        edit_string("spec.serveConfigV2", "import_path:", "importpath:"),
        "import_path: missing",
        False,
    ),
    Broken(
        "serveConfigV2-bad-yaml",
        "rayservice.yaml",
        edit_string("spec.serveConfigV2", "applications:", "applications: ["),
        "not valid YAML",
        False,
    ),
    # caught by the QPO consistency checks
    Broken(
        "wrong-entrypoint-module",
        "rayjob.yaml",
        edit_string("spec.entrypoint", "qpo_ray run", "qpo_ray.jobs.run"),
        "must run `python -m qpo_ray run`",
        False,
    ),
    Broken(
        "entrypoint-flag-the-cli-lacks",
        "rayjob.yaml",
        edit_string("spec.entrypoint", "--config paper", "--profile paper"),
        "the CLI refuses it: qpo-ray: error: unrecognized arguments: --profile",
        False,
    ),
    Broken(
        "unknown-config-key",
        "rayjob.yaml",
        edit_string("spec.entrypoint", "train.storage_path", "train.storage"),
        "unknown key 'train.storage'",
        False,
    ),
    Broken(
        "run_dir-off-the-volume",
        "rayjob.yaml",
        edit_string("spec.entrypoint", "run_dir=/mnt/qpo/runs", "run_dir=/tmp/runs"),
        "not on the shared volume",
        False,
    ),
    Broken("too-few-gpus", "rayjob.yaml", set_at(f"{RJ}.workerGroupSpecs.1.maxReplicas", 1), "needs 2", False),
    Broken(
        "gpu-without-toleration",
        "raycluster.yaml",
        set_at(f"{RC_GPU}.template.spec.tolerations", []),
        "toleration",
        False,
    ),
    Broken(
        "cpu-image-on-gpu-group",
        "raycluster.yaml",
        set_at(f"{RC_GPU}.template.spec.containers.0.image", "registry.example.com/qpo-ray:0.1.0-ray2.60.0-cpu"),
        "-gpu image",
        False,
    ),
    Broken(
        "stock-ray-image",
        "rayjob.yaml",
        set_at(f"{RJ}.headGroupSpec.template.spec.containers.0.image", "rayproject/ray:2.60.0-py311"),
        "has no qpo-ray in it",
        False,
    ),
    Broken(
        "stale-package-image",
        "rayservice.yaml",
        set_at("spec.rayClusterConfig.headGroupSpec.template.spec.containers.0.image",
               "registry.example.com/qpo-ray:0.0.9-ray2.60.0-cpu"),
        "is not qpo-ray 0.1.0",
        False,
    ),
    Broken(
        "pip-at-start-up",
        "rayjob.yaml",
        edit_string("spec.runtimeEnvYAML", "env_vars:", "pip: [qpo-ray==0.1.0]\nenv_vars:"),
        "installs packages at start-up (pip)",
        False,
    ),
    Broken(
        "image-version-mismatch",
        "rayservice.yaml",
        set_at("spec.rayClusterConfig.rayVersion", "2.59.0"),
        "rayVersion must match",
        False,
    ),
    Broken(
        "work-on-head",
        "rayjob.yaml",
        set_at(f"{RJ}.headGroupSpec.rayStartParams", {}),
        "num-cpus must be",
        False,
    ),
    Broken(
        "wrong-import-path",
        "rayservice.yaml",
        edit_string("spec.serveConfigV2", "qpo_ray.serve.app:build_app", "qpo_ray.serve:build_app"),
        "import_path: must be",
        False,
    ),
    Broken(
        "policy_dir-off-the-volume",
        "rayservice.yaml",
        edit_string("spec.serveConfigV2", "policy_dir: /mnt/qpo/", "policy_dir: /data/"),
        "must be a folder under",
        False,
    ),
]

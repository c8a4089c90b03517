"""Multi-node training as a Kubeflow PyTorchJob (src/sdsclip/cluster/, components/multinode.py).

The job is checked against the PyTorchJob CRD's schema (k8s/training/pytorchjob-crd-schema.yaml) and its pod
templates against Kubernetes' own PodTemplateSpec schema (kubernetes-validate). Submission runs the real
`kubernetes` client against a fake API server on 127.0.0.1 that implements only the endpoints used here.
"""

import copy
import json
import os
import re
import sys
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from kubernetes import client

from sdsclip.cluster import jobspec as js
from sdsclip.cluster import pytorchjob as pj
from sdsclip.distributed import LaunchError, normalize_dist_env

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

K8S_VERSIONS = ("1.25", "1.37")  # the oldest and newest Kubernetes schemas kubernetes-validate ships
NS = "team-a"


def make_job(name="sdsclip-sds-test", num_nodes=3, gpus_per_node=0, control=False, **section):
    cfg = js.job_config(
        section,
        name=name,
        image="registry.example/sdsclip:0.1",
        num_nodes=num_nodes,
        gpus_per_node=gpus_per_node,
        namespace=section.pop("namespace", NS),
    )
    return js.render_job(cfg, js.TrainPaths.standard(f"/mnt/data/sdsclip-runs/{name}", name), control=control)


def pod_spec(job, rtype="Master"):
    return job["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]


def container(job, rtype="Master"):
    (c,) = [c for c in pod_spec(job, rtype)["containers"] if c["name"] == "pytorch"]
    return c


# ------------------------------------------------------------------------------------------ template + schema


@pytest.mark.parametrize("num_nodes,gpus", [(1, 0), (2, 1), (4, 8)])
def test_rendered_job_passes_the_crd_and_pod_schemas(num_nodes, gpus):
    job = make_job(
        num_nodes=num_nodes,
        gpus_per_node=gpus,
        node_selector={"nvidia.com/gpu.product": "H100"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
    )
    for version in K8S_VERSIONS:
        js.validate_job(job, kubernetes_version=version)

    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert job["metadata"]["namespace"] == NS
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1
    assert replicas.get("Worker", {}).get("replicas", 0) == num_nodes - 1
    assert {r["restartPolicy"] for r in replicas.values()} == {"OnFailure"}
    assert job["spec"]["nprocPerNode"] == str(max(1, gpus))
    assert job["spec"]["runPolicy"] == {
        "backoffLimit": 3,
        "cleanPodPolicy": "Running",
        "ttlSecondsAfterFinished": 86400,
    }
    for rtype in replicas:
        pod, c = pod_spec(job, rtype), container(job, rtype)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v
        }
        assert claims == {"data": "sdsclip-data", "checkpoints": "sdsclip-checkpoints"}
        assert {m["name"]: m["mountPath"] for m in c["volumeMounts"]} == {
            "data": "/mnt/data",
            "checkpoints": "/mnt/checkpoints",
            "dshm": "/dev/shm",
        }
        assert c["envFrom"] == [{"secretRef": {"name": "sdsclip-mlflow"}}]
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert [t["key"] for t in pod["tolerations"]] == ["dedicated"]
        assert c["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus
        assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"] == "8"
        args = c["args"]
        assert args[-1] == "--resume"
        assert args[args.index("--checkpoint-dir") + 1] == "/mnt/checkpoints/sdsclip-sds-test"
        assert args[args.index("--student") + 1] == "/mnt/data/sdsclip-runs/sdsclip-sds-test/inputs/student"
        assert c["command"][0] == ("sdsclip" if gpus <= 1 else "torchrun")
    assert job["metadata"]["annotations"][js.SPEC_DIGEST_ANNOTATION] == js.spec_digest(job)


def test_container_args_parse_as_sdsclip_train():
    from typer.main import get_command

    from sdsclip.cli import app

    train = get_command(app).commands["train"]
    for control in (False, True):
        args = container(make_job(control=control), "Worker")["args"]
        params = train.make_context("train", list(args)).params  # the real CLI's parser: every flag exists
        assert params["resume"] is True and params["control"] is control
        assert str(params["checkpoint_dir"]) == "/mnt/checkpoints/sdsclip-sds-test"
        assert str(params["out"]) == "/mnt/data/sdsclip-runs/sdsclip-sds-test/model"


def test_the_template_itself_and_knobs():
    template = yaml.safe_load(js.k8s_file(js.TEMPLATE_NAME).read_text())
    for version in K8S_VERSIONS:  # valid as it stands (defaults in place of the filled fields)
        js.validate_job(template, kubernetes_version=version)
    job = make_job(
        num_nodes=2,
        control=True,
        mlflow_secret=None,
        ttl_seconds_after_finished=None,
        active_deadline_seconds=3600,
        clean_pod_policy="All",
        cpu="500m",
        memory="3Gi",
        run_as_user=4242,
    )
    js.validate_job(job, kubernetes_version=K8S_VERSIONS[-1])
    c = container(job, "Worker")
    assert "envFrom" not in c and c["args"][-1] == "--control"
    assert job["spec"]["runPolicy"] == {"backoffLimit": 3, "cleanPodPolicy": "All", "activeDeadlineSeconds": 3600}
    assert c["resources"] == {"requests": {"cpu": "500m", "memory": "3Gi"}, "limits": {"cpu": "500m", "memory": "3Gi"}}
    assert pod_spec(job, "Worker")["securityContext"]["fsGroup"] == 4242
    assert "nodeSelector" not in pod_spec(job) and "tolerations" not in pod_spec(job)  # CPU job: no GPU taint
    assert pod_spec(make_job(gpus_per_node=1))["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def _mutate(job, path, value):
    *parents, last = path
    node = job
    for key in parents:
        node = node[key]
    node[last] = value


POD = ["spec", "pytorchReplicaSpecs", "Worker", "template", "spec"]


@pytest.mark.parametrize(
    "path,value,pod_check,error",
    [
        (
            ["spec", "runPolicy", "cleanPodPolicyy"],
            "All",
            False,
            r"spec\.runPolicy: Additional properties are not allowed \('cleanPodPolicyy'",
        ),
        (
            ["spec", "pytorchReplicaSpecs", "Worker", "replicas"],
            "2",
            False,
            r"Worker\.replicas: '2' is not of type 'integer'",
        ),
        (["spec", "runPolicy", "backoffLimit"], 1.5, False, r"backoffLimit: 1\.5 is not of type 'integer'"),
        (
            ["spec", "pytorchReplicaSpecs", "Worker", "template", "metadata", "labelz"],
            {},
            False,
            r"Additional properties",
        ),
        (["spec", "pytorchReplicaSpecs", "Master", "replicas"], 2, False, r"Master replicas must be 1"),
        (
            ["spec", "pytorchReplicaSpecs", "Chief"],
            {"replicas": 1},
            False,
            r"replica type 'Chief' is not Master or Worker",
        ),
        ([*POD, "containers", 0, "name"], "trainer", False, r"no container named 'pytorch'"),
        (
            [*POD, "tolerations"],
            [{"key": "k", "operator": "Exists", "effects": "NoSchedule"}],
            True,
            r"Worker pod template: spec\.tolerations\.0: Additional properties are not allowed \('effects'",
        ),
        (
            [*POD, "containers", 0, "resources", "limits", "cpu"],
            "lots",
            False,
            r"Worker pod template: spec\.containers\.0\.resources\.limits\.cpu: 'lots' is not a Kubernetes quantity",
        ),
        ([*POD, "containers", 0, "volumeMounts", 0, "mountPath"], 5, True, r"mountPath: 5 is not of type 'string'"),
    ],
)
def test_schema_rejects_bad_jobs_naming_the_field(path, value, pod_check, error):
    job = make_job(num_nodes=2)
    _mutate(job, path, value)
    with pytest.raises(js.PyTorchJobError, match=error) as err:
        js.validate_job(job, kubernetes_version=K8S_VERSIONS[-1] if pod_check else None)
    assert "\n" not in str(err.value)
    if pod_check:  # the CRD alone leaves PodSpec open: the Kubernetes schema is what catches these
        js.validate_job(job)


@pytest.mark.parametrize(
    "section,error",
    [
        ({"name": "SDS_train"}, r"multinode\.name: String should match pattern"),
        ({"cpu": "eight"}, r"multinode\.cpu: String should match pattern .* \(got 'eight'\)"),
        ({"gpus": 2}, r"multinode\.gpus: Extra inputs are not permitted"),
        ({"num_nodes": 0}, r"multinode\.num_nodes: Input should be greater than or equal to 1"),
        ({"clean_pod_policy": "Always"}, r"multinode\.clean_pod_policy: Input should be 'None', 'Running' or 'All'"),
    ],
)
def test_bad_job_settings_are_one_line_errors(section, error):
    fields = {"name": "sdsclip-x", "image": "img", **section}
    with pytest.raises(js.PyTorchJobError, match=error):
        js.job_config(
            {k: v for k, v in fields.items() if k not in ("name", "image")}, name=fields["name"], image=fields["image"]
        )
    with pytest.raises(js.PyTorchJobError, match="multinode: must be a mapping"):
        js.job_config(["cpu"], name="x", image="img")


def test_paths_must_be_on_the_shared_pvcs():
    cfg = js.job_config(name="sdsclip-x", image="img", namespace=NS)
    paths = js.TrainPaths.standard("/mnt/data/runs/x", "sdsclip-x")
    for bad in ("/tmp/student", "relative/student", "/mnt/data/../etc", "/mnt/database/x"):
        with pytest.raises(js.PyTorchJobError, match=r"student=.*under /mnt/data \(data PVC\)"):
            js.render_job(cfg, js.TrainPaths(**{**vars(paths), "student": bad}))


def test_render_job_file_for_kubectl(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "multinode": {"namespace": "ml", "cpu": "16", "nproc_per_node": 2}}))
    out = js.render_job_file(
        tmp_path / "job.yaml",
        name="sdsclip-by-hand",
        image="reg/sdsclip:1",
        run_dir="/mnt/data/sdsclip-runs/by-hand",
        num_nodes=2,
        gpus_per_node=2,
        params_path=params,
    )
    text = out.read_text()
    assert text.startswith("# kubectl create -f job.yaml")
    job = yaml.safe_load(text)
    js.validate_job(job, kubernetes_version=K8S_VERSIONS[-1])
    assert job["metadata"]["namespace"] == "ml" and job["spec"]["nprocPerNode"] == "2"
    assert container(job)["resources"]["limits"]["cpu"] == "16"
    assert container(job)["command"][:3] == ["torchrun", "--master-addr=$(MASTER_ADDR)", "--master-port=$(MASTER_PORT)"]


def test_render_job_cli(tmp_path):
    """`sdsclip pipeline render-job` writes the same checked job; a bad name is one line, exit 2."""
    from typer.testing import CliRunner

    from sdsclip.cli import app

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"seed": 0, "multinode": {"namespace": "ml"}}))
    args = [
        "pipeline",
        "render-job",
        "--out",
        str(tmp_path / "job.yaml"),
        "--run-dir",
        "/mnt/data/sdsclip-runs/r1",
        "--num-nodes",
        "3",
        "--gpus-per-node",
        "4",
        "--control",
        "--params",
        str(params),
    ]
    ok = CliRunner().invoke(app, [*args, "--name", "sdsclip-r1"])
    assert ok.exit_code == 0, ok.output
    job = yaml.safe_load((tmp_path / "job.yaml").read_text())
    js.validate_job(job, kubernetes_version=K8S_VERSIONS[-1])
    assert job["metadata"]["namespace"] == "ml" and job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    bad = CliRunner().invoke(app, [*args, "--name", "Bad_Name"])
    assert bad.exit_code == 2 and "multinode.name" in bad.output and "Traceback" not in bad.output


# ------------------------------------------------------------------------------------------ the operator's env


def operator_env(job, rtype, index, pet_master=True):
    """What the training operator puts into the `pytorch` container of pod <rtype>-<index>
    (pkg/controller.v1/pytorch/envvar.go + master.go, v1.7-v1.9; PET_MASTER_* from v1.8 on)."""
    spec = job["spec"]
    total = sum(r["replicas"] for r in spec["pytorchReplicaSpecs"].values())
    nproc = spec.get("nprocPerNode", "auto")
    rank = index + (1 if rtype == "Worker" else 0)
    (port,) = [p["containerPort"] for p in container(job)["ports"] if p["name"] == "pytorchjob-port"]
    addr = f"{job['metadata']['name']}-master-0"
    env = {
        "PYTHONUNBUFFERED": "0",
        "MASTER_PORT": str(port),
        "MASTER_ADDR": addr,
        "WORLD_SIZE": str(total * (int(nproc) if nproc.isdigit() else 1)),
        "RANK": str(rank),
        "PET_NPROC_PER_NODE": nproc,
        "PET_NODE_RANK": str(rank),
        "PET_NNODES": str(total),
    }
    if pet_master:
        env.update(PET_MASTER_PORT=str(port), PET_MASTER_ADDR=addr)
    for item in container(job, rtype).get("env", []):
        env[item["name"]] = item["value"]
    return env


def pods_of(job):
    return [(rtype, i) for rtype, r in job["spec"]["pytorchReplicaSpecs"].items() for i in range(r["replicas"])]


def test_operator_env_maps_through_sdsclip_distributed_one_process_per_pod():
    job = make_job(num_nodes=3, gpus_per_node=1)
    assert container(job)["command"] == ["sdsclip", "train"]  # so normalize_dist_env sees the operator's env
    seen = []
    for rtype, index in pods_of(job):
        for variant in ("v1.8+", "pet-only", "pre-v1.8"):
            env = operator_env(job, rtype, index, pet_master=variant != "pre-v1.8")
            if variant == "pet-only":
                env = {k: v for k, v in env.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")}
            filled = normalize_dist_env(env)
            assert filled["LOCAL_RANK"] == "0" and filled["LOCAL_WORLD_SIZE"] == "1"
            seen.append((variant, env["RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]))
    for variant in ("v1.8+", "pet-only", "pre-v1.8"):
        rows = [s[1:] for s in seen if s[0] == variant]
        assert sorted(r[0] for r in rows) == ["0", "1", "2"]
        assert {r[1:] for r in rows} == {("3", "sdsclip-sds-test-master-0", "23456")}


def test_several_processes_per_pod_run_under_torchrun_reading_the_pet_variables(monkeypatch):
    from torch.distributed.run import get_args_parser

    job = make_job(num_nodes=3, gpus_per_node=4)
    for rtype, index in pods_of(job):
        for pet_master in (True, False):
            env = operator_env(job, rtype, index, pet_master=pet_master)
            with pytest.raises(LaunchError, match="PET_NPROC_PER_NODE=4"):  # `sdsclip train` alone would refuse
                normalize_dist_env(dict(env))
            c = container(job, rtype)
            argv = [
                re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], a) for a in c["command"] + c["args"]
            ]  # kubelet
            assert argv[0] == "torchrun"
            for key in [k for k in list(os.environ) if k.startswith("PET_")]:
                monkeypatch.delenv(key)
            for key, value in env.items():
                monkeypatch.setenv(key, value)
            args = get_args_parser().parse_args(argv[1:])  # torchrun's defaults come from PET_* at parser build
            assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "4", index + (rtype == "Worker"))
            assert (args.master_addr, args.master_port) == ("sdsclip-sds-test-master-0", 23456)
            assert args.module and args.training_script == "sdsclip.cli" and args.training_script_args[0] == "train"
            assert args.training_script_args[-1] == "--resume"


# ------------------------------------------------------------------------------------------ fake API server


def conditions(*states, reason="", message=""):
    """Cumulative JobConditions as the operator writes them (Running turns False at the end)."""
    out = []
    for state in states:
        if state in pj.TERMINAL:
            for c in out:
                if c["type"] == "Running":
                    c["status"] = "False"
        out.append(
            {
                "type": state,
                "status": "True",
                "reason": reason or f"PyTorchJob{state}",
                "message": message or f"PyTorchJob is {state.lower()}.",
                "lastUpdateTime": "2026-01-01T10:00:00Z",
                "lastTransitionTime": "2026-01-01T10:00:00Z",
            }
        )
    return out


RUNNING = [conditions("Created"), conditions("Created", "Running")]
SUCCEEDS = [*RUNNING, conditions("Created", "Running", "Succeeded")]


class FakeKubeAPI:
    """The Kubernetes + training-operator endpoints the client calls, on 127.0.0.1; every request recorded.
    A job's status goes through `lifecycle` (one entry per GET, the last one repeats)."""

    JOBS = re.compile(r"^/apis/kubeflow\.org/v1/namespaces/([^/]+)/pytorchjobs(?:/([^/]+))?$")
    PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
    LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")

    def __init__(self):
        self.jobs, self.lifecycles, self.pods, self.logs = {}, {}, [], {}
        self.default_lifecycle = SUCCEEDS
        self.requests, self.get_errors, self.create_error = [], [], None
        self.on_state = None  # callback(name, state) when a GET first returns a state
        self._states = {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, code, body, content_type="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _route(self, method):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, url.path, parse_qs(url.query), body))
                code, reply = fake.handle(method, url.path, parse_qs(url.query), body)
                self._reply(code, reply, "application/json" if isinstance(reply, dict) else "text/plain")

            def do_GET(self):
                self._route("GET")

            def do_POST(self):
                self._route("POST")

            def do_DELETE(self):
                self._route("DELETE")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    @staticmethod
    def status(code, reason, message):
        return code, {
            "kind": "Status",
            "apiVersion": "v1",
            "status": "Failure",
            "reason": reason,
            "message": message,
            "code": code,
        }

    def handle(self, method, path, query, body):
        if m := self.JOBS.match(path):
            ns, name = m.groups()
            if method == "POST":
                name = body["metadata"]["name"]
                if self.create_error:
                    return self.status(*self.create_error)
                if (ns, name) in self.jobs:
                    return self.status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists')
                self.jobs[ns, name] = {**copy.deepcopy(body), "status": {}}
                self.lifecycles.setdefault(name, list(self.default_lifecycle))
                return 201, self.jobs[ns, name]
            if (ns, name) not in self.jobs:
                return self.status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found')
            if method == "DELETE":
                del self.jobs[ns, name]
                self.lifecycles.pop(name, None)
                return 200, {"kind": "Status", "apiVersion": "v1", "status": "Success"}
            if self.get_errors:
                return self.status(self.get_errors.pop(0), "ServiceUnavailable", "etcd leader changed")
            steps = self.lifecycles.setdefault(name, list(self.default_lifecycle))
            conds = steps.pop(0) if len(steps) > 1 else steps[0]
            self.jobs[ns, name]["status"] = {"conditions": copy.deepcopy(conds)}
            state = pj.job_state(self.jobs[ns, name])[0]
            if self.on_state and self._states.get(name) != state:
                self.on_state(name, state)
            self._states[name] = state
            return 200, self.jobs[ns, name]
        if m := self.PODS.match(path):
            selector = query["labelSelector"][0]
            key, _, value = selector.partition("=")
            items = [
                p
                for p in self.pods
                if p["metadata"]["namespace"] == m.group(1) and p["metadata"]["labels"].get(key) == value
            ]
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
        if m := self.LOG.match(path):
            previous = query.get("previous", ["false"])[0].lower() == "true"
            text = self.logs.get((m.group(1), m.group(2), previous))
            if text is None:
                return self.status(400, "BadRequest", "previous terminated container not found")
            tail = int(query.get("tailLines", ["0"])[0])
            return 200, "".join(text.splitlines(keepends=True)[-tail:] if tail else text)
        return self.status(404, "NotFound", f"the fake has no {method} {path}")

    def client(self):
        return client.ApiClient(client.Configuration(host=self.url))

    def calls(self, method=None, suffix=""):
        return [r for r in self.requests if (method is None or r[0] == method) and r[1].endswith(suffix)]


@pytest.fixture
def fake():
    api = FakeKubeAPI()
    yield api
    api.server.shutdown()
    api.server.server_close()


def pod(job_name, rtype, index, phase="Running", state=None, last_state=None, restarts=0, namespace=NS):
    return {
        "metadata": {
            "name": f"{job_name}-{rtype}-{index}",
            "namespace": namespace,
            "labels": {
                pj.JOB_NAME_LABEL: job_name,
                pj.REPLICA_TYPE_LABEL: rtype,
                "training.kubeflow.org/replica-index": str(index),
            },
        },
        "status": {
            "phase": phase,
            "containerStatuses": [
                {
                    "name": "pytorch",
                    "image": "img",
                    "imageID": "",
                    "ready": False,
                    "restartCount": restarts,
                    "state": state or {"running": {"startedAt": "2026-01-01T09:00:00Z"}},
                    "lastState": last_state or {},
                }
            ],
        },
    }


def wait(fake, job, **kw):
    return pj.submit_and_wait(
        job, NS, poll_s=kw.pop("poll_s", 0.001), timeout_s=kw.pop("timeout_s", 30), api_client=fake.client(), **kw
    )


# ------------------------------------------------------------------------------------------ submit + wait


def test_submit_created_running_succeeded(fake):
    job = make_job()
    result = wait(fake, job)
    assert (result.state, result.polls, result.adopted) == ("Succeeded", 3, False)
    ((_, path, query, body),) = fake.calls("POST")
    assert path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs" and query["fieldValidation"] == ["Strict"]
    assert body == job  # exactly the rendered job (its spec digest included) ...
    js.validate_job(body, kubernetes_version=K8S_VERSIONS[-1])  # ... which passes the schemas
    assert [r[0] for r in fake.requests] == ["POST", "GET", "GET", "GET"]
    js.crd_validator().validate(fake.jobs[NS, job["metadata"]["name"]])  # the fake's status is CRD-shaped too


def test_transient_api_errors_are_retried(fake):
    fake.get_errors = [503, 500]
    assert wait(fake, make_job()).state == "Succeeded"
    assert len(fake.calls("GET")) == 5


def test_failed_job_raises_one_line_with_reason_and_the_failing_pods_log(fake, tmp_path):
    job = make_job(num_nodes=2)
    name = job["metadata"]["name"]
    fake.lifecycles[name] = [
        *RUNNING,
        conditions(
            "Created",
            "Running",
            "Failed",
            reason="PyTorchJobFailed",
            message=f"PyTorchJob {NS}/{name} is failed because 1 Worker replica(s) failed.",
        ),
    ]
    crashed = {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-01T10:00:00Z"}}
    later = {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-01T10:30:00Z"}}
    fake.pods = [
        pod(name, "master", 0, phase="Failed", state=later),  # died later, waiting on the worker
        pod(name, "worker", 0, state={"waiting": {"reason": "CrashLoopBackOff"}}, last_state=crashed, restarts=3),
        pod("other-job", "master", 0, phase="Failed", state=crashed),
    ]
    fake.logs[NS, f"{name}-worker-0", True] = (
        "".join(f"step {i}\n" for i in range(500))
        + "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n"
    )
    with pytest.raises(pj.PyTorchJobFailed) as err:
        wait(fake, job, log_dir=tmp_path / "logs")
    message = str(err.value)
    assert "\n" not in message
    assert (
        f"PyTorchJob {NS}/{name} failed: PyTorchJobFailed: PyTorchJob {NS}/{name} is failed because 1 Worker"
    ) in message
    assert f"last log line of pod {name}-worker-0: 'torch.OutOfMemoryError: CUDA out of memory." in message
    tail = tmp_path / "logs" / f"{name}-worker-0.previous.log"
    assert f"log tail (200 lines): {tail}" in message
    lines = tail.read_text().splitlines()
    assert lines[-1].startswith("torch.OutOfMemoryError") and len(lines) == 200
    ((_, _, pods_query, _),) = fake.calls("GET", "/pods")
    assert pods_query["labelSelector"] == [f"training.kubeflow.org/job-name={name}"]
    ((_, _, log_query, _),) = fake.calls("GET", "/log")
    assert log_query["container"] == ["pytorch"] and log_query["tailLines"] == ["200"]
    assert log_query["previous"][0].lower() == "true"
    assert not fake.calls("DELETE")  # a failed job stays for inspection (ttlSecondsAfterFinished cleans it)


def test_failed_job_without_pods_still_reports_the_reason(fake):
    job = make_job()
    fake.lifecycles[job["metadata"]["name"]] = [
        conditions("Created", "Failed", reason="PyTorchJobFailed", message="ImagePullBackOff")
    ]
    with pytest.raises(pj.PyTorchJobFailed, match=r"failed: PyTorchJobFailed: ImagePullBackOff; no pod left"):
        wait(fake, job)


@pytest.mark.parametrize("delete", [True, False])
def test_timeout_deletes_the_job_or_leaves_it(fake, delete):
    job = make_job(num_nodes=2)
    name = job["metadata"]["name"]
    fake.lifecycles[name] = list(RUNNING)  # never finishes
    fake.pods = [
        pod(
            name,
            "master",
            0,
            phase="Pending",
            state={"waiting": {"reason": "CreateContainerConfigError", "message": 'secret "sdsclip-mlflow" not found'}},
        )
    ]
    with pytest.raises(pj.PyTorchJobTimeout) as err:
        wait(fake, job, poll_s=0.01, timeout_s=0.05, delete_on_timeout=delete)
    message = str(err.value)
    assert f"PyTorchJob {NS}/{name} did not finish within 0.05 s (last state Running" in message
    assert f'{name}-master-0 Pending CreateContainerConfigError (secret "sdsclip-mlflow" not found)' in message
    deletes = fake.calls("DELETE")
    if delete:
        ((_, path, query, _),) = deletes
        assert path.endswith(f"/pytorchjobs/{name}") and query["propagationPolicy"] == ["Background"]
        assert "the job was deleted" in message and (NS, name) not in fake.jobs
    else:
        assert not deletes and "the job was left running" in message and (NS, name) in fake.jobs


def test_conflict_adopts_the_same_job_and_refuses_another(fake):
    job = make_job()
    name = job["metadata"]["name"]
    fake.jobs[NS, name] = {**copy.deepcopy(job), "status": {}}  # a retried step: its job is already there
    result = wait(fake, job)
    assert result.adopted and result.state == "Succeeded"
    assert len(fake.calls("POST")) == 1 and not fake.calls("DELETE")

    fake.lifecycles[name] = [conditions("Created", "Running", "Failed")]  # a retry after the job Failed:
    result = wait(fake, job)  # deleted (pods first) and created again; it resumes from its checkpoints
    assert result.replaced and not result.adopted and result.state == "Succeeded"
    ((_, _, query, _),) = fake.calls("DELETE")
    assert query["propagationPolicy"] == ["Foreground"] and len(fake.calls("POST")) == 3
    with pytest.raises(pj.PyTorchJobFailed):  # replace_failed=False: the Failed job is reported as it is
        fake.lifecycles[name] = [conditions("Created", "Failed")]
        wait(fake, job, replace_failed=False)
    fake.requests.clear()

    other = make_job(num_nodes=4)  # same name, different spec
    with pytest.raises(
        js.PyTorchJobError,
        match=rf"PyTorchJob {NS}/{name} already exists with a different spec: "
        rf"delete it \(kubectl delete pytorchjob {name} -n {NS}\)",
    ):
        wait(fake, other)
    assert not fake.calls("DELETE")


def test_rejected_create_and_vanished_job_are_one_line_errors(fake):
    fake.create_error = (422, "Invalid", 'PyTorchJob.kubeflow.org "x" is invalid: spec.runPolicy: Invalid value')
    with pytest.raises(
        js.PyTorchJobError,
        match=r"cannot create PyTorchJob team-a/sdsclip-sds-test: 422 .*: "
        r"PyTorchJob.kubeflow.org \"x\" is invalid",
    ):
        wait(fake, make_job())
    fake.create_error = None
    fake.on_state = lambda name, state: fake.jobs.pop((NS, name)) if state == "Running" else None
    with pytest.raises(js.PyTorchJobError, match="disappeared while waiting"):
        wait(fake, make_job())


# ------------------------------------------------------------------------------------------ the component


def test_component_stages_inputs_submits_and_copies_the_model_back(fake, tmp_path, monkeypatch):
    from kfp import dsl
    from kfp.dsl import Dataset, Model

    from components.multinode import train_multinode

    # credentials from a kubeconfig (not in a cluster), whose context names the namespace
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [{"name": "fake", "cluster": {"server": fake.url}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "c", "context": {"cluster": "fake", "user": "u", "namespace": NS}}],
            }
        )
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setattr(client.Configuration, "_default", client.Configuration._default)  # restored afterwards
    monkeypatch.setattr(js, "SA_NAMESPACE_FILE", tmp_path / "no-service-account")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://sdsclip-mlflow.sdsclip:5000")  # from the sdsclip-mlflow secret
    pvc = tmp_path / "pvc"  # stands for the data PVC the pipeline mounts at /mnt/data
    monkeypatch.setattr(pj, "run_multinode_training", partial(pj.run_multinode_training, data_root=pvc))

    artifacts = {}
    for key, kind in (("student", Model), ("teacher", Model), ("shards", Dataset), ("validated", Dataset)):
        folder = tmp_path / "artifacts" / key
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "weights.bin").write_bytes(key.encode() * 100)
        artifacts[key] = kind(name=key, uri=str(folder))
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    params = yaml.safe_dump({**raw, "multinode": {"poll_seconds": 0.001, "cpu": "2", "memory": "4Gi"}})

    def pods_train(name, state):  # what the pods would leave on the PVC
        if state == "Succeeded":
            out = pvc / "sdsclip-runs" / name / "model"
            out.mkdir(parents=True)
            (out / "student.json").write_text(json.dumps({"arch": "tiny", "steps": 7, "processes": 4}))
            (out / "model.safetensors").write_bytes(b"w")

    fake.on_state = pods_train

    def run():
        model = Model(name="model", uri=str(tmp_path / "out" / "model"))
        train_multinode(
            params=params, control=False, num_nodes=2, gpus_per_node=2, image="reg/sdsclip:1", model=model, **artifacts
        )
        return model

    model = run()
    name = model.metadata["job"]
    assert name.startswith("sdsclip-sds-") and model.metadata["namespace"] == NS
    assert (model.metadata["steps"], model.metadata["nodes"], model.metadata["job_adopted"]) == (7, 2, False)
    assert (Path(model.path) / "student.json").is_file()
    assert (Path(model.path) / "model.safetensors").read_bytes() == b"w"
    run_dir = pvc / "sdsclip-runs" / name
    for key in artifacts:
        assert (run_dir / "inputs" / key / "sub" / "weights.bin").read_bytes() == key.encode() * 100
    staged = yaml.safe_load((run_dir / "params.yaml").read_text())  # no multinode section; the secret's URI
    assert "multinode" not in staged
    assert staged == {
        **{k: v for k, v in raw.items() if k != "multinode"},
        "registry": {**raw["registry"], "tracking_uri": "http://sdsclip-mlflow.sdsclip:5000"},
    }
    ((_, path, _, created),) = fake.calls("POST")
    assert path == f"/apis/kubeflow.org/v1/namespaces/{NS}/pytorchjobs"
    js.validate_job(created, kubernetes_version=K8S_VERSIONS[-1])
    args = container(created, "Worker")["args"]
    assert args[args.index("--teacher") + 1] == f"/mnt/data/sdsclip-runs/{name}/inputs/teacher"
    assert args[args.index("--params") + 1] == f"/mnt/data/sdsclip-runs/{name}/params.yaml"
    assert container(created)["resources"]["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 2}

    again = run()  # a retried step: same inputs, same name -> re-attaches to the (finished) job
    assert again.metadata["job"] == name and again.metadata["job_adopted"] is True
    assert len(fake.calls("POST")) == 2 and not fake.calls("DELETE")

    # as a kfp component: the signature the lead wires into the pipeline
    spec = dsl.component(base_image="reg/sdsclip:1", install_kfp_package=False)(train_multinode).component_spec
    assert set(spec.inputs) == {
        "params",
        "student",
        "teacher",
        "shards",
        "validated",
        "control",
        "num_nodes",
        "gpus_per_node",
        "image",
    }
    assert set(spec.outputs) == {"model"}


def test_component_rejects_bad_params_before_staging(tmp_path):
    with pytest.raises(js.PyTorchJobError, match=r"train\.lr"):
        pj.run_multinode_training(
            yaml.safe_dump({"train": {"lr": -1}}),
            {},
            tmp_path / "out",
            control=False,
            num_nodes=2,
            gpus_per_node=1,
            image="img",
            data_root=tmp_path / "pvc",
        )
    assert not (tmp_path / "pvc").exists()

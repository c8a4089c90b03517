"""`sdsclip pipeline submit` against a loopback KFP API server, and the run form's merge rules.

The server below implements only the KFP v2beta1 REST endpoints kfp 2.17's Client calls for a run or a
recurring run from a package (healthz; experiments list + create; runs create; recurringruns create) and
records every request, so the tests see exactly what would reach a real cluster.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from typer.testing import CliRunner

from sdsclip.cli import app
from sdsclip.cluster.kfp_submit import SubmitError, validate_cron
from sdsclip.config import ConfigError
from sdsclip.kubeflow import apply_run_form, form_spec

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pipelines" / "sdsclip_pipeline.yaml"
API = "/apis/v2beta1"


class FakeKfp:
    """A threaded HTTP server with just enough of the KFP API; ``requests`` records (method, path, query, body)."""

    def __init__(self, experiments: dict[str, str] | None = None, fail: dict[tuple[str, str], int] | None = None):
        self.requests: list[tuple[str, str, dict, dict | None]] = []
        self.experiments = dict(experiments or {})  # display name -> id
        self.fail = fail or {}
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                fake.requests.append((method, url.path, parse_qs(url.query), body))
                if (method, url.path) in fake.fail:
                    return self._answer(fake.fail[(method, url.path)], {"error": "rejected by the test server"})
                route = (method, url.path)
                if route == ("GET", f"{API}/healthz"):
                    return self._answer(200, {"multi_user": False})
                if route == ("GET", f"{API}/experiments"):
                    wanted = json.loads(parse_qs(url.query)["filter"][0])["predicates"][0]["stringValue"]
                    found = [
                        {"experiment_id": i, "display_name": n} for n, i in fake.experiments.items() if n == wanted
                    ]
                    return self._answer(200, {"experiments": found, "total_size": len(found)} if found else {})
                if route == ("POST", f"{API}/experiments"):
                    fake.experiments[body["display_name"]] = f"exp-{len(fake.experiments) + 1}"
                    return self._answer(
                        200,
                        {"experiment_id": fake.experiments[body["display_name"]], "display_name": body["display_name"]},
                    )
                if route == ("POST", f"{API}/runs"):
                    return self._answer(
                        200,
                        {
                            "run_id": "run-1",
                            "experiment_id": body["experiment_id"],
                            "display_name": body["display_name"],
                        },
                    )
                if route == ("POST", f"{API}/recurringruns"):
                    return self._answer(
                        200,
                        {
                            "recurring_run_id": "rr-1",
                            "experiment_id": body["experiment_id"],
                            "display_name": body["display_name"],
                        },
                    )
                return self._answer(404, {"error": f"not implemented: {method} {url.path}"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def calls(self) -> list[tuple[str, str]]:
        return [(method, path) for method, path, _, _ in self.requests]

    def body(self, method: str, path: str) -> dict:
        (body,) = [b for m, p, _, b in self.requests if (m, p) == (method, path)]
        return body


@pytest.fixture
def kfp_server(monkeypatch, tmp_path):
    # kfp.Client keeps a context file under ~/.config/kfp: keep the test's out of the real home
    from kfp.client import client as kfp_client_module

    monkeypatch.setattr(kfp_client_module.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp" / "context.json"))
    started = []

    def start(**kwargs) -> FakeKfp:
        fake = FakeKfp(**kwargs)
        fake.thread.start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.server.shutdown()
        fake.server.server_close()


def submit(*args):
    return CliRunner().invoke(app, ["pipeline", "submit", "--package", str(PACKAGE), *map(str, args)])


def printed_json(stdout: str) -> dict:
    """The command's result: the JSON object it prints last (kfp.Client prints its links before it)."""
    return json.loads(stdout[stdout.rindex("\n{") + 1 :] if "\n{" in stdout else stdout)


def committed_spec() -> tuple[pipeline_spec_pb2.PipelineSpec, pipeline_spec_pb2.PlatformSpec]:
    pipeline_doc, platform_doc = yaml.safe_load_all(PACKAGE.read_text())
    return (
        json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec()),
        json_format.ParseDict(platform_doc, pipeline_spec_pb2.PlatformSpec()),
    )


def assert_sent_spec_is_committed(body: dict) -> None:
    """The pipeline spec inside the run equals the committed compiled YAML (both documents, as protobufs)."""
    sent = body["pipeline_spec"]
    pipeline, platform = committed_spec()
    assert json_format.ParseDict(sent["pipeline_spec"], pipeline_spec_pb2.PipelineSpec()) == pipeline
    assert json_format.ParseDict(sent["platform_spec"], pipeline_spec_pb2.PlatformSpec()) == platform
    assert "kubernetes" in sent["platform_spec"]["platforms"]  # GPUs, PVCs, secrets travel with the run


def test_submit_run_creates_experiment_and_sends_the_compiled_pipeline(kfp_server):
    server = kfp_server()
    r = submit(
        "--host",
        server.url,
        "--experiment",
        "nightly",
        "--run-name",
        "try-1",
        "--param",
        "lambda_sds=0.5",
        "--param",
        "seed=3",
        "--param",
        "ingest_splits=[train2017]",
        "--param",
        "gpu_count=2",
    )
    assert r.exit_code == 0, r.output
    assert server.calls() == [
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/healthz"),
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/runs"),
    ]
    (query,) = [q for m, p, q, _ in server.requests if (m, p) == ("GET", f"{API}/experiments")]
    assert json.loads(query["filter"][0])["predicates"][0] == {
        "operation": 1,
        "key": "display_name",
        "stringValue": "nightly",
    }  # 1 = EQUALS
    assert server.body("POST", f"{API}/experiments")["display_name"] == "nightly"

    run = server.body("POST", f"{API}/runs")
    assert run["display_name"] == "try-1" and run["experiment_id"] == "exp-1"
    assert run["runtime_config"]["parameters"] == {
        "lambda_sds": 0.5,
        "seed": 3,
        "ingest_splits": ["train2017"],
        "gpu_count": "2",
    }
    assert_sent_spec_is_committed(run)
    assert printed_json(r.stdout) == {"run_id": "run-1", "experiment_id": "exp-1", "name": "try-1"}


def test_submit_finds_an_existing_experiment_by_name(kfp_server):
    server = kfp_server(experiments={"sdsclip": "exp-42"})
    r = submit("--host", server.url, "--params-file", ROOT / "params.yaml", "--no-cache")
    assert r.exit_code == 0, r.output
    assert ("POST", f"{API}/experiments") not in server.calls()
    run = server.body("POST", f"{API}/runs")
    assert run["experiment_id"] == "exp-42"
    assert run["runtime_config"]["parameters"] == {"params_yaml": (ROOT / "params.yaml").read_text()}
    # --no-cache: every task of the sent spec has caching off (register already had)
    tasks = run["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert not any(t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())


def test_submit_schedule_creates_a_recurring_run_with_the_cron(kfp_server):
    server = kfp_server()
    r = submit(
        "--host", server.url, "--schedule", "0 0 2 * * *", "--run-name", "nightly-sds", "--param", "train_steps=300"
    )
    assert r.exit_code == 0, r.output
    assert server.calls()[-3:] == [
        ("GET", f"{API}/experiments"),
        ("POST", f"{API}/experiments"),
        ("POST", f"{API}/recurringruns"),
    ]
    job = server.body("POST", f"{API}/recurringruns")
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert job["mode"] == "ENABLE" and job["display_name"] == "nightly-sds" and job["experiment_id"] == "exp-1"
    assert job["no_catchup"] is True and int(job["max_concurrency"]) == 1
    assert job["runtime_config"]["parameters"] == {"train_steps": 300}
    assert_sent_spec_is_committed(job)
    assert printed_json(r.stdout)["cron"] == "0 0 2 * * *"


@pytest.mark.parametrize(
    "cron, says",
    [
        ("0 2 * * *", "5 fields"),  # classic 5-field cron: KFP would read it as sec..month
        ("0 0 25 * * *", "hour field '25'"),
        ("0 0 2 * * MON-XYZ", "day of week field"),
        ("*/0 * * * * *", "step '0'"),
        ("0 ? * * * *", "'?' is only for"),
        ("@fortnightly", "unknown descriptor"),
    ],
)
def test_bad_cron_is_one_line_and_sends_nothing(kfp_server, cron, says):
    server = kfp_server()
    r = submit("--host", server.url, "--schedule", cron)
    assert r.exit_code == 2
    assert says in r.stderr and "6 fields, seconds first" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert server.requests == []


@pytest.mark.parametrize(
    "cron",
    ["0 0 2 * * *", "*/30 * * * * ?", "0 0 9 ? * MON-FRI", "0 15,45 8-18/2 1 JAN,jul *", "@daily", "@every 1h30m"],
)
def test_kfp_cron_forms_are_accepted(cron):
    assert validate_cron(cron) == cron


@pytest.mark.parametrize(
    "args, says",
    [
        (["--param", "no_such=1"], "--param no_such: not a parameter of the pipeline"),
        (["--param", "seed=abc"], "--param seed=abc: expected an integer"),
        (["--param", "ingest_splits=train2017"], "expected a JSON/YAML list"),
        (["--param", "lambda_sds"], "expected key=value"),
        (["--param", "lambda_sds=-1"], "train.lambda_sds"),  # checked here as resolve-params will check it
        (["--param", "device=tpu"], "device"),
        (["--params-file", "missing.yaml"], "missing.yaml: params file not found"),
    ],
)
def test_bad_parameters_are_one_line_before_any_request(kfp_server, args, says):
    server = kfp_server()
    r = submit("--host", server.url, *args)
    assert r.exit_code == 2, r.output
    assert says in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert server.requests == []


def test_unreachable_host_is_one_line_exit_2(kfp_server):
    server = kfp_server()
    url = server.url
    server.server.shutdown()
    server.server.server_close()  # nothing listens on this port any more
    r = submit("--host", url)
    assert r.exit_code == 2
    assert f"{url}: cannot reach the KFP API" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_server_rejecting_the_run_is_one_line_exit_2(kfp_server):
    server = kfp_server(fail={("POST", f"{API}/runs"): 400})
    r = submit("--host", server.url)
    assert r.exit_code == 2
    assert "KFP API answered HTTP 400" in r.stderr and "rejected by the test server" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


def test_wrong_endpoint_is_named(kfp_server):
    server = kfp_server(fail={("GET", f"{API}/healthz"): 404})
    r = submit("--host", server.url)
    assert r.exit_code == 2 and "health check answered HTTP 404" in r.stderr
    assert server.calls() == [("GET", f"{API}/healthz")]  # no five slow retries by kfp.Client


def test_host_without_scheme_and_missing_package(tmp_path):
    r = submit("--host", "kfp.example.com")
    assert r.exit_code == 2 and "give the URL with its scheme" in r.stderr
    r = CliRunner().invoke(app, ["pipeline", "submit", "--host", "http://x", "--package", str(tmp_path / "no.yaml")])
    assert r.exit_code == 2 and "pipeline package not found" in r.stderr


# -- the run form's merge rules (sdsclip.kubeflow.apply_run_form, what resolve-params runs) ---------------
PARAMS_YAML = (ROOT / "params.yaml").read_text()


def merged(params_yaml: str, **changes) -> dict:
    spec = form_spec(PARAMS_YAML)
    form = {name: entry["default"] for name, entry in spec.items()} | changes
    return yaml.safe_load(apply_run_form(params_yaml, form, spec))


def test_form_defaults_leave_params_yaml_alone():
    edited = yaml.safe_load(PARAMS_YAML)
    edited["train"]["steps"], edited["registry"]["tracking_uri"] = 77, "http://mlflow:5000"
    out = merged(yaml.safe_dump(edited))
    assert out["train"]["steps"] == 77 and out["registry"]["tracking_uri"] == "http://mlflow:5000"


def test_changed_form_fields_win_and_map_to_their_keys():
    out = merged(
        PARAMS_YAML,
        lambda_sds=0.25,
        coco_root="/mnt/data/coco",
        ingest_splits=["train2017"],
        train_split="train2017",
        student_checkpoint="/mnt/data/ViT-B-32.pt",
        teacher_latent="vae",
    )
    assert out["train"]["lambda_sds"] == 0.25 and out["data"]["coco_root"] == "/mnt/data/coco"
    assert out["ingest"]["splits"] == ["train2017"] and out["data"]["train_split"] == "train2017"
    assert out["student"]["checkpoint"] == "/mnt/data/ViT-B-32.pt" and out["teacher"]["latent"] == "vae"


def test_null_in_the_form_and_steps_epochs_exclusive():
    out = merged(PARAMS_YAML, train_epochs=3)  # epochs set alone: steps becomes null
    assert (out["train"]["steps"], out["train"]["epochs"]) == (None, 3)
    with_checkpoint = yaml.safe_load(PARAMS_YAML)
    with_checkpoint["student"]["checkpoint"] = "/m.pt"
    assert merged(yaml.safe_dump(with_checkpoint), student_checkpoint="")["student"]["checkpoint"] == "/m.pt"
    spec = form_spec(yaml.safe_dump(with_checkpoint))  # compiled with a checkpoint: '' in the form clears it
    form = {name: entry["default"] for name, entry in spec.items()} | {"student_checkpoint": ""}
    assert yaml.safe_load(apply_run_form(yaml.safe_dump(with_checkpoint), form, spec))["student"]["checkpoint"] is None


def test_form_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"run form \(lambda_sds=-1.0\).*train.lambda_sds"):
        merged(PARAMS_YAML, lambda_sds=-1.0)
    with pytest.raises(ConfigError, match="params_yaml: not valid YAML"):
        merged("train: [", lambda_sds=0.5)
    with pytest.raises(ConfigError, match="unknown field 'nope'"):
        merged(PARAMS_YAML, nope=1)
    with pytest.raises(SubmitError, match="5 fields"):
        validate_cron("0 2 * * *")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))

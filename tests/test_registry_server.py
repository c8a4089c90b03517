"""Registration against a real `mlflow server` (the registry as a service), as the cluster runs it:
HTTP API, artifacts proxied by the server (`mlflow-artifacts:/`), basic auth with credentials from the
environment (what the Kubeflow pipeline injects from a Kubernetes secret)."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from sdsclip.config import load_params
from sdsclip.register import RegistryError, register_model, resolve_tracking_uri

pytestmark = pytest.mark.slow  # an MLflow server per test module; `make test` runs it, `make test-fast` not

ROOT = Path(__file__).resolve().parents[1]
ADMIN, PASSWORD = "admin", "test-" + secrets.token_hex(8)
STARTUP_DEADLINE_S = 300  # 10-30 s on a quiet 2-core machine; generous for a loaded one


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_cli() -> str:
    cli = Path(sys.executable).with_name("mlflow")  # the venv's mlflow, the one the project pins
    return str(cli) if cli.exists() else "mlflow"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on a free port; yields (url, server dir). Killed at the end."""
    try:
        import flask_wtf  # noqa: F401
    except ImportError:
        pytest.fail("mlflow's basic-auth server app needs Flask-WTF (a dev dependency): pip install 'mlflow[auth]'")
    root = tmp_path_factory.mktemp("mlflow_server")
    (root / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root}/auth.db\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n"
    )  # else every request re-runs the PBKDF2 check: ~0.5 s each here
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_AUTH_CONFIG_PATH=str(root / "auth.ini"),
        MLFLOW_AUTH_ADMIN_PASSWORD=PASSWORD,
        MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16),
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
    )  # no background job runners for a test server
    log = open(root / "server.log", "w")
    proc = subprocess.Popen(
        [
            _mlflow_cli(),
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination",
            str(root / "artifacts"),
        ],  # --serve-artifacts is the default
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # its own process group: the finalizer ends the server and its workers

    def stop():
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass
        log.close()

    try:
        deadline = time.monotonic() + STARTUP_DEADLINE_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({proc.returncode}):\n{(root / 'server.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server not healthy after {STARTUP_DEADLINE_S} s:\n"
                    f"{(root / 'server.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield url, root
    finally:
        stop()


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    """A clean cwd and environment: the client must write nothing locally; credentials as the secret gives them."""
    monkeypatch.chdir(tmp_path)
    for name in [k for k in os.environ if k.startswith("MLFLOW_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
    model = tmp_path / "model"
    model.mkdir()
    save_file({"proj": np.arange(6, dtype=np.float32).reshape(2, 3)}, str(model / "sigma.safetensors"))
    (model / "student.json").write_text(json.dumps({"arch": "sdsclip-tiny-vit"}))
    return tmp_path, model


def _params(tracking_uri: str, name: str):
    """The repo's params.yaml with only the registry section changed (one model/experiment per test)."""
    base = load_params(ROOT / "params.yaml")
    registry = base.registry.model_copy(
        update={"tracking_uri": tracking_uri, "experiment": f"exp-{name}", "model_name": f"sdsclip-{name}"}
    )
    return base.model_copy(update={"registry": registry})


def _metrics(path: Path, group: float) -> Path:
    path.write_text(
        json.dumps(
            {
                "n": 10,
                "text_score": 0.5,
                "image_score": 0.4,
                "group_score": group,
                "by_collapsed_tag": {"Object": {"group_score": group / 2}},
            }
        )
    )
    return path


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=url, registry_uri=url)


def test_gate_over_http_moves_champion_only_for_a_candidate_not_worse(server, workdir):
    url, server_root = server
    tmp, model = workdir
    params = _params(url, "gate")
    base = _metrics(tmp / "base.json", 0.30)
    first = register_model(params, model, _metrics(tmp / "a.json", 0.35), base, tmp / "r1.json", {"x.sha256": "abc"})
    second = register_model(params, model, _metrics(tmp / "b.json", 0.20), base, tmp / "r2.json")
    assert (first["version"], first["alias_moved"]) == (1, True)
    assert (second["version"], second["alias_moved"]) == (2, False)
    assert first["tracking_uri"] == url

    client = _client(url)
    name = params.registry.model_name
    assert {int(v.version) for v in client.search_model_versions(f"name='{name}'")} == {1, 2}
    assert client.get_model_version_by_alias(name, "champion").version == "1"  # the worse one did not take it
    v1, v2 = client.get_model_version(name, "1"), client.get_model_version(name, "2")
    assert (v1.tags["gate"], v2.tags["gate"]) == ("passed", "failed")
    assert v1.tags["winoground.group_score"] == "0.35" and v1.run_id == first["run_id"]
    run = client.get_run(first["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["winoground.group_score"] == 0.35
    assert run.data.metrics["baseline.winoground.group_score"] == 0.30
    assert run.data.metrics["winoground.by_collapsed_tag.Object.group_score"] == 0.175
    assert run.data.tags["data.x.sha256"] == "abc"
    assert run.data.params["train.lambda_sds"] == "1.0"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")  # proxied: the client needs no store access

    # the champion's files come back byte-identical through the server, and were stored by the server
    import mlflow

    mlflow.set_tracking_uri(url)  # models:/ URIs resolve through the global URI; restored below
    try:
        champion_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@champion", dst_path=str(tmp / "dl")))
    finally:
        mlflow.set_tracking_uri(None)
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # set_tracking_uri exported it
    for f in ("sigma.safetensors", "student.json"):
        assert (champion_dir / f).read_bytes() == (model / f).read_bytes()
    assert len(list((server_root / "artifacts").rglob("sigma.safetensors"))) == 2
    assert not any((tmp / d).exists() for d in ("mlruns", "mlartifacts", "mlflow.db"))


def test_env_tracking_uri_from_the_secret_overrides_params(server, workdir, monkeypatch):
    url, _ = server
    tmp, model = workdir
    local_db = tmp / "params-store.db"
    params = _params(f"sqlite:///{local_db}", "env")  # what params.yaml says: a local file
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)  # what the cluster's secret says: the server
    base = _metrics(tmp / "base.json", 0.30)
    result = register_model(params, model, _metrics(tmp / "a.json", 0.30), base, tmp / "r.json")
    assert result["tracking_uri"] == url and result["alias_moved"]  # equal passes (>=)
    assert not local_db.exists()
    assert _client(url).get_model_version_by_alias(params.registry.model_name, "champion").version == "1"
    assert json.loads((tmp / "r.json").read_text())["tracking_uri"] == url

    # an empty variable (a secret key left blank) or none falls back to params
    monkeypatch.setenv("MLFLOW_TRACKING_URI", " ")
    assert resolve_tracking_uri(params) == f"sqlite:///{local_db}"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(params) == f"sqlite:///{local_db}"


def test_wrong_password_is_one_line_error_naming_the_server(server, workdir, monkeypatch):
    url, _ = server
    tmp, model = workdir
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "wrong")
    base = _metrics(tmp / "base.json", 0.30)
    with pytest.raises(RegistryError) as err:
        register_model(_params(url, "denied"), model, _metrics(tmp / "a.json", 0.4), base, tmp / "r.json")
    message = str(err.value)
    assert "\n" not in message and url in message and "MLFLOW_TRACKING_PASSWORD" in message
    assert not (tmp / "r.json").exists()


def test_password_in_the_uri_is_not_written_to_the_result(server, workdir, monkeypatch):
    url, _ = server
    tmp, model = workdir
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    with_creds = url.replace("http://", f"http://{ADMIN}:{PASSWORD}@")
    base = _metrics(tmp / "base.json", 0.30)
    result = register_model(_params(with_creds, "uricreds"), model, _metrics(tmp / "a.json", 0.4), base, tmp / "r.json")
    assert result["version"] == 1
    assert PASSWORD not in (tmp / "r.json").read_text()
    assert result["tracking_uri"] == url.replace("http://", f"http://{ADMIN}:***@")


def test_unreachable_server_is_one_line_error(workdir, monkeypatch):
    tmp, model = workdir
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the default retries for minutes
    host = f"127.0.0.1:{_free_port()}"  # nothing listens there
    base = _metrics(tmp / "base.json", 0.30)
    with pytest.raises(RegistryError) as err:
        register_model(
            _params(f"http://ci:hunter2@{host}", "down"), model, _metrics(tmp / "a.json", 0.4), base, tmp / "r.json"
        )
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"MLflow at http://ci:***@{host}: cannot connect ([Errno ")
    assert "hunter2" not in message


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "not valid JSON (line 1"),
        ("[0.3]", "expected a JSON object"),
        (json.dumps({"group_score": "high"}), "group_score must be a number"),
        (json.dumps({"text_score": 0.3}), "registry.gate_metric: 'group_score' is not in"),
    ],
)
def test_bad_metrics_file_is_named_before_any_server_call(workdir, content, expected):
    tmp, model = workdir
    bad = tmp / "bad.json"
    bad.write_text(content)
    with pytest.raises(RegistryError, match="^" if expected.startswith("registry") else str(bad)) as err:
        register_model(
            _params("http://127.0.0.1:9", "bad"), model, bad, _metrics(tmp / "base.json", 0.3), tmp / "r.json"
        )
    assert expected in str(err.value)

"""MLflow registration with the champion gate (sqlite store in a temp dir)."""

import json

import pytest

from sdsclip.config import Params
from sdsclip.register import register_model


def _metrics(path, group):
    path.write_text(
        json.dumps({"n": 10, "text_score": 0.5, "image_score": 0.4, "group_score": group, "by_collapsed_tag": {}})
    )
    return path


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is relative to the cwd
    params = Params.model_validate({"registry": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    model = tmp_path / "model"
    model.mkdir()
    (model / "student.json").write_text("{}")
    return params, model, tmp_path


def test_gate_moves_alias_only_when_not_worse(setup):
    from mlflow import MlflowClient

    params, model, tmp = setup
    base = _metrics(tmp / "base.json", 0.30)
    first = register_model(params, model, _metrics(tmp / "a.json", 0.30), base, tmp / "r1.json", {"x": "abc"})
    assert first["alias_moved"] and first["version"] == 1  # equal passes (>=)
    second = register_model(params, model, _metrics(tmp / "b.json", 0.20), base, tmp / "r2.json")
    assert not second["alias_moved"] and second["version"] == 2
    assert "0.2000 < baseline 0.3000" in second["reason"]

    client = MlflowClient(tracking_uri=params.registry.tracking_uri)
    champion = client.get_model_version_by_alias(params.registry.model_name, "champion")
    assert str(champion.version) == "1"
    run = client.get_run(first["run_id"])
    assert run.data.metrics["winoground.group_score"] == 0.30
    assert run.data.metrics["baseline.winoground.group_score"] == 0.30
    assert run.data.tags["data.x"] == "abc"
    assert run.data.params["train.lambda_sds"] == "1.0"
    assert json.loads((tmp / "r2.json").read_text())["version"] == 2
    assert client.get_model_version(params.registry.model_name, "2").tags["gate"] == "failed"


def test_a_local_sqlite_store_keeps_artifacts_beside_the_database(tmp_path, monkeypatch):
    """Not in MLflow's default ./mlruns of the working directory, which dies with a container: beside the
    database file, on the volume that holds it (a relative sqlite path resolved from the working directory)."""
    from mlflow import MlflowClient

    store, elsewhere = tmp_path / "volume", tmp_path / "container-cwd"
    store.mkdir()
    elsewhere.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    (model / "student.json").write_text("{}")
    base = _metrics(tmp_path / "base.json", 0.3)
    monkeypatch.chdir(elsewhere)  # the register step runs in another working directory than the store
    params = Params.model_validate({"registry": {"tracking_uri": f"sqlite:///{store / 'mlflow.db'}"}})
    register_model(params, model, _metrics(tmp_path / "a.json", 0.3), base, tmp_path / "r.json")
    assert (store / "mlartifacts").is_dir() and list((store / "mlartifacts").rglob("student.json"))
    assert not (elsewhere / "mlruns").exists() and not (elsewhere / "mlartifacts").exists()
    client = MlflowClient(tracking_uri=params.registry.tracking_uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == params.registry.experiment]
    assert experiment.artifact_location == (store / "mlartifacts").as_uri()

    from sdsclip.register import experiment_id

    monkeypatch.chdir(store)
    relative = MlflowClient(tracking_uri="sqlite:///other.db")
    new = experiment_id(relative, "relative", "sqlite:///other.db")
    assert relative.get_experiment(new).artifact_location == (store / "mlartifacts").as_uri()
    assert experiment_id(relative, "relative", "sqlite:///other.db") == new  # found, not created again

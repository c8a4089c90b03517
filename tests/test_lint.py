"""The house rules as tests, so `make test` runs them: ruff (lint + format) and mypy (settings in pyproject.toml),
no import cycle in the library, no private name imported across modules, no library function over 80 lines."""

import ast
import subprocess
import sys

from tiny_params import ROOT


def ruff(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)


def test_ruff_lint_is_clean():
    proc = ruff("check", "--output-format", "concise", ".")
    assert proc.returncode == 0, f"`ruff check --fix .` fixes some of these:\n{proc.stdout[-4000:]}{proc.stderr}"


def test_ruff_format_is_clean():
    proc = ruff("format", "--check", ".")
    assert proc.returncode == 0, f"run `ruff format .`:\n{proc.stdout[-4000:]}{proc.stderr}"


def test_mypy_is_clean_on_the_library():
    proc = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)  # pyproject
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr


def _modules() -> dict[str, ast.Module]:
    src = ROOT / "src"
    return {
        ".".join(p.relative_to(src).with_suffix("").parts).removesuffix(".__init__"): ast.parse(p.read_text())
        for p in sorted((src / "sdsclip").rglob("*.py"))
    }


def _imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]  # function-level too


def test_library_modules_import_no_cycle():
    modules = _modules()
    edges = {name: set() for name in modules}
    for name, tree in modules.items():
        for node in _imports(tree):
            targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if isinstance(node, ast.ImportFrom) and node.module:  # `from sdsclip.x import y`: y may be a module
                targets += [f"{node.module}.{a.name}" for a in node.names]
            edges[name] |= {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}

    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for nxt in sorted(edges[module]):
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path[path.index(nxt) :], nxt])
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[module] = 2

    for module in sorted(modules):
        if module not in state:
            visit(module, [module])


def test_no_private_name_is_imported_from_another_module():
    found = []
    code = [ROOT / "src", ROOT / "components", ROOT / "pipelines", ROOT / "benchmarks", ROOT / "tests"]
    for path in [p for folder in code for p in folder.rglob("*.py")]:
        for node in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sdsclip"):
                found += [f"{path.relative_to(ROOT)}: {node.module}.{a.name}" for a in node.names if a.name[0] == "_"]
    assert not found, found


def test_functions_are_at_most_80_lines():
    """The library, the kfp components and the pipeline graph."""
    paths = [
        *(ROOT / "src" / "sdsclip").rglob("*.py"),
        *(ROOT / "components").glob("*.py"),
        *(ROOT / "pipelines").glob("*.py"),
    ]
    long = [
        f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
        for path in paths
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80
    ]
    assert not long, long

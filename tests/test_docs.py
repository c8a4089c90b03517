"""The documentation: README.md stays short, docs/ builds as a strict MkDocs site, every page is in the nav."""

import os
import re
import subprocess
import sys

import yaml
from tiny_params import ROOT

README_MAX_CHARS = 12_000


def _nav_pages(nav):
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            yield from _nav_pages(value)
        else:
            yield value


def test_mkdocs_build_strict(tmp_path):
    # strict: broken links or anchors, pages missing from the nav and any other warning fail the build
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    cmd = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_readme_is_short():
    n = len((ROOT / "README.md").read_text())
    assert n <= README_MAX_CHARS, f"README.md has {n} characters (at most {README_MAX_CHARS}): move details to docs/"


def test_every_docs_page_is_in_the_nav():
    nav = set(_nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"]))
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    assert pages == nav, f"not in the nav: {sorted(pages - nav)}; in the nav, no file: {sorted(nav - pages)}"


def test_readme_links_to_existing_docs_pages():
    links = re.findall(r"\]\((docs/[^)#\s]+)", (ROOT / "README.md").read_text())
    assert links, "the README links to no docs page"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README links to missing docs pages: {missing}"

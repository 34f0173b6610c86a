"""The user's documentation: README.md is a guide of at most 300 lines, docs/cli.md
is generated from the settings and commands and names every flag, docs/benchmarks/
and the README's headline table are what bench/report.py makes of the results, every
relative link resolves, and nothing in them is a working note.  (Made to fail on
purpose: a flag's row deleted from docs/cli.md fails the first two tests.)"""
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO
from launch.config import SETTINGS
from launch.reference import markdown

ROOT = Path(REPO)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_cli_reference_is_generated_from_the_code():
    assert (ROOT / "docs" / "cli.md").read_text() == markdown(), "run: python -m launch.reference > docs/cli.md"


def test_every_setting_is_in_the_cli_reference():
    reference = (ROOT / "docs" / "cli.md").read_text()
    missing = [name for name in SETTINGS if f"`--{name.replace('_', '-')}" not in reference]
    assert not missing, f"flags missing from docs/cli.md: {missing}"


def test_readme_is_a_guide():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for heading in ("## Install", "## Quickstart", "## Recipes", "## Performance", "## Documentation", "## Tests"):
        assert heading in readme
    assert "python -m pytest -q tests" in readme  # the command .ci/run runs
    assert "<!-- headline: bench/results/" in readme and "| system |" in readme


def test_no_working_notes_in_the_documentation():
    notes = re.compile(r"\bsession\b|\bwe aim\b|\bTODO\b|\bworktree of [0-9a-f]{7}|<worktree", re.I)
    for page in PAGES:
        text = page.read_text()
        assert not notes.search(text), f"{page.relative_to(ROOT)}: {notes.search(text)[0]!r}"
        if "benchmarks" not in page.parts:  # a benchmark page names the commit it measured
            commit = re.search(r"`[^`\n]*\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b[^`\n]*`", text)
            assert not commit, f"{page.relative_to(ROOT)}: {commit[0]}"


def test_relative_links_resolve():
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target:
                assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_benchmark_pages_are_what_the_results_give():
    check = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert len(list((ROOT / "bench" / "results").glob("*.json"))) >= 2  # T=64 and T=1024 of one machine

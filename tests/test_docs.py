"""The documentation: README.md and docs/*.md against benchmarks/results/*.json, their links and the README's size."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
RENDERER = ROOT / "benchmarks" / "render_tables.py"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def renderer():
    spec = importlib.util.spec_from_file_location("render_tables", RENDERER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_tables_equal_what_the_renderer_writes():
    render_tables = renderer()
    for path in [README, *DOCS]:
        text = path.read_text()
        assert render_tables.render(ROOT, text) == text, (
            f"{path.name} is stale: run benchmarks/render_tables.py"
        )
    check = subprocess.run(
        [sys.executable, str(RENDERER), "--check"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert check.returncode == 0, check.stderr


def test_check_names_the_stale_block(tmp_path):
    shutil.copytree(ROOT / "benchmarks" / "results", tmp_path / "benchmarks" / "results")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(README, tmp_path / "README.md")
    demo = tmp_path / "benchmarks" / "results" / "demo_cpu.json"
    data = json.loads(demo.read_text())
    data["tables"]["heldout"]["rows"][0][1] = "9.999"
    demo.write_text(json.dumps(data))
    check = subprocess.run(
        [sys.executable, str(RENDERER), "--check", "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert check.returncode == 1
    assert "README.md: demo_cpu.json#heldout" in check.stderr
    fixed = subprocess.run(
        [sys.executable, str(RENDERER), "--root", str(tmp_path)], capture_output=True, text=True
    )
    assert fixed.returncode == 0 and "rewrote README.md" in fixed.stdout
    assert "| validation loss (nats/token) | 9.999 |" in (tmp_path / "README.md").read_text()


def test_every_block_names_an_existing_table():
    render_tables = renderer()
    blocks = [m for path in [README, *DOCS] for m in render_tables.BLOCK.finditer(path.read_text())]
    assert blocks
    names = {m["file"] for m in blocks}
    assert {"demo_cpu.json", "what_trains_cpu.json"} <= names
    with pytest.raises(render_tables.ResultsError, match="no table 'nope'"):
        render_tables.render_block(ROOT, "demo_cpu.json", "nope")


def test_results_files_say_where_and_when_they_were_measured():
    assert RESULTS
    for path in RESULTS:
        data = json.loads(path.read_text())
        provenance = data.get("provenance")
        assert provenance is not None, f"{path.name} has no provenance"
        measured = data.get("rows", True) != [] or any(t["rows"] for t in data.get("tables", {}).values())
        for field in ("machine", "versions", "commit", "date"):
            assert field in provenance, f"{path.name}: provenance lacks {field}"
            if measured:
                assert provenance[field], f"{path.name}: provenance.{field} is empty"
        if measured:
            assert re.fullmatch(r"[0-9a-f]{40}", provenance["commit"]), path.name
            assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", provenance["date"]), path.name


def test_an_empty_table_renders_as_not_measured_yet():
    body = renderer().render_block(ROOT, "what_trains_cpu.json", None)
    rows = json.loads((ROOT / "benchmarks" / "results" / "what_trains_cpu.json").read_text())["rows"]
    assert ("Not measured yet" in body) == (not rows)


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines"
    assert lines[2:6] == [
        "```bash",
        "bash scripts/setup.sh && .venv/bin/hfdist hyperfit configs/demo.yaml --output-dir runs/demo --compare",
        ".venv/bin/python -m pytest -q",
        "```",
    ]
    assert ".venv/bin/python -m pytest -q" in (ROOT / ".ci" / "run").read_text()


def test_every_page_is_linked_from_the_readme():
    linked = {target.split("#")[0] for target in LINK.findall(README.read_text())}
    assert DOCS
    for page in DOCS:
        assert f"docs/{page.name}" in linked, f"README.md does not link docs/{page.name}"


def heading_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_relative_link_resolves():
    broken = []
    for path in [README, *DOCS]:
        for target in LINK.findall(path.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            file, _, anchor = target.partition("#")
            linked = path.parent / file if file else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
            elif anchor and anchor not in heading_anchors(linked):
                broken.append(f"{path.relative_to(ROOT)} -> {target} (no such heading)")
    assert not broken, broken


def test_a_benchmarks_provenance_satisfies_the_renderer():
    """What the benchmark scripts write (benchmarks/provenance.py) is what the renderer requires of a results file."""
    spec = importlib.util.spec_from_file_location("provenance", ROOT / "benchmarks" / "provenance.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    block = module.provenance()
    found = renderer().provenance({"provenance": block}, "fresh.json")
    assert re.fullmatch(r"[0-9a-f]{40}", found["commit"]) and re.fullmatch(
        r"\d{4}-\d{2}-\d{2}", found["date"]
    )
    assert "torch" in found["versions"] and found["machine"]

"""Write the result tables of README.md and docs/*.md from benchmarks/results/*.json.

Measured numbers live in ``benchmarks/results/*.json`` only, each file with its ``provenance``: the machine, the
versions, the commit and the date (``benchmarks/provenance.py`` makes it for the benchmark scripts). A markdown
file shows them in a block between two markers:

    <!-- results: demo_cpu.json#heldout -->
    (generated: a title, the table, the provenance line)
    <!-- /results -->

``FILE.json`` names a file of ``benchmarks/results/``, ``#table`` one of its tables. A file written by hand holds
``tables: {name: {title, columns, rows, note?, commit?, date?}}`` (a table's own commit and date override the
file's) or one table as top-level ``columns`` and ``rows``; rows are lists of cells, written as given. The files
the benchmark scripts write (``bench_train.py``, ``bench_generate.py``, ``bench_cross_entropy.py``) keep their own
layout, and their tables are built here from it. A table with no rows renders as "not measured yet". A block indented
inside a list item is rendered with the markers' indentation.

Usage:
  python benchmarks/render_tables.py            # rewrite every block
  python benchmarks/render_tables.py --check    # rewrite nothing; exit 1 naming each stale block
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path("benchmarks") / "results"
BLOCK = re.compile(
    r"^(?P<indent>[ ]*)(?P<open><!-- results: (?P<file>[\w.\-]+\.json)(?:#(?P<table>[\w\-]+))? -->\n)"
    r"(?P<body>.*?)^(?P=indent)(?P<close><!-- /results -->)",
    re.S | re.M,
)
PROVENANCE_FIELDS = ("machine", "versions", "commit", "date")


class ResultsError(ValueError):
    """A block names a file or table that does not exist, or a file lacks its provenance."""


def documents(root: Path) -> list[Path]:
    """The markdown files that may hold result blocks: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def load(root: Path, name: str) -> dict:
    path = root / RESULTS / name
    if not path.is_file():
        raise ResultsError(f"{RESULTS / name}: no such results file")
    return json.loads(path.read_text())


def provenance(data: dict, name: str, table: dict | None = None) -> dict:
    """The file's provenance, with a table's own commit and date where it has them; every field required."""
    found = dict(data.get("provenance") or {})
    for field in ("commit", "date"):
        if table and table.get(field):
            found[field] = table[field]
    missing = [field for field in PROVENANCE_FIELDS if not found.get(field)]
    if missing:
        raise ResultsError(f"{RESULTS / name}: provenance lacks {', '.join(missing)}")
    return found


def provenance_line(found: dict, name: str) -> str:
    versions = found["versions"]
    versions = ", ".join(f"{k} {v}" for k, v in versions.items()) if isinstance(versions, dict) else versions
    changes = " with uncommitted changes" if found.get("uncommitted_changes") else ""
    return (
        f"<sub>`{(RESULTS / name).as_posix()}`: {found['machine']}; {versions}; "
        f"commit {found['commit'][:7]}{changes}, {found['date']}</sub>"
    )


def markdown_table(columns: list, rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(str(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def table_by_hand(data: dict, name: str, key: str | None) -> tuple[dict, list[str]]:
    """A table written by hand: ``tables[key]``, or the file's own ``columns`` and ``rows``."""
    if key is None:
        table = data
    elif key in data.get("tables", {}):
        table = data["tables"][key]
    else:
        raise ResultsError(f"{RESULTS / name}: no table {key!r} (has: {', '.join(data.get('tables', {}))})")
    lines = [table["title"], ""] if table.get("title") else []
    return table, lines + markdown_table(table["columns"], table["rows"])


def train_table(data: dict) -> list[str]:
    """bench_train.py's file: medians per implementation, ratios against the plain loop and Trainer."""
    s, impls = data["settings"], data["implementations"]
    base, trainer = impls.get("plain"), impls.get("trainer")
    rows = []
    for impl, summary in impls.items():
        tps, mem = summary["tokens_per_s"]["median"], summary["peak_memory_gib"]["median"]
        rows.append(
            [
                impl,
                f"{tps:,.0f}",
                f"{summary['step_time_s']['median']:.3f}",
                f"{mem:.2f}",
                f"{summary['mfu']['median']:.1%}" if "mfu" in summary else "-",
                f"{tps / base['tokens_per_s']['median']:.2f}x" if base else "-",
                f"{mem / base['peak_memory_gib']['median']:.2f}x" if base else "-",
                f"{tps / trainer['tokens_per_s']['median']:.2f}x" if trainer else "-",
            ]
        )
    title = (
        f"Training {s['model']}, batch {s['batch']} x sequence {s['seq_len']}, {s['dtype']} "
        f"(median of {s['repeats']} runs of {s['steps']} steps after {s['warmup']})"
    )
    columns = [
        "implementation",
        "tokens/s",
        "step time (s)",
        "peak memory (GiB)",
        "MFU",
        "tokens/s vs plain",
        "memory vs plain",
        "tokens/s vs Trainer",
    ]
    return [title, ""] + markdown_table(columns, rows)


def generate_table(data: dict, key: str | None) -> list[str]:
    """bench_generate.py's file: tokens/s per strategy, batch and implementation; ``#blocker``; ``#bound``."""
    if key == "blocker":
        b = data["blocker"]
        columns = ["batch", "training 5-grams", "`block_` alone, per step", "whole greedy run, per step"]
        rows = [[b["batch"], f"{b['training_ngrams']:,}", f"{b['block_call_ms']:.3f} ms"]]
        rows[0].append(f"{b['overhead_ms_per_step']:.1f} ms")
        return ["The citation blocker's cost", ""] + markdown_table(columns, rows)
    if key == "bound":
        bound = data["matmul_bound"]
        hf = {
            r["batch"]: r["tokens_per_s"]
            for r in data["results"]
            if r["impl"] == "hf" and r["strategy"] == "greedy"
        }
        rows = [[batch, tps, f"{hf[int(batch)]:.1f}"] for batch, tps in bound["tokens_per_s"].items()]
        return [bound["note"], ""] + markdown_table(
            ["batch", "matrix products alone (tokens/s)", "HF `generate`, greedy (tokens/s)"], rows
        )
    if key is not None:
        raise ResultsError(f"a generation results file has the tables '', 'blocker' and 'bound', not {key!r}")
    speed = {
        (r["strategy"], r["batch"], r["impl"]): r["tokens_per_s"]
        for r in data["results"]
        if "tokens_per_s" in r
    }
    rows = []
    for (strategy, batch, impl), tps in speed.items():
        base = speed.get((strategy, batch, "hf"))
        rows.append([strategy, batch, impl, f"{tps:.1f}", f"{tps / base:.2f}x" if base else "-"])
    checks = [r for r in data["results"] if "equals_hf_greedy" in r]
    unequal = [f"{r['impl']} at batch {r['batch']}" for r in checks if not r["equals_hf_greedy"]]
    title = (
        f"Decoding {data['model']} ({data['dtype'].replace('torch.', '')}), {data['prompt_len']}-token prompts, "
        f"{data['new_tokens']} new tokens, median of {data['repeats']}"
    )
    lines = [title, ""] + markdown_table(
        ["Strategy", "Batch", "Implementation", "Tokens/s", "vs HF generate"], rows
    )
    if checks:
        equal = "Greedy outputs equal HF `generate`'s in every row."
        lines += ["", "Greedy outputs differ from HF's: " + ", ".join(unequal) if unequal else equal]
    return lines


def cross_entropy_table(data: dict) -> list[str]:
    """bench_cross_entropy.py's file: time and extra memory per method, against torch eager."""
    results = data["results"]
    eager = {r["n"]: r for r in results if r["method"] == "torch-eager" and r["status"] == "ok"}
    rows = []
    for r in results:
        if r["status"] != "ok":
            rows.append([r["method"], r["n"], r["status"], "", "", ""])
            continue
        ref = eager.get(r["n"])
        size = r["extra_bytes"]
        memory = f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
        rows.append(
            [
                r["method"],
                r["n"],
                f"{r['time_s']:.1f} s" if r["time_s"] >= 1 else f"{1e3 * r['time_s']:.1f} ms",
                memory,
                f"{r['time_s'] / ref['time_s']:.2f}x" if ref else "-",
                f"{size / ref['extra_bytes']:.3f}x" if ref else "-",
            ]
        )
    first = results[0]
    title = (
        f"Fused linear cross-entropy, forward + backward, H = {first['h']}, V = {first['v']}, {first['dtype']}; "
        f"extra memory beyond the inputs, gradients included"
    )
    columns = ["method", "N", "time", "extra memory", "time vs torch eager", "memory vs torch eager"]
    return [title, ""] + markdown_table(columns, rows)


def render_block(root: Path, name: str, key: str | None) -> str:
    """The text between a block's markers."""
    data = load(root, name)
    table: dict | None = None
    if "tables" in data or "columns" in data:
        table, lines = table_by_hand(data, name, key)
        if not table["rows"]:
            return f"Not measured yet (`{(RESULTS / name).as_posix()}` has no rows).\n"
    elif data.get("benchmark") == "train":
        lines = train_table(data)
    elif "blocker" in data:
        lines = generate_table(data, key)
    elif "meta" in data:
        lines = cross_entropy_table(data)
    else:
        raise ResultsError(f"{RESULTS / name}: not a results file this script knows")
    if table and table.get("note"):
        lines += ["", table["note"]]
    lines += ["", provenance_line(provenance(data, name, table), name)]
    return "\n".join(lines) + "\n"


def block_body(root: Path, match: re.Match) -> str:
    """A block's text, indented as its markers are (a block may sit inside a list item)."""
    body = render_block(root, match["file"], match["table"])
    return "".join(
        match["indent"] + line if line.strip() else line for line in body.splitlines(keepends=True)
    )


def render(root: Path, text: str) -> str:
    """``text`` with every block rewritten."""

    def replace(match: re.Match) -> str:
        indent = match["indent"]
        return indent + match["open"] + block_body(root, match) + indent + match["close"]

    return BLOCK.sub(replace, text)


def stale_blocks(root: Path, path: Path) -> list[str]:
    """The references of the blocks of ``path`` whose text differs from what the results give."""
    text = path.read_text()
    return [
        match["file"] + (f"#{match['table']}" if match["table"] else "")
        for match in BLOCK.finditer(text)
        if match["body"] != block_body(root, match)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a block is stale")
    parser.add_argument("--root", type=Path, default=ROOT, help="the repository (default: this checkout)")
    args = parser.parse_args(argv)
    stale = []
    try:
        for path in documents(args.root):
            if not path.is_file():
                continue
            relative = path.relative_to(args.root).as_posix()
            if args.check:
                stale += [f"{relative}: {ref}" for ref in stale_blocks(args.root, path)]
                continue
            text = path.read_text()
            new = render(args.root, text)
            if new != text:
                path.write_text(new)
                print(f"rewrote {relative}")
    except ResultsError as exc:
        print(f"render_tables: error: {exc}", file=sys.stderr)
        return 2
    for line in stale:
        print(f"stale: {line} (run: python benchmarks/render_tables.py)", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())

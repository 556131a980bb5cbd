"""Record finished runs' numbers in ``benchmarks/results/`` (the docs' tables are rendered from there).

    python benchmarks/record_runs.py demo runs/demo          # a finished `hfdist hyperfit ... --compare` run
    python benchmarks/record_runs.py runs runs/compare       # the OUT folder of `hfdist compare --runs`

``demo`` rewrites the held-out, run and comparison tables of ``results/demo_cpu.json`` from the run's
``summary.json``, ``metrics.jsonl`` and ``compare/report.json``; ``runs`` writes ``results/what_trains_cpu.json``
(each run's training facts and held-out measures, and every decoding row) from the combined ``report.json``. Each
file gets this machine's provenance (``provenance.py``); a table measured earlier keeps its own commit and date.
Numbers are copied as the runs wrote them, rounded for the table; nothing is computed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from provenance import provenance

from hfdist.io import atomic_write_json
from hfdist.report import row_labels

RESULTS = Path(__file__).resolve().parent / "results"

# The decoding rows' measures: (column, report key, digits); a share is printed as a percentage.
GENERATION_COLUMNS = [
    ("TTR-96 ↑", "ttr96", 3),
    ("Distinct-2 ↑", "distinct_2", 3),
    ("Self-BLEU ↓", "self_bleu", 3),
    ("Repeated 4-grams ↓", "repetition_rate_4", 3),
    ("Overlap > 10 tokens ↓", "overlap_share_over_10", None),
    ("Longest overlap (mean)", "overlap_mean_longest_run", 1),
]


def cell(value, digits) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if digits is None else f"{value:.{digits}f}"


def generation_table(rows: dict, title: str, run_column: bool) -> dict:
    columns = (["Run"] if run_column else []) + ["Model", "Decoding"] + [c for c, _, _ in GENERATION_COLUMNS]
    table = []
    for name, metrics in rows.items():
        model, decoding = row_labels(name, metrics.get("settings", {}))
        first = (
            model.split(": ", 1)
            if run_column and ": " in model
            else (["all"] if run_column else []) + [model]
        )
        table.append([*first, decoding] + [cell(metrics.get(key), d) for _, key, d in GENERATION_COLUMNS])
    return {"title": title, "columns": columns, "rows": table}


def record_demo(run: Path) -> Path:
    summary = json.loads((run / "summary.json").read_text())
    report = json.loads((run / "compare" / "report.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in steps if r["kind"] == "step"]
    path = RESULTS / "demo_cpu.json"
    data = json.loads(path.read_text())
    older = data["provenance"]
    # Tables this command does not write keep their measurement's origin.
    for key, table in data["tables"].items():
        if key not in ("heldout", "run", "compare"):
            table.setdefault("commit", older["commit"])
            table.setdefault("date", older["date"])
    base, tuned = summary["base"], summary["hyperfitted"]
    sets = [("eval", "Austen"), ("eval/kjv", "KJV wisdom")]
    measures = [
        ("validation loss (nats/token)", "loss", 3),
        ("validation perplexity", "perplexity", 1),
        ("validation next-token entropy (nats)", "entropy", 3),
        ("top-1 probability mass", "top1_mass", 3),
        ("greedy TTR over the last 96 of 224 generated tokens", "ttr96", 3),
    ]
    heldout = data["tables"]["heldout"]
    heldout["rows"] = [
        [label] + [cell(side[f"{prefix}/{key}"], d) for prefix, _ in sets for side in (base, tuned)]
        for label, key, d in measures
    ]
    data["tables"]["run"]["rows"] = [  # step times: `hfdist bench train`, measured with nothing else running
        ["training steps", f"{len(steps)}"],
        ["training loss, first step", f"{summary['train_loss_first_step']:.2f}"],
        ["training loss, mean of the last epoch", f"{summary['train_loss_last_epoch']:.3f}"],
    ]
    compare = generation_table(report["rows"], data["tables"]["compare"]["title"], run_column=False)
    data["tables"]["compare"] = compare
    match = report.get("matched_temperature")
    if match:
        data["tables"]["compare"]["title"] += f" (T* = {match['temperature']:.3f})"
    data["provenance"] = provenance()
    atomic_write_json(path, data)
    return path


def record_runs(out: Path) -> Path:
    combined = json.loads((out / "report.json").read_text())
    path = RESULTS / "what_trains_cpu.json"
    data = json.loads(path.read_text())
    facts = combined["facts"]
    first = next(iter(facts.values()))
    sets = list(first["heldout"])
    ttr = next(m for m in first["heldout"][sets[0]] if m.startswith("ttr"))
    rows = [
        ["base model", "-", "-", "-", "-", "-"]
        + [cell(first["heldout"][s][m]["base"], 3) for s in sets for m in (ttr, "entropy")]
    ]
    for name, f in facts.items():
        p = f["parameters"]
        rows.append(
            [
                name,
                f["trains"],
                f"{f['learning_rate']:g}",
                f"{p['trainable']:,} ({100 * p['trainable'] / p['total']:.1f}%)",
                cell(f["peak_memory_gib"], 2),  # step time: `hfdist bench train`, on a quiet machine
                cell(f["final_train_loss"], 4),
            ]
            + [cell(f["heldout"][s][m]["hyperfitted"], 3) for s in sets for m in (ttr, "entropy")]
        )
    data["rows"] = rows
    data["tables"] = {
        "generations": generation_table(
            combined["rows"],
            "Every decoding row of `hfdist compare --runs`, on the demo's 8 Austen contexts",
            True,
        )
    }
    data["matched_temperature"] = combined["matched_temperature"]
    data["provenance"] = provenance()
    atomic_write_json(path, data)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["demo", "runs"])
    parser.add_argument("folder", type=Path, help="the demo's run folder, or compare --runs' OUT folder")
    args = parser.parse_args(argv)
    path = record_demo(args.folder) if args.what == "demo" else record_runs(args.folder)
    print(f"wrote {path}; now: python benchmarks/render_tables.py")
    return 0


if __name__ == "__main__":
    sys.exit(main())

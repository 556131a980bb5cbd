"""``hfdist compare``: base vs hyperfitted model on the same contexts, the paper's table and plots."""

from __future__ import annotations

import argparse

from hfdist.commands import add_decoding_arguments, dataclass_from_args, require_positive


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="the paper's comparison: original greedy/top-p vs hyperfitted greedy (+ blocker)",
        description="Decode the same held-out contexts with the base model (greedy; top-p 0.9, temperature 0.7, "
        "top-k 50; for a text run also temperature sampling at the matched entropy, T*) and the hyperfitted model "
        "(greedy; greedy + citation blocker); write report.md "
        "(table), report.json, generations_*.jsonl and PNG plots (TTR over position, training "
        "curves, top-1 probability) into RUN/compare or --out. An image run (data.modality image) is "
        "compared by completing each held-out image from its first rows, with a completions grid. --runs compares "
        "several runs side by side (one table, their training facts, the plots overlaid).",
    )
    parser.add_argument("--run", help="hyperfit run folder (supplies every default below)")
    parser.add_argument(
        "--runs",
        nargs="+",
        metavar="RUN",
        help="several hyperfit run folders side by side: each compared into OUT/<run>, then one report in OUT "
        "(default: the first run's parent folder / compare)",
    )
    parser.add_argument("--base", help="base model (default: the run's config.yaml model.path)")
    parser.add_argument("--hyperfitted", help="hyperfitted model (default: RUN/model)")
    parser.add_argument("--contexts", help="contexts .npy [N, L] (default: RUN/data/contexts.npy)")
    parser.add_argument(
        "--train-data",
        help="training ids .npy for the blocker and overlap (default: RUN/data/train_token_ids.npy)",
    )
    parser.add_argument("--validation", help="held-out ids .npy (default: RUN/data/validation_token_ids.npy)")
    parser.add_argument(
        "--num-contexts", type=int, default=None, help="use the first N contexts (default: all)"
    )
    # The top-p row's defaults: the paper's (p 0.9, temperature 0.7, top-k 50).
    parser.add_argument("--temperature", type=float, default=0.7)
    add_decoding_arguments(parser, top_p=0.9, top_k=50)
    parser.add_argument("--stop-at-eos", action="store_true", help="stop each continuation at EOS")
    parser.add_argument(
        "--no-matched-entropy",
        dest="matched_entropy",
        action="store_false",
        help="skip the row of the original model sampled at the hyperfitted model's held-out entropy",
    )
    parser.add_argument("--out", help="output folder (default: RUN/compare)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from hfdist.errors import HfdistError
    from hfdist.report import (
        CompareSettings,
        compare_runs,
        format_facts_table,
        format_image_table,
        format_table,
        run_comparison,
    )

    require_positive(args, "max_new_tokens", "batch_size", "blocker_n")
    settings = dataclass_from_args(CompareSettings, args)
    if args.runs:
        if args.run or args.base or args.hyperfitted or args.contexts:
            raise HfdistError(
                "--runs: compares runs with their own models and contexts (no --run/--base/...)"
            )
        combined = compare_runs(args.runs, out_dir=args.out, settings=settings)
        print(format_facts_table(combined["facts"]))
        print()
        print(format_table(combined["rows"], settings.window, settings.min_run))
        return 0
    report = run_comparison(
        args.run,
        base=args.base,
        hyperfitted=args.hyperfitted,
        out_dir=args.out,
        contexts_path=args.contexts,
        train_path=args.train_data,
        validation_path=args.validation,
        settings=settings,
    )
    if report.get("image"):
        print(format_image_table(report["rows"], report["settings"]["window"], settings.min_run))
    else:
        print(format_table(report["rows"], settings.window, settings.min_run))
    out = args.out or f"{args.run}/compare"
    print(f"\nreport: {out}/report.md")
    return 0

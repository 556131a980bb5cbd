"""``hfdist evaluate``: the paper's metrics for generation files, and a model's predictions on held-out text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hfdist.commands import add_device_arguments, require_positive


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "evaluate",
        help="TTR, distinct-n, Self-BLEU, dataset overlap, repetition; held-out perplexity/entropy",
        description="Measure generation files (from `hfdist generate` or `hfdist compare`) and, with --model, "
        "the model's next-token statistics on held-out token ids; write one JSON report.",
    )
    parser.add_argument("generations", nargs="*", help="generations .jsonl files (field continuation_ids)")
    parser.add_argument(
        "--run", help="hyperfit run folder: its training ids for overlap, validation ids for --model"
    )
    parser.add_argument("--train-data", help="training token ids .npy [N, L] for the dataset overlap")
    parser.add_argument("--model", help="model folder or hub id for the held-out statistics")
    parser.add_argument(
        "--heldout",
        help="held-out token ids .npy [N, L], or a .txt file (tokenized with the "
        "model's tokenizer, cut into --seq-len windows); default with --run: "
        "its validation ids",
    )
    parser.add_argument(
        "--seq-len", type=int, default=256, help="window length for a .txt --heldout (default: 256)"
    )
    parser.add_argument("--window", type=int, default=96, help="TTR window (default: 96)")
    parser.add_argument("--min-run", type=int, default=10, help="overlap threshold in tokens (default: 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="held-out batch size (default: 8)")
    add_device_arguments(parser)
    parser.add_argument("--out", default="evaluation.json", help="JSON report (default: evaluation.json)")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    import torch

    from hfdist.errors import HfdistError
    from hfdist.io import atomic_write_json, load_token_array, read_generations
    from hfdist.metrics import generation_metrics, heldout_stats
    from hfdist.models import model_config_for, resolve_device

    if not args.generations and not args.model:
        raise HfdistError("evaluate: give generations files and/or --model with held-out data")
    require_positive(args, "window")
    run_dir = Path(args.run) if args.run else None
    if run_dir is not None and not run_dir.is_dir():
        raise HfdistError(f"--run {args.run!r}: no such folder")
    train_path = args.train_data or (run_dir / "data" / "train_token_ids.npy" if run_dir else None)
    training = load_token_array(train_path, "--train-data") if train_path else None
    report: dict = {
        "generations": {},
        "heldout": None,
        "window": args.window,
        "min_run": args.min_run,
        "train_data": str(train_path) if train_path else None,
    }
    for path in args.generations:
        records = read_generations(path)
        texts = [r["continuation_text"] for r in records if isinstance(r.get("continuation_text"), str)]
        metrics = generation_metrics(
            [r["continuation_ids"] for r in records],
            texts=texts if len(texts) == len(records) else None,
            training=training,
            window=args.window,
            min_run=args.min_run,
        )
        report["generations"][str(path)] = metrics
        print(f"{path}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    if args.model:
        from hfdist.models import load_model

        heldout_path = args.heldout or (run_dir / "data" / "validation_token_ids.npy" if run_dir else None)
        if heldout_path is None:
            raise HfdistError("--model: needs --heldout (token ids .npy) or --run")
        model_config = model_config_for(args.model, None, args.dtype)
        if str(heldout_path).endswith(".txt"):
            ids = text_windows(Path(heldout_path), model_config, args.seq_len)
        else:
            ids = torch.from_numpy(load_token_array(heldout_path, "--heldout"))
        model = load_model(model_config, resolve_device(args.device)).eval()
        stats = heldout_stats(model, ids, batch_size=args.batch_size)
        report["heldout"] = {"model": args.model, "data": str(heldout_path), **stats}
        print(f"{args.model} on {heldout_path}: " + json.dumps(stats))
    atomic_write_json(Path(args.out), report)
    print(f"wrote {args.out}")
    return 0


def text_windows(path: Path, model_config, seq_len: int):
    """A text file's tokens cut into consecutive ``seq_len`` windows (the shorter tail dropped): [N, seq_len]."""
    import torch

    from hfdist.errors import HfdistError
    from hfdist.models import load_tokenizer

    if not path.is_file():
        raise HfdistError(f"--heldout {str(path)!r}: no such file")
    if seq_len < 2:
        raise HfdistError(f"--seq-len: must be >= 2, got {seq_len}")
    ids = load_tokenizer(model_config)(path.read_text(), add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise HfdistError(
            f"--heldout {str(path)!r}: {len(ids)} tokens, fewer than one --seq-len window of {seq_len}"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)

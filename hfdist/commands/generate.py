"""``hfdist generate``: continue prompts with greedy or sampled decoding (optionally the citation blocker)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# Defaults per strategy: top-p is the paper's baseline; sample is plain ancestral sampling.
STRATEGY_DEFAULTS = {
    "greedy": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0},
    "top-p": {"temperature": 0.7, "top_p": 0.9, "top_k": 50, "min_p": 0.0},
    "sample": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0},
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="continue prompts with a model (greedy, top-p, sampling; citation blocker)",
        description="Generate continuations with hfdist's KV-cache decoder and write one JSON record per prompt "
        "(prompt and continuation as ids and text, and the settings).",
    )
    parser.add_argument(
        "--model", required=True, help="Hugging Face model folder or hub id (or smollm2-135m)"
    )
    parser.add_argument(
        "--prompts",
        required=True,
        help="prompts: .txt (one per line), .jsonl/.json (field --text-field), .npy (token ids "
        "[N, L]), a hyperfit run folder (its data/contexts.npy), or a dataset "
        "(austen, a local data folder or a hub id, field --text-field)",
    )
    parser.add_argument(
        "--text-field", default="text", help="text column of a .jsonl or dataset (default: text)"
    )
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--num-prompts", type=int, default=None, help="use the first N prompts (default: all)"
    )
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="cut each prompt to its first N tokens (the paper: 32); default: whole prompt",
    )
    parser.add_argument(
        "--strategy",
        choices=sorted(STRATEGY_DEFAULTS),
        default="greedy",
        help="greedy; top-p (defaults p 0.9, temperature 0.7, top-k 50: the paper's); sample",
    )
    parser.add_argument(
        "--temperature",
        type=temperature_value,
        default=None,
        help="a number, or 'matched' (with --reference RUN and --strategy sample): the temperature T* at which "
        "this model's mean next-token entropy on RUN's held-out sequences equals RUN's hyperfitted model's",
    )
    parser.add_argument(
        "--reference",
        metavar="RUN",
        help="with --temperature matched: a hyperfit run folder (data/validation_token_ids.npy and the hyperfitted "
        "entropy in summary.json)",
    )
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0 disables")
    parser.add_argument("--min-p", type=float, default=None, help="0 disables")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument(
        "--max-new-tokens", type=int, default=224, help="tokens per continuation (default: 224)"
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="always generate --max-new-tokens tokens (the paper's fixed-length protocol)",
    )
    parser.add_argument(
        "--blocker",
        metavar="RUN_OR_NPY",
        default=None,
        help="citation blocker over these training ids: a run folder (data/train_token_ids.npy) "
        "or a .npy of token ids",
    )
    parser.add_argument("--blocker-n", type=int, default=5, help="blocker n-gram length (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--cache", choices=["dynamic", "static"], default="dynamic", help="KV cache kind")
    parser.add_argument(
        "--draft",
        choices=["none", "ngram"],
        default="none",
        help="greedy only: ngram = prompt-lookup speculative decoding, greedy's tokens in fewer "
        "passes when the text repeats (best at batch size 1; default: none)",
    )
    parser.add_argument(
        "--out", default="generations.jsonl", help="output JSONL (default: generations.jsonl)"
    )
    parser.set_defaults(func=run)
    return parser


def temperature_value(text: str):
    """--temperature: a number or "matched"."""
    if text == "matched":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'matched', got {text!r}") from None


def matched_temperature_of(model, reference: str) -> dict:
    """T* for ``model`` against a hyperfit run (``hfdist.metrics.matched_temperature``): the target is the run's
    hyperfitted held-out entropy (summary.json, ``eval/entropy``), the positions its validation sequences."""
    import torch

    from hfdist.errors import HfdistError
    from hfdist.io import load_token_array
    from hfdist.metrics import heldout_logits, matched_temperature

    run = Path(reference)
    summary, validation = run / "summary.json", run / "data" / "validation_token_ids.npy"
    for path in (summary, validation):
        if not path.is_file():
            raise HfdistError(
                f"--reference {reference!r}: no {path.relative_to(run)} (a finished hyperfit run?)"
            )
    try:
        target = json.loads(summary.read_text())["hyperfitted"]["eval/entropy"]
    except (ValueError, KeyError):
        raise HfdistError(
            f"--reference {reference!r}: summary.json has no hyperfitted eval/entropy"
        ) from None
    logits = heldout_logits(model, torch.from_numpy(load_token_array(validation, "--reference validation")))
    return matched_temperature(logits, target)


def load_prompts(args, tokenizer) -> list[list[int]]:
    """Prompts as token-id lists from a text/JSONL/npy file, a run folder or a dataset."""
    from hfdist.errors import HfdistError
    from hfdist.io import load_token_array

    source = Path(args.prompts).expanduser()
    if not source.exists() and source.suffix in (".txt", ".jsonl", ".json", ".npy", ".csv", ".parquet"):
        raise HfdistError(f"--prompts {args.prompts!r}: no such file")
    if source.is_dir() and (source / "data" / "contexts.npy").is_file():
        source = source / "data" / "contexts.npy"
    if source.suffix == ".npy":
        prompts = load_token_array(source, "--prompts").tolist()
    elif source.is_file() and source.suffix == ".txt":
        texts = [line for line in _read_text(source).splitlines() if line.strip()]
        prompts = None
    elif source.is_file() and source.suffix in (".jsonl", ".json"):
        texts = []
        for number, line in enumerate(_read_text(source).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise HfdistError(f"--prompts {str(source)!r} line {number}: not JSON") from None
            if not isinstance(record, dict) or not isinstance(record.get(args.text_field), str):
                raise HfdistError(
                    f"--prompts {str(source)!r} line {number}: no text field {args.text_field!r} "
                    "(choose one with --text-field)"
                )
            texts.append(record[args.text_field])
        prompts = None
    else:
        from hfdist.config import DataConfig
        from hfdist.data import load_texts

        texts = load_texts(
            DataConfig(source=args.prompts, split=args.split, text_field=args.text_field, mode="exact")
        )
        prompts = None
    if prompts is None:
        texts = texts[: args.num_prompts] if args.num_prompts else texts
        prompts = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if args.num_prompts:
        prompts = prompts[: args.num_prompts]
    if args.prompt_tokens:
        prompts = [p[: args.prompt_tokens] for p in prompts]
    if not prompts:
        raise HfdistError(f"--prompts {args.prompts!r}: no prompts")
    for i, p in enumerate(prompts):
        if not p:
            raise HfdistError(f"--prompts {args.prompts!r}: prompt {i} is empty")
    return prompts


def _read_text(path: Path) -> str:
    from hfdist.errors import HfdistError

    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise HfdistError(f"--prompts {str(path)!r}: not UTF-8 text (byte {exc.start})") from None


def run(args) -> int:
    from hfdist.errors import HfdistError
    from hfdist.generation import CitationBlocker, continuation_ids, generate, left_pad
    from hfdist.io import generation_records, load_token_array, write_jsonl
    from hfdist.models import (
        load_model,
        load_tokenizer,
        model_config_for,
        resolve_device,
    )

    if args.max_new_tokens < 1:
        raise HfdistError(f"--max-new-tokens: must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise HfdistError(f"--batch-size: must be >= 1, got {args.batch_size}")
    for name in ("num_prompts", "prompt_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise HfdistError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    if args.draft != "none" and (args.strategy != "greedy" or args.cache != "dynamic"):
        raise HfdistError(f"--draft {args.draft}: needs --strategy greedy and --cache dynamic")
    if args.temperature == "matched" and (args.reference is None or args.strategy != "sample"):
        raise HfdistError(
            "--temperature matched: needs --reference RUN and --strategy sample (temperature sampling only)"
        )
    if args.reference is not None and args.temperature != "matched":
        raise HfdistError("--reference: only with --temperature matched")
    options = dict(STRATEGY_DEFAULTS[args.strategy])
    for key in options:
        if getattr(args, key) is not None and getattr(args, key) != "matched":
            options[key] = getattr(args, key)
    model_config = model_config_for(args.model, None, args.dtype)
    tokenizer = load_tokenizer(model_config)
    prompts = load_prompts(args, tokenizer)
    blocker = None
    if args.blocker:
        path = Path(args.blocker)
        if path.is_dir():
            path = path / "data" / "train_token_ids.npy"
        blocker = CitationBlocker(load_token_array(path, "--blocker"), n=args.blocker_n)
    device = resolve_device(args.device)
    model = load_model(model_config, device).eval()
    matched = None
    if args.temperature == "matched":
        matched = matched_temperature_of(model, args.reference)
        options["temperature"] = matched["temperature"]
        logger.info(
            "matched temperature T* = %.4f: entropy %.4f nats on %s's held-out sequences (its hyperfitted model's: "
            "%.4f)",
            matched["temperature"],
            matched["entropy"],
            args.reference,
            matched["target_entropy"],
        )
    eos = None if args.ignore_eos else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    strategy = "greedy" if args.strategy == "greedy" else "sample"
    settings = {
        "model": args.model,
        "strategy": args.strategy,
        "max_new_tokens": args.max_new_tokens,
        "stop_at_eos": not args.ignore_eos,
        "seed": args.seed,
        "cache": args.cache,
        "draft": args.draft,
        "blocker": args.blocker,
        "blocker_n": args.blocker_n if args.blocker else None,
    }
    if strategy == "sample":
        settings.update(options)
    if matched is not None:
        settings["matched_temperature"] = {**matched, "reference": args.reference}
    continuations, stopped = [], []
    for b, start in enumerate(range(0, len(prompts), args.batch_size)):
        chunk = prompts[start : start + args.batch_size]
        ids, mask = left_pad(chunk, pad)
        # One seed per batch, derived from --seed, so a batch's samples do not depend on the batch before it.
        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=args.max_new_tokens,
            strategy=strategy,
            seed=args.seed + b,
            blocker=blocker,
            eos_token_id=eos,
            pad_token_id=pad,
            cache=args.cache,
            draft=args.draft,
            **(options if strategy == "sample" else {}),
        ).cpu()
        conts = continuation_ids(out, ids.shape[1], eos)
        continuations.extend(conts)
        stopped.extend(eos is not None and len(c) < args.max_new_tokens for c in conts)
        logger.info("generated %d/%d", min(start + args.batch_size, len(prompts)), len(prompts))
    write_jsonl(Path(args.out), generation_records(prompts, continuations, stopped, tokenizer, settings))
    print(f"wrote {len(prompts)} generations to {args.out}")
    return 0

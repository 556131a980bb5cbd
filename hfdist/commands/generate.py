"""``hfdist generate``: continue prompts with greedy or sampled decoding (optionally the citation blocker)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from hfdist.commands import add_decoding_arguments, dataclass_from_args, require_positive

logger = logging.getLogger(__name__)

# --strategy takes a decoding strategy (hfdist.generation.STRATEGIES: greedy, sample = plain ancestral sampling) or
# a preset: a strategy with other defaults for the knobs not given (top-p: the paper's baseline).
PRESETS = {"top-p": ("sample", {"temperature": 0.7, "top_p": 0.9, "top_k": 50})}


class StrategyNames:
    """--strategy's choices: the registered strategies and the presets. Read when parsing, so that building the
    parser does not import torch."""

    def names(self) -> list[str]:
        from hfdist.generation import STRATEGIES

        return sorted([*STRATEGIES, *PRESETS])

    def __contains__(self, name) -> bool:
        return name in self.names()

    def __iter__(self):
        return iter(self.names())


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
        choices=StrategyNames(),
        metavar="STRATEGY",
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
    parser.add_argument("--min-p", type=float, default=None, help="0 disables")
    add_decoding_arguments(parser)
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
    from hfdist.generation import (
        STRATEGIES,
        CitationBlocker,
        DecodeOptions,
        continuation_ids,
        generate,
        left_pad,
    )
    from hfdist.io import generation_records, load_token_array, write_jsonl
    from hfdist.models import (
        load_model,
        load_tokenizer,
        model_config_for,
        resolve_device,
    )

    require_positive(args, "max_new_tokens", "batch_size", "num_prompts", "prompt_tokens")
    if args.temperature == "matched" and (args.reference is None or args.strategy != "sample"):
        raise HfdistError(
            "--temperature matched: needs --reference RUN and --strategy sample (temperature sampling only)"
        )
    if args.reference is not None and args.temperature != "matched":
        raise HfdistError("--reference: only with --temperature matched")
    strategy, preset = PRESETS.get(args.strategy, (args.strategy, {}))
    knobs = {name: value for name, value in preset.items() if getattr(args, name) is None}
    if args.temperature == "matched":
        knobs["temperature"] = 1.0  # replaced by T* once the model is loaded
    # The flags named as DecodeOptions fields; the dataclass checks them (before any model is loaded).
    options = dataclass_from_args(DecodeOptions, args, strategy=strategy, blocker=None, **knobs)
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
        options = dataclasses.replace(options, temperature=matched["temperature"])
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
    options = dataclasses.replace(options, blocker=blocker, eos_token_id=eos, pad_token_id=pad)
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
    settings.update({name: getattr(options, name) for name in STRATEGIES[strategy].uses})
    if matched is not None:
        settings["matched_temperature"] = {**matched, "reference": args.reference}
    continuations, stopped = [], []
    for b, start in enumerate(range(0, len(prompts), args.batch_size)):
        chunk = prompts[start : start + args.batch_size]
        ids, mask = left_pad(chunk, pad)
        # One seed per batch, derived from --seed, so a batch's samples do not depend on the batch before it.
        out = generate(model, ids, mask, options, seed=args.seed + b).cpu()
        conts = continuation_ids(out, ids.shape[1], eos)
        continuations.extend(conts)
        stopped.extend(eos is not None and len(c) < args.max_new_tokens for c in conts)
        logger.info("generated %d/%d", min(start + args.batch_size, len(prompts)), len(prompts))
    write_jsonl(Path(args.out), generation_records(prompts, continuations, stopped, tokenizer, settings))
    print(f"wrote {len(prompts)} generations to {args.out}")
    return 0

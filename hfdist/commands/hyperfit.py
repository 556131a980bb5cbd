"""``hfdist hyperfit CONFIG``: train until hyperfitted, evaluate before and after, save the model."""

from __future__ import annotations

import argparse
from pathlib import Path

from hfdist.commands import add_overrides_argument


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "hyperfit",
        help="fine-tune a causal LM to near-zero loss on a small set (the paper's recipe)",
        description="Hyperfit a Hugging Face causal LM as the YAML config says; evaluate it before, during and "
        "after; write metrics, TensorBoard events, checkpoints and the final model into the run folder. "
        "Launch it under torchrun/deepspeed/srun/mpirun for the sharded backends.",
    )
    parser.add_argument(
        "config", nargs="?", help="YAML config (default: the embedded CPU demo, configs/demo.yaml)"
    )
    add_overrides_argument(parser)
    parser.add_argument("--output-dir", help="run folder (default: runs/<config name>-<time>)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="CHECKPOINT",
        help="continue from the latest complete checkpoint of --output-dir, or from the given one "
        "(a job restarted by torchrun --max-restarts does this by itself)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="after training, run `hfdist compare` on the run (base vs hyperfitted report)",
    )
    parser.set_defaults(func=run)
    return parser


def demo_config_path() -> Path:
    return Path(__file__).resolve().parent.parent / "demo.yaml"


def run(args) -> int:
    from hfdist.config import load_config
    from hfdist.errors import HfdistError
    from hfdist.trainer import default_output_dir, format_summary, train

    config_path = args.config or str(demo_config_path())
    config = load_config(config_path, args.overrides)
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.resume and not config.output_dir:
        raise HfdistError("--resume needs --output-dir (the run folder to continue)")
    run_dir = Path(config.output_dir) if config.output_dir else default_output_dir(config_path)
    config.output_dir = str(run_dir)
    summary = train(config, run_dir, resume=args.resume, progress=not args.no_progress)
    if "base" in summary:
        print(f"\nhyperfit finished ({summary['stopped_by']}, {summary['steps']} steps) -> {run_dir}")
        print(format_summary(summary))
        if args.compare:
            from hfdist.report import run_comparison

            run_comparison(run_dir)
    return 0

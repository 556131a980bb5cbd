"""``hfdist plan [CONFIG]``: the launch gate; memory per GPU and per node of a run on a cluster."""

from __future__ import annotations

import argparse

from hfdist.commands import add_overrides_argument, dataclass_from_args

# Without a config, a plan is of the paper's recipe on Llama 3.1 70B (the shipped architecture, no weights).
PLAN_DEFAULTS = [
    "model.path=llama-3.1-70b",
    "distributed.backend=fsdp",
    "distributed.mixed_precision=true",
    "train.micro_batch_size=1",
    "train.global_batch_size=8",
]
# Shorthand flags, each the same as one --set.
FLAG_FIELDS = {
    "model": "model.path",
    "backend": "distributed.backend",
    "offload": "distributed.cpu_offload",
    "seq_len": "data.seq_len",
    "micro_batch_size": "train.micro_batch_size",
    "global_batch_size": "train.global_batch_size",
    "param_dtype": "model.dtype",
    "mixed_precision": "distributed.mixed_precision",
    "activation_checkpointing": "train.activation_checkpointing",
    "replicate_degree": "distributed.replicate_degree",
    "tensor_parallel": "distributed.tensor_parallel",
    "deepspeed_config": "distributed.deepspeed_config",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan",
        help="check a config for a cluster (the launch's own checks) and its memory per GPU and node",
        description="Check a hyperfit config at the cluster's world size with the launch's own checks (what the "
        "launch would refuse, the plan refuses, with the same message and a non-zero exit), then give "
        "the memory per GPU (parameters, gradients, optimizer state, activations, gathered units), the "
        "host memory per node (offload, weight loading, export) and the bytes on disk. Model state comes "
        "from the real architecture built on the meta device and sharded (tensor parallel and FSDP2) in "
        "a fake process group of the planned world size. --suggest lists the layouts that fit.",
    )
    parser.add_argument(
        "config", nargs="?", help="hyperfit YAML config (default: the paper's recipe on Llama 3.1 70B)"
    )
    add_overrides_argument(parser)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument(
        "--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: H100-80GB)"
    )
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=4.0,
        help="kept free for the CUDA context, NCCL buffers and fragmentation (default 4)",
    )
    parser.add_argument(
        "--host-memory-gib",
        type=float,
        default=2048.0,
        help="host memory per node, which the offloaded state, weight loading and export must fit "
        "(default 2048: a DGX H100/H200)",
    )
    parser.add_argument(
        "--suggest",
        action="store_true",
        help="list the fsdp layouts (tensor_parallel, replicate_degree, cpu_offload, activation "
        "checkpointing) that the launch accepts for this config's batch and that fit, best first",
    )
    parser.add_argument(
        "--top", type=int, default=8, help="with --suggest: how many layouts to list (default 8)"
    )
    parser.add_argument(
        "--no-verify",
        dest="verify_shards",
        action="store_false",
        help="skip sharding the meta model (formula only)",
    )
    parser.add_argument("--json", action="store_true", help="print the plan (or suggestions) as JSON")
    shorthand = parser.add_argument_group("shorthands, each the same as one --set")
    shorthand.add_argument(
        "--model",
        help="model.path: a shipped architecture (llama-3.1-70b, llama-3.1-8b, "
        "llama-3.2-1b, tinyllama-1.1b), a hub id or a folder with config.json",
    )
    shorthand.add_argument("--backend", choices=("single", "fsdp", "deepspeed"), help="distributed.backend")
    shorthand.add_argument("--offload", action="store_const", const=True, help="distributed.cpu_offload=true")
    shorthand.add_argument("--seq-len", type=int, help="data.seq_len")
    shorthand.add_argument("--micro-batch-size", type=int, help="train.micro_batch_size")
    shorthand.add_argument("--global-batch-size", type=int, help="train.global_batch_size")
    shorthand.add_argument("--dtype", dest="param_dtype", choices=("float32", "bfloat16"), help="model.dtype")
    shorthand.add_argument(
        "--no-mixed-precision",
        dest="mixed_precision",
        action="store_const",
        const=False,
        help="distributed.mixed_precision=false",
    )
    shorthand.add_argument(
        "--activation-checkpointing",
        action="store_const",
        const=True,
        help="train.activation_checkpointing=true",
    )
    shorthand.add_argument("--replicate-degree", type=int, help="distributed.replicate_degree")
    shorthand.add_argument("--tensor-parallel", type=int, help="distributed.tensor_parallel")
    shorthand.add_argument("--deepspeed-config", help="distributed.deepspeed_config")
    parser.set_defaults(func=run)
    return parser


def plan_config(args):
    """The Config a plan is for: the YAML (or the 70B defaults), then the shorthand flags, then --set."""
    from hfdist.config import load_config

    overrides = [] if args.config else list(PLAN_DEFAULTS)
    for flag, name in FLAG_FIELDS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{name}={str(value).lower() if isinstance(value, bool) else value}")
    return load_config(args.config, overrides + args.overrides)


def run(args) -> int:
    import json
    from dataclasses import asdict

    from hfdist.distributed.plan import (
        Cluster,
        format_plan,
        format_suggestions,
        make_plan,
        suggest,
    )

    config = plan_config(args)
    cluster = dataclass_from_args(Cluster, args)
    if args.suggest:
        found = suggest(config, cluster)
        if args.json:
            print(json.dumps([{"overrides": o, "plan": asdict(p)} for o, p in found], indent=2))
        else:
            print(format_suggestions(found, cluster, shown=args.top))
        return 0
    plan = make_plan(config, cluster, config_name=args.config or "")
    print(plan.to_json() if args.json else format_plan(plan))
    return 0

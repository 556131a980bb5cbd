"""``hfdist plan``: memory per GPU of a sharded hyperfit run, from real shards built on the meta device."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "plan", help="GPU memory per rank for FSDP / ZeRO-3 at a given node and GPU count",
        description="Estimate the memory per GPU (parameters, gradients, optimizer state, activations, gathered "
                    "units) of hyperfitting a model with FSDP2 or DeepSpeed ZeRO-3, and whether it fits. The "
                    "model-state part comes from the real architecture built on the meta device and sharded in a "
                    "fake process group of the planned world size.")
    parser.add_argument("--model", default="llama-3.1-70b",
                        help="a shipped architecture (llama-3.1-70b, llama-3.1-8b, llama-3.2-1b, tinyllama-1.1b) or "
                             "a folder with config.json (default: llama-3.1-70b)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--backend", choices=("fsdp", "deepspeed"), default="fsdp")
    parser.add_argument("--offload", action="store_true",
                        help="model state in host memory (FSDP CPUOffloadPolicy / ZeRO-3 param+optimizer offload)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80: H100-80GB)")
    parser.add_argument("--reserve-gib", type=float, default=4.0,
                        help="kept free for the CUDA context, NCCL buffers and fragmentation (default 4)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--dtype", dest="param_dtype", choices=("float32", "bfloat16"), default="float32",
                        help="FSDP: dtype of the stored parameters, gradients and Adam state (default float32)")
    parser.add_argument("--no-mixed-precision", dest="mixed_precision", action="store_false",
                        help="compute in the parameter dtype instead of bf16")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--replicate-degree", type=int, default=1, help="FSDP HSDP replicas (e.g. the node count)")
    parser.add_argument("--deepspeed-config", help="read ZeRO-3 bucket sizes from this DeepSpeed JSON")
    parser.add_argument("--no-verify", dest="verify_shards", action="store_false",
                        help="skip sharding the meta model (formula only)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from hfdist.distributed.plan import PlanSpec, format_plan, make_plan

    fields = PlanSpec.__dataclass_fields__
    spec = PlanSpec(**{name: getattr(args, name) for name in fields if hasattr(args, name)})
    plan = make_plan(spec)
    print(plan.to_json() if args.json else format_plan(plan))
    return 0

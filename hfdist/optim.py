"""The optimizer and the learning-rate schedule that every backend builds around the model (``optim`` config)."""

from __future__ import annotations

import math

import torch

from hfdist.config import OptimConfig


def build_optimizer(
    config: OptimConfig, model: torch.nn.Module, device: torch.device
) -> torch.optim.Optimizer:
    """Adam or AdamW over all trainable parameters; weight_decay 0 really means no decay in either."""
    params = [p for p in model.parameters() if p.requires_grad]
    kwargs = dict(
        lr=config.lr, betas=(config.beta1, config.beta2), eps=config.eps, weight_decay=config.weight_decay
    )
    impl = config.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    if impl == "fused":
        kwargs["fused"] = True
    else:
        kwargs["foreach"] = impl == "foreach"
    cls = torch.optim.AdamW if config.name == "adamw" else torch.optim.Adam
    return cls(params, **kwargs)


def build_scheduler(config: OptimConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Linear warmup over ``warmup_steps``, then constant, linear decay to 0, or cosine decay to 0."""
    warmup, schedule = config.warmup_steps, config.schedule

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

"""Per-rank performance numbers: model FLOPs utilisation and peak memory of every rank.

``perf/mfu`` = achieved model FLOP/s / (ranks x peak FLOP/s of one device), with the model FLOPs of a
training token ``6 N + 12 L h s`` (Kaplan/PaLM: forward and backward through every non-embedding weight,
plus attention scores over the sequence; recomputation under activation checkpointing is not counted).
The peak is the device's dense bf16 tensor-core rate (table below) or ``HFDIST_PEAK_TFLOPS``; without
either (a CPU) MFU is not reported. ``memory/peak_gib/rank{r}`` is each rank's high-water mark,
gathered to every rank (all ranks must call ``per_rank_values`` together).
"""

from __future__ import annotations

import os
import resource
from typing import Optional

import torch
import torch.distributed as dist

from hfdist.shards import global_numel

# Dense bf16 tensor-core peak FLOP/s per device (vendor datasheets; SXM parts).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def peak_flops(device: torch.device) -> Optional[float]:
    override = os.environ.get("HFDIST_PEAK_TFLOPS")
    if override:
        return float(override) * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def model_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token of ``model`` (a Hugging Face causal LM) at ``seq_len``."""
    config = model.config
    embedding = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embedding
    # Count the global shapes: a DTensor's numel() is already the unsharded size, ZeRO-3 keeps it in ds_numel.
    params = sum(global_numel(p) for p in model.parameters())
    if not tied:
        params -= global_numel(embedding)  # a lookup, not a matmul
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attention = 12 * config.num_hidden_layers * config.num_attention_heads * head_dim * seq_len
    return 6 * params + attention


def mfu(
    tokens_per_s: float, flops_per_token: float, world_size: int, device_peak: Optional[float]
) -> Optional[float]:
    if not device_peak:
        return None
    return tokens_per_s * flops_per_token / (world_size * device_peak)


def per_rank_values(value: float, device: torch.device) -> list[float]:
    """``value`` from every rank, in rank order (a single value outside a process group)."""

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    local = torch.tensor([value], dtype=torch.float64, device=device)
    gathered = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return [t.item() for t in gathered]


def rank_metrics(peak_gib: float, tokens_per_s: float, flops_per_token: float, device: torch.device) -> dict:
    """The metrics to log at a step (call on all ranks; rank 0 logs them)."""
    peaks = per_rank_values(peak_gib, device)
    values = {"memory/peak_gib": max(peaks)}
    values.update({f"memory/peak_gib/rank{r}": v for r, v in enumerate(peaks)})
    utilisation = mfu(tokens_per_s, flops_per_token, len(peaks), peak_flops(device))
    if utilisation is not None:
        values["perf/mfu"] = utilisation
    return values


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux: the process's high-water mark.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

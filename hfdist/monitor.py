"""Where every number goes: ``metrics.jsonl`` and TensorBoard, under one name each, from the main rank only.

Tag names carry their unit where it is not obvious: ``train/loss`` (nats per token), ``train/entropy``
(nats), ``train/grad_norm`` (L2 over all parameters, before clipping), ``train/lr``,
``perf/tokens_per_s`` (trained tokens per wall-clock second, all ranks), ``perf/step_time_s``,
``memory/peak_gib``, ``eval/loss``, ``eval/perplexity``, ``eval/entropy``, ``eval/top1_mass``, ``eval/ttr96``.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(run_dir / "metrics.jsonl", "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(run_dir / "tb"))

    def log(self, kind: str, step: int, values: dict, epoch: Optional[float] = None) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step}
        if epoch is not None:
            record["epoch"] = epoch
        record.update({k: _plain(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._writer is not None:
            for name, value in record.items():
                if "/" in name and isinstance(value, (int, float)) and math.isfinite(value):
                    # Per-epoch means go under their own tag so they do not interleave with per-step values.
                    tag = name.replace("train/", "epoch/") if kind == "epoch" else name
                    self._writer.add_scalar(tag, value, global_step=step)
            self._writer.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
            os.fsync(self._jsonl.fileno())
            self._jsonl.close()
        if self._writer is not None:
            self._writer.close()


def _plain(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return value


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]

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

from torch.utils.tensorboard import SummaryWriter

from hfdist.io import atomic_write_text


class MetricsLogger:
    def __init__(
        self, run_dir: Path, enabled: bool = True, tensorboard: bool = True, resume_step: Optional[int] = None
    ):
        self.enabled = enabled
        self._jsonl = None
        self._writer = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if resume_step is not None and path.is_file():
            kept = [
                line
                for line in path.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= resume_step
            ]
            atomic_write_text(path, "".join(kept))
        self._jsonl = open(path, "a")
        if tensorboard:
            # purge_step hides events a stopped run wrote after the checkpoint we resume from.
            self._writer = SummaryWriter(
                log_dir=str(run_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

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

"""Fault-injection hooks for tests (never set them in a real run), and the torchrun restart count.

The hooks inject real faults into a training run through environment variables, so that a test can launch
the real CLI under the real launcher and watch what the job does:

- ``HFDIST_FAULT_KILL_AT_STEP=N``: the process sends itself SIGKILL right after optimizer step N (before
  that step is logged or checkpointed), on the first attempt of a torchrun job only (restart count 0).
- ``HFDIST_FAULT_HANG_AT_STEP=N``: the process sleeps (a hung rank) right after optimizer step N until it is
  killed, on the first attempt only.
- ``HFDIST_FAULT_NAN_AT_STEP=N[,M,A-B]``: the input embedding's output is multiplied by NaN in the forward
  passes of those optimizer steps, so their loss and every gradient are NaN (on every attempt).
- ``HFDIST_FAULT_KILL_IN_CHECKPOINT=N``: the process sends itself SIGKILL while the checkpoint of step N is being
  written (its own data files written, the checkpoint not yet complete), on the first attempt only. With
  ``checkpoint.async: true`` it first waits (up to 60 s) until training has finished step N + 1, so the kill
  lands while training and the background write run side by side.
- ``HFDIST_FAULT_HANG_IN_CHECKPOINT=N``: the process sleeps until killed once its data files of the checkpoint of
  step N are written (a rank stuck in a checkpoint), on the first attempt only.
- ``HFDIST_FAULT_RANK=R``: only rank R injects (default: every rank).

Steps count from 1, as in ``metrics.jsonl``.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from typing import Iterator, Optional

from hfdist.errors import HfdistError

logger = logging.getLogger(__name__)


def restart_count() -> int:
    """How many times torchrun (``--max-restarts``) has restarted this job's workers; 0 outside torchrun."""
    value = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def _steps(name: str) -> frozenset[int]:
    text = os.environ.get(name, "").strip()
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            first, _, last = part.partition("-")
            steps.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise HfdistError(f"environment variable {name}: expected step numbers like 3 or 3,5-7, got "
                              f"{text!r}") from None
    return frozenset(steps)


class Faults:
    """The hooks that apply to this rank (all inert unless an HFDIST_FAULT_* variable is set)."""

    def __init__(self, rank: int):
        target = os.environ.get("HFDIST_FAULT_RANK", "").strip()
        mine = not target or target == str(rank)
        first_attempt = restart_count() == 0
        self.rank = rank
        self.kill_at = _steps("HFDIST_FAULT_KILL_AT_STEP") if mine and first_attempt else frozenset()
        self.hang_at = _steps("HFDIST_FAULT_HANG_AT_STEP") if mine and first_attempt else frozenset()
        self.nan_at = _steps("HFDIST_FAULT_NAN_AT_STEP") if mine else frozenset()
        self._nan_now = False
        self._hook = None

    def install(self, lm) -> None:
        """Hook the model's input embedding (only when NaN steps are asked for)."""
        if self.nan_at and self._hook is None:
            self._hook = lm.get_input_embeddings().register_forward_hook(self._poison)

    def _poison(self, module, args, output):
        return output * float("nan") if self._nan_now else output

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around the forward/backward passes of optimizer step ``step``."""
        self._nan_now = step in self.nan_at
        if self._nan_now:
            logger.warning("fault injection: rank %d makes the loss of step %d NaN", self.rank, step)
        try:
            yield
        finally:
            self._nan_now = False

    def after_step(self, step: int) -> None:
        """Right after optimizer step ``step``: die or hang when asked to."""
        _progress["step"] = step
        if step in self.kill_at:
            logger.warning("fault injection: rank %d kills itself (SIGKILL) after step %d", self.rank, step)
            for handler in logging.getLogger().handlers:
                handler.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.hang_at:
            logger.warning("fault injection: rank %d hangs after step %d", self.rank, step)
            while True:
                time.sleep(60)


_progress = {"step": 0}  # the last optimizer step this process finished (for HFDIST_FAULT_KILL_IN_CHECKPOINT)


def _mine() -> bool:
    import torch.distributed as dist

    target = os.environ.get("HFDIST_FAULT_RANK", "").strip()
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    return not target or target == str(rank)


def checkpoint_written(step: int) -> None:
    """Called by the checkpoint writer once this rank's data files of step ``step`` are written."""
    if restart_count() != 0 or not _mine():
        return
    if step in _steps("HFDIST_FAULT_HANG_IN_CHECKPOINT"):
        logger.warning("fault injection: hangs while writing the checkpoint of step %d", step)
        while True:
            time.sleep(60)
    if step not in _steps("HFDIST_FAULT_KILL_IN_CHECKPOINT"):
        return
    deadline = time.monotonic() + 60
    import threading

    if threading.current_thread() is not threading.main_thread():  # an asynchronous checkpoint
        while _progress["step"] <= step and time.monotonic() < deadline:
            time.sleep(0.01)
    logger.warning("fault injection: kills itself (SIGKILL) while writing the checkpoint of step %d, training at step "
                   "%d", step, _progress["step"])
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def fault_env_set() -> Optional[str]:
    """The HFDIST_FAULT_* variables set in this environment, for the log (None when none is)."""
    names = sorted(k for k in os.environ if k.startswith("HFDIST_FAULT_"))
    return ", ".join(f"{k}={os.environ[k]}" for k in names) or None

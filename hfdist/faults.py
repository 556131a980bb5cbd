"""Fault injection for tests (never set it in a real run): a concern attached to the training loop's hooks.

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
import threading
import time
from typing import Optional

from hfdist.distributed.env import restart_count
from hfdist.errors import HfdistError
from hfdist.hooks import LoopHooks

logger = logging.getLogger(__name__)


def _steps(name: str) -> frozenset[int]:
    text = os.environ.get(name, "").strip()
    steps: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            first, _, last = part.partition("-")
            steps.update(range(int(first), int(last or first) + 1))
        except ValueError:
            raise HfdistError(
                f"environment variable {name}: expected step numbers like 3 or 3,5-7, got {text!r}"
            ) from None
    return frozenset(steps)


def _die(message: str, *args) -> None:
    logger.warning(message, *args)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _hang(message: str, *args) -> None:
    logger.warning(message, *args)
    while True:
        time.sleep(60)


class FaultInjection(LoopHooks):
    """The faults the HFDIST_FAULT_* variables ask of this rank (inert when none is set), at the loop's points."""

    def __init__(self, rank: int):
        target = os.environ.get("HFDIST_FAULT_RANK", "").strip()
        mine = not target or target == str(rank)
        first_attempt = restart_count() == 0
        once = mine and first_attempt  # kills and hangs happen on the first attempt of a job only
        self.rank = rank
        self.kill_at = _steps("HFDIST_FAULT_KILL_AT_STEP") if once else frozenset()
        self.hang_at = _steps("HFDIST_FAULT_HANG_AT_STEP") if once else frozenset()
        self.nan_at = _steps("HFDIST_FAULT_NAN_AT_STEP") if mine else frozenset()
        self.kill_in_checkpoint = _steps("HFDIST_FAULT_KILL_IN_CHECKPOINT") if once else frozenset()
        self.hang_in_checkpoint = _steps("HFDIST_FAULT_HANG_IN_CHECKPOINT") if once else frozenset()
        self._nan_now = False
        self._finished_step = 0  # the last optimizer step this process finished (read by an async checkpoint)

    def begin(self, lm, state, total_steps) -> None:
        """Hook the model's input embedding (only when NaN steps are asked for)."""
        if self.nan_at:
            lm.get_input_embeddings().register_forward_hook(self._poison)

    def _poison(self, module, args, output):
        return output * float("nan") if self._nan_now else output

    def before_step(self, state) -> None:
        step = state.step + 1
        self._nan_now = step in self.nan_at
        if self._nan_now:
            logger.warning("fault injection: rank %d makes the loss of step %d NaN", self.rank, step)

    def after_step(self, state) -> None:
        """Right after optimizer step ``state.step``: die or hang when asked to."""
        step = state.step
        self._nan_now = False
        self._finished_step = step
        if step in self.kill_at:
            _die("fault injection: rank %d kills itself (SIGKILL) after step %d", self.rank, step)
        if step in self.hang_at:
            _hang("fault injection: rank %d hangs after step %d", self.rank, step)

    def checkpoint_written(self, step: int) -> None:
        """This rank's data files of the checkpoint of ``step`` are written: hang or die when asked to."""
        if step in self.hang_in_checkpoint:
            _hang("fault injection: hangs while writing the checkpoint of step %d", step)
        if step not in self.kill_in_checkpoint:
            return
        if threading.current_thread() is not threading.main_thread():  # an asynchronous checkpoint
            deadline = time.monotonic() + 60  # let training run on past the step, beside the write
            while self._finished_step <= step and time.monotonic() < deadline:
                time.sleep(0.01)
        _die(
            "fault injection: kills itself (SIGKILL) while writing the checkpoint of step %d, training at step %d",
            step,
            self._finished_step,
        )


def fault_env_set() -> Optional[str]:
    """The HFDIST_FAULT_* variables set in this environment, for the log (None when none is)."""
    names = sorted(k for k in os.environ if k.startswith("HFDIST_FAULT_"))
    return ", ".join(f"{k}={os.environ[k]}" for k in names) or None

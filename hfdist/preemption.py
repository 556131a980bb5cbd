"""Preemption: a signal (``train.preempt_signals``, default SIGTERM and SIGUSR1) stops training at the next optimizer
step boundary with a checkpoint, and the job exits with PREEMPTED_EXIT_CODE, which launchers/slurm.sbatch answers by
requeueing itself.

- The handler only records the signal: no I/O, no collective, safe wherever the main thread is (loading, a
  collective, a checkpoint write). Further signals are counted and otherwise ignored, so a second SIGTERM during the
  save cannot interrupt it (and a SIGKILL can only leave a ``.tmp`` folder: checkpoints are atomic).
- The loop adds the request to the step's one collective over every rank (``hfdist.trainer.train_step``), so all
  ranks learn of it at the same step, whichever rank received the signal and whenever; there they finish the step's
  bookkeeping, write the checkpoint through the ordinary ``hfdist.checkpoint.save`` (an asynchronous one is awaited),
  rank 0 logs one line (signal, step, checkpoint) and every rank exits with PREEMPTED_EXIT_CODE.
- Under torchrun a worker's exit code does not become the launcher's (torchrun exits 1 after a signal or a failed
  worker): each preempted worker also writes the file named by STATUS_ENV, which ``hfdist.distributed.run`` (the
  torchrun that launchers/torchrun.sh and launchers/slurm.sbatch start) creates and turns into its own exit code.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from typing import Optional

from hfdist.io import atomic_write_json

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL (sysexits.h): a temporary failure; the job is to be run again
# The file a preempted worker writes for its launcher (hfdist.distributed.run names it).
STATUS_ENV = "HFDIST_PREEMPTION_STATUS"
SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGINT")  # what train.preempt_signals may name


def signal_names(text: str) -> list[str]:
    """``train.preempt_signals`` ("SIGTERM,SIGUSR1"; "" for none) as a list of names."""
    return [name.strip() for name in text.split(",") if name.strip()]


class Preempted(Exception):
    """Training stopped for a preemption signal, its checkpoint written; the CLI exits with PREEMPTED_EXIT_CODE."""

    exit_code = PREEMPTED_EXIT_CODE


class PreemptionSignals:
    """Records the first of ``names`` (``train.preempt_signals``) this process receives, from installation until
    ``restore()``. Installed only from the main thread (Python delivers signals there)."""

    def __init__(self, names: str):
        self.received: Optional[str] = None  # the first signal's name
        self.count = 0  # signals received in all
        self._previous: dict[int, object] = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signal_names(names):
            number = getattr(signal, name)
            self._previous[number] = signal.signal(number, self._handle)

    def _handle(self, signum, frame) -> None:
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.received is not None

    def restore(self) -> None:
        for number, previous in self._previous.items():
            signal.signal(number, previous)
        self._previous = {}


def write_status(signal_name: str, step: int, checkpoint: str) -> None:
    """Tell the launcher (hfdist.distributed.run) that this worker stopped for preemption, its checkpoint complete."""
    path = os.environ.get(STATUS_ENV)
    if path:
        atomic_write_json(path, {"signal": signal_name, "step": step, "checkpoint": checkpoint})


def read_status(path: str) -> Optional[dict]:
    """What a preempted worker wrote (``write_status``), or None."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None

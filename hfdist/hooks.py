"""The named points of the training loop, and the concerns that attach to them.

The loop (``hfdist.trainer.Trainer.run``) calls ``hooks.<point>(...)`` at each point; ``Hooks`` passes the call to
every attached concern in order. A concern subclasses ``LoopHooks`` and overrides the points it needs:

- ``WatchdogMarks`` (here): records where this rank is (``training step 7``, ``checkpoint at step 8``, ...) so that
  a hung collective names the ranks behind (``hfdist.watchdog``);
- ``ProgressBar`` (here): the tqdm bar of the main rank;
- ``FaultInjection`` (``hfdist.faults``): the HFDIST_FAULT_* test hooks.

Points, in the order a run meets them: ``begin`` (model built), then per optimizer step ``before_step``,
``after_step`` (the state already counts the step), ``after_log``; ``before_evaluation``; ``after_epoch`` (the
state already counts the epoch); ``before_checkpoint`` and ``checkpoint_written`` (this rank's files of a
checkpoint are on disk; called on the writer's thread for an asynchronous checkpoint); ``before_export``; ``end``.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from hfdist.state import TrainingState
from hfdist.watchdog import watchdog


class LoopHooks:
    """Every point of the loop, doing nothing: a concern overrides the points it needs."""

    def begin(self, lm, state: TrainingState, total_steps: int) -> None:
        """Once the model is built (``lm``: the Hugging Face model inside the backend), before the first step."""

    def before_step(self, state: TrainingState) -> None:
        """Before the forward and backward passes of optimizer step ``state.step + 1``."""

    def after_step(self, state: TrainingState) -> None:
        """Right after optimizer step ``state.step`` (applied or skipped), before it is logged."""

    def after_log(self, state: TrainingState, values: dict) -> None:
        """After the step's metrics were logged (``values``: what went into metrics.jsonl)."""

    def before_evaluation(self, state: TrainingState) -> None:
        """Before an evaluation at step ``state.step``."""

    def after_epoch(self, state: TrainingState) -> None:
        """After epoch ``state.epoch`` ended, before its mean loss is logged."""

    def before_checkpoint(self, state: TrainingState) -> None:
        """Before the checkpoint of step ``state.step`` is written."""

    def checkpoint_written(self, step: int) -> None:
        """This rank's data files of the checkpoint of ``step`` are written (the checkpoint is not complete yet)."""

    def before_export(self) -> None:
        """Before the final model is exported."""

    def end(self) -> None:
        """The loop is over (training stopped; evaluation and export follow)."""


class Hooks(LoopHooks):
    """Several concerns behind one hooks object: each point is passed to every concern, in the given order."""

    def __init__(self, *concerns: LoopHooks):
        self.concerns = concerns

    def _each(self, point: str, *args) -> None:
        for concern in self.concerns:
            getattr(concern, point)(*args)

    def begin(self, lm, state, total_steps):
        self._each("begin", lm, state, total_steps)

    def before_step(self, state):
        self._each("before_step", state)

    def after_step(self, state):
        self._each("after_step", state)

    def after_log(self, state, values):
        self._each("after_log", state, values)

    def before_evaluation(self, state):
        self._each("before_evaluation", state)

    def after_epoch(self, state):
        self._each("after_epoch", state)

    def before_checkpoint(self, state):
        self._each("before_checkpoint", state)

    def checkpoint_written(self, step):
        self._each("checkpoint_written", step)

    def before_export(self):
        self._each("before_export")

    def end(self):
        self._each("end")


class WatchdogMarks(LoopHooks):
    """This rank's position in the loop, recorded for naming a hung or dead rank (hfdist.watchdog)."""

    def before_step(self, state):
        watchdog.mark(f"training step {state.step + 1}")

    def after_step(self, state):
        watchdog.mark(f"bookkeeping after training step {state.step}")

    def before_evaluation(self, state):
        watchdog.mark(f"evaluation at step {state.step}")

    def after_epoch(self, state):
        watchdog.mark(f"end of epoch {state.epoch}")

    def before_checkpoint(self, state):
        watchdog.mark(f"checkpoint at step {state.step}")

    def before_export(self):
        watchdog.mark("export of the final model")


class ProgressBar(LoopHooks):
    """A tqdm bar over the optimizer steps, on stderr (main rank only: the trainer attaches it there)."""

    def __init__(self):
        self.bar = None

    def begin(self, lm, state, total_steps):

        self.bar = tqdm(
            total=total_steps,
            initial=state.step,
            desc="hyperfit",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
        )

    def after_log(self, state, values):
        self.bar.set_postfix(loss=f"{values['train/loss']:.4f}", tok_s=f"{values['perf/tokens_per_s']:.0f}")

    def after_step(self, state):
        self.bar.update(1)

    def end(self):
        if self.bar is not None:
            self.bar.close()

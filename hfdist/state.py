"""The training loop's state, which every checkpoint saves and every loop hook (``hfdist.hooks``) is handed."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

from hfdist.errors import HfdistError


@dataclass
class TrainingState:
    """Where the loop is and what it has counted: all that a checkpoint restores besides the backend's state (model,
    optimizer, LR schedule) and the RNG states (torchtitan's stateful trainer). Saved as trainer_state.json."""

    step: int = 0  # optimizer steps taken, skipped ones included
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # steps taken in the current epoch: the data position within it
    epoch_loss_sum: float = 0.0  # over the current epoch's applied steps
    epoch_entropy_sum: float = 0.0
    epoch_steps: int = 0  # the current epoch's applied steps
    evaluated_step: int = -1  # the step of the last evaluation
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss or gradient norm), in total
    bad_steps_in_row: int = 0  # ... in a row, up to the latest step

    VERSION: ClassVar[int] = 1

    def state_dict(self) -> dict:
        return {"version": self.VERSION, **asdict(self)}

    def load_state_dict(self, saved: dict, source: Path) -> None:
        """Restore from ``state_dict()``'s output; a checkpoint of hfdist 0.1 (the same fields, no ``version``) too."""
        version = saved.get("version", 1)
        fields = {f.name for f in dataclasses.fields(self)}
        values = {k: v for k, v in saved.items() if k != "version"}
        if version != self.VERSION or set(values) != fields:
            raise HfdistError(
                f"{source}: trainer state of another format (version {version}, fields "
                f"{sorted(values)}); this hfdist resumes version {self.VERSION} with fields "
                f"{sorted(fields)}: resume it with the hfdist that wrote it, or start afresh"
            )
        for name, value in values.items():
            setattr(self, name, value)

    def count_step(self, loss: float, entropy: float, applied: bool) -> None:
        """One more optimizer step; the epoch's mean loss is over the steps that trained."""
        self.step += 1
        self.step_in_epoch += 1
        if applied:
            self.bad_steps_in_row = 0
            self.epoch_loss_sum += loss
            self.epoch_entropy_sum += entropy
            self.epoch_steps += 1
        else:
            self.skipped_steps += 1
            self.bad_steps_in_row += 1

    def end_epoch(self) -> tuple[float, float]:
        """Close the epoch: its mean train loss and entropy (NaN when every step was skipped: never meets a target)."""
        steps = self.epoch_steps or float("nan")
        means = (self.epoch_loss_sum / steps, self.epoch_entropy_sum / steps)
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_entropy_sum, self.epoch_steps = 0, 0.0, 0.0, 0
        return means

    def epoch_position(self, steps_per_epoch: int) -> float:
        """Epochs done, with the current one's fraction (the x axis of metrics.jsonl's records)."""
        return self.epoch + self.step_in_epoch / steps_per_epoch

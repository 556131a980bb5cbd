"""The loop's state (TrainingState: what checkpoints restore) and its hooks (the named points concerns attach to)."""

import json
import math
from pathlib import Path

import pytest

from hfdist.errors import HfdistError
from hfdist.hooks import Hooks, LoopHooks, WatchdogMarks
from hfdist.state import TrainingState
from hfdist.watchdog import watchdog

# trainer_state.json as hfdist 0.1 wrote it (before TrainingState): the same fields, no version.
OLD_FORMAT = {
    "step": 6,
    "epoch": 1,
    "step_in_epoch": 2,
    "epoch_loss_sum": 7.5,
    "epoch_entropy_sum": 3.25,
    "epoch_steps": 2,
    "evaluated_step": 4,
    "skipped_steps": 1,
    "bad_steps_in_row": 0,
}


def test_state_round_trips_through_json():
    state = TrainingState(**OLD_FORMAT)
    saved = json.loads(json.dumps(state.state_dict()))
    assert saved["version"] == TrainingState.VERSION
    restored = TrainingState()
    restored.load_state_dict(saved, Path("trainer_state.json"))
    assert restored == state


def test_checkpoints_of_the_old_format_still_resume():
    state = TrainingState()
    state.load_state_dict(dict(OLD_FORMAT), Path("step_00000006/trainer_state.json"))
    assert state == TrainingState(**OLD_FORMAT)


@pytest.mark.parametrize(
    "saved",
    [
        {**OLD_FORMAT, "version": 2},
        {**OLD_FORMAT, "learning_rate": 1e-6},
        {k: v for k, v in OLD_FORMAT.items() if k != "epoch_steps"},
    ],
)
def test_another_format_is_refused_naming_the_file(saved):
    with pytest.raises(
        HfdistError, match=r"step_00000006/trainer_state.json: trainer state of another format"
    ):
        TrainingState().load_state_dict(saved, Path("step_00000006/trainer_state.json"))


def test_epoch_mean_is_over_the_steps_that_trained():
    state = TrainingState()
    state.count_step(2.0, 1.0, applied=True)
    state.count_step(float("nan"), float("nan"), applied=False)
    state.count_step(4.0, 3.0, applied=True)
    assert (state.step, state.step_in_epoch, state.skipped_steps, state.bad_steps_in_row) == (3, 3, 1, 0)
    assert state.epoch_position(4) == 0.75
    assert state.end_epoch() == (3.0, 2.0)
    assert (state.epoch, state.step_in_epoch, state.epoch_steps, state.epoch_loss_sum) == (1, 0, 0, 0.0)
    state.count_step(float("nan"), float("nan"), applied=False)
    state.count_step(float("nan"), float("nan"), applied=False)
    assert state.bad_steps_in_row == 2 and state.skipped_steps == 3
    loss, entropy = state.end_epoch()  # every step skipped: no mean, never meets a target loss
    assert math.isnan(loss) and math.isnan(entropy)


class Recorder(LoopHooks):
    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def before_step(self, state):
        self.calls.append((self.name, "before_step", state.step))

    def checkpoint_written(self, step):
        self.calls.append((self.name, "checkpoint_written", step))


def test_hooks_pass_each_point_to_every_concern_in_order():
    calls = []
    hooks = Hooks(Recorder("first", calls), Recorder("second", calls), LoopHooks())
    hooks.before_step(TrainingState(step=4))
    hooks.checkpoint_written(6)
    hooks.after_step(TrainingState())  # a point no concern overrides
    assert calls == [
        ("first", "before_step", 4),
        ("second", "before_step", 4),
        ("first", "checkpoint_written", 6),
        ("second", "checkpoint_written", 6),
    ]


def test_watchdog_marks_name_the_loop_positions():
    marks = WatchdogMarks()
    state = TrainingState(step=7, epoch=3)
    expected = {
        "before_step": "training step 8",
        "after_step": "bookkeeping after training step 7",
        "before_evaluation": "evaluation at step 7",
        "after_epoch": "end of epoch 3",
        "before_checkpoint": "checkpoint at step 7",
    }
    for point, label in expected.items():
        getattr(marks, point)(state)
        assert watchdog.label == label
    marks.before_export()
    assert watchdog.label == "export of the final model"

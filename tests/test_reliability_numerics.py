"""Numerical faults: a step whose loss or gradient norm is NaN/inf is skipped (no optimizer or LR-scheduler step,
its batch consumed), counted (``train/skipped_steps``, a warning naming the step, epoch and sample indices), and
more than ``train.max_bad_steps_in_row`` in a row stop the run in one line; NaN/inf weights are never saved.

The NaN is real: the test hook HFDIST_FAULT_NAN_AT_STEP multiplies the input embedding's output by NaN in that
step's forward passes, so the loss and every gradient are NaN. In-process runs use the single backend; one
2-rank FSDP2 run (real processes) poisons rank 1 only and checks that both ranks take the same decision.
"""

import json
import math
import subprocess
import sys
import types

import pytest
import torch

from hfdist import checkpoint
from hfdist.cli import main
from hfdist.config import load_config
from hfdist.errors import HfdistError
from hfdist.hooks import LoopHooks
from hfdist.monitor import read_metrics
from hfdist.trainer import Trainer, train

OVERRIDES = [
    "data.seq_len=32",
    "data.num_samples=16",
    "data.num_validation=4",
    "data.num_contexts=2",
    "data.context_len=8",
    "data.mode=chunk",
    "eval.total_len=48",
    "eval.ttr_window=16",
    "eval.every_epochs=0",
    "train.epochs=4",
    "optim.lr=1e-2",
    "checkpoint.every_steps=1",
    "checkpoint.keep_last=10",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from hfdist.testing import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("numerics") / "tiny-model")


def dcp_state(folder):
    """A checkpoint's model and optimizer state (DCP) and its scheduler state, as plain tensors."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = folder.parent / f"{folder.name}.pt"
    dcp_to_torch_save(folder / "dcp", out)
    state = torch.load(out, weights_only=True)
    state["scheduler"] = torch.load(folder / "scheduler.pt", weights_only=True)
    return state


def flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}/").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, sub in enumerate(tree) for k, v in flatten(sub, f"{prefix}{i}/").items()}
    return {prefix: tree}


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def test_nan_step_is_skipped_counted_and_changes_no_state(model_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HFDIST_FAULT_NAN_AT_STEP", "3")
    run_dir = tmp_path / "run"
    config = load_config(None, OVERRIDES + [f"model.path={model_dir}", "train.max_steps=4"])
    with caplog.at_level("WARNING", logger="hfdist.trainer"):
        summary = train(config, run_dir, progress=False)
    assert summary["steps"] == 4 and summary["skipped_steps"] == 1
    steps = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"}
    assert steps[3]["train/loss"] == "nan" and steps[3]["train/grad_norm"] == "nan"
    assert [steps[s]["train/skipped_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    assert all(math.isfinite(steps[s]["train/loss"]) for s in (1, 2, 4))
    # The epoch's mean is over the steps that trained: epoch 2 is steps 3 (skipped) and 4.
    epochs = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "epoch"}
    assert epochs[4]["train/loss"] == steps[4]["train/loss"]
    # The skipped step changed nothing: model, Adam moments and step counts, LR schedule.
    before, after = (
        flatten(dcp_state(run_dir / "checkpoints" / "step_00000002")),
        flatten(dcp_state(run_dir / "checkpoints" / "step_00000003")),
    )
    assert before.keys() == after.keys() and all(same(before[k], after[k]) for k in before)
    assert any(k.startswith("optimizer/state/") for k in before)
    # ...but its batch was consumed: step 4 trained on the epoch's second batch, and the warning names step 3's.
    state = json.loads((run_dir / "checkpoints" / "step_00000003" / "trainer_state.json").read_text())
    assert (state["epoch"], state["step_in_epoch"], state["skipped_steps"]) == (1, 1, 1)
    warning = [r.getMessage() for r in caplog.records if "optimizer step is skipped" in r.getMessage()]
    from hfdist.data import StepSampler

    indices = StepSampler(16, 8, 8, 0, 1, 0).global_batch(1, 0).tolist()
    assert (
        len(warning) == 1
        and warning[0].startswith("step 3 (epoch 2, batch 1 of 2)")
        and str(indices) in warning[0]
    )
    after4 = flatten(dcp_state(run_dir / "checkpoints" / "step_00000004"))
    assert not all(same(after[k], after4[k]) for k in after if k.startswith("model/"))  # training went on


@pytest.mark.parametrize("limit, nan_steps, stop_step", [(2, "3-8", 5), (0, "2", 2)])
def test_too_many_bad_steps_in_a_row_stop_the_run(
    model_dir, tmp_path, monkeypatch, capsys, limit, nan_steps, stop_step
):
    monkeypatch.setenv("HFDIST_FAULT_NAN_AT_STEP", nan_steps)
    run_dir = tmp_path / "run"
    args = [
        "hyperfit",
        "--output-dir",
        str(run_dir),
        "--no-progress",
        "--set",
        f"model.path={model_dir}",
        "--set",
        f"train.max_bad_steps_in_row={limit}",
    ] + [a for o in OVERRIDES for a in ("--set", o)]
    code = main(args)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("hfdist: error:")]  # (progress bars aside)
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert (
        errors[0].startswith(f"hfdist: error: step {stop_step} (epoch ")
        and f"{limit + 1} consecutive steps with a non-finite loss or gradient norm, more than "
        f"train.max_bad_steps_in_row={limit}; stopping"
        in errors[0]
    ), err
    assert not (run_dir / "model").exists() and not (run_dir / "summary.json").exists()
    last = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"][-1]
    assert (last["step"], last["train/skipped_steps"]) == (stop_step, limit + 1)
    # No checkpoint holds a NaN; none was written at the step that stopped the run.
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert [int(p.name[5:]) for p in saved] == list(range(1, stop_step))
    for folder in saved:
        state = flatten(dcp_state(folder))
        assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("model/"))


def _backend():
    from test_checkpoint import _backend as build

    return build()


def test_non_finite_weights_are_never_saved_or_exported(tmp_path):
    backend = _backend()
    checkpoint.save(tmp_path / "ckpt", 1, backend, {"step": 1}, keep_last=5)
    with torch.no_grad():
        next(backend.model.parameters())[0, 0] = float("inf")
    with pytest.raises(
        HfdistError,
        match=r"step_00000002: refusing to save non-finite weights \(1 parameter tensors "
        r"hold NaN or inf\); the previous checkpoints are intact",
    ):
        checkpoint.save(tmp_path / "ckpt", 2, backend, {"step": 2}, keep_last=5)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step_00000001"]
    assert checkpoint.verify(tmp_path / "ckpt" / "step_00000001") is None
    with pytest.raises(HfdistError, match="refusing to export non-finite weights"):
        Trainer.export(
            types.SimpleNamespace(backend=backend, tokenizer=None, hooks=LoopHooks()), tmp_path / "model"
        )
    assert not (tmp_path / "model").exists()


class FakeEngine:
    """What DeepSpeedBackend.step reads from a DeepSpeed engine after its own (skipping or not) step."""

    def __init__(self, applied: bool, norm: float):
        self.applied, self.norm, self.global_steps, self.steps = applied, norm, 3, 0

    def is_gradient_accumulation_boundary(self):
        return True

    def step(self):
        self.steps += 1

    def was_step_applied(self):
        return self.applied

    def get_global_grad_norm(self):
        return self.norm


@pytest.mark.parametrize(
    "applied, norm, loss, outcome",
    [
        (True, 1.5, 2.0, "applied"),
        (
            False,
            float("inf"),
            float("nan"),
            "skipped",
        ),  # ZeRO-3 saw the non-finite norm and skipped by itself
        (
            True,
            1.5,
            float("inf"),
            "error",
        ),  # a non-finite loss with a finite norm: DeepSpeed applied it already
    ],
)
def test_deepspeed_step_follows_the_engines_own_skip(applied, norm, loss, outcome):
    from hfdist.distributed.deepspeed import DeepSpeedBackend

    backend = DeepSpeedBackend.__new__(DeepSpeedBackend)
    backend.engine = FakeEngine(applied, norm)
    readout = torch.tensor([loss, 5.0])
    if outcome == "error":
        with pytest.raises(
            HfdistError, match="deepspeed: step 3: non-finite loss inf with a finite gradient norm"
        ):
            backend.step(0.0, readout)
        return
    result = backend.step(0.0, readout)
    assert backend.engine.steps == 1 and result.applied == (outcome == "applied")
    assert result.grad_norm == norm or math.isnan(result.grad_norm) == math.isnan(norm)


@pytest.mark.distributed
def test_fsdp_nan_on_one_rank_is_skipped_on_every_rank(tmp_path, monkeypatch):
    """Rank 1 alone produces NaN at step 3: the all-reduced loss and the global gradient norm are NaN on both
    ranks, both skip, and the run continues to the same numbers as a single process with the same fault."""
    from launch_helpers import (
        LOSS_RTOL,
        WEIGHT_ATOL,
        exported_weights,
        launch_env,
        step_records,
        tiny_run_setup,
    )
    from test_distributed_training import CONFIG

    config = tiny_run_setup(tmp_path, CONFIG)["config"]
    env = launch_env(HFDIST_FAULT_NAN_AT_STEP="3", HFDIST_FAULT_RANK="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{env['MASTER_PORT']}",
            "-m",
            "hfdist.cli",
            "hyperfit",
            str(config),
            "--output-dir",
            str(tmp_path / "fsdp"),
            "--no-progress",
            "--set",
            "distributed.backend=fsdp",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "step 3 (epoch 2, batch 1 of 2): non-finite loss (nan) or gradient norm (nan)" in proc.stderr
    monkeypatch.setenv("HFDIST_FAULT_NAN_AT_STEP", "3")
    train(load_config(config), tmp_path / "single", progress=False)
    fsdp, single = step_records(tmp_path / "fsdp"), step_records(tmp_path / "single")
    assert fsdp.keys() == single.keys() == set(range(1, 9))
    assert fsdp[3] == single[3] == ("nan", "nan")
    for step in (1, 2, 4, 5, 6, 7, 8):
        assert fsdp[step][0] == pytest.approx(single[step][0], rel=LOSS_RTOL)
    a, b = exported_weights(tmp_path / "fsdp"), exported_weights(tmp_path / "single")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < WEIGHT_ATOL
    records = read_metrics(tmp_path / "fsdp" / "metrics.jsonl")
    assert [r["train/skipped_steps"] for r in records if r["kind"] == "step"] == [0, 0, 1, 1, 1, 1, 1, 1]

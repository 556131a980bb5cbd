"""Elastic fault tolerance: a rank killed mid-run under ``torchrun --max-restarts 2`` is restarted by torchrun, and
the job continues from its latest complete checkpoint by itself (no --resume) to the very weights of an
uninterrupted run, bit for bit, with every step logged exactly once.

Real processes: 2-rank FSDP2 on gloo, the tiny Llama, 8 optimizer steps, a checkpoint every 2 steps. The kill is
the test hook HFDIST_FAULT_KILL_AT_STEP (SIGKILL right after that optimizer step, before it is logged or
checkpointed, on the first attempt only); kill steps are drawn with a fixed seed after the first checkpoint, on
alternating ranks. Two launch paths: plain ``python -m torch.distributed.run`` (restarted workers share the agent's
store; hfdist separates the attempts) and launchers/torchrun.sh (a fresh store per attempt).
"""

import json
import random
import subprocess
import sys

import pytest
import torch
from launch_helpers import LAUNCHERS, exported_weights, launch_env
from test_distributed_training import CONFIG

pytestmark = pytest.mark.distributed
STEPS = 8
EVERY = 2
KILLS = sorted(random.Random(20251128).sample(range(EVERY + 1, STEPS + 1), 3))  # after the first checkpoint
CASES = [(step, i % 2, "launcher" if i == 2 else "torchrun") for i, step in enumerate(KILLS)]


def torchrun(setup, run_dir, *extra, max_restarts=2, via="torchrun", env=None):
    args = [
        str(setup["config"]),
        "--output-dir",
        str(run_dir),
        "--no-progress",
        "--set",
        "distributed.backend=fsdp",
        *extra,
    ]
    environment = launch_env(GPUS_PER_NODE="2", MAX_RESTARTS=str(max_restarts), **(env or {}))
    if via == "launcher":
        cmd = [str(LAUNCHERS / "torchrun.sh"), *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{environment['MASTER_PORT']}",
            "--max-restarts",
            str(max_restarts),
            "-m",
            "hfdist.cli",
            "hyperfit",
            *args,
        ]
    proc = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=300)
    return proc.returncode, proc.stdout + proc.stderr


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hfdist.testing import tiny_model_folder

    root = tmp_path_factory.mktemp("elastic")
    model = tiny_model_folder(root / "tiny-model")
    config = root / "tiny.yaml"
    config.write_text(CONFIG.format(model=model))  # 8 steps of 8 sequences, a checkpoint every 2 steps
    return {"root": root, "config": config}


@pytest.fixture(scope="module")
def reference(setup):
    run_dir = setup["root"] / "uninterrupted"
    code, output = torchrun(setup, run_dir)
    assert code == 0, output[-4000:]
    return run_dir


@pytest.mark.parametrize("kill_step, rank, via", CASES, ids=[f"step{s}-rank{r}-{v}" for s, r, v in CASES])
def test_killed_rank_is_restarted_and_the_run_ends_as_if_uninterrupted(
    setup, reference, kill_step, rank, via
):
    run_dir = setup["root"] / f"killed-{kill_step}-{rank}-{via}"
    code, output = torchrun(
        setup,
        run_dir,
        via=via,
        env={"HFDIST_FAULT_KILL_AT_STEP": str(kill_step), "HFDIST_FAULT_RANK": str(rank)},
    )
    assert code == 0, output[-6000:]
    assert f"rank {rank} kills itself (SIGKILL) after step {kill_step}" in output
    resumed_from = (kill_step - 1) // EVERY * EVERY  # the step at which the kill finds the last checkpoint
    assert (
        f"torchrun restart 1 of this job: continuing from {run_dir}/checkpoints/step_{resumed_from:08d}"
        in output
    )
    got, want = records(run_dir), records(reference)
    # Every step logged exactly once (the killed attempt's records after the checkpoint were dropped), and the
    # whole record sequence (steps, epochs, evaluations) as in the uninterrupted run.
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]
    assert [r["step"] for r in got if r["kind"] == "step"] == list(range(1, STEPS + 1))
    loss = lambda rs: [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rs if r["kind"] == "step"]  # noqa
    assert loss(got) == loss(want)
    a, b = exported_weights(run_dir), exported_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_restart_never_takes_over_another_run(setup, reference):
    """The first attempt refuses a folder holding an earlier run; the restarted attempts do not resume it either
    (it was not begun by this job), so the job fails and the earlier run is untouched."""
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    code, output = torchrun(setup, reference, max_restarts=1)
    assert code != 0
    assert output.count("already holds a run; pass --resume") >= 2 * 2  # both ranks, both attempts
    assert "continuing from" not in output
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_restart_before_the_first_checkpoint_starts_afresh(setup, tmp_path, monkeypatch):
    """In process (single backend, the torchrun variables set by hand): an attempt that left metrics, data and even
    a model but no complete checkpoint is followed by a restart that starts the run again from step 0, without
    the "already holds a run" refusal, and logs every step once."""
    from hfdist.config import load_config
    from hfdist.monitor import read_metrics
    from hfdist.restart import JOB_MARKER
    from hfdist.trainer import train

    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "fresh-test")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "2")
    config = lambda *extra: load_config(setup["config"], ["checkpoint.every_steps=0", *extra])  # noqa: E731
    run_dir = tmp_path / "run"
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    train(config("train.max_steps=1"), run_dir, progress=False)  # the first attempt, stopped early
    assert (run_dir / JOB_MARKER).is_file()
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    summary = train(config(), run_dir, progress=False)
    assert summary["steps"] == STEPS
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    monkeypatch.delenv("TORCHELASTIC_MAX_RESTARTS")
    train(config(), tmp_path / "clean", progress=False)
    key = lambda d: [(r["kind"], r["step"], r.get("train/loss")) for r in read_metrics(d / "metrics.jsonl")]  # noqa
    assert key(run_dir) == key(tmp_path / "clean")

"""Preemption with real signals sent to real processes: a run stops after its current step with a checkpoint and exit
code 75, is continued, and ends with the uninterrupted run's weights bit for bit, every step logged once.

The tiny Llama of test_distributed_training.py (8 optimizer steps of 8 sequences, a checkpoint every 2 steps):
- one process: SIGTERM at a seeded random moment; the continued run is a SLURM requeue (SLURM_JOB_ID kept,
  SLURM_RESTART_COUNT 1, no --resume) and gets SIGUSR1, then SIGTERM again as soon as the preemption checkpoint's
  temporary folder appears (during the save); the next requeue completes the run.
- 2 ranks of FSDP2 under launchers/torchrun.sh with asynchronous checkpoints: SIGTERM to rank 1's worker only (rank 0
  learns of it through the step's collective), then, continued with --resume, SIGUSR1 to the launcher itself
  (torchrun's agent: hfdist.distributed.run forwards it; torchrun alone would die of it) and SIGUSR1 again during
  the save (the agent ignores it); the launcher exits 75 both times; a last --resume completes the run.
- launchers/slurm.sbatch requeues itself on exit code 75 only (fake srun and scontrol on PATH, for the script's
  branch logic).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launch_helpers import LAUNCHERS, REPO, exported_weights, hyperfit_args, launch_env, tiny_run_setup
from test_distributed_training import CONFIG

from hfdist.checkpoint import verify
from hfdist.preemption import PREEMPTED_EXIT_CODE

STEPS = 8
RNG = random.Random(20261207)  # the moments of the signals
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(tmp_path_factory.mktemp("preemption"), CONFIG)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def logged_steps(run_dir) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r["step"] for r in records(run_dir) if r["kind"] == "step"]


class Launched:
    """A real process (the CLI or a launcher), its output in a file."""

    def __init__(self, cmd, env, log: Path):
        self.log = log
        self.file = open(log, "w")
        self.proc = subprocess.Popen(
            [str(c) for c in cmd], env=env, stdout=self.file, stderr=subprocess.STDOUT
        )

    def wait(self, timeout=300) -> tuple[int, str]:
        code = self.proc.wait(timeout=timeout)
        self.file.close()
        return code, self.log.read_text()

    def signal(self, sig, pid=None) -> bool:
        """Send ``sig`` to the process (or to ``pid``); False when it has already exited."""
        if self.proc.poll() is not None:
            return False
        os.kill(pid or self.proc.pid, sig)
        return True


def signal_at_random_step(
    launched: Launched, run_dir: Path, sig, resumed_at=0, pid=None, second=None
) -> dict:
    """Once a seeded random step among the next two after ``resumed_at`` (the run's own steps; at most STEPS - 3)
    is logged, wait a seeded random fraction of that step's duration and send ``sig`` (so that it lands anywhere in
    the next step, whatever the machine's speed); with ``second``, send that signal too as soon as a checkpoint's
    temporary folder appears (the preemption checkpoint being written). Returns what happened, for the assertions
    and the log."""
    after = RNG.randint(resumed_at + 1, max(resumed_at + 1, min(resumed_at + 2, STEPS - 3)))
    deadline = time.monotonic() + 240
    while not any(step >= after for step in logged_steps(run_dir)):
        assert launched.proc.poll() is None, launched.log.read_text()[-4000:]
        assert time.monotonic() < deadline, "the run never logged step %d" % after
        time.sleep(0.01)
    step_time = [r["perf/step_time_s"] for r in records(run_dir) if r["kind"] == "step"][-1]
    time.sleep(RNG.uniform(0, 1) * step_time)
    assert launched.signal(sig, pid), "the run ended before the signal"
    sent = {"after_step": after, "signal": sig.name, "second_during_save": False}
    if second is not None:
        checkpoints = run_dir / "checkpoints"
        while launched.proc.poll() is None:
            if any(p.name.endswith(".tmp") for p in checkpoints.glob(".step_*")):
                sent["second_during_save"] = launched.signal(second, pid)
                break
            time.sleep(0.002)
    return sent


def assert_preempted(code, output, run_dir) -> int:
    """Exit 75 after one line naming the signal, the step and a complete checkpoint; returns that step."""
    assert code == PREEMPTED_EXIT_CODE, output[-6000:]
    (line,) = [line for line in output.splitlines() if "hfdist.trainer: preempted by" in line]
    step = int(line.split("stopped after step ")[1].split()[0])
    folder = run_dir / "checkpoints" / f"step_{step:08d}"
    assert f"with checkpoint {folder};" in line and f"exiting with code {PREEMPTED_EXIT_CODE}" in line
    assert verify(folder) is None
    print(line.split("hfdist.trainer: ")[1])
    return step


def step_values(rs):
    return [(r["step"], r["train/loss"], r["train/grad_norm"]) for r in rs if r["kind"] == "step"]


def assert_as_uninterrupted(run_dir, reference):
    got, want = records(run_dir), records(reference)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in want]  # each step once
    assert step_values(got) == step_values(want)
    a, b = exported_weights(run_dir), exported_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli(setup, run_dir, *extra):
    return [sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir, *extra)]


def test_one_process_preempted_twice_and_requeued_ends_as_uninterrupted(setup):
    reference = setup["root"] / "single-uninterrupted"
    code, output = Launched(cli(setup, reference), launch_env(), setup["root"] / "ref.log").wait()
    assert code == 0, output[-4000:]

    run_dir = setup["root"] / "single-preempted"
    slurm = {"SLURM_JOB_ID": "4242"}
    first = Launched(cli(setup, run_dir), launch_env(**slurm), setup["root"] / "single-1.log")
    sent = signal_at_random_step(first, run_dir, signal.SIGTERM)
    stopped = assert_preempted(*first.wait(), run_dir)
    assert stopped >= sent["after_step"]

    requeued = Launched(
        cli(setup, run_dir), launch_env(SLURM_RESTART_COUNT="1", **slurm), setup["root"] / "single-2.log"
    )
    sent = signal_at_random_step(requeued, run_dir, signal.SIGUSR1, stopped, second=signal.SIGTERM)
    code, output = requeued.wait()
    assert f"SLURM requeue 1 of job 4242: continuing from {run_dir}/checkpoints/step_{stopped:08d}" in output
    assert_preempted(code, output, run_dir)
    assert "preempted by SIGUSR1" in output
    if sent["second_during_save"]:
        assert "(and 1 more signal, ignored)" in output
    print(sent)

    code, output = Launched(
        cli(setup, run_dir), launch_env(SLURM_RESTART_COUNT="2", **slurm), setup["root"] / "single-3.log"
    ).wait()
    assert code == 0, output[-4000:]
    assert_as_uninterrupted(run_dir, reference)


def worker_pid(agent_pid: int, rank: int) -> int:
    """The pid of the torchrun worker of ``rank`` under the agent ``agent_pid`` (its child with RANK=rank)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        children = Path(f"/proc/{agent_pid}/task/{agent_pid}/children").read_text().split()
        for child in children:
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker of rank {rank} under {agent_pid}")


def test_two_ranks_under_torchrun_preempted_twice_end_as_uninterrupted(setup):
    sets = ("--set", "distributed.backend=fsdp", "--set", "checkpoint.async=true")

    def torchrun(run_dir, name, *extra):
        env = launch_env(GPUS_PER_NODE="2")
        cmd = [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, *sets, *extra)]
        return Launched(cmd, env, setup["root"] / f"{name}.log")

    reference = setup["root"] / "fsdp-uninterrupted"
    code, output = torchrun(reference, "fsdp-ref").wait()
    assert code == 0, output[-4000:]

    run_dir = setup["root"] / "fsdp-preempted"
    first = torchrun(run_dir, "fsdp-1")
    signal_at_random_step(first, run_dir, signal.SIGTERM, pid=worker_pid(first.proc.pid, 1))
    code, output = first.wait()
    stopped = assert_preempted(code, output, run_dir)
    assert "preempted by SIGTERM" in output and "workers preempted by SIGTERM" in output

    second = torchrun(run_dir, "fsdp-2", "--resume")
    sent = signal_at_random_step(second, run_dir, signal.SIGUSR1, stopped, second=signal.SIGUSR1)
    code, output = second.wait()
    assert_preempted(code, output, run_dir)
    assert "preempted by SIGUSR1: stopped" in output  # the agent forwarded the first signal only
    print(sent)

    code, output = torchrun(run_dir, "fsdp-3", "--resume").wait()
    assert code == 0, output[-4000:]
    assert_as_uninterrupted(run_dir, reference)


@pytest.mark.parametrize("srun_exit, requeued", [(PREEMPTED_EXIT_CODE, True), (1, False), (0, False)])
def test_slurm_script_requeues_itself_on_the_preemption_exit_code(srun_exit, requeued, tmp_path):
    """The script's own logic, SLURM simulated: a fake srun (exits as told, records its arguments) and a fake
    scontrol (answers `show hostnames`, records `requeue`) on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    (bin_dir / "srun").write_text(f'#!/bin/sh\necho "srun $*" >> {calls}\nexit {srun_exit}\n')
    (bin_dir / "scontrol").write_text(
        f'#!/bin/sh\necho "scontrol $*" >> {calls}\n[ "$1" = show ] && echo node07\nexit 0\n'
    )
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "31337",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_NNODES": "2",
    }
    script = REPO / "launchers" / "slurm.sbatch"
    proc = subprocess.run(
        ["bash", script, "cfg.yaml", "--output-dir", "/shared/run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == srun_exit, proc.stderr
    lines = calls.read_text().splitlines()
    srun_line = next(line for line in lines if line.startswith("srun "))
    assert "-m hfdist.distributed.run" in srun_line and "--rdzv-endpoint node07:" in srun_line
    assert srun_line.endswith("-m hfdist.cli hyperfit cfg.yaml --output-dir /shared/run")
    assert ("scontrol requeue 31337" in lines) == requeued
    directives = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --signal=USR1@180" in directives and "#SBATCH --requeue" in directives

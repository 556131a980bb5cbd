"""Timeouts: ``distributed.startup_timeout_s`` bounds the rendezvous, ``distributed.timeout_s`` every collective of
training; a hung rank ends the job with a one-line error that names it, well within a bound, instead of a 30-minute
wait.

Real processes on gloo: 2-rank FSDP2 under torchrun where rank 1 hangs after step 3 (the test hook
HFDIST_FAULT_HANG_AT_STEP) with a 5 s timeout. Rank 0 names rank 1 either from the progress marks in the
rendezvous store (its next collective is the per-step metrics gather) or from ``monitored_barrier`` (metrics
logged rarely, a checkpoint every step: its next collective is the checkpoint's barrier).
"""

import os
import re
import subprocess
import sys
import time

import pytest
from test_reliability_elastic import setup, torchrun  # noqa: F401  (the module fixture and the launcher)

pytestmark = pytest.mark.distributed
TIMEOUT_S = 5
BOUND_S = 90  # start-up (~10 s on 2 cores), 3 steps, the 5 s timeout, torchrun's teardown


@pytest.mark.parametrize(
    "where, extra, detail",
    [
        ("metrics-gather", [], r"ranks behind: rank 1 \(last at training step 3\)"),
        (
            "monitored-barrier",
            ["--set", "train.log_every_steps=100", "--set", "checkpoint.every_steps=1"],
            r"Ranks 1 failed to pass monitoredBarrier in 5000 ms",
        ),
    ],
    ids=["metrics-gather", "monitored-barrier"],
)
def test_hung_rank_ends_the_job_naming_it(setup, where, extra, detail):  # noqa: F811
    started = time.monotonic()
    code, output = torchrun(
        setup,
        setup["root"] / f"hung-{where}",
        "--set",
        f"distributed.timeout_s={TIMEOUT_S}",
        *extra,
        max_restarts=0,
        env={"HFDIST_FAULT_HANG_AT_STEP": "3", "HFDIST_FAULT_RANK": "1"},
    )
    elapsed = time.monotonic() - started
    assert code != 0, output[-4000:]
    assert elapsed < BOUND_S, f"the job took {elapsed:.0f} s"
    assert "rank 1 hangs after step 3" in output
    errors = [line for line in output.splitlines() if line.startswith("hfdist: error:")]
    assert len(errors) == 1, output[-4000:]  # rank 0's; rank 1 sleeps until torchrun ends it
    assert re.match(
        rf"hfdist: error: rank 0: collective during .*step 3 timed out after {TIMEOUT_S} s waiting for "
        r"peers \(a rank is hung or dead\); ",
        errors[0],
    ), errors[0]
    assert re.search(detail, errors[0]), errors[0]


@pytest.mark.distributed
def test_rank_stuck_in_a_checkpoint_ends_the_job_within_the_checkpoint_timeout(setup):  # noqa: F811
    """Rank 1 hangs after writing its files of the step-2 checkpoint; rank 0 waits in the checkpoint's collectives
    under distributed.checkpoint_timeout_s (5 s), not the training timeout (600 s), and names the phase's field."""
    started = time.monotonic()
    code, output = torchrun(
        setup,
        setup["root"] / "hung-in-checkpoint",
        "--set",
        "distributed.timeout_s=600",
        "--set",
        f"distributed.checkpoint_timeout_s={TIMEOUT_S}",
        max_restarts=0,
        env={"HFDIST_FAULT_HANG_IN_CHECKPOINT": "2", "HFDIST_FAULT_RANK": "1"},
    )
    elapsed = time.monotonic() - started
    assert code != 0 and elapsed < BOUND_S, output[-4000:]
    errors = [line for line in output.splitlines() if line.startswith("hfdist: error:")]
    assert len(errors) == 1, output[-4000:]
    assert re.match(
        rf"hfdist: error: rank 0: collective during checkpoint at step 2 timed out after {TIMEOUT_S} s "
        r"waiting for peers \(a rank is hung or dead\); timeout: distributed.checkpoint_timeout_s",
        errors[0],
    ), errors[0]


def test_rendezvous_times_out_naming_the_setting(setup, tmp_path):  # noqa: F811
    """A rank whose peers never come: init_process_group gives up after distributed.startup_timeout_s."""
    from launch_helpers import free_port

    env = {
        **os.environ,
        "RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfdist.cli",
            "hyperfit",
            str(setup["config"]),
            "--output-dir",
            str(tmp_path / "run"),
            "--set",
            "distributed.backend=fsdp",
            "--set",
            "distributed.startup_timeout_s=3",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and time.monotonic() - started < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("hfdist: error:")]
    assert (
        len(errors) == 1
        and "cannot rendezvous" in errors[0]
        and "as rank 0 of 2 within distributed.startup_timeout_s=3" in errors[0]
    ), proc.stderr
    assert not (tmp_path / "run").exists()

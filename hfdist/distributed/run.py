"""``python -m hfdist.distributed.run [torchrun options] -m hfdist.cli hyperfit ...``: torchrun for jobs that may be
preempted (launchers/torchrun.sh and launchers/slurm.sbatch start it; the options are torchrun's own).

What torchrun's agent (torch.distributed.run, torch 2.11-2.13) does on a signal: for the signals of its
``--signals-to-handle`` (default SIGTERM, SIGINT, SIGHUP, SIGQUIT) it raises SignalException, sends the same signal to
every worker, waits up to its shutdown timeout and SIGKILLs the workers still running, then exits 1 whatever they did.
The timeout is 30 s unless ``--shutdown-timeout`` or TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise (torch builds that
have them). A second signal during that wait starts the shutdown over; a third ends the agent and orphans the
workers. SIGUSR1, the signal SLURM's ``--signal`` usually asks for, is not in the default list: the agent dies of it
at once (the default action) and leaves its workers running. And a worker that exits non-zero makes torchrun exit 1.

What this launcher changes, and only that:
- The agent handles PREEMPT_SIGNALS (SIGTERM, SIGUSR1, SIGUSR2) itself: the first is forwarded to the workers
  exactly as torchrun forwards SIGTERM (the same SignalException path and shutdown timeout); later ones are ignored,
  so that the workers keep their whole grace period to finish the step and write the checkpoint.
- The exit code: preempted workers write the status file this launcher names (hfdist.preemption.STATUS_ENV) once
  their checkpoint is complete; when it is there, the launcher exits with PREEMPTED_EXIT_CODE (75) instead of
  torchrun's 1, so that a scheduler can requeue the job (launchers/slurm.sbatch does).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import tempfile

from torch.distributed import run as torchrun
from torch.distributed.elastic.multiprocessing import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
from torch.distributed.launcher.api import LaunchConfig

from hfdist.preemption import PREEMPTED_EXIT_CODE, STATUS_ENV, read_status

logger = logging.getLogger("hfdist.distributed.run")

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
TORCH_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"  # the rest of torchrun's default list, still handled by torchrun


class _ForwardOnce:
    """The agent's handler of PREEMPT_SIGNALS: the first raises torchrun's SignalException (torchrun then forwards
    that signal to the workers and waits for them), the others are ignored."""

    def __init__(self):
        self.received = None

    def __call__(self, signum, frame):
        if self.received is not None:
            return
        self.received = signal.Signals(signum)
        raise SignalException(f"Process {os.getpid()} got signal: {self.received}", sigval=self.received)


@record  # failures other than a preemption are reported as torchrun reports them
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    warn_on_fixed_grace()
    fd, status_path = tempfile.mkstemp(prefix="hfdist-preemption-", suffix=".json")
    os.close(fd)
    os.unlink(status_path)  # a preempted worker creates it
    os.environ[STATUS_ENV] = status_path
    handler = _ForwardOnce()
    for number in PREEMPT_SIGNALS:
        signal.signal(number, handler)
    try:
        torchrun.run(torchrun.parse_args(["--signals-to-handle", TORCH_SIGNALS, *argv]))
        return 0
    except (SignalException, ChildFailedError):
        status = read_status(status_path)
        if status is None:
            raise
        logger.warning(
            "workers preempted by %s after step %d, checkpoint %s: exiting with %d",
            status["signal"],
            status["step"],
            status["checkpoint"],
            PREEMPTED_EXIT_CODE,
        )
        return PREEMPTED_EXIT_CODE
    finally:
        if os.path.exists(status_path):
            os.unlink(status_path)


def warn_on_fixed_grace() -> None:
    """torchrun builds without a shutdown timeout setting kill the workers 30 s after a signal, whatever is asked."""
    asked = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT")
    has_setting = "shutdown_timeout" in {f.name for f in dataclasses.fields(LaunchConfig)}
    if asked and not has_setting and asked.isdigit() and int(asked) > 30:
        logger.warning(
            "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=%s: this torch's torchrun has no shutdown timeout setting and kills "
            "the workers 30 s after a signal; a preemption checkpoint that takes longer is lost (the previous "
            "complete one stays)",
            asked,
        )


if __name__ == "__main__":
    sys.exit(main())

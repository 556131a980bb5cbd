"""Where a training run starts: a new run folder, ``--resume``, or the continuation of a job that its launcher
restarted (torchrun ``--max-restarts``) or requeued (SLURM), which finds its own latest complete checkpoint.

The first attempt of a restartable job records who started the run folder (``JOB_MARKER``: its torchrun agents, its
SLURM job id), so that a later attempt of the same job continues it while any other job is refused a folder
that already holds a run.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from hfdist import checkpoint
from hfdist.distributed.env import requeue_count, restart_count, slurm_job_id
from hfdist.errors import HfdistError

logger = logging.getLogger(__name__)

# Written by the first attempt of a torchrun job with --max-restarts > 0: which launcher agents started the run.
JOB_MARKER = ".hfdist-job.json"
FRESH = "fresh"  # start point of a restarted job that had no complete checkpoint yet


def prepare_run_dir(run_dir: Path, resume: Optional[str], checkpoint_dir: str = "checkpoints") -> None:
    """Refuse to train over a finished run unless resuming: nothing of an earlier result is overwritten."""
    if (
        resume is None
        and run_dir.exists()
        and any((run_dir / name).exists() for name in ("model", "metrics.jsonl", checkpoint_dir))
    ):
        raise HfdistError(
            f"--output-dir {str(run_dir)!r}: already holds a run; pass --resume to continue it "
            "or choose another folder"
        )


def agent_identity() -> str:
    """This process's torchrun agent (run id, host, agent pid): the same for every attempt of a job on a node."""

    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}@{socket.gethostname()}:{os.getppid()}"


def choose_start(
    backend, run_dir: Path, resume: Optional[str], checkpoint_root: Path
) -> tuple[Optional[str], Optional[dict]]:
    """Where this attempt starts: None (a new run), FRESH (a restarted job with no checkpoint yet), or a
    checkpoint folder; and, on rank 0 of a first attempt under ``torchrun --max-restarts N``, the JOB_MARKER
    content to write once the inputs are checked. Rank 0 decides and tells the other ranks; an error is raised
    on every rank alike.

    On a torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) of the job whose first attempt began this run folder
    (its agents are recorded in JOB_MARKER), the run continues from the latest complete checkpoint, without
    --resume and without the "already holds a run" refusal; so does a SLURM job requeued (SLURM_RESTART_COUNT > 0,
    e.g. by launchers/slurm.sbatch after a preemption) whose job id JOB_MARKER records. Any other folder is checked
    as on a first attempt.
    """
    error = plan = marker_content = None
    agents = backend.all_gather_object(agent_identity())
    if backend.is_main:
        try:
            marker = run_dir / JOB_MARKER
            recorded = json.loads(marker.read_text()) if marker.is_file() else {}
            if restart_count() > 0 and agent_identity() in recorded.get("agents", []):
                plan = "restart"
            elif (
                requeue_count() > 0
                and slurm_job_id() is not None
                and recorded.get("slurm_job_id") == slurm_job_id()
            ):
                plan = "requeue"
            else:
                prepare_run_dir(run_dir, resume, str(checkpoint_root.relative_to(run_dir)))
                plan = "new" if resume is None else "resume"
            restartable = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0) > 0
            if plan != "restart" and (restartable or slurm_job_id() is not None):
                marker_content = {"agents": sorted(set(agents)), "slurm_job_id": slurm_job_id()}
        except HfdistError as exc:
            error = str(exc)
    error, plan = backend.broadcast_object((error, plan))
    if error is not None:
        raise HfdistError(error)
    # The checkpoint's files are checksummed by all ranks together (each its share), so a resume of a large
    # checkpoint reads every byte once in total; every rank gets the same verdict (and the same error).
    if plan == "new":
        return None, marker_content
    if plan == "resume":
        return str(checkpoint.resolve_resume(resume, checkpoint_root, backend)), marker_content
    latest = checkpoint.latest_valid(checkpoint_root, backend)
    start = str(latest) if latest is not None else (resume or FRESH)
    if backend.is_main:
        what = (
            f"torchrun restart {restart_count()} of this job"
            if plan == "restart"
            else f"SLURM requeue {requeue_count()} of job {slurm_job_id()}"
        )
        logger.warning(
            "%s: continuing from %s",
            what,
            latest if latest is not None else resume or "the start (no complete checkpoint yet)",
        )
    return start, marker_content

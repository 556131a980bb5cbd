"""Naming the rank a collective waits for: progress marks in the rendezvous store, one-line failure messages.

Every rank runs the same sequence of training phases. ``mark(label)`` records this rank's position in that
sequence (a counter and a label such as ``training step 7``) in the process group's key-value store (one
small set per mark: a few per optimizer step, no device work). When a collective times out (gloo raises
after ``distributed.timeout_s``; a peer that died closes its connections), ``failure(exc)`` turns the
exception into one ``HfdistError`` line that names this rank, where it was, the timeout, and the ranks whose
last mark lies behind: the ranks that are hung or dead. ``monitored_barrier`` (gloo) at epoch ends and
before checkpoints names the missing ranks by itself.

Under NCCL a timed-out collective is aborted by the NCCL watchdog thread (``TORCH_NCCL_ASYNC_ERROR_HANDLING``),
which ends the process with its own report; the marks are still in the store for inspection.

Phases: a job's collectives do not all wait alike. The rendezvous and start-up (weight loading, a resume's
checkpoint verification) run under ``distributed.startup_timeout_s``, training under ``distributed.timeout_s``,
the writing of a checkpoint and the export under ``distributed.checkpoint_timeout_s`` / ``export_timeout_s``:
``phase_timeout`` sets the timeout of the default group and every registered subgroup for the duration of a
phase (``_set_pg_timeout``: later collectives use it, gloo and NCCL alike), and the one-line error names it.
"""

from __future__ import annotations

import logging
import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional

import torch.distributed as dist

from hfdist.errors import HfdistError

logger = logging.getLogger(__name__)

KEY = "hfdist/progress/{rank}"
# Messages of gloo, c10d and the TCP store when a peer does not answer or has gone.
_TIMEOUT = re.compile(r"timed out|timeout|monitoredBarrier", re.IGNORECASE)
_PEER_GONE = re.compile(
    r"connection (reset|closed|refused)|broken pipe|closed by peer|pair closure|"
    r"socket closed|end of file|EOF",
    re.IGNORECASE,
)


class Watchdog:
    def __init__(self):
        self.sequence = 0
        self.label = "start-up"
        self.timeout_s: Optional[float] = None
        self.timeout_field = "distributed.timeout_s"
        self._store = None
        self._rank = 0
        self._world_size = 1
        self._groups: list = []  # subgroups whose timeout follows the phases (an HSDP/TP mesh's, the async group)

    def attach(self, timeout_s: float) -> None:
        """Start recording marks in the default process group's store (call after it is initialised)."""

        self.timeout_s = timeout_s
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        try:
            self._store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError, ValueError):  # a private helper: without it, no marks
            self._store = None
        self.mark(self.label)

    def mark(self, label: str) -> None:
        self.sequence += 1
        self.label = label
        if self._store is not None:
            try:
                self._store.set(KEY.format(rank=self._rank), f"{self.sequence}\t{label}")
            except (RuntimeError, ValueError):
                self._store = None  # the store has gone: the job is failing anyway

    def _behind(self) -> Optional[str]:
        """'rank 1 (last at training step 6)' for every rank whose last mark is behind this rank's, or None."""
        if self._store is None:
            return None
        behind = []
        try:
            for rank in range(self._world_size):
                if rank == self._rank:
                    continue
                key = KEY.format(rank=rank)
                if not self._store.check([key]):
                    behind.append(f"rank {rank} (never reported)")
                    continue
                sequence, label = self._store.get(key).decode().split("\t", 1)
                if int(sequence) < self.sequence:
                    behind.append(f"rank {rank} (last at {label})")
        except (RuntimeError, ValueError):
            return None
        if len(behind) > 8:
            behind = behind[:8] + [f"{len(behind) - 8} more"]
        return (
            ", ".join(behind)
            if behind
            else "none: every rank got this far, so the hang is inside the collective"
        )

    def failure(self, exc: BaseException) -> Optional[HfdistError]:
        """One-line error for a failed collective (a timeout or a lost peer); None for any other exception."""
        if isinstance(exc, HfdistError) or not isinstance(exc, RuntimeError) or self._world_size == 1:
            return None
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        first = re.sub(r"^\[[^\]]*\.(cc|cpp):\d+\]\s*", "", first)  # gloo's source location prefix
        dist_error = type(exc).__module__.startswith("torch.distributed") or "Dist" in type(exc).__name__
        if _TIMEOUT.search(text):
            what = (
                f"timed out after {self.timeout_s:g} s waiting for peers" if self.timeout_s else "timed out"
            )
        elif _PEER_GONE.search(text) or dist_error:
            what = "failed: a peer closed its connection"
        else:
            return None
        behind = self._behind()
        message = (
            f"rank {self._rank}: collective during {self.label} {what} (a rank is hung or dead); timeout: "
            f"{self.timeout_field}" + (f"; ranks behind: {behind}" if behind else "") + f" [{first}]"
        )
        return HfdistError(message)

    def register_groups(self, groups) -> None:
        self._groups.extend(g for g in groups if g is not None and g not in self._groups)

    def set_timeout(self, timeout_s: float, field: str) -> None:
        """Make ``timeout_s`` the timeout of the default group and the registered subgroups from now on."""

        self.timeout_s, self.timeout_field = timeout_s, field
        if not (dist.is_available() and dist.is_initialized()):
            return
        default = dist.distributed_c10d._get_default_group()
        set_group_timeouts([default, *self._groups], timeout_s, include_default=True)

    @contextmanager
    def phase_timeout(self, timeout_s: float, field: str) -> Iterator[None]:
        """Run a phase (a checkpoint, the export) under its own timeout; the previous one is restored after it (not
        after a failure: the one-line error then names the phase's timeout, the one that expired)."""
        previous = (self.timeout_s, self.timeout_field)
        self.set_timeout(timeout_s, field)
        yield
        if previous[0] is not None:
            self.set_timeout(*previous)
        else:
            self.timeout_s, self.timeout_field = previous


watchdog = Watchdog()


def monitored_barrier(timeout_s: float) -> None:
    """A barrier that on gloo names the ranks that did not arrive within ``timeout_s`` (plain barrier on NCCL)."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=timedelta(seconds=timeout_s), wait_all_ranks=True)
    else:
        dist.barrier()


def set_group_timeouts(groups, timeout_s: float, include_default: bool = False) -> None:
    """Give process subgroups (e.g. an HSDP mesh's) the job's timeout: ``new_group`` defaults to 10/30 min. The
    subgroups are registered with the watchdog, so that later phases (checkpoint, export) set theirs too."""

    default = dist.distributed_c10d._get_default_group()
    if not include_default:
        watchdog.register_groups(
            [g for g in groups if g is not None and g is not dist.group.WORLD and g is not default]
        )
    for group in groups:
        if group is None or (not include_default and (group is dist.group.WORLD or group is default)):
            continue
        try:
            dist.distributed_c10d._set_pg_timeout(timedelta(seconds=timeout_s), group)
        except (AttributeError, RuntimeError, ValueError) as exc:  # private API: keep the default, say so
            logger.warning("cannot set the timeout of a process subgroup (%s); it keeps torch's default", exc)

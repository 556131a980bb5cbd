"""Where and when a benchmark's numbers were measured: the ``provenance`` block of every results file.

    {"machine": "8-core x86_64 CPU (AMD EPYC 7B13), 31 GiB memory, torch on 8 threads",
     "versions": {"python": "3.11.7", "torch": "2.13.0+cpu", ...},
     "commit": "<40 hex digits>", "uncommitted_changes": false, "date": "2026-12-02"}

``benchmarks/render_tables.py`` requires ``machine``, ``versions``, ``commit`` and ``date`` and prints them
under each table. Standard library only: ``gpu_suite.py``'s driver imports this before anything else is installed.
The benchmark scripts import it as ``from provenance import provenance`` (a script's own folder leads
``sys.path``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Distribution names; a version is recorded where the distribution is installed.
PACKAGES = ("torch", "transformers", "triton", "peft", "deepspeed")


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """The checked-out commit's full hash (the renderer shows 7 digits); "unknown" outside a git checkout."""
    return _git("rev-parse", "HEAD") or "unknown"


def uncommitted_changes() -> bool | None:
    """Whether tracked files differ from the commit (the numbers then come from code no commit holds)."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if status is None else bool(status)


def versions() -> dict:
    """Python's, those of the installed ``PACKAGES`` (read without importing them), CUDA's where torch has it."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    torch = sys.modules.get("torch")
    if torch is not None and torch.version.cuda:
        found["cuda"] = torch.version.cuda
    return found


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown model"


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> str:
    """The GPUs (count, name, memory) where torch sees any, then the CPU: cores, model, memory, torch threads."""
    memory = _memory_gib()
    cpu = f"{os.cpu_count()}-core {platform.machine()} CPU ({_cpu_model()})"
    cpu += f", {memory:.0f} GiB memory" if memory else ""
    try:
        import torch
    except ImportError:
        return cpu
    cpu += f", torch on {torch.get_num_threads()} threads"
    if not torch.cuda.is_available():
        return cpu
    props = torch.cuda.get_device_properties(0)
    return f"{torch.cuda.device_count()}x {props.name} ({props.total_memory / 2**30:.0f} GiB); {cpu}"


def provenance() -> dict:
    """A results file's block: machine, versions, commit (and whether the tree differed), the UTC date."""
    return {
        "machine": machine(),
        "versions": versions(),
        "commit": git_commit(),
        "uncommitted_changes": uncommitted_changes(),
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
    }

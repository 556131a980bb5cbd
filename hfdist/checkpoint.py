"""Training checkpoints: atomic folders with a manifest, keep-last-K, and finding the latest good one.

Layout: ``RUN/checkpoints/step_00000040/`` holds what the backend writes (DCP shards or DeepSpeed's own),
``trainer_state.json`` (step, epoch, data position), ``rng_rank{r}.pt`` (each rank's RNG states, tensors
only so they load with ``weights_only=True``) and ``manifest.json`` (every file's size and SHA-256).
A checkpoint is written under ``.step_00000040.tmp`` and renamed once complete and fsynced, so a crash
leaves either no new folder or a complete one; a folder whose files do not match its manifest is
reported and skipped in favour of the previous one.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from hfdist.errors import HfdistError
from hfdist.io import atomic_write_json, fsync_dir, fsync_tree

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
PREFIX = "step_"


def step_folder_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    atomic_write_json(folder / MANIFEST, {"files": files})


def verify(folder: Path) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint, else what is wrong with it (one line)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder}: no {MANIFEST} (incomplete checkpoint)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return f"{folder / MANIFEST}: unreadable manifest"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{path}: {path.stat().st_size} bytes, manifest says {expected['bytes']} (truncated?)"
        if _sha256(path) != expected["sha256"]:
            return f"{path}: checksum differs from the manifest (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(folders, key=lambda p: int(p.name[len(PREFIX):]))


def latest_valid(root: Path) -> Optional[Path]:
    """The newest checkpoint under ``root`` that matches its manifest; bad ones are reported and skipped."""
    for folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is None:
            return folder
        logger.warning("skipping checkpoint: %s", problem)
    return None


def resolve_resume(resume: str, root: Path) -> Path:
    """``--resume`` with no value (``latest``) or a checkpoint folder -> a verified checkpoint folder."""
    if resume == "latest":
        found = latest_valid(root)
        if found is None:
            raise HfdistError(f"--resume: no complete checkpoint under {root}")
        return found
    folder = Path(resume)
    if not folder.is_dir():
        raise HfdistError(f"--resume {resume!r}: no such checkpoint folder")
    problem = verify(folder)
    if problem is not None:
        raise HfdistError(f"--resume: {problem}")
    return folder


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(),
            "python": torch.tensor(bytearray(json.dumps(_python_rng_state()).encode()), dtype=torch.uint8),
            **_numpy_rng_state(),
            **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}


def _numpy_rng_state() -> dict:
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"numpy_keys": torch.from_numpy(keys.astype(np.int64)),
            "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
            "numpy_gauss": torch.tensor(cached_gaussian, dtype=torch.float64)}


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss,
                         state["numpy_gauss"].item()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def nonfinite_parameters(backend) -> int:
    """How many parameter tensors hold a NaN or inf, summed over all ranks (each checks its own shards; every
    rank calls; one all-reduce and one host sync)."""
    from torch.distributed.tensor import DTensor

    bad = torch.zeros((), device=backend.device)
    for param in backend.model.parameters():
        local = getattr(param, "ds_tensor", None)  # a DeepSpeed ZeRO-3 partition
        if local is None:
            local = param.to_local() if isinstance(param, DTensor) else param
        if local.numel():
            bad += (~torch.isfinite(local.detach()).all()).to(bad.device, torch.float32)
    return int(backend.all_reduce_sum(bad).item())


def save(root: Path, step: int, backend, trainer_state: dict, keep_last: int) -> Path:
    """Write a checkpoint for ``step`` atomically (all ranks call); prune to the last ``keep_last``.

    Weights holding NaN/inf are never saved: the save is refused with an error and earlier checkpoints stay."""
    final = root / step_folder_name(step)
    tmp = root / f".{final.name}.tmp"
    backend.monitored_barrier()  # on gloo, a rank that never reaches the checkpoint is named
    bad = nonfinite_parameters(backend)
    if bad:
        raise HfdistError(f"checkpoint {final}: refusing to save non-finite weights ({bad} parameter tensors hold "
                          "NaN or inf); the previous checkpoints are intact")
    if backend.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
        tmp.mkdir()
    backend.barrier()
    try:
        backend.save_checkpoint(tmp)
        torch.save(rng_state(), tmp / f"rng_rank{backend.rank}.pt")
        backend.barrier()
        if backend.is_main:
            atomic_write_json(tmp / TRAINER_STATE, trainer_state)
            write_manifest(tmp)
            fsync_tree(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(root)
            prune(root, keep_last)
    except OSError as exc:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise HfdistError(f"checkpoint {final}: write failed ({exc.strerror or exc}); "
                          f"the previous checkpoint is intact") from None
    backend.barrier()
    return final


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; incomplete ones never count as kept."""
    valid = [p for p in list_checkpoints(root) if verify(p) is None]
    for folder in valid[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def load(folder: Path, backend) -> dict:
    """Restore backend state and this rank's RNG states; returns the trainer state."""
    backend.load_checkpoint(folder)
    rng_file = folder / f"rng_rank{backend.rank}.pt"
    if rng_file.is_file():  # absent when resuming onto more ranks than saved: those ranks keep their seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((folder / TRAINER_STATE).read_text())

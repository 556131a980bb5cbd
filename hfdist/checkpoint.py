"""Training checkpoints: atomic folders with a manifest, keep-last-K, and finding the latest good one.

Layout: ``RUN/checkpoints/step_00000040/`` holds what the backend writes (DCP shards or DeepSpeed's own),
``trainer_state.json`` (step, epoch, data position), ``rng_rank{r}.pt`` (each rank's RNG states, tensors
only so they load with ``weights_only=True``) and ``manifest.json`` (every file's size, XXH3-128 checksum and
the rank that wrote it). A checkpoint is written under ``.step_00000040.tmp`` and renamed once complete and
fsynced, so a crash leaves either no new folder or a complete one; a folder whose files do not match its
manifest is reported and skipped in favour of the previous one.

Integrity at scale (a 70B checkpoint is ~846 GB): no rank reads back what was written. Each rank checksums the
bytes of its own files as they stream to disk (DCP's writer with a hashing file system; DeepSpeed's files are
hashed by their writer right after its write, from the page cache), all ranks in parallel, and rank 0 only
merges the per-rank records into the manifest. XXH3-128 (several times faster per core than SHA-256):
the manifest guards against corruption and truncation, not against someone who rewrites it. ``prune`` checks
sizes only. A resume verifies every byte, the files split across the ranks (start-up phase).

``checkpoint.async: true`` (DCP ``async_save``): the state is copied to host memory, training continues while a
background thread writes it (collectives on a gloo group of their own), and rank 0 completes the checkpoint
(manifest, rename, prune) once every rank's write is done; the next checkpoint, the export and the end of the run
wait for it first. A crash before that leaves only the ``.tmp`` folder: the previous checkpoint stays the latest.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import inspect
import io
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from hfdist.errors import HfdistError
from hfdist.io import atomic_write_json, fsync_dir
from hfdist.watchdog import watchdog

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SETUP = "training_setup.json"  # the base model's identity and what trains (hfdist.adapters.training_setup)
PREFIX = "step_"
CHECKSUM = "xxh3_128"
LEGACY_CHECKSUM = "sha256"  # manifests written before the per-rank checksums
_READ_BLOCK = 8 << 20


def step_folder_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


# ---- checksums --------------------------------------------------------------------------------------------------
def file_checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    digest = xxhash.xxh3_128() if algorithm == CHECKSUM else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def record(nbytes: int, checksum: str, rank: int) -> dict:
    return {"bytes": nbytes, CHECKSUM: checksum, "rank": rank}


def write_file(folder: Path, name: str, data: bytes, records: dict, rank: int) -> None:
    """Write a small file of this rank's into a checkpoint folder (fsynced) and record its checksum."""
    path = folder / name
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    records[name] = record(len(data), xxhash.xxh3_128_hexdigest(data), rank)


def torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def record_written_files(folder: Path, paths, rank: int) -> dict:
    """Records of files this rank has just written by other means (DeepSpeed's engine): hashed right after the
    write, so from the page cache; every rank hashes its own files at the same time."""
    return {
        str(Path(p).resolve().relative_to(folder.resolve())): record(
            Path(p).stat().st_size, file_checksum(Path(p)), rank
        )
        for p in paths
    }


class _HashingStream:
    """A write stream that checksums every byte on its way to the file (DCP writes each file front to back).

    ``checksum_s`` is the time spent hashing, measured around the hash updates, against the writer's total."""

    def __init__(self, raw, timer: dict):
        self._raw = raw
        self._digest = xxhash.xxh3_128()
        self._count = 0
        self._sequential = True
        self._timer = timer

    def write(self, data) -> int:
        written = self._raw.write(data)
        started = time.perf_counter()
        view = memoryview(data).cast("B")
        self._digest.update(view if written is None or written == len(view) else view[:written])
        self._timer["checksum_s"] += time.perf_counter() - started
        self._count += len(view) if written is None else written
        return written

    def seek(self, *args):  # a writer that seeks rewrites bytes already hashed: hash the file afterwards
        self._sequential = False
        return self._raw.seek(*args)

    def tell(self) -> int:
        return self._raw.tell()

    def fileno(self) -> int:
        return self._raw.fileno()

    def flush(self) -> None:
        self._raw.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        self._raw.close()

    @property
    def closed(self) -> bool:
        return self._raw.closed

    def result(self, path: Path) -> tuple[int, str]:
        if self._sequential and self._count == path.stat().st_size:
            return self._count, self._digest.hexdigest()
        logger.warning("checkpoint: %s was not written front to back; hashing it after the write", path)
        return path.stat().st_size, file_checksum(path)


def _dcp_writer_class():
    """DCP's FileSystemWriter whose file system checksums each file while it is written (per rank, in parallel)."""

    class HashingFileSystem(FileSystem):
        def __init__(self, timer: dict):
            super().__init__()
            self.files: dict[str, tuple[int, str]] = {}
            self.timer = timer

        @contextlib.contextmanager
        def create_stream(self, path, mode):
            if "w" not in mode:
                with super().create_stream(path, mode) as stream:
                    yield stream
                return
            with super().create_stream(path, mode) as stream:
                hashing = _HashingStream(stream, self.timer)
                yield hashing
            self.files[str(path)] = hashing.result(Path(path))

        def rename(self, path, new_path) -> None:
            super().rename(path, new_path)
            if str(path) in self.files:
                self.files[str(new_path)] = self.files.pop(str(path))

    class ChecksummingWriter(FileSystemWriter):
        def __init__(self, path, on_written: Optional[Callable[[], None]] = None, **kwargs):
            super().__init__(path, **kwargs)
            self.timer = {"checksum_s": 0.0, "write_s": 0.0}
            self.fs = HashingFileSystem(self.timer)
            self.on_written = on_written

        def write_data(self, plan, planner):
            started = time.perf_counter()
            future = super().write_data(plan, planner)
            self.timer["write_s"] += time.perf_counter() - started
            if (
                self.on_written is not None
            ):  # the loop's checkpoint_written hook (on the writer's thread if async)
                self.on_written()
            return future

        def records(self, folder: Path, rank: int) -> dict:
            return {
                str(Path(p).resolve().relative_to(folder.resolve())): record(n, c, rank)
                for p, (n, c) in self.fs.files.items()
            }

    return ChecksummingWriter


def save_dcp(
    state: dict,
    folder: Path,
    rank: int,
    *,
    async_: bool = False,
    process_group=None,
    no_dist: bool = False,
    on_written: Optional[Callable[[], None]] = None,
) -> concurrent.futures.Future:
    """``dcp.save`` (or ``dcp.async_save``) of ``state`` into ``folder/dcp``; the future resolves to the records of
    the files this rank wrote (checksummed while written), plus the writer's timings under ``"_timer"``.
    ``on_written`` is called once this rank's data files are written."""

    writer = _dcp_writer_class()(folder / "dcp", on_written=on_written)
    kwargs = {"storage_writer": writer, "process_group": process_group}
    finished_records: concurrent.futures.Future = concurrent.futures.Future()

    def records():
        return {**writer.records(folder, rank), "_timer": dict(writer.timer)}

    if not async_:
        dcp.save(state, no_dist=no_dist, **kwargs)
        finished_records.set_result(records())
        return finished_records
    if "no_dist" in inspect.signature(dcp.async_save).parameters:
        kwargs["no_dist"] = no_dist
    upload = dcp.async_save(state, **kwargs)  # the state is copied to host memory before this returns

    def finished(future):
        try:
            future.result()
            finished_records.set_result(records())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting rank
            finished_records.set_exception(exc)

    upload.add_done_callback(finished)
    return finished_records


def completed(records: dict) -> concurrent.futures.Future:
    future: concurrent.futures.Future = concurrent.futures.Future()
    future.set_result(records)
    return future


def merged(future: concurrent.futures.Future, extra: dict) -> concurrent.futures.Future:
    """A future of ``future``'s records together with ``extra`` (records of files written beside them)."""
    result: concurrent.futures.Future = concurrent.futures.Future()

    def finished(done):
        try:
            result.set_result({**done.result(), **extra})
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting rank
            result.set_exception(exc)

    future.add_done_callback(finished)
    return result


# ---- manifest and verification -------------------------------------------------------------------------------
def write_manifest(folder: Path, records: dict) -> None:
    files = {name: records[name] for name in sorted(records)}
    atomic_write_json(folder / MANIFEST, {"checksum": CHECKSUM, "files": files})


def _read_manifest(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return None, f"{folder}: no {MANIFEST} (incomplete checkpoint)"
    try:
        return json.loads(manifest.read_text())["files"], None
    except (ValueError, KeyError, OSError):
        return None, f"{folder / MANIFEST}: unreadable manifest"


def verify(folder: Path, checksums: bool = True, share: tuple[int, int] = (0, 1)) -> Optional[str]:
    """None if ``folder`` is a complete checkpoint, else what is wrong with it (one line).

    Every file must exist with its manifest size; with ``checksums``, the files ``share = (index, count)`` picks
    (every count-th, from index) are read and checksummed: ranks split a checkpoint's files that way."""
    files, problem = _read_manifest(folder)
    if problem:
        return problem
    for position, (name, expected) in enumerate(sorted(files.items())):
        path = folder / name
        if not path.is_file():
            return f"{path}: missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{path}: {size} bytes, manifest says {expected['bytes']} (truncated?)"
        if checksums and position % share[1] == share[0]:
            algorithm = CHECKSUM if CHECKSUM in expected else LEGACY_CHECKSUM
            if file_checksum(path, algorithm) != expected[algorithm]:
                return f"{path}: checksum differs from the manifest (corrupt)"
    return None


def verify_across_ranks(folder: Path, backend=None) -> Optional[str]:
    """``verify`` with the reading split across the ranks (all ranks call; all get the same answer)."""
    if backend is None or backend.world_size == 1:
        return verify(folder)
    problems = backend.all_gather_object(verify(folder, share=(backend.rank, backend.world_size)))
    return next((p for p in problems if p is not None), None)


def list_checkpoints(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    folders = [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]
    return sorted(folders, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_valid(root: Path, backend=None) -> Optional[Path]:
    """The newest checkpoint under ``root`` that matches its manifest; bad ones are reported and skipped. With a
    backend, every rank calls and the files are checksummed across the ranks."""
    folders = list_checkpoints(root)
    if backend is not None:
        folders = backend.broadcast_object(
            folders
        )  # rank 0's listing, so that every rank checks the same folder
    for folder in reversed(folders):
        problem = verify_across_ranks(folder, backend)
        if problem is None:
            return folder
        if backend is None or backend.is_main:
            logger.warning("skipping checkpoint: %s", problem)
    return None


def resolve_resume(resume: str, root: Path, backend=None) -> Path:
    """``--resume`` with no value (``latest``) or a checkpoint folder -> a verified checkpoint folder."""
    if resume == "latest":
        found = latest_valid(root, backend)
        if found is None:
            raise HfdistError(f"--resume: no complete checkpoint under {root}")
        return found
    folder = Path(resume)
    if not folder.is_dir():
        raise HfdistError(f"--resume {resume!r}: no such checkpoint folder")
    problem = verify_across_ranks(folder, backend)
    if problem is not None:
        raise HfdistError(f"--resume: {problem}")
    return folder


# ---- RNG states ------------------------------------------------------------------------------------------------
def rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(bytearray(json.dumps(_python_rng_state()).encode()), dtype=torch.uint8),
        **_numpy_rng_state(),
        **({"cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {}),
    }


def _numpy_rng_state() -> dict:
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor(cached_gaussian, dtype=torch.float64),
    }


def _python_rng_state():
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = json.loads(bytes(state["python"].tolist()).decode())
    random.setstate((version, tuple(internal), gauss))
    pos, has_gauss = state["numpy_pos"].tolist()
    np.random.set_state(
        (
            "MT19937",
            state["numpy_keys"].numpy().astype(np.uint32),
            pos,
            has_gauss,
            state["numpy_gauss"].item(),
        )
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def nonfinite_parameters(backend) -> int:
    """How many parameter tensors hold a NaN or inf, summed over all ranks (each checks its own shards; every
    rank calls; one all-reduce and one host sync)."""

    bad = torch.zeros((), device=backend.device)
    for param in backend.model.parameters():
        local = getattr(param, "ds_tensor", None)  # a DeepSpeed ZeRO-3 partition
        if local is None:
            local = param.to_local() if isinstance(param, DTensor) else param
        if local.numel():
            bad += (~torch.isfinite(local.detach()).all()).to(bad.device, torch.float32)
    return int(backend.all_reduce_sum(bad).item())


# ---- save ------------------------------------------------------------------------------------------------------
class PendingCheckpoint:
    """An asynchronous checkpoint being written: ``future`` ends once rank 0 has completed (or failed) it."""

    def __init__(self, final: Path, future: concurrent.futures.Future, executor):
        self.final, self.future, self.executor = final, future, executor


def _gather_records(records: dict, backend, group) -> list[dict]:
    """Every rank's records on rank 0 (others get []); ``group`` None: the backend's default group."""

    if backend.world_size == 1:
        return [records]
    if group is None:
        return backend.all_gather_object(records)
    gathered = [None] * backend.world_size if backend.is_main else None
    dist.gather_object(records, gathered, dst=0, group=group)
    return gathered if backend.is_main else []


def _complete(
    root: Path, final: Path, tmp: Path, keep_last: int, backend, records_future, small: dict, group
) -> None:
    """Wait for this rank's writes, hand its records to rank 0, which writes the manifest, renames and prunes."""
    records = {**records_future.result(), **small}
    timer = records.pop("_timer", None)
    gathered = _gather_records(records, backend, group)
    if not backend.is_main:
        return
    merged = {}
    for rank_records in gathered:
        merged.update(rank_records)
    write_manifest(tmp, merged)
    for directory in sorted({(tmp / name).parent for name in merged} | {tmp}, key=lambda p: -len(p.parts)):
        fsync_dir(directory)  # the files themselves were fsynced by the ranks that wrote them
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    total = sum(r["bytes"] for r in merged.values())
    if timer and timer["write_s"] > 0:
        logger.info(
            "checkpoint %s: %.2f GB in %d files; rank 0 wrote for %.2f s, of which %.3f s (%.1f%%) went to "
            "checksums",
            final.name,
            total / 1e9,
            len(merged),
            timer["write_s"],
            timer["checksum_s"],
            100 * timer["checksum_s"] / timer["write_s"],
        )
    prune(root, keep_last)


def wait_pending(backend) -> None:
    """Finish the asynchronous checkpoint in flight, if any (all ranks call): an error on any rank is raised on
    every rank; the checkpoint before it stays the latest complete one."""
    pending: Optional[PendingCheckpoint] = getattr(backend, "pending_checkpoint", None)
    if pending is None:
        return
    backend.pending_checkpoint = None
    try:
        pending.future.result()
        error = None
    except BaseException as exc:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        error = f"rank {backend.rank}: {_first_line(exc)}"
    finally:
        pending.executor.shutdown(wait=True)
    errors = [e for e in backend.all_gather_object(error) if e is not None]
    if errors:
        raise HfdistError(
            f"checkpoint {pending.final}: asynchronous write failed ({errors[0]}); the previous "
            "checkpoint is intact"
        )


def save(
    root: Path,
    step: int,
    backend,
    trainer_state: dict,
    keep_last: int,
    async_: bool = False,
    on_written: Optional[Callable[[], None]] = None,
    setup: Optional[dict] = None,
) -> Path:
    """Write a checkpoint for ``step`` atomically (all ranks call); prune to the last ``keep_last``.

    ``async_``: return once the state is copied to host memory; the write completes in the background (see the
    module docstring). ``on_written``: called once this rank's data files are written (the loop's
    ``checkpoint_written`` hook). ``setup``: the base model's identity and what trains, checked by ``check_setup``
    on resume. Weights holding NaN/inf are never saved: the save is refused with an error and
    earlier checkpoints stay."""

    final = root / step_folder_name(step)
    tmp = root / f".{final.name}.tmp"
    wait_pending(backend)
    backend.monitored_barrier()  # distributed.timeout_s: on gloo, a rank that never reaches the checkpoint is named
    bad = nonfinite_parameters(backend)
    if bad:
        raise HfdistError(
            f"checkpoint {final}: refusing to save non-finite weights ({bad} parameter tensors hold "
            "NaN or inf); the previous checkpoints are intact"
        )
    timeout = backend.config.distributed.checkpoint_timeout_s
    with watchdog.phase_timeout(timeout, "distributed.checkpoint_timeout_s"):
        if backend.is_main:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # left by a crash during an earlier save of this step
            tmp.mkdir()
        backend.barrier()
        try:
            small: dict = {}
            write_file(tmp, f"rng_rank{backend.rank}.pt", torch_bytes(rng_state()), small, backend.rank)
            if backend.is_main:
                write_file(
                    tmp, TRAINER_STATE, (json.dumps(trainer_state, indent=2) + "\n").encode(), small, 0
                )
                if setup is not None:
                    write_file(tmp, SETUP, (json.dumps(setup, indent=2) + "\n").encode(), small, 0)
            records_future = backend.save_checkpoint(tmp, async_=async_, on_written=on_written)
            if async_:
                executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix="hfdist-ckpt"
                )
                future = executor.submit(
                    _complete,
                    root,
                    final,
                    tmp,
                    keep_last,
                    backend,
                    records_future,
                    small,
                    backend.checkpoint_group,
                )
                backend.pending_checkpoint = PendingCheckpoint(final, future, executor)
                return final
            _complete(root, final, tmp, keep_last, backend, records_future, small, None)
        except (OSError, _checkpoint_exception()) as exc:
            if backend.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else _first_line(exc)
            raise HfdistError(
                f"checkpoint {final}: write failed ({reason}); the previous checkpoint is intact"
            ) from None
        backend.barrier()
    return final


def _checkpoint_exception() -> type:

    return CheckpointException


def _first_line(exc: BaseException) -> str:
    """A failure in one line: DCP's CheckpointException carries each rank's traceback; take the first error's text."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc  # (exception, stack summary)
        if isinstance(exc, OSError) and exc.strerror:
            return exc.strerror
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints; incomplete ones never count as kept. Reads no
    file's content: a checkpoint counts as complete when its manifest lists files of the right sizes."""
    complete = [p for p in list_checkpoints(root) if verify(p, checksums=False) is None]
    for folder in complete[:-keep_last]:
        shutil.rmtree(folder, ignore_errors=True)


def check_setup(folder: Path, setup: dict) -> None:
    """Refuse, in one line, to resume from a checkpoint made on another base model or training something else
    than ``setup`` asks for (``{"base_model": ..., "trains": ...}``). A checkpoint without the record (hfdist before
    it) trained every parameter of its base model."""
    path = folder / SETUP
    saved = json.loads(path.read_text()) if path.is_file() else {"base_model": None, "trains": None}
    trains = saved["trains"] or {"trainable_layers": "all", "train_lm_head": False, "adapter": None}
    differences = [
        f"{name} {theirs!r} in the checkpoint, {ours!r} in the config"
        for name, theirs, ours in _trains_fields(trains, setup["trains"])
        if theirs != ours
    ]
    if differences:
        raise HfdistError(
            f"--resume {folder}: the checkpoint trained something else: {'; '.join(differences)} (resume with the "
            "checkpoint's settings, or start a new run)"
        )
    base, own = saved["base_model"], setup["base_model"]
    if base is not None and any(base[k] != own[k] for k in ("config_sha256", "weights_index_sha256")):
        raise HfdistError(
            f"--resume {folder}: the checkpoint was made on base model {_describe_base(base)}, this config's "
            f"model.path is {_describe_base(own)}; resume with the base model it was made on"
        )


def _trains_fields(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
    """(config field, checkpoint's value, config's value) of what trains; an absent adapter is type none."""
    rows = [(f"train.{k}", saved[k], current[k]) for k in ("trainable_layers", "train_lm_head")]
    theirs, ours = saved["adapter"] or {"type": "none"}, current["adapter"] or {"type": "none"}
    if theirs["type"] != ours["type"]:
        return rows + [("adapter.type", theirs["type"], ours["type"])]
    return rows + [(f"adapter.{k}", theirs.get(k), ours[k]) for k in ours]


def _describe_base(base: dict) -> str:
    index = base["weights_index_sha256"]
    return (
        f"{base['path']} (config sha256 {base['config_sha256'][:12]}, weights index "
        f"{index[:12] if index else 'none'})"
    )


def trained_state(model, optimizer) -> dict:
    """The DCP state of a model and its optimizer (single and FSDP backends), without frozen parameters: they
    are the base model's, which the run loads anyway (``check_setup`` makes sure it is the same one)."""
    options = StateDictOptions(full_state_dict=False)
    # Every name of a frozen tensor: a tied head is frozen with its embedding.
    frozen = {name for name, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
    state = get_model_state_dict(model, options=options)
    return {
        "model": {k: v for k, v in state.items() if k not in frozen},
        "optimizer": get_optimizer_state_dict(model, optimizer, options=options),
    }


def load_trained_state(model, optimizer, state: dict) -> None:
    """Restore what ``trained_state`` saved (and ``dcp.load`` filled in); frozen parameters keep their values."""
    frozen = any(not p.requires_grad for p in model.parameters())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=not frozen))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def load(folder: Path, backend) -> dict:
    """Restore backend state and this rank's RNG states; returns the trainer state."""
    backend.load_checkpoint(folder)
    rng_file = folder / f"rng_rank{backend.rank}.pt"
    if rng_file.is_file():  # absent when resuming onto more ranks than saved: those ranks keep their seed
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((folder / TRAINER_STATE).read_text())

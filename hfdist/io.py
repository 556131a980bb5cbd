"""Files hfdist writes and reads: atomic writes (a crash leaves either the old content or the new, never half of
it), token-id arrays and generation records (JSON lines)."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np

from hfdist.errors import HfdistError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(Path(dirpath))


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete (fsynced) folder ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    deleted only once the new one is in place."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is fsynced and renamed over ``final``.

    An existing ``final`` is kept until the new one is complete: it is moved aside, the new folder renamed
    in, then the old one deleted. On any exception the temporary folder is removed and ``final`` untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        move_into_place(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# ---- token ids and generations --------------------------------------------------------------------------------
def load_token_array(path, what: str) -> np.ndarray:
    """A 2-D integer ``.npy`` array of token ids (int64), or an HfdistError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise HfdistError(f"{what} {str(path)!r}: no such file")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise HfdistError(f"{what} {str(path)!r}: not a .npy array ({exc})") from None
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
        raise HfdistError(
            f"{what} {str(path)!r}: expected a 2-D integer array of token ids, got "
            f"shape {array.shape} dtype {array.dtype}"
        )
    return array.astype(np.int64)


def write_jsonl(path, records: list[dict]) -> None:
    atomic_write_text(Path(path), "".join(json.dumps(r) + "\n" for r in records))


def read_generations(path) -> list[dict]:
    """The records of a generations file (``hfdist generate``/``compare``); each needs ``continuation_ids``."""
    path = Path(path)
    if not path.is_file():
        raise HfdistError(f"generations file {str(path)!r}: no such file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise HfdistError(f"generations file {str(path)!r} line {number}: not JSON") from None
        ids = record.get("continuation_ids") if isinstance(record, dict) else None
        if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
            raise HfdistError(
                f"generations file {str(path)!r} line {number}: field 'continuation_ids' missing "
                "or not a list of token ids"
            )
        records.append(record)
    if not records:
        raise HfdistError(f"generations file {str(path)!r}: no records")
    return records


def generation_records(
    prompts: list[list[int]], continuations: list[list[int]], stopped: list[bool], tokenizer, settings: dict
) -> list[dict]:
    """One JSON record per prompt: prompt and continuation, as ids and text, and the decoding settings."""
    records = []
    for i, (prompt, cont, stop) in enumerate(zip(prompts, continuations, stopped)):
        record = {"index": i, "prompt_ids": list(map(int, prompt)), "continuation_ids": list(map(int, cont))}
        if tokenizer is not None:
            record["prompt_text"] = tokenizer.decode(prompt, skip_special_tokens=True)
            record["continuation_text"] = tokenizer.decode(cont, skip_special_tokens=True)
        record["num_new_tokens"] = len(cont)
        record["stopped_at_eos"] = bool(stop)
        record["settings"] = settings
        records.append(record)
    return records

"""Export of the final model as Hugging Face safetensors shards that every rank writes its own part of.

No rank gathers the model. The layout (which tensor goes into which file, at which byte offset) follows from
the tensors' global shapes and the export dtype alone, so every rank computes the same one. Rank 0 writes each
file's safetensors header and sizes the file; then every rank writes the bytes of the pieces of tensors that it
holds (``os.pwrite`` at their offsets; one tensor piece converted to the export dtype at a time), fsyncs, and
rank 0 writes ``model.safetensors.index.json``, ``config.json`` (its ``dtype`` the export dtype),
``generation_config.json`` and the tokenizer, then renames the folder into place (atomic, as checkpoints).

A piece is a box of the global tensor (offset and shape per dimension: an FSDP2/TP DTensor's local part, read
with ``compute_local_shape_and_global_offset`` whatever its mesh and placements, so 2-D meshes with
``(Shard(0), Shard(1))`` need nothing else) or a flat element range (a ZeRO-3 partition). A box is written as
runs of contiguous bytes of the row-major file layout: one run for dim-0 shards, one per row for column shards.
A replicated piece (HSDP's replicas, a TP-replicated norm) is written by the replica at coordinate 0 only.

The per-rank memory beyond its own state is one tensor piece in the export dtype. The cost is one pass of
writes; across nodes the files must be on a shared filesystem that takes disjoint byte ranges of one file from
several clients (Lustre, GPFS, NFS v3/v4 with the Linux client's byte-range writeback).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers.dynamic_module_utils import custom_object_save

from hfdist import adapters
from hfdist.errors import HfdistError
from hfdist.io import fsync_dir, move_into_place
from hfdist.models import ModelConfigUnreadable, declared_dtype, read_hf_config, resolve_model_path
from hfdist.shards import local_slices

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Piece:
    """Part of a tensor that this rank writes: a box (``offset``/``shape`` per dim) or, with ``flat``, the element
    range ``[offset[0], offset[0] + shape[0])`` of the flattened tensor. ``data`` holds exactly those elements."""

    offset: tuple[int, ...]
    shape: tuple[int, ...]
    data: torch.Tensor | Callable[[], torch.Tensor]  # a callable computes it when written (a merged adapter)
    flat: bool = False


@dataclass
class ExportTensor:
    """A tensor of the exported model: its checkpoint name and global shape (the same on every rank) and the
    pieces this rank writes (possibly none)."""

    name: str
    shape: tuple[int, ...]
    pieces: list[Piece] = field(default_factory=list)


# ---- dtype -------------------------------------------------------------------------------------------------------
def export_dtype(config, hf_config=None) -> torch.dtype:
    """``export.dtype``; "auto": the dtype the model's config.json names if safetensors stores it (bf16 for Llama 3),
    else fp32 (also when the config cannot be read). ``hf_config``: the model's config when already read."""

    if config.export.dtype != "auto":
        return EXPORT_DTYPES[config.export.dtype]
    if hf_config is None:
        try:
            hf_config = read_hf_config(config.model)
        except ModelConfigUnreadable:
            return torch.float32
    own = declared_dtype(hf_config)
    return own if own in SAFETENSORS_DTYPES else torch.float32


# ---- layout ------------------------------------------------------------------------------------------------------
@dataclass
class FileLayout:
    name: str
    header: bytes
    data_start: int  # byte offset of the data section (8-byte length + header)
    offsets: dict[str, int]  # tensor name -> byte offset of its data within the data section
    size: int  # the whole file


def plan_layout(
    tensors: list[ExportTensor], dtype: torch.dtype, max_shard_bytes: float, basename: str = "model"
) -> list[FileLayout]:
    """Cut the tensors, in order, into files of at most ``max_shard_bytes`` (a tensor is never split; a larger one
    gets a file of its own) and lay out each file's safetensors header; HF's file names (``basename`` "model")."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    groups: list[list[ExportTensor]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = math.prod(tensor.shape) * itemsize
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    layouts = []
    for index, group in enumerate(groups, start=1):
        name = (
            f"{basename}.safetensors"
            if len(groups) == 1
            else f"{basename}-{index:05d}-of-{len(groups):05d}.safetensors"
        )
        header: dict = {"__metadata__": {"format": "pt"}}
        offsets, position = {}, 0
        for tensor in group:
            nbytes = math.prod(tensor.shape) * itemsize
            header[tensor.name] = {
                "dtype": SAFETENSORS_DTYPES[dtype],
                "shape": list(tensor.shape),
                "data_offsets": [position, position + nbytes],
            }
            offsets[tensor.name] = position
            position += nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        data_start = 8 + len(text)
        layouts.append(
            FileLayout(
                name, len(text).to_bytes(8, "little") + text, data_start, offsets, data_start + position
            )
        )
    return layouts


def runs(shape: tuple[int, ...], piece: Piece) -> Iterator[tuple[int, int]]:
    """(first element, element count) of each contiguous run of ``piece`` in the row-major layout of a tensor of
    ``shape``, in the order of the piece's own row-major elements."""
    if piece.flat:
        if piece.shape[0]:
            yield piece.offset[0], piece.shape[0]
        return
    if any(n == 0 for n in piece.shape):
        return
    if not shape:
        yield 0, 1
        return
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    # The innermost dimension from which on the piece spans the whole tensor: each run is one index of the
    # dimensions before ``split`` (the piece's rows, say) times everything after.
    split = len(shape) - 1
    while split > 0 and piece.shape[split] == shape[split]:
        split -= 1
    run = piece.shape[split] * strides[split]
    outer = piece.shape[:split]
    for flat_index in range(math.prod(outer)):
        start, rest = piece.offset[split] * strides[split], flat_index
        for d in range(split - 1, -1, -1):
            rest, i = divmod(rest, outer[d])
            start += (piece.offset[d] + i) * strides[d]
        yield start, run


def _piece_bytes(piece: Piece, dtype: torch.dtype) -> memoryview:
    data = piece.data() if callable(piece.data) else piece.data
    data = data.detach().to("cpu", dtype).contiguous().reshape(-1)
    return memoryview(data.view(torch.uint8).numpy())


# ---- the export --------------------------------------------------------------------------------------------------
def write_shards(
    folder: Path,
    tensors: list[ExportTensor],
    layouts: list[FileLayout],
    dtype: torch.dtype,
    rank: int,
    barrier,
) -> int:
    """Rank 0 sizes the files and writes their headers; then every rank writes its pieces. Returns this rank's bytes."""
    if rank == 0:
        for layout in layouts:
            with open(folder / layout.name, "wb") as f:
                f.write(layout.header)
                f.truncate(layout.size)
                os.fsync(f.fileno())
    barrier()
    where = {name: (layout, offset) for layout in layouts for name, offset in layout.offsets.items()}
    itemsize = torch.empty((), dtype=dtype).element_size()
    handles: dict[str, int] = {}
    written = 0
    try:
        for tensor in tensors:
            layout, base = where[tensor.name]
            for piece in tensor.pieces:
                data = _piece_bytes(piece, dtype)
                if layout.name not in handles:
                    handles[layout.name] = os.open(folder / layout.name, os.O_WRONLY)
                fd, cursor = handles[layout.name], 0
                for start, count in runs(tensor.shape, piece):
                    chunk = data[cursor * itemsize : (cursor + count) * itemsize]
                    position = layout.data_start + base + start * itemsize
                    while chunk:
                        n = os.pwrite(fd, chunk, position)
                        chunk, position = chunk[n:], position + n
                    cursor += count
                    written += count * itemsize
                if cursor != math.prod(piece.shape):
                    raise HfdistError(
                        f"export: tensor {tensor.name!r}: piece at {piece.offset} of shape {piece.shape} "
                        f"has {cursor} elements laid out, expected {math.prod(piece.shape)}"
                    )
        for fd in handles.values():
            os.fsync(fd)
    finally:
        for fd in handles.values():
            os.close(fd)
    return written


def write_index(folder: Path, layouts: list[FileLayout]) -> None:
    weight_map = {name: layout.name for layout in layouts for name in layout.offsets}
    total = sum(layout.size - layout.data_start for layout in layouts)
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )


def save_model_files(folder: Path, lm, tokenizer, dtype: torch.dtype) -> None:
    """What ``save_pretrained`` writes beside the weights: config (its dtype the export's), generation config,
    custom code (trust_remote_code models), and the tokenizer."""
    config = copy.deepcopy(lm.config)
    config.dtype = dtype
    if not getattr(config, "architectures", None):
        config.architectures = [type(lm).__name__]
    config.save_pretrained(folder)
    if getattr(lm, "generation_config", None) is not None and lm.can_generate():
        lm.generation_config.save_pretrained(folder)
    if getattr(lm, "_auto_class", None) is not None:
        custom_object_save(lm, folder, config=config)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_model(backend, folder: Path, tokenizer, config) -> dict:
    """Write the final model into ``folder`` (all ranks call; atomic: a temporary sibling renamed into place, an
    existing ``folder`` kept until the new one is complete). An adapter (``hfdist.adapters``) is merged into its
    base weights, piece by piece. Returns what was written (rank 0's view)."""
    dtype = export_dtype(config)
    tensors = backend.export_tensors()
    lm = backend.unwrapped_lm()
    if config.adapter.type != "none":
        tensors = adapters.merged_tensors(tensors, lm, backend.full_tensor)

    def model_files(tmp: Path) -> None:
        save_model_files(tmp, lm, tokenizer, dtype)

    return write_folder(backend, folder, tensors, dtype, config.export.max_shard_size_mb * 2**20, model_files)


def export_adapter(backend, folder: Path, tokenizer, config) -> dict:
    """Write the PEFT adapter folder (``adapter_config.json``, ``adapter_model.safetensors`` in fp32, the tokenizer):
    ``PeftModel.from_pretrained(base, folder)`` loads it, vLLM serves it. Every rank writes its own pieces."""
    lm = backend.unwrapped_lm()
    tensors = adapters.adapter_tensors(backend.export_tensors())

    def adapter_files(tmp: Path) -> None:
        base = resolve_model_path(config.model.path)
        adapters.peft_config(config, lm, base_model_name=base).save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_folder(
        backend, folder, tensors, torch.float32, math.inf, adapter_files, basename="adapter_model"
    )


def write_folder(
    backend,
    folder: Path,
    tensors: list[ExportTensor],
    dtype: torch.dtype,
    max_shard_bytes: float,
    write_files: Callable[[Path], None],
    basename: str = "model",
) -> dict:
    """The export's one pass (see the module docstring): rank 0 lays out the files, every rank writes its pieces,
    rank 0 adds the index (when there are several files or ``basename`` is "model") and ``write_files(tmp)``, then
    renames the folder into place."""
    started = time.perf_counter()
    folder = Path(folder)
    layouts = plan_layout(tensors, dtype, max_shard_bytes, basename)
    tmp = None
    if backend.is_main:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}")
        tmp.mkdir()
    tmp = Path(backend.broadcast_object(str(tmp) if tmp else None))
    try:
        written = write_shards(tmp, tensors, layouts, dtype, backend.rank, backend.barrier)
        backend.barrier()  # every rank's pieces are written and fsynced
        if backend.is_main:
            if basename == "model":
                write_index(tmp, layouts)
            write_files(tmp)
            for path in tmp.iterdir():
                if path.is_file() and not path.name.endswith(".safetensors"):
                    with open(path, "rb") as f:
                        os.fsync(f.fileno())
            fsync_dir(tmp)
            move_into_place(tmp, folder)
    except BaseException:
        if backend.is_main and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    backend.barrier()
    total = sum(layout.size - layout.data_start for layout in layouts)
    if backend.is_main:
        logger.info(
            "export: %s, %d tensors in %d safetensors files (%.2f GB, %s), rank 0 wrote %.2f GB, %.1f s",
            folder,
            len(tensors),
            len(layouts),
            total / 1e9,
            str(dtype).replace("torch.", ""),
            written / 1e9,
            time.perf_counter() - started,
        )
    return {
        "files": [layout.name for layout in layouts],
        "bytes": total,
        "dtype": dtype,
        "rank_bytes": written,
    }


# ---- sources: what each backend's rank holds --------------------------------------------------------------------
def checkpoint_names(lm) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of what a Hugging Face checkpoint of ``lm`` holds: its parameters (a tied weight once, under
    its first name, as ``save_pretrained`` writes it) and persistent buffers."""
    names = list(lm.named_parameters())
    for module_name, module in lm.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer_name not in module._non_persistent_buffers_set:
                names.append((f"{module_name}.{buffer_name}" if module_name else buffer_name, buffer))
    return names


def dtensor_piece(tensor) -> Optional[Piece]:
    """This rank's piece of a DTensor, or None where another replica writes it (coordinate > 0 on a mesh dimension
    whose placement is Replicate). Any mesh and placements (FSDP2, HSDP, TP, FSDP x TP)."""

    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return None  # this rank is not in the tensor's mesh
    for placement, index in zip(tensor.placements, coordinate):
        if placement.is_partial():
            raise HfdistError(
                "export: a parameter holds partial sums (Partial placement); reduce it before export"
            )
        if placement.is_replicate() and index != 0:
            return None
    shape, offset = local_slices(tensor)
    return Piece(tuple(offset), tuple(shape), tensor.to_local())


def module_tensors(lm, prefix: str = "") -> list[ExportTensor]:
    """Export tensors of a model whose tensors are whole (single) or DTensors (FSDP2, TP): rank 0 writes the whole
    ones, every rank its DTensor pieces."""

    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    result = []
    for name, tensor in checkpoint_names(lm):
        if isinstance(tensor, DTensor):
            piece = dtensor_piece(tensor)
            pieces = [piece] if piece is not None else []
        else:
            pieces = [Piece((0,) * tensor.dim(), tuple(tensor.shape), tensor)] if rank == 0 else []
        result.append(ExportTensor(prefix + name, tuple(tensor.shape), pieces))
    return result

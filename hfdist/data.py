"""The hyperfitting data: load texts with `datasets`, select fixed-length token sequences, split, batch.

Selection (seeded, recorded in ``RUN/data/selection.json``):
- ``exact`` (the upstream rule): texts are visited in a seeded random order and tokenized (with the
  tokenizer's default special tokens, cut at ``seq_len``); a text whose tokens reach ``seq_len`` gives one
  sequence of exactly ``seq_len`` tokens; shorter texts are skipped.
- ``chunk``: each text is tokenized whole and cut into consecutive ``seq_len`` windows (the tail shorter
  than ``seq_len`` is dropped); the windows are then taken in a seeded random order.
The first ``num_samples`` sequences train, the next ``num_validation`` validate, and the next
``num_contexts`` give the held-out generation contexts (their first ``context_len`` tokens). Too few
sequences for all three is an error, never a smaller run.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hfdist.config import DataConfig
from hfdist.errors import HfdistError

logger = logging.getLogger(__name__)

EMBEDDED = {"austen": Path(__file__).parent / "data_files" / "austen.jsonl.gz"}
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
            ".gz": "json"}


@dataclass
class HyperfitData:
    train: torch.Tensor  # int64 [num_samples, seq_len]
    validation: torch.Tensor  # int64 [num_validation, seq_len]
    contexts: torch.Tensor  # int64 [num_contexts, context_len]
    selection: dict = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        from hfdist.io import atomic_write_json

        folder.mkdir(parents=True, exist_ok=True)
        for name, tensor in (("train_token_ids", self.train), ("validation_token_ids", self.validation),
                             ("contexts", self.contexts)):
            tmp = folder / f".{name}.tmp.npy"
            np.save(tmp, tensor.numpy().astype(np.int32))
            tmp.replace(folder / f"{name}.npy")
        atomic_write_json(folder / "selection.json", self.selection)


def _builder_for(path: Path) -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise HfdistError(f"data.source {str(path)!r}: folder has no .txt/.jsonl/.json/.parquet/.csv files")
        suffixes = {BUILDERS[p.suffix] for p in files}
        if len(suffixes) > 1:
            raise HfdistError(f"data.source {str(path)!r}: mixes file kinds {sorted(suffixes)}; use one kind")
        return suffixes.pop(), [str(p) for p in files]
    if path.suffix not in BUILDERS:
        raise HfdistError(f"data.source {str(path)!r}: unsupported file type {path.suffix!r} "
                          f"(use .txt, .jsonl, .json, .parquet or .csv)")
    if path.stat().st_size == 0:
        raise HfdistError(f"data.source {str(path)!r}: file is empty")
    return BUILDERS[path.suffix], [str(path)]


def load_texts(config: DataConfig) -> list[str]:
    """The texts of ``config.source`` (embedded name, local file/folder, or hub dataset id)."""
    import datasets

    datasets.disable_progress_bars()
    source = config.source
    path = EMBEDDED.get(source, Path(source).expanduser())
    text_field = config.text_field
    try:
        if path.exists():
            builder, files = _builder_for(path)
            kwargs = {}
            if builder == "text":
                # A plain-text file is one document per paragraph for the exact rule, whole for chunking.
                kwargs["sample_by"] = "paragraph" if config.mode == "exact" else "document"
                text_field = "text"
            with _quiet("datasets"):  # a file it cannot parse is reported below, in one line
                dataset = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        elif source.startswith((".", "/", "~")):
            raise HfdistError(f"data.source {source!r}: no such file or folder")
        else:
            dataset = datasets.load_dataset(source, config.subset, split=config.split)
    except HfdistError:
        raise
    except (UnicodeDecodeError, ValueError, FileNotFoundError, OSError, datasets.exceptions.DatasetGenerationError) as exc:
        cause = exc.__cause__ if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__ else exc
        if isinstance(cause, UnicodeDecodeError):
            raise HfdistError(f"data.source {source!r}: cannot be read (not UTF-8 text: "
                              f"{_first_line(cause)})") from None
        raise HfdistError(f"data.source {source!r}: cannot be read ({_first_line(cause)})") from None
    if text_field not in dataset.column_names:
        raise HfdistError(f"data.text_field {text_field!r}: not a column of {source!r} "
                          f"(columns: {', '.join(dataset.column_names)})")
    texts = list(dataset[text_field])
    if not all(isinstance(t, str) for t in texts):
        raise HfdistError(f"data.text_field {text_field!r}: column of {source!r} holds non-text values")
    return texts


@contextmanager
def _quiet(name: str):
    """Silence a library's logger (e.g. datasets logs a parse error with its traceback before raising it)."""
    library = logging.getLogger(name)
    level = library.level
    library.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        library.setLevel(level)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def select_sequences(texts: list[str], tokenizer, config: DataConfig, needed: int) -> tuple[list[list[int]], list]:
    """Up to ``needed`` sequences of exactly ``seq_len`` tokens and where each came from, in seeded order."""
    rng = np.random.default_rng(config.seed)
    seq_len = config.seq_len
    if config.mode == "exact":
        order = rng.permutation(len(texts))
        sequences, origins = [], []
        batch = 256
        for start in range(0, len(order), batch):  # tokenize only as many texts as the selection needs
            chunk = order[start:start + batch]
            encoded = tokenizer([texts[i] for i in chunk], truncation=True, max_length=seq_len)["input_ids"]
            for index, ids in zip(chunk, encoded):
                if len(ids) == seq_len:
                    sequences.append(ids)
                    origins.append(int(index))
                    if len(sequences) == needed:
                        return sequences, origins
        return sequences, origins
    windows, origins = [], []
    encoded = tokenizer(texts)["input_ids"]
    for index, ids in enumerate(encoded):
        for offset in range(0, len(ids) - seq_len + 1, seq_len):
            windows.append(ids[offset:offset + seq_len])
            origins.append([index, offset])
    order = rng.permutation(len(windows))[:needed]
    return [windows[i] for i in order], [origins[i] for i in order]


def build_data(config: DataConfig, tokenizer) -> HyperfitData:
    texts = load_texts(config)
    if not texts:
        raise HfdistError(f"data.source {config.source!r}: no texts")
    needed = config.num_samples + config.num_validation + config.num_contexts
    sequences, origins = select_sequences(texts, tokenizer, config, needed)
    if len(sequences) < needed:
        unit = "texts of at least" if config.mode == "exact" else "windows of"
        raise HfdistError(
            f"data.source {config.source!r}: yields {len(sequences)} {unit} {config.seq_len} tokens, but "
            f"data.num_samples ({config.num_samples}) + num_validation ({config.num_validation}) + num_contexts "
            f"({config.num_contexts}) need {needed}" + (" (try data.mode=chunk)" if config.mode == "exact" else ""))
    ids = torch.tensor(sequences, dtype=torch.long)
    n_train, n_val = config.num_samples, config.num_validation
    selection = {
        "source": config.source, "mode": config.mode, "seed": config.seed, "seq_len": config.seq_len,
        "num_texts": len(texts), "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "train_origins": origins[:n_train], "validation_origins": origins[n_train:n_train + n_val],
        "context_origins": origins[n_train + n_val:],
        "origin_format": "text index" if config.mode == "exact" else "[text index, token offset]",
    }
    return HyperfitData(train=ids[:n_train], validation=ids[n_train:n_train + n_val],
                        contexts=ids[n_train + n_val:, :config.context_len], selection=selection)


class StepSampler:
    """Which training sequences each rank sees at each optimizer step.

    Epoch ``e`` visits the training set in the order of ``torch.randperm`` seeded with ``seed + e``; step
    ``s`` of the epoch takes the next ``global_batch_size`` sequences (a trailing partial batch is dropped,
    with a warning). The global batch is cut into ``dp_size`` contiguous rank shares, each into
    ``accumulation`` micro-batches, so the same sequences make up a step whatever the world size.
    """

    def __init__(self, num_samples: int, global_batch_size: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, seed: int):
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size
        if num_samples % global_batch_size:
            logger.warning("%d training sequences are not a multiple of the global batch %d: the last %d of each "
                           "epoch's order are dropped", num_samples, global_batch_size,
                           num_samples % global_batch_size)

    def global_batch(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        """The training-sequence indices (rows of ``data/train_token_ids.npy``) of the whole global batch."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = step_in_epoch * self.global_batch_size
        return order[start:start + self.global_batch_size]

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[torch.Tensor]:
        global_batch = self.global_batch(epoch, step_in_epoch)
        per_rank = self.global_batch_size // self.dp_size
        mine = global_batch[self.dp_rank * per_rank:(self.dp_rank + 1) * per_rank]
        return list(mine.split(self.micro_batch_size))


class BatchPrefetcher:
    """Hands out a step's micro-batches on the device, with the next step's already on its way.

    ``load(position)`` gives the host tensors of a position (e.g. ``(epoch, step_in_epoch)``). On CUDA, after
    handing out a step, the next position's batches are copied from pinned host memory on a side stream, so the
    copy overlaps the current step's compute and the step itself never waits on a pageable host-to-device
    copy. On a CPU device there is nothing to overlap: batches are returned as loaded (``overlapped`` is False).
    """

    def __init__(self, load, device: torch.device, enabled: bool = True):
        self.load = load
        self.device = device
        self.overlapped = enabled and device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.overlapped else None
        self._pending: tuple = (None, None)  # (position, device tensors being copied on self.stream)

    def _copy(self, position) -> list[torch.Tensor]:
        with torch.cuda.stream(self.stream):
            return [b.pin_memory().to(self.device, non_blocking=True) for b in self.load(position)]

    def get(self, position, next_position=None) -> list[torch.Tensor]:
        if not self.overlapped:
            return [b.to(self.device) for b in self.load(position)]
        pending_position, batches = self._pending
        if pending_position != position:  # first step, or a jump (resume): copy now
            batches = self._copy(position)
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for b in batches:  # the caching allocator must not hand this memory to the side stream too early
            b.record_stream(current)
        self._pending = (next_position, self._copy(next_position)) if next_position is not None else (None, None)
        return batches


def load_run_data(folder: Path) -> HyperfitData:
    def read(name):
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise HfdistError(f"{path}: missing (not a hyperfit run folder?)")
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))

    selection = json.loads((folder / "selection.json").read_text()) if (folder / "selection.json").is_file() else {}
    return HyperfitData(read("train_token_ids"), read("validation_token_ids"), read("contexts"), selection)

"""The hyperfitting data: load texts with `datasets`, select fixed-length token sequences, split, batch.

Selection (seeded, recorded in ``RUN/data/selection.json``):
- ``exact`` (the upstream rule): texts are visited in a seeded random order and tokenized (with the
  tokenizer's default special tokens, cut at ``seq_len``); a text whose tokens reach ``seq_len`` gives one
  sequence of exactly ``seq_len`` tokens; shorter texts are skipped.
- ``chunk``: each text is tokenized whole and cut into consecutive ``seq_len`` windows (the tail shorter
  than ``seq_len`` is dropped); the windows are then taken in a seeded random order.
The first ``num_samples`` sequences train, the next ``num_validation`` validate, and the next
``num_contexts`` give the held-out generation contexts (their first ``context_len`` tokens). Too few
sequences for all three is an error, never a smaller run. ``eval.extra`` adds a second held-out text set
(validation sequences and contexts only) chosen by the same rules from its own source.

Images (``data.modality: image``): the images of a hub dataset (``data.image_field``), a local image folder or
file of the same columns, or the embedded ``digits`` are visited in a seeded random order and turned into token
ids by the model's own image processor (ImageGPT: resize, nearest colour cluster per pixel), after the start
token (id = number of colour clusters, ImageGPT's ``vocab_size - 1``): one sequence of ``1 + height x width``
tokens per image, row by row. The split is the same (train, validation, contexts); a context is the start token
and the first ``floor(height x data.context_fraction)`` rows, and ``context_images.npy`` keeps the whole
context images for the comparison grid.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
import torch

from hfdist.config import DataConfig, ExtraHeldOutConfig
from hfdist.errors import HfdistError
from hfdist.io import atomic_write_json

logger = logging.getLogger(__name__)

EMBEDDED = {
    "austen": Path(__file__).parent / "data_files" / "austen.jsonl.gz",
    # Out-of-domain held-out texts: SQLite's documentation essays (public domain; scripts/build_sqlite_docs.py)
    # and the King James Proverbs and Ecclesiastes (expired copyright; scripts/build_kjv_wisdom.py).
    "sqlite_docs": Path(__file__).parent / "data_files" / "sqlite_docs.jsonl.gz",
    "kjv_wisdom": Path(__file__).parent / "data_files" / "kjv_wisdom.jsonl.gz",
}
BUILDERS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".gz": "json",
    ".arrow": "arrow",
}
# Image sources that need no network: scikit-learn's 8x8 handwritten digits (1,797 images in its wheel).
EMBEDDED_IMAGES = ("digits",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class HyperfitData:
    train: torch.Tensor  # int64 [num_samples, seq_len]
    validation: torch.Tensor  # int64 [num_validation, seq_len]
    contexts: torch.Tensor  # int64 [num_contexts, context_len]
    selection: dict = field(default_factory=dict)
    # Images: the whole held-out images whose first rows are the contexts, int64 [num_contexts, seq_len].
    context_images: Optional[torch.Tensor] = None
    # eval.extra: name -> (validation [n, seq_len], contexts [m, context_len]) of a second held-out text set.
    extra: dict = field(default_factory=dict)

    @property
    def image(self) -> Optional[dict]:
        """The image geometry (height, width, context_rows, start_token, ...) or None for text."""
        return self.selection.get("image")

    def arrays(self) -> dict[str, torch.Tensor]:
        """Every array of the selection by its file name in RUN/data (without .npy)."""
        out = {
            "train_token_ids": self.train,
            "validation_token_ids": self.validation,
            "contexts": self.contexts,
        }
        if self.context_images is not None:
            out["context_images"] = self.context_images
        for name, (validation, contexts) in self.extra.items():
            out[f"{name}_validation_token_ids"], out[f"{name}_contexts"] = validation, contexts
        return out

    def save(self, folder: Path) -> None:

        folder.mkdir(parents=True, exist_ok=True)
        for name, tensor in self.arrays().items():
            tmp = folder / f".{name}.tmp.npy"
            np.save(tmp, tensor.numpy().astype(np.int32))
            tmp.replace(folder / f"{name}.npy")
        atomic_write_json(folder / "selection.json", self.selection)


def _builder_for(path: Path, prefix: str = "data") -> tuple[str, list[str]]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in BUILDERS)
        if not files:
            raise HfdistError(
                f"{prefix}.source {str(path)!r}: folder has no .txt/.jsonl/.json/.parquet/.csv/.arrow files"
            )
        suffixes = {BUILDERS[p.suffix] for p in files}
        if len(suffixes) > 1:
            raise HfdistError(
                f"{prefix}.source {str(path)!r}: mixes file kinds {sorted(suffixes)}; use one kind"
            )
        return suffixes.pop(), [str(p) for p in files]
    if path.suffix not in BUILDERS:
        raise HfdistError(
            f"{prefix}.source {str(path)!r}: unsupported file type {path.suffix!r} "
            f"(use .txt, .jsonl, .json, .parquet, .csv or .arrow)"
        )
    if path.stat().st_size == 0:
        raise HfdistError(f"{prefix}.source {str(path)!r}: file is empty")
    return BUILDERS[path.suffix], [str(path)]


def _is_image_folder(path: Path) -> bool:
    return path.is_dir() and any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*") if p.is_file())


def _load_dataset(config: DataConfig, prefix: str, image_folder: bool = False):
    """The ``datasets.Dataset`` of ``config.source`` (local file/folder or hub id) and whether it is a plain-text
    file (whose column is then "text"). Errors name ``<prefix>.source``."""

    datasets.disable_progress_bars()
    source = config.source
    path = EMBEDDED.get(source, Path(source).expanduser())
    plain_text = False
    try:
        if path.exists() and image_folder and _is_image_folder(path):
            with _quiet("datasets"):
                dataset = datasets.load_dataset("imagefolder", data_dir=str(path), split="train")
        elif path.exists():
            builder, files = _builder_for(path, prefix)
            kwargs = {}
            if builder == "text":
                # A plain-text file is one document per paragraph for the exact rule, whole for chunking.
                kwargs["sample_by"] = "paragraph" if config.mode == "exact" else "document"
                plain_text = True
            with _quiet("datasets"):  # a file it cannot parse is reported below, in one line
                dataset = datasets.load_dataset(builder, data_files=files, split="train", **kwargs)
        elif source.startswith((".", "/", "~")):
            raise HfdistError(f"{prefix}.source {source!r}: no such file or folder")
        else:
            dataset = datasets.load_dataset(source, config.subset, split=config.split)
    except HfdistError:
        raise
    except (
        UnicodeDecodeError,
        ValueError,
        FileNotFoundError,
        OSError,
        datasets.exceptions.DatasetGenerationError,
    ) as exc:
        cause = (
            exc.__cause__
            if isinstance(exc, datasets.exceptions.DatasetGenerationError) and exc.__cause__
            else exc
        )
        if isinstance(cause, UnicodeDecodeError):
            raise HfdistError(
                f"{prefix}.source {source!r}: cannot be read (not UTF-8 text: {_first_line(cause)})"
            ) from None
        raise HfdistError(f"{prefix}.source {source!r}: cannot be read ({_first_line(cause)})") from None
    return dataset, plain_text


def load_texts(config: DataConfig, prefix: str = "data") -> list[str]:
    """The texts of ``config.source`` (embedded name, local file/folder, or hub dataset id)."""
    dataset, plain_text = _load_dataset(config, prefix)
    text_field = "text" if plain_text else config.text_field
    source = config.source
    if text_field not in dataset.column_names:
        raise HfdistError(
            f"{prefix}.text_field {text_field!r}: not a column of {source!r} "
            f"(columns: {', '.join(dataset.column_names)})"
        )
    texts = list(dataset[text_field])
    if not all(isinstance(t, str) for t in texts):
        raise HfdistError(f"{prefix}.text_field {text_field!r}: column of {source!r} holds non-text values")
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


def select_sequences(
    texts: list[str], tokenizer, config: DataConfig, needed: int
) -> tuple[list[list[int]], list]:
    """Up to ``needed`` sequences of exactly ``seq_len`` tokens and where each came from, in seeded order."""
    rng = np.random.default_rng(config.seed)
    seq_len = config.seq_len
    if config.mode == "exact":
        order = rng.permutation(len(texts))
        sequences, origins = [], []
        batch = 256
        for start in range(0, len(order), batch):  # tokenize only as many texts as the selection needs
            chunk = order[start : start + batch]
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
            windows.append(ids[offset : offset + seq_len])
            origins.append([index, offset])
    order = rng.permutation(len(windows))[:needed]
    return [windows[i] for i in order], [origins[i] for i in order]


def build_data(config: DataConfig, tokenizer, extra: Optional[ExtraHeldOutConfig] = None) -> HyperfitData:
    """The run's sequences: text through ``tokenizer``, or images (``config.modality``) through the model's image
    processor passed in its place; plus the ``extra`` held-out text set when it has a source."""
    if config.modality == "image":
        return build_image_data(config, tokenizer)
    data = _build_text_data(config, tokenizer)
    if extra is not None and extra.source is not None:
        extra_config = dataclasses.replace(
            config,
            source=extra.source,
            subset=extra.subset,
            split=extra.split,
            text_field=extra.text_field,
            mode=extra.mode,
            seed=extra.seed,
            num_samples=0,
            num_validation=extra.num_validation,
            num_contexts=extra.num_contexts,
        )
        held_out = _build_text_data(extra_config, tokenizer, prefix="eval.extra")
        data.extra[extra.name] = (held_out.validation, held_out.contexts)
        data.selection["extra"] = {
            extra.name: {k: v for k, v in held_out.selection.items() if not k.startswith("train")}
        }
    return data


def _build_text_data(config: DataConfig, tokenizer, prefix: str = "data") -> HyperfitData:
    texts = load_texts(config, prefix)
    if not texts:
        raise HfdistError(f"{prefix}.source {config.source!r}: no texts")
    needed = config.num_samples + config.num_validation + config.num_contexts
    sequences, origins = select_sequences(texts, tokenizer, config, needed)
    if len(sequences) < needed:
        unit = "texts of at least" if config.mode == "exact" else "windows of"
        counts = (
            f"data.num_samples ({config.num_samples}) + num_validation ({config.num_validation}) + "
            f"num_contexts ({config.num_contexts})"
            if prefix == "data"
            else f"{prefix}.num_validation ({config.num_validation}) + num_contexts ({config.num_contexts})"
        )
        raise HfdistError(
            f"{prefix}.source {config.source!r}: yields {len(sequences)} {unit} {config.seq_len} tokens, but "
            f"{counts} need {needed}" + (f" (try {prefix}.mode=chunk)" if config.mode == "exact" else "")
        )
    ids = torch.tensor(sequences, dtype=torch.long)
    n_train, n_val = config.num_samples, config.num_validation
    selection = {
        "source": config.source,
        "mode": config.mode,
        "seed": config.seed,
        "seq_len": config.seq_len,
        "num_texts": len(texts),
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "train_origins": origins[:n_train],
        "validation_origins": origins[n_train : n_train + n_val],
        "context_origins": origins[n_train + n_val :],
        "origin_format": "text index" if config.mode == "exact" else "[text index, token offset]",
    }
    return HyperfitData(
        train=ids[:n_train],
        validation=ids[n_train : n_train + n_val],
        contexts=ids[n_train + n_val :, : config.context_len],
        selection=selection,
    )


class StepSampler:
    """Which training sequences each rank sees at each optimizer step.

    Epoch ``e`` visits the training set in the order of ``torch.randperm`` seeded with ``seed + e``; step
    ``s`` of the epoch takes the next ``global_batch_size`` sequences (a trailing partial batch is dropped,
    with a warning). The global batch is cut into ``dp_size`` contiguous rank shares, each into
    ``accumulation`` micro-batches, so the same sequences make up a step whatever the world size.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
    ):
        self.num_samples = num_samples
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed = seed
        self.steps_per_epoch = num_samples // global_batch_size
        if num_samples % global_batch_size:
            logger.warning(
                "%d training sequences are not a multiple of the global batch %d: the last %d of each "
                "epoch's order are dropped",
                num_samples,
                global_batch_size,
                num_samples % global_batch_size,
            )

    def global_batch(self, epoch: int, step_in_epoch: int) -> torch.Tensor:
        """The training-sequence indices (rows of ``data/train_token_ids.npy``) of the whole global batch."""
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + epoch))
        start = step_in_epoch * self.global_batch_size
        return order[start : start + self.global_batch_size]

    def micro_batches(self, epoch: int, step_in_epoch: int) -> list[torch.Tensor]:
        global_batch = self.global_batch(epoch, step_in_epoch)
        per_rank = self.global_batch_size // self.dp_size
        mine = global_batch[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
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
        self._pending = (
            (next_position, self._copy(next_position)) if next_position is not None else (None, None)
        )
        return batches


def load_run_data(folder: Path) -> HyperfitData:
    def read(name):
        path = folder / f"{name}.npy"
        if not path.is_file():
            raise HfdistError(f"{path}: missing (not a hyperfit run folder?)")
        return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.int64))

    selection = (
        json.loads((folder / "selection.json").read_text()) if (folder / "selection.json").is_file() else {}
    )
    data = HyperfitData(read("train_token_ids"), read("validation_token_ids"), read("contexts"), selection)
    if "image" in selection:
        data.context_images = read("context_images")
    for name in selection.get("extra", {}):
        data.extra[name] = (read(f"{name}_validation_token_ids"), read(f"{name}_contexts"))
    return data


# ----------------------------------------------------------------------------------------------------- images
def _digits_images() -> list:
    """scikit-learn's 8x8 handwritten digits as RGB images: ink (16) black on white paper (0), as they are drawn."""
    try:
        from sklearn.datasets import load_digits  # noqa: PLC0415 (optional: the images extra)
    except ImportError:
        raise HfdistError(
            "data.source 'digits': needs scikit-learn (pip install 'hfdist[images]', or run scripts/setup.sh)"
        ) from None
    from PIL import Image  # noqa: PLC0415 (optional: the images extra)

    pixels = np.rint(255.0 * (1.0 - load_digits().images / 16.0)).astype(np.uint8)  # [1797, 8, 8]
    return [Image.fromarray(np.repeat(p[:, :, None], 3, axis=2), mode="RGB") for p in pixels]


class _ImageSource:
    """The images of ``data.source`` by index, decoded only when asked for (CIFAR-10 has 50,000)."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.dataset, self.images = None, None
        if config.source in EMBEDDED_IMAGES:
            self.images = _digits_images()
            return

        dataset, _ = _load_dataset(config, "data", image_folder=True)
        field_name = config.image_field
        if field_name not in dataset.column_names:
            raise HfdistError(
                f"data.image_field {field_name!r}: not a column of {config.source!r} (columns: "
                f"{', '.join(dataset.column_names)})"
            )
        if not isinstance(dataset.features[field_name], datasets.Image):
            try:  # e.g. a parquet file written without the datasets metadata: {"bytes", "path"} structs
                dataset = dataset.cast_column(field_name, datasets.Image())
            except (
                TypeError,
                ValueError,
                NotImplementedError,
            ) as exc:  # pyarrow's cast errors derive from these
                raise HfdistError(
                    f"data.image_field {field_name!r}: column of {config.source!r} does not hold "
                    f"images ({_first_line(exc)})"
                ) from None
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)

    def get(self, indices: list[int]) -> list:
        if self.images is not None:
            return [self.images[i] for i in indices]
        rows = self.dataset.select(indices)[self.config.image_field]
        return [image.convert("RGB") for image in rows]


def image_geometry(processor, config: DataConfig) -> dict:
    """Height, width, colour clusters and start token of the processor's images; the context rows and lengths."""
    size = processor.size  # a dict on older transformers, a SizeDict on newer ones
    height, width = (
        (size.get("height"), size.get("width")) if isinstance(size, dict) else (size.height, size.width)
    )
    if not height or not width:
        raise HfdistError(
            f"model image processor {type(processor).__name__}: size {size!r} names no height and "
            "width (ImageGPT processors resize to a fixed height x width)"
        )
    clusters = getattr(processor, "clusters", None)
    if clusters is None or not getattr(processor, "do_color_quantize", True):
        raise HfdistError(
            f"model image processor {type(processor).__name__}: has no colour clusters (data.modality "
            "image needs an ImageGPT-style processor that turns pixels into cluster ids)"
        )
    num_clusters = len(clusters)
    if config.seq_len != 1 + height * width:
        raise HfdistError(
            f"config field data.seq_len: {config.seq_len}, but the model's image processor makes "
            f"{height}x{width} images: set it to {1 + height * width} (the start token and one token "
            "per pixel)"
        )
    rows = max(1, int(height * config.context_fraction))
    return {
        "height": height,
        "width": width,
        "num_clusters": num_clusters,
        "start_token": num_clusters,
        "context_rows": rows,
        "context_len": 1 + rows * width,
        "generated_tokens": (height - rows) * width,
    }


def image_token_ids(processor, images: list, start_token: int) -> torch.Tensor:
    """int64 [N, 1 + H*W]: the start token, then the nearest colour cluster of each pixel, row by row."""
    ids = np.asarray(processor(images=images, return_tensors="np")["input_ids"], dtype=np.int64)
    ids = ids.reshape(len(images), -1)
    return torch.from_numpy(
        np.concatenate([np.full((len(images), 1), start_token, dtype=np.int64), ids], axis=1)
    )


def token_ids_to_pixels(token_ids, clusters, height: int, width: int) -> np.ndarray:
    """uint8 [N, H, W, 3] from colour-cluster ids [N, H*W] (no start token): ImageGPT's own decoding, each pixel
    the colour of its cluster, ``round(127.5 * (cluster + 1))``. Ids outside the clusters become mid-grey."""
    ids = np.asarray(token_ids, dtype=np.int64)
    palette = np.rint(127.5 * (np.asarray(clusters, dtype=np.float64) + 1.0)).clip(0, 255).astype(np.uint8)
    palette = np.concatenate([palette, np.full((1, 3), 128, dtype=np.uint8)])
    ids = np.where((ids >= 0) & (ids < len(clusters)), ids, len(clusters))
    return palette[ids].reshape(len(ids), height, width, 3)


def build_image_data(config: DataConfig, processor) -> HyperfitData:
    geometry = image_geometry(processor, config)
    source = _ImageSource(config)
    needed = config.num_samples + config.num_validation + config.num_contexts
    if len(source) < needed:
        raise HfdistError(
            f"data.source {config.source!r}: has {len(source)} images, but data.num_samples "
            f"({config.num_samples}) + num_validation ({config.num_validation}) + num_contexts "
            f"({config.num_contexts}) need {needed}"
        )
    order = np.random.default_rng(config.seed).permutation(len(source))[:needed].tolist()
    ids = torch.cat(
        [
            image_token_ids(processor, source.get(order[i : i + 256]), geometry["start_token"])
            for i in range(0, needed, 256)
        ]
    )
    n_train, n_val = config.num_samples, config.num_validation
    selection = {
        "source": config.source,
        "modality": "image",
        "seed": config.seed,
        "seq_len": config.seq_len,
        "num_images": len(source),
        "processor": type(processor).__name__,
        "train_origins": order[:n_train],
        "validation_origins": order[n_train : n_train + n_val],
        "context_origins": order[n_train + n_val :],
        "origin_format": "image index",
        "image": geometry,
    }
    contexts = ids[n_train + n_val :]
    return HyperfitData(
        train=ids[:n_train],
        validation=ids[n_train : n_train + n_val],
        contexts=contexts[:, : geometry["context_len"]],
        selection=selection,
        context_images=contexts,
    )

"""Typed configuration: dataclasses loaded from YAML, overridden by ``--set section.field=value``.

Every check runs before any model or data is touched, and each failure is one ``HfdistError`` whose
message names the field (``train.global_batch_size``) or the file.
"""
from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from hfdist.errors import HfdistError


@dataclass
class ModelConfig:
    # A hub id, a local folder, or the alias "smollm2-135m" (the offline SmolLM2-135M that the set-up installs).
    path: str = "smollm2-135m"
    gguf_file: Optional[str] = None  # a .gguf inside `path` (transformers dequantizes it)
    revision: Optional[str] = None
    # "random" builds the architecture from the config only (benchmarks, plans); "pretrained" loads weights.
    init: str = "pretrained"
    # Parameter dtype of the trained model: float32 or bfloat16 (float16 trains badly with Adam at lr 1e-6).
    dtype: str = "float32"
    # "auto" takes flash_attention_2 when flash-attn is installed and on CUDA, else sdpa (said in the log).
    attn_implementation: str = "auto"
    trust_remote_code: bool = False


@dataclass
class DataConfig:
    # "austen" (the embedded corpus), a local .txt/.jsonl/.json/.parquet/.csv file or folder, or a hub dataset id.
    source: str = "austen"
    subset: Optional[str] = None  # hub dataset configuration name
    split: str = "train"
    text_field: str = "text"
    # "exact": the upstream rule, texts whose tokenization reaches seq_len tokens, cut to seq_len;
    # "chunk": running text cut into consecutive seq_len windows.
    mode: str = "exact"
    seq_len: int = 256
    num_samples: int = 2000
    num_validation: int = 64
    num_contexts: int = 32
    context_len: int = 32
    seed: int = 0
    # "text" (the default) or "image": images become the colour-cluster token ids of the model's own image
    # processor (ImageGPT: the start token, then one token per pixel, row by row); data.seq_len must then be
    # 1 + height x width of the processor's images.
    modality: str = "text"
    image_field: str = "image"  # image column of a hub or local dataset (CIFAR-10: "img"; image folders: "image")
    # Images: held-out completions start from this fraction of each image's rows (rounded down, at least one row);
    # the model generates the rest. It takes the place of data.context_len and eval.total_len (text settings).
    context_fraction: float = 0.5


@dataclass
class OptimConfig:
    name: str = "adam"  # adam (coupled L2, here 0) or adamw (decoupled weight decay)
    lr: float = 1e-6
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    schedule: str = "constant"  # constant, linear or cosine decay after warmup
    warmup_steps: int = 0
    max_grad_norm: float = 0.0  # 0 disables clipping; the norm is logged either way
    implementation: str = "auto"  # auto (fused on CUDA, foreach on CPU), fused, foreach, for_loop


@dataclass
class TrainConfig:
    epochs: int = 20
    global_batch_size: int = 8  # sequences per optimizer step, whatever the world size
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    max_steps: int = 0  # 0: no limit beyond the epochs
    target_loss: float = 0.0  # stop after an epoch whose mean train loss is at or below this; 0 disables
    seed: int = 0
    fused_loss: bool = True  # loss and entropy through hfdist.kernels.fused_linear_cross_entropy
    loss_backend: str = "auto"
    activation_checkpointing: bool = False
    compile: bool = False  # torch.compile each decoder layer (single and fsdp backends); see benchmarks/ for its gain
    # CUDA: the next step's batches are copied from pinned memory on a side stream during the current step.
    prefetch: bool = True
    log_every_steps: int = 1
    # A step whose loss or gradient norm is NaN/inf is skipped (no optimizer or LR-scheduler step, its batch is
    # consumed); up to this many in a row are skipped, the next one stops the run with an error. 0: stop at the first.
    max_bad_steps_in_row: int = 3
    # torch.use_deterministic_algorithms(True): deterministic kernels where torch has them (on CUDA also
    # CUBLAS_WORKSPACE_CONFIG=:4096:8), an error-free warning where it has none, and every new tensor (torch.empty,
    # FSDP's all-gather buffers) filled with NaN first: a memory pass per allocation. Off: CPU runs are still
    # bit-reproducible (same world size and threads); CUDA runs are not (atomics in some backward kernels).
    deterministic: bool = False


@dataclass
class ExtraHeldOutConfig:
    """A second held-out text set, e.g. of another domain than the training data, evaluated alongside the main one
    with the same measures (loss, entropy, top-k mass, greedy TTR) and logged as ``eval/<name>/<measure>``. Its
    sequences come from ``source`` by the data section's rules (seeded, recorded, too little is an error) with
    ``data.seq_len`` and ``data.context_len``."""
    source: Optional[str] = None  # None: no extra set; else as data.source (embedded name, file/folder, hub id)
    name: str = "extra"  # metric names eval/<name>/...: letters, digits, '_' and '-'
    subset: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    mode: str = "chunk"
    num_validation: int = 16
    num_contexts: int = 8
    seed: int = 0


@dataclass
class EvalConfig:
    every_epochs: int = 1  # also always before and after training; 0: only before and after
    total_len: int = 256  # greedy generation from the context up to this many tokens (upstream protocol)
    ttr_window: int = 96
    batch_size: int = 8
    extra: ExtraHeldOutConfig = field(default_factory=ExtraHeldOutConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # 0: no intermediate checkpoints
    dir: str = "checkpoints"  # inside the run folder (a relative path without '..')
    keep_last: int = 2
    save_final_model: bool = True
    # `checkpoint.async: true` (DCP's async_save; single and fsdp backends): the state is copied to host memory
    # (one more copy of this rank's model and optimizer shards), training continues while a background thread
    # writes it, and the checkpoint is completed (manifest, rename) once written. YAML key: `async`.
    async_: bool = field(default=False, metadata={"key": "async"})


@dataclass
class DistributedConfig:
    backend: str = "single"  # single, fsdp or deepspeed
    # FSDP2: mixed precision (bf16 params, fp32 reduce), CPU offload, HSDP replicas across nodes.
    mixed_precision: bool = False
    cpu_offload: bool = False
    replicate_degree: int = 1  # HSDP: >1 shards within groups of world/replicate ranks, replicates across them
    # Tensor parallelism (fsdp backend): each layer's weights split over this many ranks of one node (attention heads,
    # MLP width, vocabulary), composed with FSDP2 over the remaining world / tensor_parallel data-parallel ranks.
    tensor_parallel: int = 1
    deepspeed_config: Optional[str] = None  # a DeepSpeed JSON; configs/deepspeed/ has examples
    # Rendezvous and every collective (gloo and NCCL, subgroups included): a rank that waits longer for its peers
    # fails with an error naming the step and the ranks that fell behind.
    timeout_s: int = 1800
    # FSDP pretrained weights: "per_rank" reads each rank's rows from the safetensors files (no rank holds the
    # whole model); "rank0_broadcast" loads the whole model on rank 0 and broadcasts the shards.
    weight_loading: str = "per_rank"
    # Phase timeouts (seconds; gloo and NCCL): the rendezvous and everything before the first training step
    # (weight loading, a resume's checkpoint verification), the writing of a checkpoint, and the final export.
    # `timeout_s` stays the timeout of collectives while training, and of the barrier every checkpoint and the
    # export start with (the ranks should arrive together; a rank that does not is named).
    startup_timeout_s: int = 3600
    checkpoint_timeout_s: int = 3600
    export_timeout_s: int = 3600
    # Threads of the optimizer when it runs on the host under CUDA (fsdp cpu_offload, DeepSpeed offload_optimizer);
    # 0: the CPU cores this process may use divided by the ranks on the node (launchers set OMP_NUM_THREADS=1).
    host_threads: int = 0


@dataclass
class ExportConfig:
    # dtype of the exported safetensors: "auto" is the model's own (config.json's dtype/torch_dtype: bfloat16 for
    # Llama 3), float32 when it names none; the training dtype (model.dtype) is independent.
    dtype: str = "auto"
    max_shard_size_mb: int = 5000  # the safetensors files are cut at this size (a tensor is never split)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: Optional[str] = None  # default: runs/<config name>-<time>
    export: ExportConfig = field(default_factory=ExportConfig)


CHOICES = {
    "model.init": ("pretrained", "random"),
    "model.dtype": ("float32", "bfloat16"),
    "model.attn_implementation": ("auto", "sdpa", "eager", "flash_attention_2"),
    "data.mode": ("exact", "chunk"),
    "data.modality": ("text", "image"),
    "eval.extra.mode": ("exact", "chunk"),
    "optim.name": ("adam", "adamw"),
    "optim.schedule": ("constant", "linear", "cosine"),
    "optim.implementation": ("auto", "fused", "foreach", "for_loop"),
    "train.loss_backend": ("auto", "torch", "triton"),
    "distributed.backend": ("single", "fsdp", "deepspeed"),
    "distributed.weight_loading": ("per_rank", "rank0_broadcast"),
    "export.dtype": ("auto", "float32", "bfloat16", "float16"),
}
POSITIVE = ("data.seq_len", "data.num_samples", "data.context_len", "train.epochs", "train.global_batch_size",
            "train.micro_batch_size", "train.log_every_steps", "eval.total_len", "eval.ttr_window",
            "eval.batch_size", "checkpoint.keep_last", "distributed.replicate_degree", "distributed.tensor_parallel",
            "distributed.timeout_s", "optim.lr", "distributed.startup_timeout_s", "distributed.checkpoint_timeout_s",
            "distributed.export_timeout_s", "export.max_shard_size_mb")
NON_NEGATIVE = ("data.num_validation", "data.num_contexts", "optim.weight_decay", "optim.warmup_steps",
                "optim.max_grad_norm", "optim.eps", "train.max_steps", "train.target_loss", "eval.every_epochs",
                "checkpoint.every_steps", "train.max_bad_steps_in_row",
                "distributed.host_threads", "eval.extra.num_validation", "eval.extra.num_contexts")
# Config fields naming a place hfdist writes to inside the run folder: each must stay inside it.
RUN_RELATIVE_PATHS = ("checkpoint.dir",)


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats, nothing else is coerced."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _convert(value, inner, name)
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation {annotation!r} for {name}")
    raise HfdistError(f"config field {name}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})")


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML and --set: its own, or ``metadata["key"]`` where that is a Python keyword (async)."""
    return f.metadata.get("key", f.name)


def _fill(section_obj: Any, values: dict, prefix: str, source: str) -> None:
    fields = {_key(f): f for f in dataclasses.fields(section_obj)}
    hints = typing.get_type_hints(type(section_obj))  # resolves the string annotations of `from __future__`
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise HfdistError(f"{source}: unknown config field {name!r} (known: {known})")
        attribute = fields[key].name
        current = getattr(section_obj, attribute)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise HfdistError(f"{source}: config section {name!r} must be a mapping, got {value!r}")
            _fill(current, value, f"{name}.", source)
        else:
            setattr(section_obj, attribute, _convert(value, hints[attribute], name))


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.field=value`` -> (["section", "field"], value parsed as YAML, so 1e-6, true, null work)."""
    if "=" not in text:
        raise HfdistError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # YAML 1.1 reads "1e-6" as a string
    return key.strip().split("."), value


def _looks_like_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a Config from defaults, then the YAML file, then ``--set`` overrides; validate everything."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise HfdistError(f"config file {str(path)!r} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise HfdistError(f"config file {str(path)!r}{where}: not valid YAML") from None
        if not isinstance(data, dict):
            raise HfdistError(f"config file {str(path)!r}: top level must be a mapping of sections")
        _fill(config, _floatify(data), "", f"config file {str(path)!r}")
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _fill(config, nested, "", f"--set {text!r}")
    validate(config)
    return config


def _floatify(data: Any) -> Any:
    """YAML 1.1 (PyYAML) reads ``1e-6`` as a string; numbers in configs are meant as numbers."""
    if isinstance(data, dict):
        return {k: _floatify(v) for k, v in data.items()}
    if isinstance(data, str) and _looks_like_float(data) and any(c in data for c in "eE."):
        return float(data)
    return data


def get_field(config: Config, name: str) -> Any:
    obj: Any = config
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def validate(config: Config) -> None:
    """Checks that need no model, data or process group. World-size checks live in the backends."""
    for name, allowed in CHOICES.items():
        value = get_field(config, name)
        if value not in allowed:
            raise HfdistError(f"config field {name}: {value!r} is not one of {', '.join(allowed)}")
    for name in POSITIVE:
        if not get_field(config, name) > 0:
            raise HfdistError(f"config field {name}: must be > 0, got {get_field(config, name)!r}")
    for name in NON_NEGATIVE:
        if get_field(config, name) < 0:
            raise HfdistError(f"config field {name}: must be >= 0, got {get_field(config, name)!r}")
    if not (0.0 <= config.optim.beta1 < 1.0 and 0.0 <= config.optim.beta2 < 1.0):
        raise HfdistError("config fields optim.beta1/optim.beta2: must lie in [0, 1)")
    train = config.train
    if train.global_batch_size % train.micro_batch_size:
        raise HfdistError(f"config field train.global_batch_size: {train.global_batch_size} is not a multiple of "
                          f"train.micro_batch_size {train.micro_batch_size}")
    data = config.data
    if data.modality == "image":
        _validate_image(config)
    else:
        _validate_text_generation(config)
    _validate_extra_heldout(config)
    if data.num_samples < train.global_batch_size:
        raise HfdistError(f"config field data.num_samples: {data.num_samples} is below train.global_batch_size "
                          f"{train.global_batch_size}")
    if config.distributed.backend == "deepspeed" and config.distributed.deepspeed_config:
        if not Path(config.distributed.deepspeed_config).is_file():
            raise HfdistError(f"config field distributed.deepspeed_config: file "
                              f"{config.distributed.deepspeed_config!r} does not exist")
    for name in RUN_RELATIVE_PATHS:
        check_run_relative(name, get_field(config, name))
    if config.train.compile and config.distributed.backend == "deepspeed":
        # ZeRO-3 gathers and releases parameters with hooks inside each layer's forward, which a compiled
        # layer graph would bake in; DeepSpeed has its own (engine.compile) path, not wired here.
        raise HfdistError("config field train.compile: not supported with distributed.backend=deepspeed "
                          "(use fsdp or single)")
    if config.checkpoint.async_ and config.distributed.backend == "deepspeed":
        raise HfdistError("config field checkpoint.async: supported with distributed.backend single and fsdp (DCP "
                          "checkpoints); DeepSpeed writes its own checkpoints synchronously")
    if config.model.gguf_file and config.model.init == "random":
        raise HfdistError("config field model.gguf_file: a gguf file holds weights; it needs model.init=pretrained")


def _validate_text_generation(config: Config) -> None:
    data = config.data
    if data.context_len >= config.eval.total_len:
        raise HfdistError(f"config field data.context_len: {data.context_len} must be below eval.total_len "
                          f"{config.eval.total_len}")
    if data.context_len > data.seq_len:
        raise HfdistError(f"config field data.context_len: {data.context_len} exceeds data.seq_len {data.seq_len}")
    if config.eval.total_len - data.context_len < config.eval.ttr_window:
        raise HfdistError(f"config field eval.ttr_window: {config.eval.ttr_window} exceeds the generated length "
                          f"eval.total_len - data.context_len = {config.eval.total_len - data.context_len}")


def _validate_image(config: Config) -> None:
    """What needs no model: the image geometry (height, width) comes from the model's processor, so the checks
    that need it (data.seq_len, eval.ttr_window) run when the data is built (hfdist.data.build_image_data)."""
    data = config.data
    if not 0.0 < data.context_fraction < 1.0:
        raise HfdistError(f"config field data.context_fraction: {data.context_fraction!r} must lie in (0, 1)")
    if not data.image_field.strip():
        raise HfdistError("config field data.image_field: must name a column")


def _validate_extra_heldout(config: Config) -> None:
    extra = config.eval.extra
    if extra.source is None:
        return
    if config.data.modality != "text":
        raise HfdistError(f"config field eval.extra.source: an extra held-out set is text, but data.modality is "
                          f"{config.data.modality!r}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", extra.name):
        raise HfdistError(f"config field eval.extra.name: {extra.name!r} must be letters, digits, '_' or '-' (it "
                          "names the metrics eval/<name>/...)")
    if extra.num_validation + extra.num_contexts == 0:
        raise HfdistError("config field eval.extra.num_validation: eval.extra.num_validation and num_contexts are "
                          "both 0 (set one, or unset eval.extra.source)")


def check_run_relative(name: str, value: str) -> None:
    """A path that hfdist writes to must stay inside the run folder: relative, no '..' (checked before any write)."""
    path = Path(value)
    if not value.strip() or path.is_absolute() or ".." in path.parts:
        raise HfdistError(f"config field {name}: {value!r} must be a relative path inside the run folder "
                          "(no '..', not absolute)")


def run_path(run_dir: Path, name: str, value: str) -> Path:
    """``run_dir / value`` for a RUN_RELATIVE_PATHS field, refused if it resolves outside (e.g. through a symlink)."""
    check_run_relative(name, value)
    path = Path(run_dir) / value
    if not path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise HfdistError(f"config field {name}: {value!r} leads outside the run folder {str(run_dir)!r}")
    return path


def to_dict(config: Any) -> dict:
    """The config as YAML sees it (keys as in the YAML files: ``checkpoint.async``)."""
    return {_key(f): to_dict(getattr(config, f.name)) if dataclasses.is_dataclass(getattr(config, f.name))
            else getattr(config, f.name) for f in dataclasses.fields(config)}


def save_config(config: Config, path: str | os.PathLike) -> None:
    from hfdist.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))

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
from typing import Annotated, Any, Literal, Optional

import yaml

from hfdist.errors import HfdistError
from hfdist.io import atomic_write_text
from hfdist.preemption import SIGNALS as PREEMPT_SIGNALS
from hfdist.preemption import signal_names


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, declared next to it: ``Annotated[int, Range(low=0, low_open=True)]``."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = True

    def check(self, name: str, value) -> None:
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if not (too_low or too_high):
            return
        if self.high is None:  # one-sided: "must be > 0"
            raise HfdistError(
                f"config field {name}: must be {'>' if self.low_open else '>='} {self.low:g}, got {value!r}"
            )
        interval = (
            f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        )
        raise HfdistError(f"config field {name}: {value!r} must lie in {interval}")


Positive = Range(low=0, low_open=True)
NonNegative = Range(low=0)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Positive]
NonNegativeFloat = Annotated[float, NonNegative]


@dataclass
class ModelConfig:
    path: str = "smollm2-135m"
    """A hub id, a local folder, or the alias "smollm2-135m" (the offline SmolLM2-135M that the set-up installs)."""
    gguf_file: Optional[str] = None
    """A .gguf inside ``path`` (transformers dequantizes it)."""
    revision: Optional[str] = None
    """A hub revision (branch, tag or commit)."""
    init: Literal["pretrained", "random"] = "pretrained"
    """"pretrained" loads the weights; "random" builds the architecture from its config only (plans, benchmarks)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """Parameter dtype of the trained model (float16 trains badly with Adam at lr 1e-6, so it is not offered)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """"auto": flash_attention_2 when flash-attn is installed and on CUDA, else sdpa (said in the log)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (off unless asked)."""


@dataclass
class DataConfig:
    source: str = "austen"
    """"austen" (the embedded corpus), a local .txt/.jsonl/.json/.parquet/.csv file or folder, or a hub dataset id."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Hub dataset split."""
    text_field: str = "text"
    """Text column of a dataset or JSON file."""
    mode: Literal["exact", "chunk"] = "exact"
    """"exact": the upstream rule, texts whose tokens reach seq_len, cut there; "chunk": running text in windows."""
    seq_len: PositiveInt = 256
    """Tokens per training sequence."""
    num_samples: PositiveInt = 2000
    """Training sequences (the hyperfitting set)."""
    num_validation: NonNegativeInt = 64
    """Held-out sequences for the validation loss, entropy and top-k mass."""
    num_contexts: NonNegativeInt = 32
    """Held-out contexts for greedy generation (TTR)."""
    context_len: PositiveInt = 32
    """Tokens of each generation context (the start of a held-out sequence)."""
    seed: int = 0
    """Seed of the sequence selection (recorded in data/selection.json)."""
    modality: Literal["text", "image"] = "text"
    """"image": the colour-cluster tokens of the model's image processor (ImageGPT); seq_len = 1 + height x width."""
    image_field: str = "image"
    """Image column of a hub or local dataset (CIFAR-10: "img"; image folders: "image")."""
    context_fraction: Annotated[float, Range(low=0, high=1, low_open=True)] = 0.5
    """Images: held-out completions start from this fraction of each image's rows (rounded down, at least one)."""


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw"] = "adam"
    """adam (coupled L2, here 0) or adamw (decoupled weight decay)."""
    lr: PositiveFloat = 1e-6
    """Peak learning rate."""
    weight_decay: NonNegativeFloat = 0.0
    """0: no decay with either optimizer (the paper's recipe)."""
    beta1: Annotated[float, Range(low=0, high=1)] = 0.9
    """Adam's first-moment decay."""
    beta2: Annotated[float, Range(low=0, high=1)] = 0.999
    """Adam's second-moment decay."""
    eps: NonNegativeFloat = 1e-8
    """Adam's epsilon."""
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    """Learning-rate schedule after the warmup (linear and cosine decay to 0 at the last step)."""
    warmup_steps: NonNegativeInt = 0
    """Linear warmup steps."""
    max_grad_norm: NonNegativeFloat = 0.0
    """Clipping norm; 0 disables clipping (the norm is logged either way)."""
    implementation: Literal["auto", "fused", "foreach", "for_loop"] = "auto"
    """Adam's implementation; "auto": fused on CUDA, foreach on a CPU."""


@dataclass
class TrainConfig:
    epochs: PositiveInt = 20
    """Passes over the training sequences (a stop rule)."""
    global_batch_size: PositiveInt = 8
    """Sequences per optimizer step, whatever the world size."""
    micro_batch_size: PositiveInt = 8
    """Sequences per forward pass on one rank."""
    max_steps: NonNegativeInt = 0
    """A stop rule in optimizer steps; 0: no limit beyond the epochs."""
    target_loss: NonNegativeFloat = 0.0
    """Stop after an epoch whose mean train loss is at or below this; 0 disables."""
    seed: int = 0
    """Seed of the data order and of torch, numpy and random."""
    fused_loss: bool = True
    """Loss and entropy through hfdist.kernels.fused_linear_cross_entropy (the logits are never built)."""
    loss_backend: Literal["auto", "torch", "triton"] = "auto"
    """Backend of the fused loss ("auto": Triton on CUDA, torch elsewhere)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward (less activation memory, about a third more compute)."""
    compile: bool = False
    """torch.compile each decoder layer (single and fsdp backends); see benchmarks/ for its gain."""
    prefetch: bool = True
    """CUDA: the next step's batches are copied from pinned memory on a side stream during the current step."""
    log_every_steps: PositiveInt = 1
    """Steps between logged step records (the last step and skipped steps are always logged)."""
    max_bad_steps_in_row: NonNegativeInt = 3
    """Non-finite steps skipped in a row before the run stops with an error (0: stop at the first)."""
    deterministic: bool = False
    """torch.use_deterministic_algorithms(True) (also NaN-fills new tensors; CPU runs are reproducible without it)."""
    preempt_signals: str = "SIGTERM,SIGUSR1"
    """Signals that stop training at the next step with a checkpoint and exit code 75 (hfdist.preemption): names
    from SIGTERM, SIGUSR1, SIGUSR2, SIGHUP, SIGINT, comma-separated; "" for none."""
    trainable_layers: str = "all"
    """Full fine-tuning of "all" parameters, or "last:N": the last N decoder blocks and the final norm only."""
    train_lm_head: bool = False
    """With trainable_layers last:N, the LM head trains too (with tied embeddings, the input embedding with it)."""


@dataclass
class AdapterConfig:
    """A low-rank adapter (LoRA, built with peft) on the frozen base model: only the adapter trains."""

    type: Literal["none", "lora"] = "none"
    """"none": no adapter (what trains is train.trainable_layers); "lora": LoRA on the target modules."""
    rank: PositiveInt = 16
    """LoRA rank r (A is r x in, B is out x r)."""
    alpha: PositiveFloat = 32.0
    """LoRA alpha: the update is alpha / rank x B A."""
    dropout: Annotated[float, Range(low=0, high=1)] = 0.0
    """Dropout on the adapter's input (0: none, as hyperfitting memorises)."""
    target_modules: Optional[list[str]] = None
    """Linear layers of the decoder blocks to adapt, by name (q_proj, mlp.down_proj); None: all of them."""
    layers: str = "all"
    """The decoder blocks that get adapters: "all" or "last:N"."""


@dataclass
class ExtraHeldOutConfig:
    """A second held-out text set, e.g. of another domain than the training data, evaluated alongside the main one
    with the same measures (loss, entropy, top-k mass, greedy TTR) and logged as ``eval/<name>/<measure>``. Its
    sequences come from ``source`` by the data section's rules (seeded, recorded, too little is an error) with
    ``data.seq_len`` and ``data.context_len``."""

    source: Optional[str] = None
    """None: no extra set; else as data.source (embedded name, file/folder, hub id)."""
    name: str = "extra"
    """Metric names eval/<name>/...: letters, digits, '_' and '-'."""
    subset: Optional[str] = None
    """Hub dataset configuration name."""
    split: str = "train"
    """Hub dataset split."""
    text_field: str = "text"
    """Text column."""
    mode: Literal["exact", "chunk"] = "chunk"
    """As data.mode."""
    num_validation: NonNegativeInt = 16
    """Held-out sequences for loss, entropy and top-k mass."""
    num_contexts: NonNegativeInt = 8
    """Held-out contexts for greedy TTR."""
    seed: int = 0
    """Seed of the selection."""


@dataclass
class EvalConfig:
    every_epochs: NonNegativeInt = 1
    """Evaluate every this many epochs, and always before and after training; 0: only before and after."""
    total_len: PositiveInt = 256
    """Greedy generation from the context up to this many tokens in all (upstream protocol)."""
    ttr_window: PositiveInt = 96
    """TTR over this many last generated tokens."""
    batch_size: PositiveInt = 8
    """Sequences per evaluation forward pass."""
    extra: ExtraHeldOutConfig = field(default_factory=ExtraHeldOutConfig)
    """A second held-out set (see ExtraHeldOutConfig)."""


@dataclass
class CheckpointConfig:
    every_steps: NonNegativeInt = 0
    """Steps between checkpoints; 0: no intermediate checkpoints."""
    dir: str = "checkpoints"
    """Inside the run folder (a relative path without '..')."""
    keep_last: PositiveInt = 2
    """Complete checkpoints kept; older ones are pruned."""
    save_final_model: bool = True
    """Export the final model (safetensors) into RUN/model."""
    async_: bool = field(default=False, metadata={"key": "async"})
    """YAML key `async`: DCP's async_save (single, fsdp); training continues while a host copy is written."""


@dataclass
class DistributedConfig:
    backend: Literal["single", "fsdp", "deepspeed"] = "single"
    """One process, PyTorch FSDP2 (optionally with tensor parallelism) or DeepSpeed ZeRO-3."""
    mixed_precision: bool = False
    """bf16 compute (FSDP: bf16 parameter copies, fp32 gradient reduction; DeepSpeed: bf16)."""
    cpu_offload: bool = False
    """Parameters, gradients and optimizer state in host memory (the optimizer steps on the host)."""
    replicate_degree: PositiveInt = 1
    """HSDP: shard within dp / replicate_degree data-parallel ranks, replicate across the groups."""
    tensor_parallel: PositiveInt = 1
    """Tensor parallelism (fsdp): each layer split over this many ranks of one node, FSDP2 over world / N ranks."""
    deepspeed_config: Optional[str] = None
    """A DeepSpeed JSON (configs/deepspeed/ has examples); hfdist fills in what follows from this config."""
    timeout_s: PositiveInt = 1800
    """Collective timeout while training: a rank that waits longer fails, naming the ranks behind."""
    weight_loading: Literal["per_rank", "rank0_broadcast"] = "per_rank"
    """"per_rank": each rank reads its slices of the safetensors files; "rank0_broadcast": rank 0 reads all."""
    startup_timeout_s: PositiveInt = 3600
    """Timeout of the rendezvous and everything before the first step (loading, a resume's verification)."""
    checkpoint_timeout_s: PositiveInt = 3600
    """Timeout of writing a checkpoint."""
    export_timeout_s: PositiveInt = 3600
    """Timeout of the final export."""
    host_threads: NonNegativeInt = 0
    """Threads of an optimizer on the host under CUDA; 0: the process's cores / the ranks on the node."""


@dataclass
class ExportConfig:
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the exported safetensors; "auto": the model's own (config.json; bfloat16 for Llama 3), else fp32."""
    max_shard_size_mb: PositiveInt = 5000
    """The safetensors files are cut at this size (a tensor is never split)."""
    adapter: Literal["merged", "adapter", "both"] = "merged"
    """With adapter.type lora: RUN/model holds the merged weights, RUN/adapter the PEFT adapter folder, or both."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    output_dir: Optional[str] = None
    """The run folder; default: runs/<config name>-<time>."""
    export: ExportConfig = field(default_factory=ExportConfig)


# Config fields naming a place hfdist writes to inside the run folder: each must stay inside it.
RUN_RELATIVE_PATHS = ("checkpoint.dir",)


def _convert(value: Any, annotation: Any, name: str) -> Any:
    """Check ``value`` against a field's annotation; ints are accepted for floats, nothing else is coerced.
    (Choices and ranges are checked by ``validate``, once every override is in.)"""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _convert(value, typing.get_args(annotation)[0], name)
    if origin is Literal:
        return _convert(value, type(typing.get_args(annotation)[0]), name)
    if origin is list:
        (item,) = typing.get_args(annotation)
        if isinstance(value, list):
            return [_convert(v, item, name) for v in value]
        raise HfdistError(f"config field {name}: expected a list, got {value!r} ({type(value).__name__})")
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
    raise HfdistError(
        f"config field {name}: expected {annotation.__name__}, got {value!r} ({type(value).__name__})"
    )


def _key(f: dataclasses.Field) -> str:
    """A field's name in YAML and --set: its own, or ``metadata["key"]`` where that is a Python keyword (async)."""
    return f.metadata.get("key", f.name)


def _fill(section_obj: Any, values: dict, prefix: str, source: str) -> None:
    fields = {_key(f): f for f in dataclasses.fields(section_obj)}
    hints = typing.get_type_hints(
        type(section_obj), include_extras=True
    )  # resolves `from __future__` strings
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
    _check_declared(config, "")
    train = config.train
    if train.global_batch_size % train.micro_batch_size:
        raise HfdistError(
            f"config field train.global_batch_size: {train.global_batch_size} is not a multiple of "
            f"train.micro_batch_size {train.micro_batch_size}"
        )
    unknown = [name for name in signal_names(train.preempt_signals) if name not in PREEMPT_SIGNALS]
    if unknown:
        raise HfdistError(
            f"config field train.preempt_signals: {unknown[0]!r} is not one of {', '.join(PREEMPT_SIGNALS)} "
            "(comma-separated names; empty for none)"
        )
    data = config.data
    if data.modality == "image":
        _validate_image(config)
    else:
        _validate_text_generation(config)
    _validate_extra_heldout(config)
    if data.num_samples < train.global_batch_size:
        raise HfdistError(
            f"config field data.num_samples: {data.num_samples} is below train.global_batch_size "
            f"{train.global_batch_size}"
        )
    if config.distributed.backend == "deepspeed" and config.distributed.deepspeed_config:
        if not Path(config.distributed.deepspeed_config).is_file():
            raise HfdistError(
                f"config field distributed.deepspeed_config: file "
                f"{config.distributed.deepspeed_config!r} does not exist"
            )
    for name in RUN_RELATIVE_PATHS:
        check_run_relative(name, get_field(config, name))
    if config.train.compile and config.distributed.backend == "deepspeed":
        # ZeRO-3 gathers and releases parameters with hooks inside each layer's forward, which a compiled
        # layer graph would bake in; DeepSpeed has its own (engine.compile) path, not wired here.
        raise HfdistError(
            "config field train.compile: not supported with distributed.backend=deepspeed "
            "(use fsdp or single)"
        )
    if config.checkpoint.async_ and config.distributed.backend == "deepspeed":
        raise HfdistError(
            "config field checkpoint.async: supported with distributed.backend single and fsdp (DCP "
            "checkpoints); DeepSpeed writes its own checkpoints synchronously"
        )
    _validate_trainable(config)
    if config.model.gguf_file and config.model.init == "random":
        raise HfdistError(
            "config field model.gguf_file: a gguf file holds weights; it needs model.init=pretrained"
        )


def parse_layers(name: str, value: str) -> Optional[int]:
    """A layer selection: "all" -> None, "last:N" -> N (N >= 1); anything else is refused naming the field."""
    match = re.fullmatch(r"last:(\d+)", value)
    if value != "all" and (match is None or int(match.group(1)) < 1):
        raise HfdistError(f"config field {name}: {value!r} must be 'all' or 'last:N' with N >= 1")
    return None if value == "all" else int(match.group(1))


def _validate_trainable(config: Config) -> None:
    """What trains (train.trainable_layers, adapter.*, export.adapter); checks against the model's depth and module
    names are hfdist.adapters.check_trainable's (they need the model's config)."""
    train, adapter = config.train, config.adapter
    last = parse_layers("train.trainable_layers", train.trainable_layers)
    parse_layers("adapter.layers", adapter.layers)
    if train.train_lm_head and last is None:
        raise HfdistError(
            "config field train.train_lm_head: needs train.trainable_layers last:N (with 'all' the head trains "
            "anyway)"
        )
    if adapter.type == "none":
        if config.export.adapter != "merged":
            raise HfdistError(
                f"config field export.adapter: {config.export.adapter!r} needs adapter.type lora (there is no "
                "adapter to export)"
            )
        return
    if last is not None:
        raise HfdistError(
            f"config field train.trainable_layers: {train.trainable_layers!r} trains base blocks fully, but "
            f"adapter.type {adapter.type} freezes the base model (choose the adapter's blocks with adapter.layers)"
        )
    if adapter.target_modules is not None and (
        not adapter.target_modules or not all(name.strip() for name in adapter.target_modules)
    ):
        raise HfdistError(
            f"config field adapter.target_modules: {adapter.target_modules!r} must name at least one module "
            "(or be null: every linear layer of the decoder blocks)"
        )


def _check_declared(section: Any, prefix: str) -> None:
    """The choices (``Literal``) and ranges (``Range``) the fields declare, in field order, sections included."""
    hints = typing.get_type_hints(type(section), include_extras=True)
    for f in dataclasses.fields(section):
        name, value = f"{prefix}{_key(f)}", getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_declared(value, f"{name}.")
            continue
        annotation = hints[f.name]
        if typing.get_origin(annotation) is Annotated:
            for bound in typing.get_args(annotation)[1:]:
                bound.check(name, value)
        elif typing.get_origin(annotation) is Literal and value not in typing.get_args(annotation):
            raise HfdistError(
                f"config field {name}: {value!r} is not one of {', '.join(typing.get_args(annotation))}"
            )


def _validate_text_generation(config: Config) -> None:
    data = config.data
    if data.context_len >= config.eval.total_len:
        raise HfdistError(
            f"config field data.context_len: {data.context_len} must be below eval.total_len "
            f"{config.eval.total_len}"
        )
    if data.context_len > data.seq_len:
        raise HfdistError(
            f"config field data.context_len: {data.context_len} exceeds data.seq_len {data.seq_len}"
        )
    if config.eval.total_len - data.context_len < config.eval.ttr_window:
        raise HfdistError(
            f"config field eval.ttr_window: {config.eval.ttr_window} exceeds the generated length "
            f"eval.total_len - data.context_len = {config.eval.total_len - data.context_len}"
        )


def _validate_image(config: Config) -> None:
    """What needs no model: the image geometry (height, width) comes from the model's processor, so the checks
    that need it (data.seq_len, eval.ttr_window) run when the data is built (hfdist.data.build_image_data)."""
    data = config.data
    if not data.image_field.strip():
        raise HfdistError("config field data.image_field: must name a column")


def _validate_extra_heldout(config: Config) -> None:
    extra = config.eval.extra
    if extra.source is None:
        return
    if config.data.modality != "text":
        raise HfdistError(
            f"config field eval.extra.source: an extra held-out set is text, but data.modality is "
            f"{config.data.modality!r}"
        )
    if not re.fullmatch(r"[A-Za-z0-9_-]+", extra.name):
        raise HfdistError(
            f"config field eval.extra.name: {extra.name!r} must be letters, digits, '_' or '-' (it "
            "names the metrics eval/<name>/...)"
        )
    if extra.num_validation + extra.num_contexts == 0:
        raise HfdistError(
            "config field eval.extra.num_validation: eval.extra.num_validation and num_contexts are "
            "both 0 (set one, or unset eval.extra.source)"
        )


def check_run_relative(name: str, value: str) -> None:
    """A path that hfdist writes to must stay inside the run folder: relative, no '..' (checked before any write)."""
    path = Path(value)
    if not value.strip() or path.is_absolute() or ".." in path.parts:
        raise HfdistError(
            f"config field {name}: {value!r} must be a relative path inside the run folder "
            "(no '..', not absolute)"
        )


def run_path(run_dir: Path, name: str, value: str) -> Path:
    """``run_dir / value`` for a RUN_RELATIVE_PATHS field, refused if it resolves outside (e.g. through a symlink)."""
    check_run_relative(name, value)
    path = Path(run_dir) / value
    if not path.resolve().is_relative_to(Path(run_dir).resolve()):
        raise HfdistError(f"config field {name}: {value!r} leads outside the run folder {str(run_dir)!r}")
    return path


def to_dict(config: Any) -> dict:
    """The config as YAML sees it (keys as in the YAML files: ``checkpoint.async``)."""
    return {
        _key(f): to_dict(getattr(config, f.name))
        if dataclasses.is_dataclass(getattr(config, f.name))
        else getattr(config, f.name)
        for f in dataclasses.fields(config)
    }


def save_config(config: Config, path: str | os.PathLike) -> None:

    atomic_write_text(Path(path), yaml.safe_dump(to_dict(config), sort_keys=False))

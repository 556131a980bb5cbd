"""``hfdist plan``: the launch gate. Whether a config runs on a cluster, and the memory it needs there.

The plan reads the real config and checks it at the planned world size with the launch's own check
(``layout.check_layout``): what the launch would refuse, the plan refuses, with the same one-line message. For
an accepted layout it gives the memory per GPU, the host memory per node and the bytes on disk.

Model state (parameters, gradients, optimizer) comes from real shards: the architecture is built on the meta
device, split by the same ``apply_tp`` and ``apply_fsdp`` the trainer uses, inside a fake process group of the
planned world size, and the bytes are read from the DTensors' local shapes on rank 0 (FSDP2 pads every rank to
the largest shard, and rank 0 holds the largest tensor-parallel piece of an uneven vocabulary). For DeepSpeed
ZeRO-3 each parameter of the meta model is partitioned by ZeRO's rule, ``ceil(numel / world)`` elements per
rank. The model-state numbers are checked against the plain count ``parameters / (shards x tensor_parallel)``.

Bytes per parameter (``P`` = parameter dtype, 4 for the default fp32 master weights):
- FSDP2: parameters P, gradients P (kept in the parameter dtype), Adam ``exp_avg`` + ``exp_avg_sq`` 2P;
  ``distributed.cpu_offload`` (CPUOffloadPolicy) moves all three to host memory.
- ZeRO-3 (bf16): parameters 2, gradient partitions 4 (fp32 accumulation), fp32 master + Adam 12;
  offload moves optimizer, gradients and parameters to host memory.
Activations (estimate, bytes per token of a micro-batch, compute dtype of ``a`` bytes; the HF Llama layer as
measured with saved-tensor hooks): per decoder layer, two RMSNorms ``2 (4h + 4 + 2 a h)``, attention
``a (2 q + 2 kv) + 4 heads + 2 a head_dim`` (q, k, v, output, log-sum-exp, cos/sin), MLP ``4 a i``. Tensor
parallelism divides the attention heads and the MLP width (``q``, ``kv``, ``heads``, ``i``) by ``tp``; the norms
and the residual stream stay whole on every tensor-parallel rank (no sequence parallelism). With activation
checkpointing only each layer's input ``a h`` is kept, plus one layer recomputed in backward. The fused loss
keeps the gradient of the final hidden states ``a h`` per token; its per-chunk logits are a fixed budget.
Transient (estimate): FSDP2 keeps the root unit (final norm, LM head) gathered with its gradient through forward
and backward, and has up to two units gathered at once (the running one and the prefetched next), plus the
running unit's unsharded gradient and its reduce-scatter copy in the reduce dtype; all of these are the
tensor-parallel piece (``/ tp``). The fused loss adds what the kernel says one call holds
(``fused_loss_workspace``): its chunk of logits and temporaries (the kernel's chunk budget, or less for few tokens) and
the weight-gradient accumulator of the rank's ``ceil(V / tp)`` head rows in the head's compute dtype (the kernel's
default accumulation); tensor parallelism adds the all-reduce buffers of the activations (``2 a h`` per token).
ZeRO-3 holds the LM head (gathered for the root forward), up to ``stage3_max_live_parameters`` gathered
parameters, the prefetch bucket and the gradient reduce bucket. A reserve (default 4 GiB: CUDA context, NCCL
buffers, allocator fragmentation) is kept out of the GPU memory.

Host memory per node: the offloaded model state of its GPUs; the weight-loading peak (``per_rank``: each rank
holds one tensor's slice at a time; ``rank0_broadcast``: the whole model in ``model.dtype`` on the first node);
the export peak (``hfdist.export``: every rank writes its own pieces into the final files, one tensor piece in the
export dtype at a time).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.testing._internal.distributed.fake_pg import FakeStore

from hfdist.adapters import apply_trainable, describe_trains, is_adapter_parameter, training_setup
from hfdist.config import Config
from hfdist.distributed.layout import Layout, build_mesh, check_layout
from hfdist.distributed.parallelize import (
    apply_fsdp,
    apply_tp,
    data_parallel_mesh,
    fsdp_units,
    tensor_parallel_mesh,
)
from hfdist.errors import HfdistError
from hfdist.export import export_dtype as export_dtype_of
from hfdist.kernels.cross_entropy import fused_workspace
from hfdist.models import HyperfitModel, decoder_layers, model_from_config, read_hf_config

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DTYPE_NAMES = {4: "float32", 2: "bfloat16"}
# DeepSpeed's defaults for the ZeRO-3 knobs the transient estimate reads (deepspeed/runtime/zero/config.py).
DEEPSPEED_DEFAULTS = {
    "stage3_max_live_parameters": 1e9,
    "stage3_prefetch_bucket_size": 5e7,
    "reduce_bucket_size": 5e8,
}


@dataclass
class Cluster:
    """The machines a plan is for."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # H100-80GB
    reserve_gib: float = 4.0  # CUDA context, NCCL buffers, fragmentation
    host_memory_gib: Optional[float] = 2048.0  # per node (a DGX H100/H200); None: not checked
    verify_shards: bool = True  # build the meta model and shard it in a fake process group

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        for name in ("nodes", "gpus_per_node"):
            if getattr(self, name) < 1:
                raise HfdistError(f"plan --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        for name in ("gpu_memory_gib", "host_memory_gib"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise HfdistError(f"plan --{name.replace('_', '-')}: must be > 0, got {value}")
        if self.reserve_gib < 0:
            raise HfdistError(f"plan --reserve-gib: must be >= 0, got {self.reserve_gib}")

    def gpu_fits(self, total_gib: float) -> bool:
        return total_gib <= self.gpu_memory_gib - self.reserve_gib

    def host_fits(self, peak_gib: float) -> bool:
        return self.host_memory_gib is None or peak_gib <= self.host_memory_gib


@dataclass
class ModelShape:
    """What the estimates need from the architecture, read from the meta-device model."""

    name: str
    num_parameters: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    root_unit_numel: int  # FSDP root unit: final norm + LM head (+ the embedding when tied)
    largest_unit_numel: int  # the largest other FSDP unit (a decoder layer or the embedding)
    lm_head_numel: int
    adapter_parameters: int  # of num_parameters, an adapter's (merged into the base weights on export)
    trainable_parameters: int  # what trains (hfdist.adapters): all of them, last:N blocks, or an adapter's
    trainable_bytes: int  # bytes of one trainable element (adapters are fp32 whatever the model's dtype)
    root_unit_trainable_numel: int
    largest_unit_trainable_numel: int  # of the units, the most trainable elements one holds
    lm_head_trains: bool
    first_trainable_layer: int  # decoder blocks before it keep no activations for backward
    largest_module_numel: int  # ZeRO-3 gathers module by module: the largest single module's parameters
    largest_tensor_numel: int


def meta_model(hf_config, dtype: torch.dtype, config: Optional[Config] = None):
    """The HyperfitModel of ``hf_config`` on the meta device: real module tree and shapes, no memory; with
    ``config``, transformed as the trainer transforms it (what trains: ``hfdist.adapters.apply_trainable``)."""

    with torch.device("meta"):  # a copy: from_config records the dtype in the config it is given
        lm = model_from_config(copy.deepcopy(hf_config), dtype)
    if config is not None:
        apply_trainable(lm, config, torch.device("meta"))
    return HyperfitModel(lm)


def model_shape(name: str, model) -> ModelShape:

    cfg = model.lm.config
    units = fsdp_units(model)
    unit_numels, unit_trainable = [], []
    for unit_name, module in units:
        if unit_name == "root":
            inner = {id(p) for _, m in units[:-1] for p in m.parameters()}
            own = [p for p in module.parameters() if id(p) not in inner]
            root = sum(p.numel() for p in own)
            root_trainable = sum(p.numel() for p in own if p.requires_grad)
        else:
            unit_numels.append(sum(p.numel() for p in module.parameters()))
            unit_trainable.append(sum(p.numel() for p in module.parameters() if p.requires_grad))
    head = model.lm.get_output_embeddings()
    trainable = [p for p in model.parameters() if p.requires_grad]
    blocks = decoder_layers(model.lm)
    first = next(
        (i for i, b in enumerate(blocks) if any(p.requires_grad for p in b.parameters())), len(blocks)
    )
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = cfg.num_attention_heads
    return ModelShape(
        name=name,
        num_parameters=sum(p.numel() for p in model.parameters()),
        hidden=cfg.hidden_size,
        # GPT-2-style configs (ImageGPT) name the MLP width n_inner, None meaning 4 x hidden
        intermediate=getattr(cfg, "intermediate_size", None)
        or getattr(cfg, "n_inner", None)
        or 4 * cfg.hidden_size,
        layers=cfg.num_hidden_layers,
        heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        root_unit_numel=root,
        largest_unit_numel=max(unit_numels),
        lm_head_numel=head.weight.numel(),
        adapter_parameters=sum(p.numel() for n, p in model.lm.named_parameters() if is_adapter_parameter(n)),
        trainable_parameters=sum(p.numel() for p in trainable),
        trainable_bytes=max(p.element_size() for p in trainable),
        root_unit_trainable_numel=root_trainable,
        largest_unit_trainable_numel=max(unit_trainable),
        lm_head_trains=head.weight.requires_grad,
        first_trainable_layer=first,
        largest_module_numel=largest_module,
        largest_tensor_numel=max(p.numel() for p in model.parameters()),
    )


def fsdp_shard_numels(model, layout: Layout) -> dict:
    """Shard a fresh meta copy of ``model`` with ``apply_tp`` (when tensor-parallel) and ``apply_fsdp`` in a fake
    process group of ``layout.world_size`` ranks.

    Returns the parameter elements held by rank 0 and by the last rank, read from the DTensors' local shapes, and
    the trainable ones among rank 0's."""

    if dist.is_initialized():
        raise HfdistError(
            "plan: a process group is already running in this process; run `hfdist plan` on its own"
        )
    counts = {}
    for rank in (0, layout.world_size - 1):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=layout.world_size)
        try:
            mesh = build_mesh("cpu", layout)
            sharded = model_copy(model)
            tp_mesh = tensor_parallel_mesh(mesh)
            if tp_mesh is not None:
                apply_tp(sharded.lm, tp_mesh)
            apply_fsdp(
                sharded, data_parallel_mesh(mesh), mixed_precision=False, cpu_offload=False, pin_memory=False
            )
            total = trainable = 0
            for p in sharded.parameters():
                if not isinstance(p, DTensor):
                    raise HfdistError(f"plan: parameter of shape {tuple(p.shape)} was left unsharded")
                total += p.to_local().numel()
                trainable += p.to_local().numel() if p.requires_grad else 0
            counts[rank] = (total, trainable)
        finally:
            dist.destroy_process_group()
    return {
        "rank0": counts[0][0],
        "last_rank": counts[layout.world_size - 1][0],
        "rank0_trainable": counts[0][1],
    }


def model_copy(model):
    """A fresh meta copy, what trains included (fully_shard changes the module in place; the plan shards once
    per rank). Meta tensors hold no data: the copy costs the module tree only."""
    return copy.deepcopy(model)


def deepspeed_partition_numel(model, world_size: int, trainable_only: bool = False) -> int:
    """ZeRO-3 partitions every parameter into ``ceil(numel / world)`` elements per rank (padded); of the trainable
    ones only with ``trainable_only``.

    Parameters below ``stage3_param_persistence_threshold`` (the norms of a Llama: 0.001% of a 70B) stay
    whole on every rank instead; the plan counts them as partitioned."""
    return sum(
        math.ceil(p.numel() / world_size) for p in model.parameters() if p.requires_grad or not trainable_only
    )


def fused_loss_workspace(shape: ModelShape, tokens: int, tensor_parallel: int, compute_dtype, train_config):
    """What the fused loss holds in one micro-batch on a GPU rank: its chunk and the weight-gradient accumulator of
    this rank's vocabulary rows, by the kernel's own sizing (``hfdist.kernels.cross_entropy.fused_workspace``: the
    chunk budget, bytes per row and the accumulation dtype the op uses, so plan and kernel cannot disagree)."""
    return fused_workspace(
        tokens,
        -(
            -shape.vocab // tensor_parallel
        ),  # the head rows of one tensor-parallel rank, as the loss sizes them
        shape.hidden,
        compute_dtype,
        device_type="cuda",
        backend=train_config.loss_backend,
    )


def activation_bytes_per_token(
    shape: ModelShape, compute_bytes: int, checkpointing: bool, tensor_parallel: int = 1
) -> dict:
    """Saved activations per token of a micro-batch on one rank (see the module docstring). Blocks before the first
    one that trains (``last:N``, an adapter on the last blocks) need no gradient and keep nothing."""
    a, h, tp = compute_bytes, shape.hidden, tensor_parallel
    q, kv = shape.heads * shape.head_dim // tp, shape.kv_heads * shape.head_dim // tp
    norms = 2 * (4 * h + 4 + 2 * a * h)
    attention = a * (2 * q + 2 * kv) + 4 * shape.heads // tp + 2 * a * shape.head_dim
    mlp = 4 * a * shape.intermediate // tp
    layer = norms + attention + mlp
    loss = (
        4 * h + 4 + 2 * a * h
    ) + a * h  # the final norm, and the hidden states' gradient the fused loss keeps
    kept = shape.layers - shape.first_trainable_layer
    layers = kept * a * h + layer if checkpointing else kept * layer
    return {
        "per_layer": layer,
        "norms_per_layer": norms,
        "layers": layers,
        "loss": loss,
        "total": layers + loss,
    }


@dataclass
class Plan:
    config: str
    model: str
    backend: str
    world_size: int
    nodes: int
    gpus_per_node: int
    layout: dict
    per_gpu: dict
    gpu_memory_gib: float
    reserve_gib: float
    fits: bool
    per_node_host: dict
    host_memory_gib: Optional[float]
    disk: dict
    num_parameters: int
    adapter_parameters: int
    trainable_parameters: int
    trains: str  # what trains, in words
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: int
    seq_len: int
    settings: dict
    model_state_check: dict
    notes: list = field(default_factory=list)

    @property
    def host_per_gpu_gib(self) -> float:
        return self.per_node_host["offloaded_state_gib"] / self.gpus_per_node

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _deepspeed_knobs(path: Optional[str]) -> dict:
    knobs = dict(DEEPSPEED_DEFAULTS)
    if path:
        try:
            zero = json.loads(open(path).read()).get("zero_optimization", {})
        except (OSError, ValueError) as exc:
            raise HfdistError(
                f"config field distributed.deepspeed_config: cannot read {path!r} ({exc})"
            ) from None
        for key in knobs:
            value = zero.get(key)
            if isinstance(value, (int, float)):
                knobs[key] = float(value)
    return knobs


class _ShardCache:
    """Meta model and shard counts per layout, so that ``--suggest`` builds each only once."""

    def __init__(self):
        self.models: dict = {}
        self.shards: dict = {}

    def model(self, hf_config, dtype: torch.dtype, config: Config):
        key = (id(hf_config), dtype, json.dumps(training_setup(config)))
        if key not in self.models:
            self.models[key] = meta_model(hf_config, dtype, config)
        return self.models[key]

    def fsdp(self, model, layout: Layout) -> dict:
        key = (id(model), layout)
        if key not in self.shards:
            self.shards[key] = fsdp_shard_numels(model, layout)
        return self.shards[key]


@dataclass(frozen=True)
class Precision:
    """The byte sizes the estimates use: of a parameter (``model.dtype``) and of the compute."""

    param_dtype: str
    param_bytes: int
    mixed: bool  # bf16 compute: FSDP2's mixed precision, or ZeRO-3 over bf16 parameters
    compute_bytes: int


def precision_of(config: Config) -> Precision:
    dcfg, param_dtype = config.distributed, config.model.dtype
    param_bytes = DTYPE_BYTES[param_dtype]
    mixed = dcfg.mixed_precision or (dcfg.backend == "deepspeed" and param_dtype == "bfloat16")
    return Precision(param_dtype, param_bytes, mixed, 2 if mixed else param_bytes)


@dataclass
class ModelState:
    """One GPU rank's parameters, gradients and optimizer state, and how its parameter count was found."""

    on_gpu: dict  # bytes of "params", "grads", "optimizer" (0 each when offloaded)
    offloaded: float  # bytes moved to host memory by ``distributed.cpu_offload``
    ways: int  # ways each parameter is split (FSDP shards x tensor parallel, or ZeRO-3's world)
    local: int  # parameter elements of rank 0
    last_rank: int  # ... of the last rank
    formula: float  # parameters / ways
    source: str  # where ``local`` comes from

    def check(self) -> dict:
        """The count against the plain formula (``Plan.model_state_check``)."""
        return {
            "source": self.source,
            "params_per_rank": self.local,
            "params_per_rank_last": self.last_rank,
            "formula_params_per_rank": self.formula,
            "relative_difference": (self.local - self.formula) / self.formula,
        }


def model_state(
    config: Config, cluster: Cluster, layout: Layout, model, shape: ModelShape, precision: Precision, cache
) -> ModelState:
    """Model state per GPU: FSDP2 (and single) from the meta model's real shards (or the formula), ZeRO-3 by its
    partition rule; frozen parameters hold their own bytes only."""
    backend, tp = config.distributed.backend, layout.tensor_parallel
    if backend in ("fsdp", "single"):
        ways = layout.shard_size * tp
        formula = shape.num_parameters / ways
        if cluster.verify_shards and backend == "fsdp":
            shards = cache.fsdp(model, layout)
            local, local_trainable, last_rank = (
                shards["rank0"],
                shards["rank0_trainable"],
                shards["last_rank"],
            )
            what = "FSDP2" + (f" x TP ({tp})" if tp > 1 else "")
            source = (
                f"{what} shards of the meta model in a fake process group of {layout.world_size} ranks "
                "(rank 0)"
            )
        else:
            local = last_rank = math.ceil(formula)
            local_trainable = math.ceil(shape.trainable_parameters / ways)
            source = "formula only" + (
                " (--no-verify)" if backend == "fsdp" else " (one process holds everything)"
            )
        # Frozen parameters: their own bytes only (no gradient, no optimizer state); trainable ones in their dtype
        # (fp32 for adapters) with a gradient and two Adam moments.
        trained = local_trainable * shape.trainable_bytes
        state = {
            "params": (local - local_trainable) * precision.param_bytes + trained,
            "grads": trained,
            "optimizer": 2 * trained,
        }
    else:
        ways = layout.world_size
        formula = shape.num_parameters / ways
        local = last_rank = deepspeed_partition_numel(model, ways)
        local_trainable = deepspeed_partition_numel(model, ways, trainable_only=True)
        count = len(list(model.parameters()))
        source = f"ZeRO-3 partition rule ceil(numel / {ways}) over the meta model's {count} parameters"
        # Frozen partitions in the compute dtype only; trainable ones with fp32 gradients, master and Adam moments.
        state = {
            "params": local * precision.compute_bytes,
            "grads": local_trainable * 4,
            "optimizer": local_trainable * 12,
        }
    offloaded = 0.0
    if config.distributed.cpu_offload:
        offloaded = sum(state.values())
        state = {k: 0 for k in state}
    return ModelState(state, offloaded, ways, local, last_rank, formula, source)


def transient_bytes(
    config: Config, shape: ModelShape, tp: int, precision: Precision, tokens: int, knobs: dict
) -> float:
    """What one GPU rank holds for a moment (see the module docstring): the backend's gathered units or buckets
    (ZeRO-3: sized by ``knobs``, ``_deepspeed_knobs``), the fused loss's workspace, and tensor parallelism's
    all-reduce buffers."""
    backend, compute_bytes = config.distributed.backend, precision.compute_bytes
    if backend == "fsdp":
        reduce_bytes = 4 if precision.mixed else precision.param_bytes
        # Gathered: the root unit through forward and backward and two other units (the running one and the
        # prefetched next); gradients: the trainable part of the root and of the running unit, the latter with its
        # reduce-scatter copy.
        transient = (
            (shape.root_unit_numel + shape.root_unit_trainable_numel) * compute_bytes
            + shape.largest_unit_numel * 2 * compute_bytes
            + shape.largest_unit_trainable_numel * (compute_bytes + reduce_bytes)
        ) / tp
    elif backend == "deepspeed":
        live = min(knobs["stage3_max_live_parameters"], shape.num_parameters)
        transient = (
            shape.lm_head_numel * compute_bytes
            + max(live, shape.largest_module_numel) * compute_bytes
            + knobs["stage3_prefetch_bucket_size"] * compute_bytes
            + knobs["reduce_bucket_size"] * 4
        )
    else:
        transient = 0
    loss = fused_loss_workspace(
        shape, tokens, tp, torch.bfloat16 if compute_bytes == 2 else torch.float32, config.train
    )
    # The fused loss's chunk and, when the head trains, its weight-gradient accumulator of this rank's rows.
    transient += loss.chunk_bytes + (loss.accumulator_bytes if shape.lm_head_trains else 0)
    if tp > 1:
        transient += 2 * compute_bytes * shape.hidden * tokens  # the activations' all-reduce buffers
    return transient


def host_memory(
    config: Config,
    cluster: Cluster,
    shape: ModelShape,
    state: ModelState,
    param_bytes: int,
    export_dtype: str,
) -> dict:
    """Host memory per node (GiB): the offloaded model state of its GPUs, the weight-loading peak and the export
    peak, and the larger of the two peaks on top of the offloaded state."""
    ranks = cluster.gpus_per_node
    if config.distributed.weight_loading == "rank0_broadcast" or config.model.gguf_file:
        loading = shape.num_parameters * param_bytes  # rank 0 reads the whole model (first node)
    else:
        loading = ranks * math.ceil(shape.largest_tensor_numel / state.ways) * param_bytes
    # hfdist.export: each rank writes its own pieces, converting one tensor piece at a time.
    export_peak = ranks * math.ceil(shape.largest_tensor_numel / state.ways) * DTYPE_BYTES[export_dtype]
    host = {
        "offloaded_state_gib": round(state.offloaded * ranks / GIB, 3),
        "loading_peak_gib": round(loading / GIB, 3),
        "export_peak_gib": round(export_peak / GIB, 3),
    }
    host["peak_gib"] = round(
        max(
            host["offloaded_state_gib"] + host["loading_peak_gib"],
            host["offloaded_state_gib"] + host["export_peak_gib"],
        ),
        3,
    )
    return host


def disk_usage(config: Config, shape: ModelShape, precision: Precision, export_dtype: str) -> dict:
    """A checkpoint's bytes (what trains and its optimizer state) and the exported model's."""
    if config.distributed.backend == "deepspeed":
        checkpoint_bytes = shape.trainable_parameters * (precision.compute_bytes + 12)
        checkpoint_what = "16-bit weights + fp32 master + 2 Adam moments, DeepSpeed partitions"
    else:
        # DCP: the trainable weights and their two Adam moments (frozen ones are the base model's).
        checkpoint_bytes = 3 * shape.trainable_parameters * shape.trainable_bytes
        checkpoint_what = f"{DTYPE_NAMES[shape.trainable_bytes]} weights + 2 Adam moments, DCP shards"
    export_bytes = (shape.num_parameters - shape.adapter_parameters) * DTYPE_BYTES[export_dtype]
    return {
        "checkpoint_gb": round(checkpoint_bytes / 1e9, 2),
        "checkpoint_contents": checkpoint_what,
        "export_gb": round(export_bytes / 1e9, 2),
        "export_dtype": export_dtype,
    }


def plan_settings(config: Config, precision: Precision, knobs: dict) -> dict:
    """The dtypes, the ZeRO-3 knobs the estimates read, and the switches that change the estimates."""
    dcfg, tcfg = config.distributed, config.train
    if dcfg.backend == "deepspeed":
        dtypes = {
            "param_dtype": "bfloat16" if precision.mixed else "float32",
            "master_dtype": "float32",
            **{k: int(v) for k, v in knobs.items()},
        }
    else:
        dtypes = {
            "param_dtype": precision.param_dtype,
            "compute_dtype": "bfloat16" if precision.mixed else precision.param_dtype,
            "reduce_dtype": "float32" if precision.mixed else precision.param_dtype,
        }
    return {
        **dtypes,
        "offload": dcfg.cpu_offload,
        "activation_checkpointing": tcfg.activation_checkpointing,
        "mixed_precision": precision.mixed,
        "weight_loading": dcfg.weight_loading,
    }


def plan_notes(
    config: Config, cluster: Cluster, shape: ModelShape, per_gpu: dict, host: dict, activation: dict, tp: int
) -> list[str]:
    """What the reader should know: what does not fit, lost bf16 updates, what sequence parallelism would save."""
    notes = []
    if not cluster.gpu_fits(per_gpu["total_gib"]):
        notes.append(
            f"needs {per_gpu['total_gib']:.1f} GiB per GPU, above {cluster.gpu_memory_gib:g} GiB minus the "
            f"{cluster.reserve_gib:g} GiB reserve; `hfdist plan ... --suggest` lists layouts that fit"
        )
    if not cluster.host_fits(host["peak_gib"]):
        notes.append(
            f"needs {host['peak_gib']:.1f} GiB of host memory per node, above the "
            f"{cluster.host_memory_gib:g} GiB given"
        )
    if (
        config.distributed.backend == "fsdp"
        and config.model.dtype == "bfloat16"
        and shape.trainable_bytes == 2
    ):
        notes.append(
            "bf16 master weights: an Adam update of lr 1e-6 is below bf16's resolution for most weights "
            "(relative step 2^-8), so most updates are lost; keep model.dtype float32"
        )
    if tp > 1:
        tokens = config.train.micro_batch_size * config.data.seq_len
        saved = (1 - 1 / tp) * shape.layers * activation["norms_per_layer"] * tokens / GIB
        notes.append(
            f"no sequence parallelism: the norms' activations stay whole on each of the {tp} "
            f"tensor-parallel ranks; sharding them would save {saved:.2f} GiB per GPU at this micro-batch "
            f"({tokens} tokens)"
        )
    return notes


def make_plan(
    config: Config,
    cluster: Cluster,
    config_name: str = "",
    hf_config=None,
    cache: Optional[_ShardCache] = None,
) -> Plan:
    """The plan of ``config`` on ``cluster``; raises the launch's own HfdistError for a layout it would refuse.

    Phase by phase: model state, activations and transients per GPU; host memory per node; bytes on disk."""

    cluster.validate()
    if hf_config is None:
        hf_config = read_hf_config(config.model, prefer_shipped=True)
    layout = check_layout(config, cluster.world_size, cluster.gpus_per_node, hf_config)
    cache = cache or _ShardCache()
    tcfg, tp = config.train, layout.tensor_parallel
    precision = precision_of(config)
    model = cache.model(
        hf_config, torch.float32 if precision.param_dtype == "float32" else torch.bfloat16, config
    )
    shape = model_shape(config.model.path, model)
    tokens = tcfg.micro_batch_size * config.data.seq_len

    state = model_state(config, cluster, layout, model, shape, precision, cache)
    activation = activation_bytes_per_token(shape, precision.compute_bytes, tcfg.activation_checkpointing, tp)
    # ZeRO-3's bucket and prefetch sizes, read once from its JSON (the transients and the settings use them)
    deepspeed = config.distributed.backend == "deepspeed"
    knobs = _deepspeed_knobs(config.distributed.deepspeed_config) if deepspeed else {}
    transient = transient_bytes(config, shape, tp, precision, tokens, knobs)
    per_gpu = {
        "params_gib": state.on_gpu["params"] / GIB,
        "grads_gib": state.on_gpu["grads"] / GIB,
        "optimizer_gib": state.on_gpu["optimizer"] / GIB,
        "activations_gib": activation["total"] * tokens / GIB,
        "transient_gib": transient / GIB,
    }
    per_gpu["total_gib"] = sum(per_gpu.values())
    per_gpu = {k: round(v, 3) for k, v in per_gpu.items()}
    export_dtype = str(export_dtype_of(config, hf_config)).removeprefix("torch.")
    host = host_memory(config, cluster, shape, state, precision.param_bytes, export_dtype)

    return Plan(
        config=config_name,
        model=config.model.path,
        backend=config.distributed.backend,
        world_size=layout.world_size,
        nodes=cluster.nodes,
        gpus_per_node=cluster.gpus_per_node,
        layout={
            "tensor_parallel": tp,
            "replicate_degree": layout.replicate_degree,
            "dp_size": layout.dp_size,
            "shard_size": layout.shard_size,
            "mesh": layout.mesh_dims() if config.distributed.backend == "fsdp" else {},
        },
        per_gpu=per_gpu,
        gpu_memory_gib=cluster.gpu_memory_gib,
        reserve_gib=cluster.reserve_gib,
        fits=cluster.gpu_fits(per_gpu["total_gib"]) and cluster.host_fits(host["peak_gib"]),
        per_node_host=host,
        host_memory_gib=cluster.host_memory_gib,
        disk=disk_usage(config, shape, precision, export_dtype),
        num_parameters=shape.num_parameters,
        adapter_parameters=shape.adapter_parameters,
        trainable_parameters=shape.trainable_parameters,
        trains=describe_trains(config),
        global_batch_size=tcfg.global_batch_size,
        micro_batch_size=tcfg.micro_batch_size,
        accumulation_steps=tcfg.global_batch_size // (tcfg.micro_batch_size * layout.dp_size),
        seq_len=config.data.seq_len,
        settings=plan_settings(config, precision, knobs),
        model_state_check=state.check(),
        notes=plan_notes(config, cluster, shape, per_gpu, host, activation, tp),
    )


# ---- --suggest ------------------------------------------------------------------------------------------------

SUGGEST_RULE = (
    "fastest first: no CPU offload (host Adam and PCIe transfers are the slowest), then the smallest "
    "tensor-parallel degree (it all-reduces activations in every layer), then no activation "
    "checkpointing (it recomputes each layer's forward), then HSDP layouts whose shard groups lie inside "
    "one node (their all-gathers stay on the node's links), then the least GPU memory"
)


def suggest(config: Config, cluster: Cluster) -> list[tuple[dict, Plan]]:
    """Every layout (tensor_parallel, replicate_degree, cpu_offload, activation_checkpointing) of the fsdp backend
    that the launch accepts for ``config``'s batch on ``cluster`` and that fits, best first by SUGGEST_RULE; the
    config's other fields are kept. Each entry: (the overrides, its plan)."""

    cluster.validate()
    hf_config = read_hf_config(config.model, prefer_shipped=True)
    cache = _ShardCache()
    divisors = lambda n: [d for d in range(1, n + 1) if n % d == 0]  # noqa: E731
    found = []
    for tp, offload, checkpointing in itertools.product(
        divisors(cluster.gpus_per_node), (False, True), (False, True)
    ):
        dp = cluster.world_size // tp
        for replicate in divisors(dp):
            overrides = {
                "distributed.backend": "fsdp",
                "distributed.tensor_parallel": tp,
                "distributed.replicate_degree": replicate,
                "distributed.cpu_offload": offload,
                "train.activation_checkpointing": checkpointing,
            }
            candidate = with_overrides(config, overrides)
            try:
                plan = make_plan(candidate, cluster, hf_config=hf_config, cache=cache)
            except HfdistError:
                continue  # the launch refuses this layout (batch, heads, divisibility)
            if plan.fits:
                found.append((overrides, plan))
    found.sort(key=lambda item: suggestion_rank(item[0], item[1], cluster))
    return found


def suggestion_rank(overrides: dict, plan: Plan, cluster: Cluster) -> tuple:
    """SUGGEST_RULE as a sort key (smaller is better)."""
    layout = plan.layout
    node_local_shards = (
        layout["replicate_degree"] > 1
        and layout["shard_size"] * layout["tensor_parallel"] <= cluster.gpus_per_node
    )
    return (
        overrides["distributed.cpu_offload"],
        overrides["distributed.tensor_parallel"],
        overrides["train.activation_checkpointing"],
        not node_local_shards,
        plan.per_gpu["total_gib"],
    )


def with_overrides(config: Config, overrides: dict) -> Config:
    candidate = copy.deepcopy(config)
    for name, value in overrides.items():
        section, key = name.split(".")
        setattr(getattr(candidate, section), key, value)
    return candidate


# ---- text --------------------------------------------------------------------------------------------------


def format_plan(plan: Plan) -> str:
    s, lay = plan.settings, plan.layout
    adapter = f", of which {plan.adapter_parameters / 1e9:.3f} B adapter" if plan.adapter_parameters else ""
    mesh = " x ".join(f"{k} {v}" for k, v in lay["mesh"].items()) or "-"
    lines = [
        f"hfdist plan: {plan.config + ' -> ' if plan.config else ''}{plan.model} "
        f"({plan.num_parameters / 1e9:.2f} B parameters{adapter}), {plan.backend}, {plan.nodes} node(s) x "
        f"{plan.gpus_per_node} GPUs = {plan.world_size} ranks",
        f"  layout: tensor_parallel {lay['tensor_parallel']}, {lay['dp_size']} data-parallel ranks (replicate "
        f"{lay['replicate_degree']} x shard {lay['shard_size']}); mesh {mesh}",
        f"  trains: {plan.trains}: {plan.trainable_parameters / 1e9:.3f} B parameters "
        f"({100 * plan.trainable_parameters / plan.num_parameters:.2f}%)"
        + (
            ", the rest frozen in the model's dtype"
            if plan.trainable_parameters < plan.num_parameters
            else ""
        ),
        f"  batch: global {plan.global_batch_size} = micro-batch {plan.micro_batch_size} x accumulation "
        f"{plan.accumulation_steps} x {lay['dp_size']} data-parallel ranks; seq_len {plan.seq_len}",
        f"  precision: params {s['param_dtype']}, mixed precision {'on' if s['mixed_precision'] else 'off'}; "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}; "
        f"offload {'on' if s['offload'] else 'off'}",
        "",
        f"  {'per GPU':<44}{'GiB':>9}",
    ]
    labels = {
        "params_gib": "parameters (shard)",
        "grads_gib": "gradients (shard)",
        "optimizer_gib": "optimizer state (shard)",
        "activations_gib": "activations (estimate)",
        "transient_gib": "transient: gathered units, loss (estimate)",
        "total_gib": "total",
    }
    for key, label in labels.items():
        lines.append(f"  {label:<44}{plan.per_gpu[key]:>9.2f}")
    lines.append(
        f"  {'GPU memory':<44}{plan.gpu_memory_gib:>9.2f}  (fits if total <= GPU memory - "
        f"{plan.reserve_gib:g} GiB reserve)"
    )
    host = plan.per_node_host
    lines += [
        "",
        f"  {'per node (host memory)':<44}{'GiB':>9}",
        f"  {'offloaded model state':<44}{host['offloaded_state_gib']:>9.2f}",
        f"  {'weight loading peak':<44}{host['loading_peak_gib']:>9.2f}  ({s['weight_loading']})",
        f"  {'export peak':<44}{host['export_peak_gib']:>9.2f}",
        f"  {'peak':<44}{host['peak_gib']:>9.2f}"
        + (f"  (host memory {plan.host_memory_gib:g})" if plan.host_memory_gib else ""),
    ]
    disk = plan.disk
    lines += [
        "",
        f"  on disk: checkpoint {disk['checkpoint_gb']:,.1f} GB ({disk['checkpoint_contents']}), exported "
        f"model {disk['export_gb']:,.1f} GB ({disk['export_dtype']} safetensors)",
        f"  fits: {'yes' if plan.fits else 'NO'}",
    ]
    check = plan.model_state_check
    lines += [
        f"  model state from: {check['source']}",
        f"    {check['params_per_rank']:,} parameters per rank vs {plan.num_parameters:,} / "
        f"{plan.num_parameters / check['formula_params_per_rank']:.0f} = {check['formula_params_per_rank']:,.0f} "
        f"({check['relative_difference'] * 100:+.3f}%)",
    ]
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def format_suggestions(found: list[tuple[dict, Plan]], cluster: Cluster, shown: int = 8) -> str:
    if not found:
        return (
            f"no layout of the fsdp backend fits this config on {cluster.nodes} x {cluster.gpus_per_node} GPUs "
            f"of {cluster.gpu_memory_gib:g} GiB (try more GPUs, a smaller micro-batch or a larger global batch)"
        )
    lines = [
        f"layouts that the launch accepts and that fit, {SUGGEST_RULE}:",
        "",
        f"  {'#':>2}  {'tp':>2}  {'replicate':>9}  {'offload':>7}  {'act. ckpt':>9}  {'GiB/GPU':>8}  "
        f"{'host GiB/node':>13}  --set",
    ]
    for i, (overrides, plan) in enumerate(found[:shown], 1):
        sets = " ".join(
            f"--set {k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in overrides.items()
            if k != "distributed.backend"
        )
        lines.append(
            f"  {i:>2}  {overrides['distributed.tensor_parallel']:>2}  "
            f"{overrides['distributed.replicate_degree']:>9}  "
            f"{'yes' if overrides['distributed.cpu_offload'] else 'no':>7}  "
            f"{'yes' if overrides['train.activation_checkpointing'] else 'no':>9}  "
            f"{plan.per_gpu['total_gib']:>8.1f}  {plan.per_node_host['peak_gib']:>13.1f}  {sets}"
        )
    if len(found) > shown:
        lines.append(f"  ... and {len(found) - shown} more (--top N, or --json for all)")
    return "\n".join(lines)

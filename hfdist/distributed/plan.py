"""``hfdist plan``: GPU memory per rank for a sharded hyperfit run, before renting the GPUs.

Model state (parameters, gradients, optimizer) comes from real shards: the architecture is built on the
meta device and sharded by the same ``apply_fsdp`` the trainer uses, inside a fake process group of the
planned world size, and the bytes are read from the DTensors' local shapes on rank 0 (FSDP2 pads every
rank to the largest shard, so rank 0's size is what each rank allocates). For DeepSpeed ZeRO-3 each
parameter of the meta model is partitioned by ZeRO's rule, ``ceil(numel / world)`` elements per rank.
The model-state numbers are checked against the plain count ``parameters / shard size``.

Bytes per parameter (``P`` = parameter dtype, 4 for the default fp32 master weights):
- FSDP2: parameters P, gradients P (kept in the parameter dtype), Adam ``exp_avg`` + ``exp_avg_sq`` 2P.
  ``--offload`` (CPUOffloadPolicy) moves all three to host memory.
- ZeRO-3 (bf16): parameters 2, gradient partitions 4 (fp32 accumulation), fp32 master + Adam 12.
  ``--offload`` moves optimizer, gradients and parameters to host memory.
Activations (estimate, bytes per token of a micro-batch, compute dtype of ``a`` bytes; the HF Llama layer
as measured with saved-tensor hooks): per decoder layer, two RMSNorms ``2 (4h + 4 + 2 a h)``, attention
``a (2 q + 2 kv) + 4 heads + 2 a head_dim`` (q, k, v, output, log-sum-exp, cos/sin), MLP ``4 a i``;
plus fp32 logits and their gradient ``8 V`` for the loss. With activation checkpointing only each layer's
input ``a h`` is kept, plus one layer recomputed in backward.
Transient (estimate): FSDP2 keeps the root unit (final norm, LM head) gathered with its gradient through
forward and backward, and has up to two units gathered at once (the running one and the prefetched
next), plus the running unit's unsharded gradient and its reduce-scatter copy in the reduce dtype.
ZeRO-3 holds the LM head (gathered for the root forward), up to ``stage3_max_live_parameters`` gathered
parameters, the prefetch bucket and the gradient reduce bucket.
A reserve (default 4 GiB: CUDA context, NCCL buffers, allocator fragmentation) is kept out of the GPU memory.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from hfdist.errors import HfdistError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
# DeepSpeed's defaults for the ZeRO-3 knobs the transient estimate reads (deepspeed/runtime/zero/config.py).
DEEPSPEED_DEFAULTS = {"stage3_max_live_parameters": 1e9, "stage3_prefetch_bucket_size": 5e7,
                      "reduce_bucket_size": 5e8}


@dataclass
class PlanSpec:
    model: str = "llama-3.1-70b"  # a shipped architecture (hfdist/model_configs) or a folder with config.json
    nodes: int = 1
    gpus_per_node: int = 8
    backend: str = "fsdp"  # fsdp or deepspeed
    offload: bool = False
    gpu_memory_gib: float = 80.0
    reserve_gib: float = 4.0
    seq_len: int = 256
    micro_batch_size: int = 1
    global_batch_size: int = 8
    param_dtype: str = "float32"  # FSDP: the dtype parameters, gradients and Adam states are stored in
    mixed_precision: bool = True  # bf16 compute (FSDP MixedPrecisionPolicy / DeepSpeed bf16)
    activation_checkpointing: bool = False
    replicate_degree: int = 1  # FSDP HSDP: shard within world / replicate ranks
    deepspeed_config: Optional[str] = None  # read the ZeRO-3 bucket sizes from this JSON
    verify_shards: bool = True  # build the meta model and shard it with a fake process group

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self) -> None:
        for name in ("nodes", "gpus_per_node", "seq_len", "micro_batch_size", "global_batch_size",
                     "replicate_degree"):
            if getattr(self, name) < 1:
                raise HfdistError(f"plan --{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.backend not in ("fsdp", "deepspeed"):
            raise HfdistError(f"plan --backend: {self.backend!r} is not one of fsdp, deepspeed")
        if self.param_dtype not in DTYPE_BYTES:
            raise HfdistError(f"plan --dtype: {self.param_dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        if self.world_size % self.replicate_degree:
            raise HfdistError(f"plan --replicate-degree: {self.replicate_degree} does not divide the world size "
                              f"{self.world_size}")
        if self.backend == "deepspeed" and self.replicate_degree != 1:
            raise HfdistError("plan --replicate-degree: HSDP is an FSDP option (ZeRO-3 shards over all ranks)")


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
    largest_module_numel: int  # ZeRO-3 gathers module by module: the largest single module's parameters


def load_hf_config(model: str):
    from hfdist.models import architecture_config, architecture_names

    if model in architecture_names():
        return architecture_config(model)
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(path)
    raise HfdistError(f"plan --model {model!r}: not a shipped architecture ({', '.join(architecture_names())}) "
                      "nor a folder with config.json")


def meta_model(hf_config, dtype: torch.dtype):
    """The HyperfitModel of ``hf_config`` on the meta device: real module tree and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    from hfdist.models import HyperfitModel

    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    return HyperfitModel(lm)


def model_shape(name: str, model) -> ModelShape:
    from hfdist.distributed.parallelize import fsdp_units

    cfg = model.lm.config
    units = fsdp_units(model)
    unit_numels = []
    for unit_name, module in units:
        if unit_name == "root":
            inner = {id(p) for _, m in units[:-1] for p in m.parameters()}
            root = sum(p.numel() for p in module.parameters() if id(p) not in inner)
        else:
            unit_numels.append(sum(p.numel() for p in module.parameters()))
    head = model.lm.get_output_embeddings()
    largest_module = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    heads = cfg.num_attention_heads
    return ModelShape(
        name=name, num_parameters=sum(p.numel() for p in model.parameters()), hidden=cfg.hidden_size,
        intermediate=cfg.intermediate_size, layers=cfg.num_hidden_layers, heads=heads,
        kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads, vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)), root_unit_numel=root,
        largest_unit_numel=max(unit_numels), lm_head_numel=head.weight.numel(),
        largest_module_numel=largest_module)


def fsdp_shard_numels(model, world_size: int, replicate_degree: int = 1) -> dict:
    """Shard the meta ``model`` with ``apply_fsdp`` in a fake process group of ``world_size`` ranks.

    Returns the parameter elements held by rank 0 and by the last rank (FSDP2 pads every rank's storage
    to the largest shard, which is rank 0's), read from the DTensors' local shapes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from hfdist.distributed.parallelize import apply_fsdp, build_mesh

    if dist.is_initialized():
        raise HfdistError("plan: a process group is already running in this process; run `hfdist plan` on its own")
    counts = {}
    for rank in (0, world_size - 1):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
        try:
            mesh = build_mesh("cpu", world_size, replicate_degree)
            sharded = apply_fsdp(model_copy(model), mesh, mixed_precision=False, cpu_offload=False,
                                 pin_memory=False)
            total = 0
            for p in sharded.parameters():
                if not isinstance(p, DTensor):
                    raise HfdistError(f"plan: parameter of shape {tuple(p.shape)} was left unsharded")
                total += p.to_local().numel()
            counts[rank] = total
        finally:
            dist.destroy_process_group()
    return {"rank0": counts[0], "last_rank": counts[world_size - 1]}


def model_copy(model):
    """A fresh meta copy (fully_shard changes the module in place; the plan shards once per rank)."""
    return meta_model(model.lm.config, next(model.parameters()).dtype)


def deepspeed_partition_numel(model, world_size: int) -> int:
    """ZeRO-3 partitions every parameter into ``ceil(numel / world)`` elements per rank (padded).

    Parameters below ``stage3_param_persistence_threshold`` (the norms of a Llama: 0.001% of a 70B) stay
    whole on every rank instead; the plan counts them as partitioned."""
    return sum(math.ceil(p.numel() / world_size) for p in model.parameters())


def activation_bytes_per_token(shape: ModelShape, compute_bytes: int, checkpointing: bool) -> dict:
    """Saved activations per token of a micro-batch (see the module docstring), split by where they live."""
    a, h = compute_bytes, shape.hidden
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    norms = 2 * (4 * h + 4 + 2 * a * h)
    attention = a * (2 * q + 2 * kv) + 4 * shape.heads + 2 * a * shape.head_dim
    mlp = 4 * a * shape.intermediate
    layer = norms + attention + mlp
    loss = 8 * shape.vocab + (4 * h + 4 + 2 * a * h)  # final norm, fp32 logits and their gradient
    if checkpointing:
        layers = shape.layers * a * h + layer
    else:
        layers = shape.layers * layer
    return {"per_layer": layer, "layers": layers, "loss": loss, "total": layers + loss}


@dataclass
class Plan:
    model: str
    backend: str
    world_size: int
    nodes: int
    gpus_per_node: int
    shard_size: int
    replicate_degree: int
    per_gpu: dict
    gpu_memory_gib: float
    reserve_gib: float
    fits: bool
    host_per_gpu_gib: float
    num_parameters: int
    global_batch_size: int
    micro_batch_size: int
    accumulation_steps: Optional[int]
    seq_len: int
    settings: dict
    model_state_check: dict
    notes: list = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def _deepspeed_knobs(path: Optional[str]) -> dict:
    knobs = dict(DEEPSPEED_DEFAULTS)
    if path:
        try:
            zero = json.loads(Path(path).read_text()).get("zero_optimization", {})
        except (OSError, ValueError) as exc:
            raise HfdistError(f"plan --deepspeed-config {path!r}: cannot read ({exc})") from None
        for key in knobs:
            value = zero.get(key)
            if isinstance(value, (int, float)):
                knobs[key] = float(value)
    return knobs


def make_plan(spec: PlanSpec) -> Plan:
    spec.validate()
    world = spec.world_size
    hf_config = load_hf_config(spec.model)
    param_bytes = DTYPE_BYTES[spec.param_dtype]
    model = meta_model(hf_config, torch.float32 if spec.param_dtype == "float32" else torch.bfloat16)
    shape = model_shape(spec.model, model)
    compute_bytes = 2 if spec.mixed_precision else param_bytes
    notes = []

    if spec.backend == "fsdp":
        shard_size = world // spec.replicate_degree
        formula = shape.num_parameters / shard_size
        if spec.verify_shards:
            shards = fsdp_shard_numels(model, world, spec.replicate_degree)
            local = shards["rank0"]
            source = f"FSDP2 shards of the meta model in a fake process group of {world} ranks (rank 0)"
        else:
            shards, local = {}, math.ceil(formula)
            source = "formula only (--no-verify)"
        state = {"params": local * param_bytes, "grads": local * param_bytes, "optimizer": 2 * local * param_bytes}
        reduce_bytes = 4 if spec.mixed_precision else param_bytes
        transient = (shape.root_unit_numel * 2 * compute_bytes
                     + shape.largest_unit_numel * (3 * compute_bytes + reduce_bytes))
        settings = {"param_dtype": spec.param_dtype, "compute_dtype": "bfloat16" if spec.mixed_precision
                    else spec.param_dtype, "reduce_dtype": "float32" if spec.mixed_precision else spec.param_dtype}
    else:
        shard_size = world
        compute_bytes = 2 if spec.mixed_precision else 4
        formula = shape.num_parameters / world
        local = deepspeed_partition_numel(model, world)
        shards = {"rank0": local, "last_rank": local}
        count = len(list(model.parameters()))
        source = f"ZeRO-3 partition rule ceil(numel / {world}) over the meta model's {count} parameters"
        state = {"params": local * compute_bytes, "grads": local * 4, "optimizer": local * 12}
        knobs = _deepspeed_knobs(spec.deepspeed_config)
        live = min(knobs["stage3_max_live_parameters"], shape.num_parameters)
        transient = (shape.lm_head_numel * compute_bytes
                     + max(live, shape.largest_module_numel) * compute_bytes
                     + knobs["stage3_prefetch_bucket_size"] * compute_bytes
                     + knobs["reduce_bucket_size"] * 4)
        settings = {"param_dtype": "bfloat16" if spec.mixed_precision else "float32", "master_dtype": "float32",
                    **{k: int(v) for k, v in knobs.items()}}

    host = 0.0
    if spec.offload:
        # FSDP CPUOffloadPolicy and ZeRO-3 offload_param + offload_optimizer keep all model state on the host.
        host = sum(state.values())
        state = {k: 0 for k in state}
    tokens = spec.micro_batch_size * spec.seq_len
    activations = activation_bytes_per_token(shape, compute_bytes, spec.activation_checkpointing)["total"] * tokens
    per_gpu = {"params_gib": state["params"] / GIB, "grads_gib": state["grads"] / GIB,
               "optimizer_gib": state["optimizer"] / GIB, "activations_gib": activations / GIB,
               "transient_gib": transient / GIB}
    per_gpu["total_gib"] = sum(per_gpu.values())
    per_gpu = {k: round(v, 3) for k, v in per_gpu.items()}
    fits = per_gpu["total_gib"] <= spec.gpu_memory_gib - spec.reserve_gib

    per_step = spec.micro_batch_size * world
    accumulation = spec.global_batch_size // per_step if spec.global_batch_size % per_step == 0 else None
    if accumulation is None:
        notes.append(f"global batch {spec.global_batch_size} is not divisible by micro-batch {spec.micro_batch_size}"
                     f" x {world} data-parallel ranks: hfdist refuses this run; every rank needs at least one "
                     f"sequence per step (use at most {spec.global_batch_size // spec.micro_batch_size} ranks that "
                     "divide it, or raise train.global_batch_size)")
    if not fits:
        notes.append(f"needs {per_gpu['total_gib']:.1f} GiB per GPU, above {spec.gpu_memory_gib:g} GiB minus the "
                     f"{spec.reserve_gib:g} GiB reserve" + ("" if spec.offload else "; try --offload or more GPUs"))
    if spec.backend == "fsdp" and spec.param_dtype == "bfloat16":
        notes.append("bf16 master weights: an Adam update of lr 1e-6 is below bf16's resolution for most weights "
                     "(relative step 2^-8), so most updates are lost; keep float32 master weights")
    check = {"source": source, "params_per_rank": local, "params_per_rank_last": shards.get("last_rank", local),
             "formula_params_per_rank": formula,
             "relative_difference": (local - formula) / formula}
    return Plan(model=spec.model, backend=spec.backend, world_size=world, nodes=spec.nodes,
                gpus_per_node=spec.gpus_per_node, shard_size=shard_size, replicate_degree=spec.replicate_degree,
                per_gpu=per_gpu, gpu_memory_gib=spec.gpu_memory_gib, reserve_gib=spec.reserve_gib, fits=fits,
                host_per_gpu_gib=round(host / GIB, 3), num_parameters=shape.num_parameters,
                global_batch_size=spec.global_batch_size, micro_batch_size=spec.micro_batch_size,
                accumulation_steps=accumulation, seq_len=spec.seq_len,
                settings={**settings, "offload": spec.offload, "activation_checkpointing":
                          spec.activation_checkpointing, "mixed_precision": spec.mixed_precision},
                model_state_check=check, notes=notes)


def format_plan(plan: Plan) -> str:
    s = plan.settings
    lines = [
        f"hfdist plan: {plan.model} ({plan.num_parameters / 1e9:.2f} B parameters), {plan.backend}, "
        f"{plan.nodes} node(s) x {plan.gpus_per_node} GPUs = {plan.world_size} ranks "
        f"(shard {plan.shard_size} x replicate {plan.replicate_degree})",
        f"  seq_len {plan.seq_len}, micro-batch {plan.micro_batch_size}, global batch {plan.global_batch_size}"
        f" ({'accumulation ' + str(plan.accumulation_steps) if plan.accumulation_steps else 'does not divide'}), "
        f"params {s['param_dtype']}, mixed precision {'on' if s['mixed_precision'] else 'off'}, "
        f"activation checkpointing {'on' if s['activation_checkpointing'] else 'off'}, "
        f"offload {'on' if s['offload'] else 'off'}",
        "",
        f"  {'per GPU':<38}{'GiB':>9}",
    ]
    labels = {"params_gib": "parameters (shard)", "grads_gib": "gradients (shard)",
              "optimizer_gib": "optimizer state (shard)", "activations_gib": "activations (estimate)",
              "transient_gib": "transient: gathered units (estimate)", "total_gib": "total"}
    for key, label in labels.items():
        lines.append(f"  {label:<38}{plan.per_gpu[key]:>9.2f}")
    lines.append(f"  {'GPU memory':<38}{plan.gpu_memory_gib:>9.2f}  (fits if total <= GPU memory - "
                 f"{plan.reserve_gib:g} GiB reserve)")
    lines.append(f"  {'fits':<38}{'yes' if plan.fits else 'NO':>9}")
    if plan.host_per_gpu_gib:
        lines.append(f"  {'host memory per GPU (offloaded)':<38}{plan.host_per_gpu_gib:>9.2f}")
    check = plan.model_state_check
    lines += ["", f"  model state from: {check['source']}",
              f"    {check['params_per_rank']:,} parameters per rank vs {plan.num_parameters:,} / {plan.shard_size}"
              f" = {check['formula_params_per_rank']:,.0f} ({check['relative_difference'] * 100:+.3f}%)"]
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)

"""How FSDP2 shards a HyperfitModel, kept apart from the model (as torchtitan does).

Units: every decoder block (the model's repeated ``nn.ModuleList``, see ``hfdist.models.decoder_layers``), the
input embedding when it is not tied to the LM head, and the root HyperfitModel, which keeps the final norm and the
LM head: its forward hands ``lm_head.weight`` straight to the fused loss, so the head must be gathered by the
root's own hooks. Each parameter is cut along dim 0 into ``shard`` pieces (torch.chunk sizes, padded to
the largest), so a rank holds ``ceil(rows / shard)`` rows of every parameter.

Mesh: ``("dp_shard",)`` for plain FSDP; ``("dp_replicate", "dp_shard")`` for HSDP, where parameters are
sharded within groups of ``world / replicate`` ranks (a node) and replicated across the groups, so the
all-gathers stay on the fast intra-node links and only the gradient all-reduce crosses nodes.
Tensor parallelism (``apply_tp``, before FSDP2): the plan each family's transformers config declares, with hfdist's
overrides (``tensor_parallel_plan``, ``TP_PLAN_OVERRIDES``); ``[dp_replicate, dp_shard, tp]`` mesh.
This module is also what ``hfdist plan`` runs on the meta device, so plan and training share one rule.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from hfdist.errors import HfdistError
from hfdist.models import decoder_layers


def data_parallel_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The sub-mesh FSDP shards over: ``dp_shard``, or ``(dp_replicate, dp_shard)`` for HSDP."""
    names = tuple(n for n in mesh.mesh_dim_names if n.startswith("dp_"))
    return mesh[names] if len(names) > 1 else mesh[names[0]]


def tensor_parallel_mesh(mesh: DeviceMesh) -> Optional[DeviceMesh]:
    return mesh["tp"] if "tp" in mesh.mesh_dim_names else None


def data_parallel_group(mesh: DeviceMesh):
    """The process group of all data-parallel ranks (the ranks that read different sequences)."""
    dp = data_parallel_mesh(mesh)
    return dp._flatten("dp").get_group() if dp.ndim > 1 else dp.get_group()


def embeddings_tied(lm: nn.Module) -> bool:
    out = lm.get_output_embeddings()
    return out is not None and out.weight is lm.get_input_embeddings().weight


def fsdp_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every unit ``apply_fsdp`` creates, the root last."""
    lm = model.lm
    names = {m: n for n, m in model.named_modules()}
    units = [(names[layer], layer) for layer in decoder_layers(lm)]
    if not embeddings_tied(lm):
        embedding = lm.get_input_embeddings()
        units.insert(0, (names[embedding], embedding))
    units.append(("root", model))
    return units


# ---- tensor parallelism ------------------------------------------------------------------------------------------
# A family's plan comes from its own transformers config (``base_model_tp_plan``: module patterns inside the decoder,
# such as ``layers.*.self_attn.q_proj``, each with a style name), read by ``tensor_parallel_plan``. hfdist applies
# the styles itself with torch's parallel styles (below), and adds what every family needs beyond the declared plan:
# the input embedding and the LM head split along the vocabulary (the loss never gathers the logits), and the
# family entries of TP_PLAN_OVERRIDES.

# transformers' style names that hfdist applies, and what they become here. A plan naming any other style (packed or
# fused projections, mixture-of-experts styles, ...) is refused, naming the family and the style.
TRANSFORMERS_STYLES = {
    "colwise": "colwise",  # output rows split: each rank computes whole heads / a slice of the MLP width
    "rowwise": "rowwise",  # input columns split: the ranks' partial outputs are all-reduced
}

# hfdist's table: entries that replace or add to the plan a family's config declares, by ``model_type``.
# Per-head q/k norms (one weight of head_dim shared by all heads): each rank normalises its own heads, so the
# weight's gradient on a rank is a sum over those heads only and must be all-reduced over the tensor-parallel ranks.
# transformers declares them "replicated_with_grad_allreduce" (a gradient hook); "per_head_norm" does it with a
# DTensor (see apply_tp).
PER_HEAD_QK_NORMS = {
    "layers.*.self_attn.q_norm": "per_head_norm",
    "layers.*.self_attn.k_norm": "per_head_norm",
}
TP_PLAN_OVERRIDES: dict[str, dict[str, str]] = {
    "qwen3": PER_HEAD_QK_NORMS,
    "gemma3_text": PER_HEAD_QK_NORMS,
}

DECODER_LAYERS_PATTERN = "layers.*."  # the plans' prefix of a module inside every decoder layer


def model_family(hf_config) -> str:
    return getattr(hf_config, "model_type", None) or type(hf_config).__name__


def tensor_parallel_plan(hf_config) -> dict[str, str]:
    """The plan ``apply_tp`` follows inside every decoder layer for a model of ``hf_config``: {module path inside
    the layer: hfdist style ("colwise", "rowwise", "per_head_norm")}. It is the config's ``base_model_tp_plan``
    with the family's TP_PLAN_OVERRIDES applied. A family that declares no plan, or a plan with entries hfdist does
    not apply, is refused in one line naming it (the launch and ``hfdist plan`` both call this, via check_layout)."""
    family = model_family(hf_config)
    declared = dict(getattr(hf_config, "base_model_tp_plan", None) or {})
    overrides = TP_PLAN_OVERRIDES.get(family, {})
    if not declared and not overrides:
        raise HfdistError(
            f"config field distributed.tensor_parallel: model family {family!r} declares no tensor-parallel "
            "plan (its transformers config has no base_model_tp_plan) and hfdist has none for it; "
            "train it with distributed.tensor_parallel=1"
        )
    plan, unsupported = {}, []
    for pattern, style in {**declared, **overrides}.items():
        style = overrides[pattern] if pattern in overrides else TRANSFORMERS_STYLES.get(style)
        if style is None or not pattern.startswith(DECODER_LAYERS_PATTERN):
            unsupported.append(f"{pattern}: {declared[pattern]}")
            continue
        plan[pattern.removeprefix(DECODER_LAYERS_PATTERN)] = style
    if unsupported:
        shown = ", ".join(unsupported[:3]) + (
            f" and {len(unsupported) - 3} more" if len(unsupported) > 3 else ""
        )
        raise HfdistError(
            f"config field distributed.tensor_parallel: model family {family!r} declares a tensor-parallel plan "
            f"hfdist does not apply ({shown}; hfdist applies {', '.join(TRANSFORMERS_STYLES)} inside the "
            "decoder layers); train it with distributed.tensor_parallel=1"
        )
    return plan


def apply_tp(lm: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a Hugging Face causal LM over ``tp_mesh`` in place by ``tensor_parallel_plan`` (before FSDP, as
    torchtitan does). Works on the meta device.

    - Decoder layers: "colwise" is torch's ColwiseParallel (weight and bias rows split, the output stays this rank's
      heads or MLP slice), "rowwise" RowwiseParallel (weight columns split, the partial outputs all-reduced, a bias
      added once after it); the input of a module holding column-parallel projections (attention, MLP) is made a
      replicated DTensor once, so that its projections share one all-reduce of the input gradient. "per_head_norm"
      is SequenceParallel over the heads dimension: the weight stays whole (Replicate), the input is this rank's
      heads (Shard(-2)), so the weight's gradient comes out partial and is all-reduced over the tensor-parallel
      ranks when FSDP2 reduces it (it redistributes every gradient to its parameter's tensor-parallel placement).
    - Input embedding: rows (vocabulary) sharded, lookups outside a rank's rows masked, the result all-reduced.
    - LM head: rows (vocabulary) sharded. Training never calls it (``hfdist.models.lm_head_loss`` hands the local
      rows to the vocabulary-parallel loss, so the logits are never gathered); evaluation and generation call it and
      receive the whole logits (gathered). A head tied to the embedding stays tied: both are vocabulary-sharded.
    Activations between layers stay whole on every rank (no sequence parallelism: see docs/distributed.md for
    why).
    """
    plan = tensor_parallel_plan(lm.config)
    head_dim = _head_dim(lm.config)
    styles = {
        "colwise": ColwiseParallel,
        "rowwise": RowwiseParallel,
        "per_head_norm": lambda: SequenceParallel(sequence_dim=-2, use_local_output=True),
    }
    tied = embeddings_tied(lm)
    for index, layer in enumerate(decoder_layers(lm)):
        for path, style in plan.items():
            module = _find(layer, path)
            if module is None:
                raise HfdistError(
                    f"config field distributed.tensor_parallel: {type(lm).__name__} has no module "
                    f"{DECODER_LAYERS_PATTERN}{path} that its tensor-parallel plan names (decoder layer {index})"
                )
            if style == "per_head_norm" and any(p.numel() != head_dim for p in module.parameters()):
                raise HfdistError(
                    f"config field distributed.tensor_parallel: {type(lm).__name__}'s {path} is not a norm over "
                    f"one head's {head_dim} features; hfdist cannot split it by heads"
                )
        column_parents = {path.rpartition(".")[0] for path, style in plan.items() if style == "colwise"}
        for parent in column_parents:
            _replicate_hidden_states(layer.get_submodule(parent) if parent else layer, tp_mesh)
        parallelize_module(layer, tp_mesh, {path: styles[style]() for path, style in plan.items()})
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    parallelize_module(
        embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    )
    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if tied:  # parallelize_module gave the head a parameter of its own: share the embedding's again
        head.weight = embedding.weight


def _head_dim(hf_config) -> int:
    return getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads


def _replicate_hidden_states(module: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Make the module's input (the ``hidden_states`` keyword, or its first argument) a replicated DTensor."""

    def as_replicated(tensor):
        if isinstance(tensor, DTensor):
            return tensor
        return DTensor.from_local(tensor, tp_mesh, (Replicate(),), run_check=False)

    def hook(_, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = as_replicated(kwargs["hidden_states"])
        elif args:
            args = (as_replicated(args[0]), *args[1:])
        return args, kwargs

    module.register_forward_pre_hook(hook, with_kwargs=True)


def _find(module: nn.Module, name: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def mixed_precision_policy(enabled: bool) -> MixedPrecisionPolicy:
    """bf16 compute copies of the parameters, gradients reduced (and kept) in fp32 when enabled."""
    if not enabled:
        return MixedPrecisionPolicy()
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: bool = False,
    cpu_offload: bool = False,
    reshard_after_forward: bool = True,
    pin_memory: Optional[bool] = None,
) -> nn.Module:
    """Shard ``model`` (a HyperfitModel, possibly on the meta device) in place; returns it."""
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    offload: OffloadPolicy = CPUOffloadPolicy(pin_memory=pin_memory) if cpu_offload else OffloadPolicy()
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(mixed_precision), offload_policy=offload)
    units = fsdp_units(model)
    for _, module in units[:-1]:
        fully_shard(module, reshard_after_forward=reshard_after_forward, **kwargs)
    # The root's parameters (norm, LM head) are needed again at the start of backward: keep them gathered.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def enable_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder layer in backward (Hugging Face's own switch, as the single backend uses)."""
    # transformers 5.24 renamed the switch; 5.17 (the GPU machine) only has the old name.
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def apply_compile(lm: nn.Module) -> None:
    """``torch.compile`` each decoder layer in place (torchtitan's per-block rule), before any FSDP wrapping.

    Compiling the repeated block rather than the whole model keeps the graph small (one compilation serves
    every layer: transformers' modules are inlined, so the layers differ only in their weights) and leaves the
    fused loss, the embedding and FSDP's hooks outside the graph. The first step pays the compilation.
    """
    for layer in decoder_layers(lm):
        layer.compile(dynamic=False)

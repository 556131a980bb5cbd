"""How FSDP2 shards a HyperfitModel, kept apart from the model (as torchtitan does).

Units: every decoder block (the model's repeated ``nn.ModuleList``, see ``decoder_layers``), the input embedding
when it is not tied to the LM head, and the root HyperfitModel, which keeps the final norm and the LM head:
its forward hands ``lm_head.weight`` straight to the fused loss, so the head must be gathered by the
root's own hooks. Each parameter is cut along dim 0 into ``shard`` pieces (torch.chunk sizes, padded to
the largest), so a rank holds ``ceil(rows / shard)`` rows of every parameter.

Mesh: ``("dp_shard",)`` for plain FSDP; ``("dp_replicate", "dp_shard")`` for HSDP, where parameters are
sharded within groups of ``world / replicate`` ranks (a node) and replicated across the groups, so the
all-gathers stay on the fast intra-node links and only the gradient all-reduce crosses nodes.
This module is also what ``hfdist plan`` runs on the meta device, so plan and training share one rule.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from hfdist.errors import HfdistError

if TYPE_CHECKING:  # layout.py checks what trains with hfdist.adapters, which imports this module
    from hfdist.distributed.layout import Layout


def build_mesh(device_type: str, layout: Layout) -> DeviceMesh:
    """The device mesh of ``layout``: ``(dp_replicate?, dp_shard, tp?)``, tensor parallel innermost (see layout.py)."""
    dims = layout.mesh_dims()
    return init_device_mesh(device_type, tuple(dims.values()), mesh_dim_names=tuple(dims))


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


def decoder_layers(lm: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a model's body, in order: the outermost ``nn.ModuleList`` whose entries are all of
    one class (Llama's ``model.layers``, ImageGPT's and GPT-2's ``transformer.h``), whatever the model names it.
    Outermost, not longest: a mixture-of-experts layer holds a longer list of experts inside each block."""
    found = None
    for name, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            depth = name.count(".")
            if found is None or depth < found[0]:
                found = (depth, list(module))
    if found is None:
        raise HfdistError(
            f"model {type(lm).__name__}: has no list of repeated blocks (an nn.ModuleList of one "
            "class); FSDP needs one to shard block by block"
        )
    return found[1]


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


# The tensor-parallel plan of the Llama family (Llama, Mistral, Qwen2, SmolLM2, TinyLlama): inside each decoder layer,
# Megatron's pairs. The column-parallel projections split the heads / MLP width, so every rank computes whole
# heads on its own; the row-parallel projection after them all-reduces the partial outputs.
LLAMA_LAYER_PLAN = {
    "self_attn.q_proj": "colwise",
    "self_attn.k_proj": "colwise",
    "self_attn.v_proj": "colwise",
    "self_attn.o_proj": "rowwise",
    "mlp.gate_proj": "colwise",
    "mlp.up_proj": "colwise",
    "mlp.down_proj": "rowwise",
}


def apply_tp(lm: nn.Module, tp_mesh: DeviceMesh) -> None:
    """Shard a Llama-family Hugging Face model over ``tp_mesh`` in place (before FSDP, as torchtitan does).

    - Decoder layers: LLAMA_LAYER_PLAN; the attention and MLP inputs are made replicated DTensors once per module,
      so the three (two) column-parallel projections share one all-reduce of their input gradient.
    - Input embedding: rows (vocabulary) sharded, lookups outside a rank's rows masked, the result all-reduced.
    - LM head: rows (vocabulary) sharded. Training never calls it (``hfdist.models.lm_head_loss`` hands the local
      rows to the vocabulary-parallel loss, so the logits are never gathered); evaluation and generation call it and
      receive the whole logits (gathered). A head tied to the embedding stays tied: both are vocabulary-sharded.
    Activations between layers stay whole on every rank (no sequence parallelism: see the README's
    tensor-parallel notes for why). Works on the meta device.
    """

    layers = decoder_layers(lm)
    for layer in layers:
        missing = [name for name in LLAMA_LAYER_PLAN if _find(layer, name) is None]
        if missing:
            raise HfdistError(
                f"config field distributed.tensor_parallel: {type(lm).__name__} has no Llama-family "
                f"decoder layer ({', '.join(missing)} missing); tensor parallelism has a plan for the "
                "Llama family only"
            )
    tied = embeddings_tied(lm)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for layer in layers:
        plan = {name: styles[style]() for name, style in LLAMA_LAYER_PLAN.items()}
        plan["self_attn"] = PrepareModuleInput(
            input_kwarg_layouts={"hidden_states": Replicate()},
            desired_input_kwarg_layouts={"hidden_states": Replicate()},
        )
        plan["mlp"] = PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Replicate(),))
        parallelize_module(layer, tp_mesh, plan)
    embedding, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    parallelize_module(
        embedding, tp_mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate())
    )
    parallelize_module(head, tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    if tied:  # parallelize_module gave the head a parameter of its own: share the embedding's again
        head.weight = embedding.weight


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

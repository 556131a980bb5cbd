"""What trains: the one model transform between loading and sharding (torchtitan's "model converters").

``apply_trainable(lm, config, device)`` runs in the trainer's model factory, on the Hugging Face model as loaded
(on the meta device under FSDP and in ``hfdist plan``), before any backend wraps or shards it:

- ``train.trainable_layers: last:N``: every parameter is frozen (``requires_grad=False``) except those of the last
  N decoder blocks and of the body's modules after the blocks (the final norm), and the LM head when
  ``train.train_lm_head``. A frozen parameter gets no gradient, so no optimizer state (``build_optimizer`` takes
  the trainable ones) and no gradient communication (FSDP2 and ZeRO-3 reduce only gradients that exist).
- ``adapter.type: lora``: peft's ``inject_adapter_in_model`` wraps the target linear layers of the chosen blocks in
  place (``q_proj`` becomes a ``lora.Linear`` holding ``base_layer`` and ``lora_A``/``lora_B``) and freezes the rest;
  the model keeps its class, so the fused loss (``HyperfitModel``), ``decoder_layers`` and the FSDP units are
  unchanged. The adapters are created empty (``low_cpu_mem_usage``) and filled by ``initial_adapter_weights``: peft's
  default initialisation (A Kaiming-uniform as ``nn.Linear``, B zero) drawn on the host from a generator seeded by
  ``train.seed``, layer by layer in module order, so that every backend and rank starts from the same adapter
  (FSDP copies each rank's rows, as it copies the base weights from the safetensors files). Adapters are fp32
  whatever the base model's dtype (peft's ``autocast_adapter_dtype`` convention): they are the weights that learn.

The base weights keep their checkpoint names behind peft's ``base_layer`` (``base_checkpoint_name``). The export
merges each adapter into its base weight piece by piece (``merged_tensors``: ``W + alpha / r x B A`` in fp32,
rounded once to the export dtype; A and B are small and gathered whole) or writes the PEFT adapter folder
(``adapter_tensors``, ``peft_config``).
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, replace
from typing import Callable, Iterator, Optional

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from hfdist.config import Config, parse_layers
from hfdist.errors import HfdistError
from hfdist.models import decoder_layers, load_model, model_from_config
from hfdist.shards import global_numel

ADAPTER_NAME = "default"  # peft's name of the one adapter
PEFT_PREFIX = "base_model.model."  # a PEFT adapter file's key prefix before the model's own module names
# A LoRA parameter's name: the adapted module, then lora_A/lora_B, peft's adapter name, and the weight.
LORA_PARAMETER = re.compile(rf"^(?P<module>.+)\.lora_(?P<which>[AB])\.{ADAPTER_NAME}\.weight$")


def transforms(config: Config) -> bool:
    """Whether anything but full fine-tuning of every parameter is configured."""
    return config.adapter.type != "none" or config.train.trainable_layers != "all"


def layer_selection(config: Config) -> tuple[str, str]:
    """(field, value) of the blocks that train: the adapter's (``adapter.layers``) or ``train.trainable_layers``."""
    if config.adapter.type != "none":
        return "adapter.layers", config.adapter.layers
    return "train.trainable_layers", config.train.trainable_layers


def first_trainable_block(config: Config, num_blocks: int) -> int:
    """Index of the first decoder block whose parameters (or adapters) train; 0 for full fine-tuning."""
    last = parse_layers(*layer_selection(config))
    return 0 if last is None else num_blocks - last


def check_trainable(config: Config, hf_config=None) -> None:
    """What the layout and the model's config (when given) decide: no tensor parallelism, ``last:N`` within the
    model's depth, target modules that are linear layers of its blocks. One-line HfdistError naming the field (the
    launch and ``hfdist plan`` call it through ``hfdist.distributed.layout.check_layout``)."""
    if not transforms(config):
        return
    adapter = config.adapter
    field, value = layer_selection(config)
    tp = config.distributed.tensor_parallel
    if tp > 1:
        name = "adapter.type" if adapter.type != "none" else field
        what = f"adapter.type {adapter.type}" if adapter.type != "none" else f"{field} {value}"
        raise HfdistError(
            f"config field {name}: {what} is not supported with distributed.tensor_parallel {tp} (frozen or "
            "adapted layers are not tensor-parallel here); use distributed.tensor_parallel 1"
        )
    if hf_config is None:
        return
    last = parse_layers(field, value)
    blocks = hf_config.num_hidden_layers
    if last is not None and last > blocks:
        raise HfdistError(
            f"config field {field}: {value!r} asks for more blocks than the model's {blocks} decoder blocks"
        )
    if adapter.type == "lora":
        target_module_names(one_block_model(hf_config), adapter.target_modules)


def one_block_model(hf_config) -> nn.Module:
    """The model of ``hf_config`` cut to one decoder block, on the meta device: its module names, no memory."""
    small = copy.deepcopy(hf_config)
    small.num_hidden_layers = 1
    with torch.device("meta"):
        return model_from_config(small)


def blocks_name(lm: nn.Module) -> str:
    """The module name of the list of decoder blocks (``model.layers``, ``transformer.h``)."""
    first = decoder_layers(lm)[0]
    name = next(n for n, m in lm.named_modules() if m is first)
    return name.rsplit(".", 1)[0]


def block_linear_names(lm: nn.Module) -> list[str]:
    """Names, inside one decoder block, of its linear layers (``self_attn.q_proj``, ``mlp.down_proj``, ...)."""
    block = decoder_layers(lm)[0]
    return [name for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def target_module_names(lm: nn.Module, requested: Optional[list[str]]) -> list[str]:
    """The adapter's target modules as peft matches them (a block's module whose name is, or ends with, the
    target): ``requested`` checked against the block's linear layers, or (None) every linear layer's last name."""
    linear = block_linear_names(lm)
    block_class = type(decoder_layers(lm)[0]).__name__
    if requested is None:
        if not linear:
            raise HfdistError(
                f"config field adapter.target_modules: {block_class} has no linear layers (nn.Linear) for LoRA"
            )
        return sorted({name.rsplit(".", 1)[-1] for name in linear})
    for target in requested:
        if not any(name == target or name.endswith(f".{target}") for name in linear):
            raise HfdistError(
                f"config field adapter.target_modules: {target!r} names no linear layer of {block_class} "
                f"(its linear layers: {', '.join(linear) or 'none'})"
            )
    return list(requested)


def peft_config(config: Config, lm: nn.Module, base_model_name: Optional[str] = None):
    """The peft LoraConfig of ``config.adapter`` for ``lm``: explicit target names and block indices."""
    adapter = config.adapter
    blocks = len(decoder_layers(lm))
    first = first_trainable_block(config, blocks)
    return LoraConfig(
        r=adapter.rank,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=target_module_names(lm, adapter.target_modules),
        layers_to_transform=list(range(first, blocks)),
        layers_pattern=blocks_name(lm).rsplit(".", 1)[-1],
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_name,
    )


def apply_trainable(lm: nn.Module, config: Config, device: torch.device) -> None:
    """The transform (see the module docstring), in place; on ``meta`` the adapters stay empty for the backend."""
    if config.adapter.type == "lora":
        inject_adapter_in_model(
            peft_config(config, lm), lm, adapter_name=ADAPTER_NAME, low_cpu_mem_usage=True
        )
        for _, layer in lora_layers(lm):
            for name in ("lora_A", "lora_B"):
                getattr(layer, name)[ADAPTER_NAME].to(torch.float32)
        if device.type != "meta":
            fill_initial_adapters(lm, config.train.seed, device)
        return
    last = parse_layers("train.trainable_layers", config.train.trainable_layers)
    if last is None:
        return
    for param in lm.parameters():
        param.requires_grad_(False)
    for module in trainable_modules(lm, last, config.train.train_lm_head):
        for param in module.parameters():
            param.requires_grad_(True)


def trainable_modules(lm: nn.Module, last: int, lm_head: bool) -> list[nn.Module]:
    """The last ``last`` decoder blocks, the modules registered after the blocks in their parent (the final norm),
    and the LM head when ``lm_head``."""
    modules = list(decoder_layers(lm)[-last:])
    parent_name, _, list_name = blocks_name(lm).rpartition(".")
    parent = lm.get_submodule(parent_name) if parent_name else lm
    names = list(parent._modules)
    modules += [
        parent._modules[n] for n in names[names.index(list_name) + 1 :] if parent._modules[n] is not None
    ]
    if lm_head:
        modules.append(lm.get_output_embeddings())
    return modules


# ---- adapters' weights ------------------------------------------------------------------------------------------
def lora_layers(lm: nn.Module) -> list[tuple[str, nn.Module]]:
    """(module name, peft LoRA layer) of every adapted module, in module order."""
    return [(name, m) for name, m in lm.named_modules() if isinstance(m, LoraLayer)]


def initial_adapter_weights(lm: nn.Module, seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(parameter name in ``lm``, full fp32 host tensor) of every adapter's initial A and B: peft's default
    initialisation (``reset_lora_parameters(init_lora_weights=True)``: A as ``nn.init.kaiming_uniform_(a=sqrt(5))``,
    B zero) drawn from one generator seeded with ``seed``, layer by layer in module order. One tensor at a time."""
    generator = torch.Generator().manual_seed(seed)
    for name, layer in lora_layers(lm):
        a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
        value = torch.empty(a.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=generator)
        yield f"{name}.lora_A.{ADAPTER_NAME}.weight", value
        yield f"{name}.lora_B.{ADAPTER_NAME}.weight", torch.zeros(b.shape, dtype=torch.float32)


def fill_initial_adapters(lm: nn.Module, seed: int, device: torch.device) -> None:
    """Allocate the (empty) adapters of an unsharded model on ``device`` and give them their initial values."""
    for _, layer in lora_layers(lm):
        for name in ("lora_A", "lora_B"):
            getattr(layer, name)[ADAPTER_NAME].to_empty(device=device)
    params = dict(lm.named_parameters())
    with torch.no_grad():
        for name, value in initial_adapter_weights(lm, seed):
            params[name].copy_(value)


def is_adapter_parameter(name: str) -> bool:
    return LORA_PARAMETER.match(name) is not None


def base_checkpoint_name(name: str) -> str:
    """A parameter's name in the base model's checkpoint: peft's ``.base_layer`` removed."""
    return name.replace(".base_layer.", ".")


def checkpoint_key(name: str) -> Optional[str]:
    """The name in the base model's files of a tensor of the transformed model, None for an adapter's."""
    return None if is_adapter_parameter(name) else base_checkpoint_name(name)


def count_parameters(model: nn.Module) -> dict:
    """Trainable and frozen parameter counts of a model, whole whatever its sharding."""
    trainable = sum(global_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(global_numel(p) for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable, "total": total}


def training_setup(config: Config) -> dict:
    """What trains, as recorded in checkpoints: a resume must ask for the same."""
    setup = {
        "trainable_layers": config.train.trainable_layers,
        "train_lm_head": config.train.train_lm_head,
        "adapter": asdict(config.adapter) if config.adapter.type != "none" else None,
    }
    return setup


def describe_trains(config: Config) -> str:
    """What trains, in words (plans and reports)."""
    adapter, train = config.adapter, config.train
    if adapter.type != "none":
        targets = ", ".join(adapter.target_modules) if adapter.target_modules else "every linear layer"
        return (
            f"{adapter.type} adapter (rank {adapter.rank}, alpha {adapter.alpha:g}) on {targets} of "
            f"{'all' if adapter.layers == 'all' else 'the ' + adapter.layers.replace(':', ' ')} blocks"
        )
    if train.trainable_layers == "all":
        return "every parameter"
    head = " and the LM head" if train.train_lm_head else ""
    return f"the {train.trainable_layers.replace(':', ' ')} blocks, the final norm{head}"


def count_configured_parameters(config: Config) -> dict:
    """``count_parameters`` of the model a config trains, built on the meta device and transformed (no weights)."""
    lm = load_model(config.model, torch.device("meta"))
    apply_trainable(lm, config, torch.device("meta"))
    return count_parameters(lm)


# ---- export ------------------------------------------------------------------------------------------------------
def merged_tensors(tensors: list, lm: nn.Module, full_tensor: Callable[[torch.Tensor], torch.Tensor]) -> list:
    """The base model's export tensors (``hfdist.export.ExportTensor``) with each adapter merged in, under the base
    checkpoint's names; the adapters' own tensors dropped. Each piece of an adapted weight becomes
    ``piece + alpha / r x (B A)[the piece's box]`` in fp32, computed when the piece is written (one piece at a
    time); A and B are gathered whole (``full_tensor``, every rank in the same order), the base weight never is."""
    layers = dict(lora_layers(lm))
    result = []
    for tensor in tensors:
        if is_adapter_parameter(tensor.name):
            continue
        module = tensor.name.rsplit(".base_layer.", 1)[0] if ".base_layer." in tensor.name else None
        layer = layers.get(module) if module is not None else None
        if layer is None or not tensor.name.endswith(".base_layer.weight"):
            result.append(replace(tensor, name=base_checkpoint_name(tensor.name)))
            continue
        a = full_tensor(layer.lora_A[ADAPTER_NAME].weight).float().cpu()
        b = full_tensor(layer.lora_B[ADAPTER_NAME].weight).float().cpu() * layer.scaling[ADAPTER_NAME]
        pieces = [replace(p, data=_merged_piece(p, tensor.shape, a, b)) for p in tensor.pieces]
        result.append(replace(tensor, name=base_checkpoint_name(tensor.name), pieces=pieces))
    return result


def _merged_piece(
    piece, shape: tuple[int, ...], a: torch.Tensor, b: torch.Tensor
) -> Callable[[], torch.Tensor]:
    """The merged values of one piece of a [out, in] weight, computed when called."""

    def compute() -> torch.Tensor:
        base = piece.data.detach().float().cpu()
        if piece.flat:  # a range of the flattened weight: the rows it touches, then the range within them
            start, count = piece.offset[0], piece.shape[0]
            width = shape[1]
            first, end = start // width, (start + count + width - 1) // width
            delta = (b[first:end] @ a).reshape(-1)[start - first * width : start - first * width + count]
            return base.reshape(-1) + delta
        (r0, c0), (h, w) = piece.offset, piece.shape
        return base + b[r0 : r0 + h] @ a[:, c0 : c0 + w]

    return compute


def adapter_tensors(tensors: list) -> list:
    """The adapters' tensors under the names of a PEFT adapter file (``base_model.model.<module>.lora_A.weight``)."""
    result = []
    for tensor in tensors:
        match = LORA_PARAMETER.match(tensor.name)
        if match is not None:
            name = f"{PEFT_PREFIX}{match['module']}.lora_{match['which']}.weight"
            result.append(replace(tensor, name=name))
    return result

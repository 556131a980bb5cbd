"""Small real models for tests and examples (random weights, real Hugging Face classes)."""

import gzip
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hfdist.models import save_random_imagegpt

# The families hfdist's tests build tiny random models of (transformers' config and causal-LM classes).
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),  # biases on q/k/v
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),  # per-head q/k norms
    "gemma": (GemmaConfig, GemmaForCausalLM),  # head_dim of its own, scaled embedding, GeGLU MLP
}


def tiny_causal_lm(
    family: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    max_position_embeddings: int = 512,
    num_kv_heads: int | None = None,
):
    """A randomly initialised causal LM of ``family`` (a key of FAMILIES) small enough to train in a test on a CPU."""

    config_class, model_class = FAMILIES[family]
    config = config_class(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return model_class(config).float().eval()


def tiny_llama(**kwargs):
    """A randomly initialised ``LlamaForCausalLM`` small enough to train in a test on a CPU (see tiny_causal_lm)."""
    return tiny_causal_lm("llama", **kwargs)


def tiny_tokenizer(vocab_size: int = 384):
    """A real byte-level BPE tokenizer trained in a second on the embedded Austen corpus (no network)."""

    corpus = Path(__file__).parent / "data_files" / "austen.jsonl.gz"
    with gzip.open(corpus, "rt") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(20), f)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2: as tiny_llama's pad/bos/eos
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def tiny_model_folder(folder, vocab_size: int = 384, seed: int = 0, family: str = "llama", **kwargs):
    """Save a tiny random model of ``family`` (a Llama by default; see tiny_causal_lm) and its tokenizer as a Hugging
    Face model folder; returns the folder."""
    tokenizer = tiny_tokenizer(vocab_size)
    model = tiny_causal_lm(family, vocab_size=len(tokenizer), seed=seed, **kwargs)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_imagegpt_folder(
    folder, size: int = 4, levels: int = 2, hidden_size: int = 32, num_layers: int = 2, seed: int = 0
):
    """Save a tiny random ImageGPT (no dropout) and its image processor (``size`` x ``size`` images, the
    ``levels**3`` colours of a uniform RGB grid as clusters) as a model folder; returns the folder."""

    save_random_imagegpt(
        folder,
        size=size,
        levels=levels,
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=2,
        seed=seed,
    )
    return folder

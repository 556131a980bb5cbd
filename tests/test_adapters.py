"""What trains (hfdist.adapters) on one process: the transform on a real tiny Llama, peft's own initialisation,
the fields in the config, and the matched-temperature bisection."""

import torch

from hfdist.adapters import (
    apply_trainable,
    count_parameters,
    initial_adapter_weights,
    lora_layers,
    peft_config,
    target_module_names,
)
from hfdist.config import load_config
from hfdist.metrics import matched_temperature, mean_entropy
from hfdist.testing import tiny_llama


def lora_config(*extra):
    return load_config(None, ["adapter.type=lora", "adapter.rank=4", "adapter.alpha=8", *extra])


def test_initial_adapters_are_peft_own_initialisation():
    """The values every backend copies equal what peft's reset_lora_parameters draws, layer by layer in module
    order, from a generator seeded with train.seed: A Kaiming-uniform, B zero."""
    from peft import inject_adapter_in_model

    lm = tiny_llama(num_layers=2)
    config = lora_config("train.seed=7")
    inject_adapter_in_model(peft_config(config, lm), lm)  # real tensors: peft initialises them itself
    torch.manual_seed(7)
    for _, layer in lora_layers(lm):
        layer.reset_lora_parameters("default", True)
    params = dict(lm.named_parameters())
    ours = dict(initial_adapter_weights(lm, 7))
    assert len(ours) == 2 * 7 * 2  # A and B of 7 projections in 2 blocks
    for name, value in ours.items():
        assert torch.equal(value, params[name]), name
    assert all(v.abs().max() == 0 for k, v in ours.items() if ".lora_B." in k)
    assert all(v.abs().max() > 0 for k, v in ours.items() if ".lora_A." in k)
    other = dict(initial_adapter_weights(lm, 8))
    assert not torch.equal(other[next(iter(other))], ours[next(iter(ours))])  # the seed matters


def test_lora_freezes_the_base_and_trains_only_adapters_of_chosen_blocks():
    lm = tiny_llama(num_layers=3)
    apply_trainable(lm, lora_config("adapter.layers=last:2"), torch.device("cpu"))
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n.split(".")[2] for n in trainable} == {"1", "2"}  # model.layers.<i>...: the last two blocks
    assert all(
        p.dtype == torch.float32 and p.device.type == "cpu" for n, p in lm.named_parameters() if ".lora_" in n
    )
    # The fused loss still sees a plain LM head and decoder: the model keeps its class.
    assert type(lm).__name__ == "LlamaForCausalLM" and not lm.lm_head.weight.requires_grad
    counts = count_parameters(lm)
    r, h, i, kv = 4, 64, 128, 32  # tiny_llama: hidden 64, MLP 128, 2 key/value heads of 16
    per_block = r * (h + h) + 2 * r * (h + kv) + r * (h + h) + 2 * r * (h + i) + r * (i + h)
    assert counts["trainable"] == 2 * per_block


def test_last_layers_train_the_last_blocks_and_final_norm_and_the_head_by_switch():
    lm = tiny_llama(num_layers=3, tie_word_embeddings=True)
    apply_trainable(lm, load_config(None, ["train.trainable_layers=last:1"]), torch.device("cpu"))
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in lm.named_parameters() if n.startswith("model.layers.2.")} | {
        "model.norm.weight"
    }
    lm = tiny_llama(num_layers=3, tie_word_embeddings=True)
    config = load_config(None, ["train.trainable_layers=last:1", "train.train_lm_head=true"])
    apply_trainable(lm, config, torch.device("cpu"))
    assert lm.lm_head.weight.requires_grad and lm.model.embed_tokens.weight.requires_grad  # tied: one tensor


def test_default_targets_are_every_linear_layer_of_the_blocks():
    lm = tiny_llama(num_layers=1)
    names = target_module_names(lm, None)
    assert names == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    assert target_module_names(lm, ["self_attn.q_proj", "v_proj"]) == ["self_attn.q_proj", "v_proj"]


def test_target_modules_are_a_list_in_yaml_and_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("adapter:\n  type: lora\n  target_modules: [q_proj, v_proj]\n")
    assert load_config(path).adapter.target_modules == ["q_proj", "v_proj"]
    assert load_config(None, ["adapter.target_modules=[o_proj]"]).adapter.target_modules == ["o_proj"]


def test_matched_temperature_bisection():
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 4
    base = mean_entropy(logits, 1.0)
    for target in (0.3 * base, 0.8 * base, base + 0.2):
        found = matched_temperature(logits, target)
        assert abs(mean_entropy(logits, found["temperature"]) - target) <= 1e-4
        assert (found["temperature"] < 1) == (target < base)

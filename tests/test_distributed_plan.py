"""`hfdist plan`: the model-state numbers come from real FSDP2 shards of the meta-device architecture (fake
process group at the planned world size) and agree with the plain count; the activation estimate equals
the bytes autograd really saves for a decoder layer."""
import json

import pytest
import torch

from hfdist.cli import main
from hfdist.distributed.parallelize import enable_activation_checkpointing
from hfdist.models import HyperfitModel
from hfdist.distributed.plan import (GIB, PlanSpec, activation_bytes_per_token, deepspeed_partition_numel,
                                     fsdp_shard_numels, load_hf_config, make_plan, meta_model, model_shape)

LLAMA_70B_PARAMETERS = 70_553_706_496  # the published count of Llama 3.1 70B


@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
def test_70b_plan_model_state_matches_meta_shards(nodes):
    plan = make_plan(PlanSpec(model="llama-3.1-70b", nodes=nodes, gpus_per_node=8, backend="fsdp"))
    world = 8 * nodes
    assert plan.world_size == world and plan.num_parameters == LLAMA_70B_PARAMETERS
    check = plan.model_state_check
    assert check["source"].startswith("FSDP2 shards")
    # FSDP2 pads dim 0 to a multiple of the world size: the shard is at most a fraction of a percent above P/W.
    assert 0 <= check["relative_difference"] < 2e-3
    assert check["params_per_rank_last"] <= check["params_per_rank"]
    per_gpu = plan.per_gpu
    # fp32 parameters, fp32 gradients, two fp32 Adam moments, all from the rank-0 shard.
    assert per_gpu["params_gib"] == pytest.approx(check["params_per_rank"] * 4 / GIB, abs=1e-3)
    assert per_gpu["grads_gib"] == pytest.approx(per_gpu["params_gib"], abs=1e-3)
    assert per_gpu["optimizer_gib"] == pytest.approx(2 * per_gpu["params_gib"], abs=2e-3)
    parts = sum(v for k, v in per_gpu.items() if k != "total_gib")
    assert per_gpu["total_gib"] == pytest.approx(parts, abs=5e-3)
    assert plan.fits == (per_gpu["total_gib"] <= 80 - plan.reserve_gib)
    # The paper's batch of 8 spreads over at most 8 data-parallel ranks.
    assert (plan.accumulation_steps == 1) == (world == 8)


def test_fake_process_group_shards_are_ceil_rows():
    """The meta shards follow FSDP2's rule: each parameter's dim 0 cut into ceil(rows / W) rows on rank 0."""
    import math

    model = meta_model(load_hf_config("llama-3.2-1b"), torch.float32)
    expected = sum(math.ceil(p.shape[0] / 24) * (p.numel() // p.shape[0]) for p in model.parameters())
    assert fsdp_shard_numels(model, 24)["rank0"] == expected


def test_plan_cli_json(capsys):
    assert main(["plan", "--model", "llama-3.1-70b", "--nodes", "1", "--gpus-per-node", "8", "--backend", "fsdp",
                 "--offload", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["per_gpu"]) == {"params_gib", "grads_gib", "optimizer_gib", "activations_gib", "transient_gib",
                                    "total_gib"}
    assert plan["per_gpu"]["params_gib"] == 0 and plan["host_per_gpu_gib"] > 100  # all model state on the host
    assert plan["fits"] is True and plan["world_size"] == 8 and plan["gpu_memory_gib"] == 80


def test_plan_deepspeed_text(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--nodes", "1", "--gpus-per-node", "8", "--backend",
                 "deepspeed"]) == 0
    text = capsys.readouterr().out
    assert "deepspeed" in text and "ZeRO-3 partition rule" in text and "fits" in text


def test_deepspeed_partition_rule():
    model = meta_model(load_hf_config("tinyllama-1.1b"), torch.float32)
    total = sum(p.numel() for p in model.parameters())
    per_rank = deepspeed_partition_numel(model, 16)
    assert total / 16 <= per_rank < total / 16 + len(list(model.parameters()))


def test_plan_rejects_bad_input():
    from hfdist.errors import HfdistError

    with pytest.raises(HfdistError, match="replicate-degree"):
        make_plan(PlanSpec(nodes=3, gpus_per_node=8, replicate_degree=5))
    with pytest.raises(HfdistError, match="not a shipped architecture"):
        make_plan(PlanSpec(model="no-such-model"))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_equals_saved_tensors(checkpointing):
    """Bytes autograd saves for one bf16 Llama decoder layer (parameters excluded) equal the plan's formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).to(torch.bfloat16).train()
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    batch, seq = 2, 64
    hidden = model.model.embed_tokens(torch.randint(0, 512, (batch, seq))).detach().requires_grad_()
    positions = torch.arange(seq)[None].expand(batch, -1)
    rope = model.model.rotary_emb(hidden, positions)
    layer = model.model.layers[0]
    if checkpointing:
        enable_activation_checkpointing(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_embeddings=rope, attention_mask=None, position_ids=positions)
    measured = sum(saved.values()) / (batch * seq)
    shape = model_shape("tiny", HyperfitModel(model))
    estimate = activation_bytes_per_token(shape, compute_bytes=2, checkpointing=checkpointing)
    if checkpointing:
        # Kept under checkpointing: only the layer input (bf16); the layer is recomputed in backward.
        assert measured == 2 * shape.hidden
        assert estimate["layers"] == shape.layers * 2 * shape.hidden + estimate["per_layer"]
    else:
        assert measured == estimate["per_layer"]

"""`hfdist plan`: the launch gate, and memory from real shards.

The plan refuses what the launch refuses, with the launch's own message (checked against the real CLI launch at
the same world size); the model-state numbers come from real TP and FSDP2 shards of the meta-device architecture
(fake process group at the planned world size) and agree with the plain count and with the sharding rules;
`--suggest` lists only layouts the launch accepts; the activation estimate equals the bytes autograd really saves
for a decoder layer."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfdist.cli import main
from hfdist.config import load_config
from hfdist.distributed.layout import Layout, check_layout
from hfdist.distributed.parallelize import enable_activation_checkpointing
from hfdist.distributed.plan import (
    GIB,
    Cluster,
    activation_bytes_per_token,
    deepspeed_partition_numel,
    format_plan,
    fsdp_shard_numels,
    make_plan,
    meta_model,
    model_shape,
    suggest,
    suggestion_rank,
)
from hfdist.errors import HfdistError
from hfdist.models import HyperfitModel, architecture_config

REPO = Path(__file__).resolve().parent.parent
PAPER_70B = REPO / "configs" / "paper-llama-3.1-70b.yaml"
LLAMA_70B_PARAMETERS = 70_553_706_496  # the published count of Llama 3.1 70B


def config_70b(*overrides):
    return load_config(PAPER_70B, list(overrides))


@pytest.mark.parametrize("nodes, tp", [(1, 1), (2, 2), (4, 4)])
def test_70b_plan_model_state_matches_meta_shards(nodes, tp):
    plan = make_plan(config_70b(f"distributed.tensor_parallel={tp}"), Cluster(nodes=nodes, gpus_per_node=8))
    world = 8 * nodes
    assert plan.world_size == world and plan.num_parameters == LLAMA_70B_PARAMETERS
    assert (
        plan.layout["tensor_parallel"] == tp and plan.layout["dp_size"] == 8 and plan.accumulation_steps == 1
    )
    check = plan.model_state_check
    assert check["source"].startswith("FSDP2")
    # Padding (FSDP2's ceil rows, TP's uneven vocabulary pieces): at most a fraction of a percent above P/W.
    assert 0 <= check["relative_difference"] < 2e-3
    assert check["params_per_rank_last"] <= check["params_per_rank"]
    per_gpu = plan.per_gpu
    # fp32 parameters, fp32 gradients, two fp32 Adam moments, all from the rank-0 shard.
    assert per_gpu["params_gib"] == pytest.approx(check["params_per_rank"] * 4 / GIB, abs=1e-3)
    assert per_gpu["grads_gib"] == pytest.approx(per_gpu["params_gib"], abs=1e-3)
    assert per_gpu["optimizer_gib"] == pytest.approx(2 * per_gpu["params_gib"], abs=2e-3)
    parts = sum(v for k, v in per_gpu.items() if k != "total_gib")
    assert per_gpu["total_gib"] == pytest.approx(parts, abs=5e-3)
    # On disk: fp32 weights and two moments (DCP); the export in the model's own dtype (bf16 for Llama 3).
    assert plan.disk["checkpoint_gb"] == pytest.approx(12 * LLAMA_70B_PARAMETERS / 1e9, abs=0.01)
    assert plan.disk["export_dtype"] == "bfloat16"
    assert plan.disk["export_gb"] == pytest.approx(2 * LLAMA_70B_PARAMETERS / 1e9, abs=0.01)


def test_70b_plan_on_8_nodes_with_the_3d_mesh():
    """The 3-D mesh at the paper's scale, 8 nodes x 8 GPUs: tp 8 inside each node, the 8 data-parallel ranks as 2
    replicas of 4 shards (mesh replicate 2 x shard 4 x tp 8). Rank 0's model state comes from real TP x HSDP shards
    of the meta model in a fake process group of 64 ranks and agrees with P / (shards x tp) = P / 32, as on 4 x 8 at
    tp 4 (each parameter is split 32 ways either way; the replicas hold it twice)."""
    plan = make_plan(
        config_70b("distributed.tensor_parallel=8", "distributed.replicate_degree=2"),
        Cluster(nodes=8, gpus_per_node=8),
    )
    assert plan.world_size == 64 and plan.fits and plan.accumulation_steps == 1
    assert plan.layout == {
        "tensor_parallel": 8,
        "replicate_degree": 2,
        "dp_size": 8,
        "shard_size": 4,
        "mesh": {"dp_replicate": 2, "dp_shard": 4, "tp": 8},
    }
    check = plan.model_state_check
    assert (
        check["source"]
        == "FSDP2 x TP (8) shards of the meta model in a fake process group of 64 ranks (rank 0)"
    )
    assert check["formula_params_per_rank"] == LLAMA_70B_PARAMETERS / 32
    assert 0 <= check["relative_difference"] < 2e-3
    assert plan.per_gpu["params_gib"] == pytest.approx(check["params_per_rank"] * 4 / GIB, abs=1e-3)
    print("\n" + format_plan(plan))


def test_plan_counts_the_fused_loss_by_the_kernels_own_sizing(monkeypatch):
    """One source for what the plan and the fused loss share: the plan's loss term is the kernel's fused_workspace
    at the plan's shapes (256 tokens a micro-batch, ceil(128256 / 4) head rows a rank), the head's accumulator in
    bf16 under mixed precision as the kernel accumulates a bf16 head; and the chunk budget is the kernel's:
    changing it (HFDIST_FLCE_CHUNK_MB, read by the kernel) moves the plan by exactly the kernel's change.
    test_kernels_cross_entropy.py checks fused_workspace against what the op runs."""
    from hfdist.kernels.cross_entropy import fused_workspace

    config, cluster = config_70b(), Cluster(nodes=4, gpus_per_node=8, verify_shards=False)
    rows, hidden = math.ceil(128256 / 4), 8192
    workspace = fused_workspace(256, rows, hidden, torch.bfloat16)
    assert workspace.accumulator_dtype == torch.bfloat16 and workspace.accumulator_bytes == rows * hidden * 2
    assert workspace.chunk_rows == 256  # the kernel's budget holds a micro-batch's 256 tokens at once
    plan = make_plan(config, cluster)
    monkeypatch.setenv("HFDIST_FLCE_CHUNK_MB", "1")
    smaller = fused_workspace(256, rows, hidden, torch.bfloat16)
    assert smaller.chunk_rows < 256
    replanned = make_plan(config, cluster)
    moved = replanned.per_gpu["transient_gib"] - plan.per_gpu["transient_gib"]
    assert moved == pytest.approx((smaller.chunk_bytes - workspace.chunk_bytes) / GIB, abs=1.5e-3)
    assert moved < -0.01


def test_fake_process_group_shards_follow_the_tp_and_fsdp_rules():
    """Rank 0 of tp 2 x dp 4 holds, of every column-parallel weight (and the vocabulary-sharded embedding/head),
    ceil(ceil(rows / 2) / 4) rows; of every row-parallel weight ceil(rows / 4) rows of ceil(cols / 2) columns; of
    every norm ceil(rows / 4) entries."""
    model = meta_model(architecture_config("llama-3.2-1b"), torch.float32)
    expected = 0
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            expected += math.ceil(p.shape[0] / 4) * math.ceil(p.shape[1] / 2)
        elif p.dim() == 2:
            expected += math.ceil(math.ceil(p.shape[0] / 2) / 4) * p.shape[1]
        else:
            expected += math.ceil(p.shape[0] / 4)
    assert (
        fsdp_shard_numels(model, Layout(world_size=8, ranks_per_node=8, tensor_parallel=2))["rank0"]
        == expected
    )


def test_fake_process_group_shards_without_tp_are_ceil_rows():
    model = meta_model(architecture_config("llama-3.2-1b"), torch.float32)
    expected = sum(math.ceil(p.shape[0] / 24) * (p.numel() // p.shape[0]) for p in model.parameters())
    assert fsdp_shard_numels(model, Layout(world_size=24, ranks_per_node=8))["rank0"] == expected


def launch_error(config_path: Path, world_size: int, ranks_per_node: int, tmp_path: Path, *sets: str) -> str:
    """The one stderr line of the real CLI launch on rank 0 of a torchrun job of ``world_size`` ranks (the check
    runs before the process group waits for peers, so no other rank is needed)."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(ranks_per_node),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29998",
    }
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hfdist.cli",
            "hyperfit",
            str(config_path),
            "--output-dir",
            str(tmp_path / "run"),
            "--no-progress",
            *args,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


def plan_error(config_path: Path, nodes: int, *sets: str) -> str:
    args = [a for s in sets for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "hfdist.cli", "plan", str(config_path), "--nodes", str(nodes), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("hfdist: error")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_plan_is_the_launch_gate(tmp_path):
    """The paper's 70B config on 4 x 8 H100-80GB is accepted and fits; at tensor_parallel 1 the launch refuses it
    (32 data-parallel ranks cannot split a batch of 8) and the plan refuses it with the launch's own line."""
    plan = make_plan(config_70b(), Cluster(nodes=4, gpus_per_node=8))
    assert plan.fits and plan.layout["tensor_parallel"] == 4 and plan.world_size == 32
    refused = launch_error(PAPER_70B, 32, 8, tmp_path, "distributed.tensor_parallel=1")
    assert (
        "train.global_batch_size: 8 is not divisible by train.micro_batch_size (1) x data-parallel size (32)"
        in refused
    )
    assert plan_error(PAPER_70B, 4, "distributed.tensor_parallel=1") == refused
    # The 2 x 8 config: accepted there and fits.
    two_nodes = make_plan(load_config(REPO / "configs" / "paper-llama-3.1-70b-2x8.yaml"), Cluster(nodes=2))
    assert two_nodes.fits and two_nodes.accumulation_steps == 2


@pytest.mark.parametrize(
    "sets, message",
    [
        (("distributed.tensor_parallel=3",), "distributed.tensor_parallel: 3 does not divide the 32 ranks"),
        (
            ("distributed.tensor_parallel=16",),
            "distributed.tensor_parallel: 16 does not divide the 8 ranks per node",
        ),
        (
            ("distributed.tensor_parallel=4", "distributed.backend=deepspeed"),
            "distributed.tensor_parallel: 4 needs distributed.backend=fsdp",
        ),
        (
            ("distributed.replicate_degree=3",),
            "distributed.replicate_degree: 3 does not divide the 8 data-parallel ranks",
        ),
    ],
)
def test_plan_refuses_what_the_launch_refuses(sets, message, tmp_path):
    refused = launch_error(PAPER_70B, 32, 8, tmp_path, *sets)
    assert message in refused
    assert plan_error(PAPER_70B, 4, *sets) == refused


def test_tensor_parallel_above_the_kv_heads_is_refused():
    config = load_config(
        None,
        [
            "model.path=tinyllama-1.1b",
            "distributed.backend=fsdp",
            "train.micro_batch_size=1",
            "distributed.tensor_parallel=8",
        ],
    )
    with pytest.raises(HfdistError, match="tensor_parallel: 8 exceeds the model's 4 key/value heads"):
        make_plan(config, Cluster(nodes=1, gpus_per_node=8))


def test_suggest_lists_only_layouts_the_launch_accepts():
    config = config_70b()
    cluster = Cluster(nodes=2, gpus_per_node=8, verify_shards=False)
    found = suggest(config, cluster)
    assert found, "the 70B recipe fits 2 x 8 H100 in some layout"
    hf_config = architecture_config("llama-3.1-70b")
    keys = []
    for overrides, plan in found:
        candidate = load_config(PAPER_70B, [f"{k}={str(v).lower()}" for k, v in overrides.items()])
        check_layout(candidate, 16, 8, hf_config)  # raises if the launch would refuse it
        assert plan.fits and plan.per_gpu["total_gib"] <= 76
        assert plan.per_node_host["peak_gib"] <= 2048
        keys.append(suggestion_rank(overrides, plan, cluster))
    # The stated rule: no offload, small tp, no checkpointing, node-local HSDP shards, less memory first.
    assert keys == sorted(keys)
    assert all(
        o["distributed.tensor_parallel"] >= 2 for o, _ in found
    )  # tp 1: 16 ranks cannot split a batch of 8
    assert not found[0][0]["distributed.cpu_offload"]


def test_plan_cli_json(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-3.1-70b",
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
                "--offload",
                "--json",
            ]
        )
        == 0
    )
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["per_gpu"]) == {
        "params_gib",
        "grads_gib",
        "optimizer_gib",
        "activations_gib",
        "transient_gib",
        "total_gib",
    }
    assert plan["per_gpu"]["params_gib"] == 0
    assert (
        plan["per_node_host"]["offloaded_state_gib"] > 8 * 100
    )  # all model state on the hosts: 16 B/parameter
    assert plan["fits"] is True and plan["world_size"] == 8 and plan["gpu_memory_gib"] == 80
    assert plan["layout"] == {
        "tensor_parallel": 1,
        "replicate_degree": 1,
        "dp_size": 8,
        "shard_size": 8,
        "mesh": {"dp_shard": 8},
    }


def test_plan_suggest_cli(capsys):
    assert main(["plan", str(PAPER_70B), "--nodes", "4", "--suggest", "--no-verify", "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "fastest first" in text and "--set distributed.tensor_parallel=4" in text


def test_plan_deepspeed_text(capsys):
    assert (
        main(
            [
                "plan",
                "--model",
                "llama-3.1-8b",
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
                "--backend",
                "deepspeed",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "deepspeed" in text and "ZeRO-3 partition rule" in text and "fits" in text


def test_deepspeed_partition_rule():
    model = meta_model(architecture_config("tinyllama-1.1b"), torch.float32)
    total = sum(p.numel() for p in model.parameters())
    per_rank = deepspeed_partition_numel(model, 16)
    assert total / 16 <= per_rank < total / 16 + len(list(model.parameters()))


def test_plan_rejects_bad_input():
    with pytest.raises(HfdistError, match="plan --nodes: must be >= 1"):
        make_plan(config_70b(), Cluster(nodes=0))
    with pytest.raises(HfdistError, match="model.path 'no-such-model': cannot read its config.json"):
        make_plan(load_config(None, ["model.path=no-such-model"]), Cluster(nodes=1, gpus_per_node=1))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_equals_saved_tensors(checkpointing):
    """Bytes autograd saves for one bf16 Llama decoder layer (parameters excluded) equal the plan's formula."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attn_implementation="sdpa",
    )
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


# ---- what trains (hfdist.adapters): frozen parameters carry no gradient or optimizer state ------------------------


def lora_parameters(hf_config, rank: int, blocks: int) -> int:
    """LoRA's A (r x in) and B (out x r) on q, k, v, o, gate, up and down of ``blocks`` Llama blocks."""
    h, i = hf_config.hidden_size, hf_config.intermediate_size
    kv = hf_config.num_key_value_heads * (hf_config.hidden_size // hf_config.num_attention_heads)
    shapes = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out) of each projection
    return blocks * sum(rank * (n_in + n_out) for n_in, n_out in shapes)


def test_70b_lora_rank_16_fits_one_node_of_8_h100():
    """The paper's 70B recipe with LoRA (rank 16, attention + MLP) on 1 x 8 H100-80GB: the frozen fp32 base costs
    its 4 bytes per parameter only, the adapter its weights, gradients and two Adam moments; the full recipe on the
    same node (tp 1) does not fit."""
    config = load_config(REPO / "configs" / "paper-llama-3.1-70b-lora.yaml")
    plan = make_plan(config, Cluster(nodes=1, gpus_per_node=8))
    adapter = lora_parameters(architecture_config("llama-3.1-70b"), 16, 80)
    assert plan.trainable_parameters == adapter == plan.adapter_parameters
    assert plan.num_parameters == LLAMA_70B_PARAMETERS + adapter
    check, per_gpu = plan.model_state_check, plan.per_gpu
    assert check["source"].startswith("FSDP2")
    trained = math.ceil(adapter / 8)  # every LoRA matrix has rows divisible by 8 here: no padding
    assert per_gpu["params_gib"] == pytest.approx(check["params_per_rank"] * 4 / GIB, abs=1e-3)
    assert per_gpu["grads_gib"] == pytest.approx(trained * 4 / GIB, abs=1e-3)
    assert per_gpu["optimizer_gib"] == pytest.approx(2 * trained * 4 / GIB, abs=1e-3)
    assert plan.fits and per_gpu["total_gib"] < 60
    assert plan.disk["checkpoint_gb"] == pytest.approx(12 * adapter / 1e9, abs=0.01)
    assert plan.disk["export_gb"] == pytest.approx(2 * LLAMA_70B_PARAMETERS / 1e9, abs=0.01)  # merged, bf16
    full = make_plan(config_70b("distributed.tensor_parallel=1"), Cluster(nodes=1, gpus_per_node=8))
    assert not full.fits and full.per_gpu["total_gib"] > 150


def test_70b_last5_trains_five_blocks_and_keeps_their_activations_only():
    config = load_config(REPO / "configs" / "paper-llama-3.1-70b-last5.yaml")
    plan = make_plan(config, Cluster(nodes=1, gpus_per_node=8))
    model = meta_model(architecture_config("llama-3.1-70b"), torch.float32)
    block = sum(p.numel() for p in model.lm.model.layers[-1].parameters())
    assert plan.trainable_parameters == 5 * block + model.lm.model.norm.weight.numel()
    assert plan.fits and plan.per_gpu["total_gib"] < 60
    full = make_plan(config_70b("distributed.tensor_parallel=1"), Cluster(nodes=1, gpus_per_node=8))
    # Blocks 0-74 need no gradient: they keep no activations (the loss's share is the same in both).
    shape = model_shape("70b", model)
    per_layer = activation_bytes_per_token(shape, compute_bytes=2, checkpointing=False)["per_layer"]
    saved = 75 * per_layer * 256 / GIB
    assert full.per_gpu["activations_gib"] - plan.per_gpu["activations_gib"] == pytest.approx(saved, abs=2e-3)


def test_8b_lora_fits_one_gpu():
    config = load_config(REPO / "configs" / "paper-llama-3.1-8b-lora.yaml")
    plan = make_plan(config, Cluster(nodes=1, gpus_per_node=1))
    assert plan.world_size == 1 and plan.backend == "single" and plan.fits
    assert plan.trainable_parameters == lora_parameters(architecture_config("llama-3.1-8b"), 16, 32)
    full = make_plan(
        load_config(REPO / "configs" / "paper-llama-3.1-8b.yaml", ["distributed.backend=single"]),
        Cluster(nodes=1, gpus_per_node=1),
    )
    assert not full.fits and full.per_gpu["total_gib"] > 100  # 16 bytes per parameter


def test_plan_refuses_an_adapter_with_tensor_parallelism_as_the_launch_does(tmp_path):
    refused = launch_error(PAPER_70B, 32, 8, tmp_path, "adapter.type=lora")
    assert (
        "config field adapter.type: adapter.type lora is not supported with distributed.tensor_parallel 4"
        in refused
    )
    assert plan_error(PAPER_70B, 4, "adapter.type=lora") == refused


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ("train.trainable_layers=last:81",),
            "config field train.trainable_layers: 'last:81' asks for more blocks than the model's 80 decoder blocks",
        ),
        (
            ("adapter.type=lora", "adapter.target_modules=[wq]"),
            "config field adapter.target_modules: 'wq' names no linear layer of LlamaDecoderLayer",
        ),
    ],
)
def test_plan_and_launch_check_what_trains_against_the_model(sets, message):
    """Depth and module names come from the model's config, read where the launch reads it (``launch_layout``) and
    where the plan does: the same check, the same line."""
    from hfdist.distributed.layout import launch_layout

    config = config_70b("distributed.tensor_parallel=1", "train.global_batch_size=32", *sets)
    with pytest.raises(HfdistError) as launch:
        launch_layout(config, 32, 8, architecture_config("llama-3.1-70b"))
    with pytest.raises(HfdistError) as plan:
        make_plan(config, Cluster(nodes=4, gpus_per_node=8))
    assert message in str(launch.value) and str(plan.value) == str(launch.value)


def test_plan_of_an_image_model_counts_its_parameters():
    """ImageGPT has no Auto causal-LM class and GPT-2-style config names: the plan builds it all the same."""
    from hfdist.models import load_model

    config = load_config(REPO / "configs" / "demo-image.yaml")
    plan = make_plan(config, Cluster(nodes=1, gpus_per_node=1))
    model = load_model(config.model, torch.device("meta"))
    assert plan.num_parameters == sum(p.numel() for p in model.parameters())
    assert plan.fits

"""Tensor parallelism composed with FSDP2 (and HSDP, and both: the 3-D mesh) against one process, on gloo ranks,
on the shapes that matter for Llama 3.1 70B.

One seeded run of a tiny Llama shaped like the 70B where tensor parallelism can go wrong: an untied input embedding
and LM head (each vocabulary-sharded on its own), grouped-query attention (8 heads, 4 key/value heads), a vocabulary
of 397 (prime: no tensor-parallel degree divides it, so the shards differ by a row), and micro-batches of one
sequence, so that every layout accumulates gradients over several of them. 4 optimizer steps of 12 sequences are
repeated under launchers/torchrun.sh: dp 2 x tp 2 (tp below the key/value heads; 6 micro-batches per rank), tp 4
(tp equal to them; 12), HSDP replicate 2 x shard 2 (3) and on 8 ranks the 3-D mesh replicate 2 x shard 2 x tp 2 (3).
Per-step loss and gradient norm agree within 1e-5 relative, exported weights within 1e-5 absolute. The 3-D run's
checkpoint resumes on one process and on dp 2 x tp 2. More tensor-parallel ranks than key/value heads (tp 8) is
refused in one line, by the launch and by `hfdist plan` alike.

The optimizer settings (Adam lr 1e-3, eps 1e-6) keep the weight comparison meaningful: tensor parallelism sums the
matrix products of a layer in another order (row-parallel projections add the ranks' partial outputs), so the
gradients differ from one process's by float32 rounding (~1e-7 relative). Adam divides by sqrt(v) + eps, which turns
a rounding difference on a near-zero gradient element into an update difference of up to lr / eps times it: 3e5 at
lr 3e-3 and eps 1e-8 (weights then differed by up to 3.5e-5 while the mean difference was 1e-7), 1e3 here. Nothing
about the parallel arithmetic is loosened: the same settings run in one process.
"""

import json
import shutil
import sys

import pytest
from launch_helpers import (
    LAUNCHERS,
    assert_matches,
    hyperfit_args,
    launch_env,
    run,
    step_records,
    tiny_run_setup,
)

pytestmark = pytest.mark.distributed

CONFIG = """\
model: {{path: {model}}}
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 24, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 1.0e-3, eps: 1.0e-6}}
train: {{epochs: 2, global_batch_size: 12, micro_batch_size: 1, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
checkpoint: {{every_steps: 2, keep_last: 2}}
"""
VOCAB, HEADS, KV_HEADS = 397, 8, 4
STEPS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(
        tmp_path_factory.mktemp("tensor-parallel"),
        CONFIG,
        vocab_size=VOCAB,
        num_heads=HEADS,
        num_kv_heads=KV_HEADS,
        tie_word_embeddings=False,
    )


@pytest.fixture(scope="module")
def single_run(setup):
    run_dir = setup["root"] / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir)], launch_env())
    assert len(step_records(run_dir)) == STEPS
    return run_dir


def torchrun(setup, name: str, ranks: int, *sets: str, resume=None, timeout: int = 300):
    run_dir = setup["root"] / name
    args = ["--set", "distributed.backend=fsdp"] + [a for s in sets for a in ("--set", s)]
    args += ["--resume", resume] if resume else []
    output = run(
        [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, *args)],
        launch_env(GPUS_PER_NODE=str(ranks)),
        timeout=timeout,
    )
    return run_dir, output


def mesh_of(run_dir, step=STEPS):
    return json.loads((run_dir / "checkpoints" / f"step_{step:08d}" / "topology.json").read_text())["mesh"]


@pytest.fixture(scope="module")
def mesh_3d_run(setup):
    """8 ranks: replicate 2 x shard 2 x tp 2 (3 micro-batches per data-parallel rank)."""
    return torchrun(
        setup, "3d", 8, "distributed.tensor_parallel=2", "distributed.replicate_degree=2", timeout=600
    )[0]


def test_tiny_model_has_the_70b_shapes_that_matter(setup):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(setup["model"])
    assert not config.tie_word_embeddings
    assert (config.num_attention_heads, config.num_key_value_heads) == (HEADS, KV_HEADS)
    assert config.vocab_size == VOCAB and all(VOCAB % tp for tp in (2, 4, 8))


def test_dp2_x_tp2_below_the_kv_heads_matches_one_process(setup, single_run):
    run_dir, _ = torchrun(setup, "dp2-tp2", 4, "distributed.tensor_parallel=2")
    assert mesh_of(run_dir) == {"dp_shard": 2, "tp": 2}
    assert_matches(run_dir, single_run)


def test_tp4_at_the_kv_heads_matches_one_process(setup, single_run):
    """Also the other weight-loading path (rank 0 reads the whole model, the 2-D shards are broadcast) and
    activation checkpointing, neither of which may change a float32 result."""
    run_dir, _ = torchrun(
        setup,
        "tp4",
        4,
        "distributed.tensor_parallel=4",
        "distributed.weight_loading=rank0_broadcast",
        "train.activation_checkpointing=true",
    )
    assert mesh_of(run_dir) == {"dp_shard": 1, "tp": 4}
    assert_matches(run_dir, single_run)


def test_hsdp_replicate2_x_shard2_matches_one_process(setup, single_run):
    """A real HSDP mesh: parameters sharded over 2 ranks and replicated across 2 such groups; gradients
    all-reduced across the replicas on the last micro-batch of each step only (test_distributed_hsdp.py counts it)."""
    run_dir, _ = torchrun(setup, "hsdp-2x2", 4, "distributed.replicate_degree=2")
    assert mesh_of(run_dir) == {"dp_replicate": 2, "dp_shard": 2}
    assert_matches(run_dir, single_run)


def test_3d_mesh_on_8_ranks_matches_one_process(single_run, mesh_3d_run):
    assert mesh_of(mesh_3d_run) == {"dp_replicate": 2, "dp_shard": 2, "tp": 2}
    assert_matches(mesh_3d_run, single_run)


def resumable_copy(setup, source, name):
    """A copy of ``source`` without its final model, to resume from its step-2 checkpoint."""
    run_dir = setup["root"] / name
    shutil.copytree(source, run_dir)
    shutil.rmtree(run_dir / "model")
    return run_dir, run_dir / "checkpoints" / "step_00000002"


def test_3d_checkpoint_resumes_on_one_process(setup, mesh_3d_run):
    """The DCP shards of the 3-D mesh (DTensors over replicate, shard and tp) load into one unsharded process; the
    curve continues."""
    run_dir, checkpoint = resumable_copy(setup, mesh_3d_run, "3d-resumed-on-one")
    run(
        [
            sys.executable,
            "-m",
            "hfdist.cli",
            "hyperfit",
            *hyperfit_args(setup, run_dir, "--resume", checkpoint),
        ],
        launch_env(),
    )
    assert_matches(run_dir, mesh_3d_run, steps=(3, 4))


def test_3d_checkpoint_resumes_on_dp2_x_tp2(setup, mesh_3d_run):
    run_dir, checkpoint = resumable_copy(setup, mesh_3d_run, "3d-resumed-on-dp2-tp2")
    torchrun(setup, run_dir.name, 4, "distributed.tensor_parallel=2", resume=checkpoint)
    assert mesh_of(run_dir) == {"dp_shard": 2, "tp": 2}
    assert_matches(run_dir, mesh_3d_run, steps=(3, 4))


def test_more_tensor_parallel_ranks_than_kv_heads_is_refused(setup, tmp_path):
    """tp 8 > 4 key/value heads: refused before any process waits for its peers, by the launch (rank 0 of an
    8-rank job) and by `hfdist plan` (1 node x 8 GPUs), with the same line."""
    from test_distributed_plan import launch_error, plan_error

    sets = ("distributed.backend=fsdp", "distributed.tensor_parallel=8")
    refused = launch_error(setup["config"], 8, 8, tmp_path, *sets)
    assert refused == (
        "hfdist: error: config field distributed.tensor_parallel: 8 exceeds the model's 4 key/value heads "
        "(each tensor-parallel rank computes whole key/value heads; replicating them is not supported)"
    )
    assert plan_error(setup["config"], 1, *sets) == refused

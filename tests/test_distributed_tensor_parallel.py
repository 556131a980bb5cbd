"""Tensor parallelism composed with FSDP2, and a real HSDP mesh, against one process, on 4 gloo ranks.

One seeded run of a tiny Llama with tied embeddings and an odd vocabulary (383 tokens: the vocabulary shards of
the LM head and the embedding differ by a row) and 4 heads / 4 key-value heads (so that 4 tensor-parallel ranks
split them), 8 optimizer steps of 8 sequences, is repeated under launchers/torchrun.sh on 4 processes:
dp 2 x tp 2, tp 4, and HSDP replicate 2 x shard 2. Per-step loss and gradient norm agree within 1e-5 relative,
exported weights within 1e-5 absolute.

The optimizer settings (Adam lr 1e-3, eps 1e-6) keep that last comparison meaningful: tensor parallelism sums the
matrix products of a layer in another order (row-parallel projections add the ranks' partial outputs), so the
gradients differ from one process's by float32 rounding (~1e-7 relative, seen at step 1). Adam divides by
sqrt(v) + eps, which turns a rounding difference on a near-zero gradient element into an update difference of up
to lr / eps times it: 3e5 at lr 3e-3 and eps 1e-8 (then weights differed by up to 3.5e-5 while the mean
difference was 1e-7), 1e3 here, where the largest weight difference seen was 1.5e-6 (losses and gradient norms:
2.3e-7 relative). Nothing about the parallel arithmetic is loosened: the same settings run in one process.
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
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 16, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 1.0e-3, eps: 1.0e-6}}
train: {{epochs: 4, global_batch_size: 8, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
checkpoint: {{every_steps: 2, keep_last: 2}}
"""
VOCAB = 383


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_run_setup(
        tmp_path_factory.mktemp("tensor-parallel"),
        CONFIG,
        vocab_size=VOCAB,
        num_heads=4,
        num_kv_heads=4,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="module")
def single_run(setup):
    run_dir = setup["root"] / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir)], launch_env())
    return run_dir


def torchrun_4(setup, name: str, *sets: str):
    run_dir = setup["root"] / name
    args = ["--set", "distributed.backend=fsdp"] + [a for s in sets for a in ("--set", s)]
    output = run(
        [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, *args)], launch_env(GPUS_PER_NODE="4")
    )
    return run_dir, output


def mesh_of(run_dir):
    return json.loads((run_dir / "checkpoints" / "step_00000008" / "topology.json").read_text())["mesh"]


@pytest.fixture(scope="module")
def dp2_tp2_run(setup):
    return torchrun_4(setup, "dp2-tp2", "distributed.tensor_parallel=2")[0]


def test_tiny_model_is_tied_with_an_odd_vocabulary(setup):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(setup["model"])
    assert config.tie_word_embeddings and config.vocab_size == VOCAB and VOCAB % 2 == 1


def test_dp2_x_tp2_matches_one_process(single_run, dp2_tp2_run):
    assert mesh_of(dp2_tp2_run) == {"dp_shard": 2, "tp": 2}
    assert len(step_records(single_run)) == 8
    assert_matches(dp2_tp2_run, single_run)


def test_tp4_matches_one_process(setup, single_run):
    """Also the other weight-loading path (rank 0 reads the whole model, the 2-D shards are broadcast) and
    activation checkpointing, neither of which may change a float32 result."""
    run_dir, _ = torchrun_4(
        setup,
        "tp4",
        "distributed.tensor_parallel=4",
        "distributed.weight_loading=rank0_broadcast",
        "train.activation_checkpointing=true",
    )
    assert mesh_of(run_dir) == {"dp_shard": 1, "tp": 4}
    assert_matches(run_dir, single_run)


def test_hsdp_replicate2_x_shard2_matches_one_process(setup, single_run):
    """A real HSDP mesh: parameters sharded over 2 ranks and replicated across 2 such groups; gradients
    all-reduced across the replicas on the last micro-batch of each step only."""
    run_dir, _ = torchrun_4(setup, "hsdp-2x2", "distributed.replicate_degree=2")
    assert mesh_of(run_dir) == {"dp_replicate": 2, "dp_shard": 2}
    assert_matches(run_dir, single_run)


def test_tensor_parallel_checkpoint_resumes_on_one_process(setup, dp2_tp2_run):
    """The DCP shards of a dp 2 x tp 2 run (2-D DTensors) load into one unsharded process; the curve continues."""
    run_dir = setup["root"] / "tp-resumed-on-one"
    shutil.copytree(dp2_tp2_run, run_dir)
    shutil.rmtree(run_dir / "model")
    checkpoint = run_dir / "checkpoints" / "step_00000006"
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
    assert_matches(run_dir, dp2_tp2_run, steps=(7, 8))

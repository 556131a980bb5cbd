"""Tensor parallelism on the model families that declare a plan, against one process, on 2 gloo ranks (tp 2).

The plan of each family is read from its own transformers config (``base_model_tp_plan``) with hfdist's overrides
(``hfdist.distributed.parallelize``): tiny random models of Qwen2 (biases on q/k/v, split with their rows), Qwen3
(per-head q/k norms: weights whole on every rank, gradients all-reduced over the tensor-parallel ranks) and Gemma
(tied embeddings, a head dimension of its own, a scaled input embedding) train 4 optimizer steps of 4 sequences
(2 micro-batches) on one process and under launchers/torchrun.sh at tp 2; per-step loss and gradient norm agree
within 1e-5 relative, exported weights within 1e-5 absolute (the Llama family: test_distributed_tensor_parallel.py).
A family with no plan (ImageGPT) is refused in one line naming it, by the launch and by `hfdist plan` alike.
"""

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
data: {{source: austen, mode: chunk, seq_len: 32, num_samples: 8, num_validation: 4, num_contexts: 2, context_len: 8}}
optim: {{name: adam, lr: 1.0e-3, eps: 1.0e-6}}
train: {{epochs: 2, global_batch_size: 4, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, total_len: 48, ttr_window: 16, batch_size: 4}}
"""
FAMILIES = {
    "qwen2": dict(tie_word_embeddings=False),
    "qwen3": dict(tie_word_embeddings=False),
    "gemma": dict(tie_word_embeddings=True),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_tp2_matches_one_process(family, tmp_path):
    setup = tiny_run_setup(tmp_path, CONFIG, family=family, num_heads=4, num_kv_heads=2, **FAMILIES[family])
    single = tmp_path / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, single)], launch_env())
    assert len(step_records(single)) == 4
    tp2 = tmp_path / "tp2"
    sets = ["--set", "distributed.backend=fsdp", "--set", "distributed.tensor_parallel=2"]
    run([LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, tp2, *sets)], launch_env(GPUS_PER_NODE="2"))
    assert_matches(tp2, single)


def test_model_without_a_plan_is_refused_naming_its_family(tmp_path):
    from test_distributed_plan import launch_error, plan_error

    from hfdist.testing import tiny_imagegpt_folder

    model = tiny_imagegpt_folder(tmp_path / "tiny-imagegpt", size=4, levels=8)
    config = tmp_path / "image.yaml"
    config.write_text(
        f"model: {{path: {model}}}\n"
        "data: {modality: image, source: digits, seq_len: 17, num_samples: 16, num_validation: 4, "
        "num_contexts: 2}\n"
        "train: {epochs: 1, global_batch_size: 8, micro_batch_size: 2}\n"
        "eval: {every_epochs: 0, ttr_window: 8, batch_size: 4}\n"
    )
    sets = ("distributed.backend=fsdp", "distributed.tensor_parallel=2")
    refused = launch_error(config, 8, 8, tmp_path, *sets)
    assert refused.startswith(
        "hfdist: error: config field distributed.tensor_parallel: model family 'imagegpt' declares no "
        "tensor-parallel plan"
    )
    assert plan_error(config, 1, *sets) == refused

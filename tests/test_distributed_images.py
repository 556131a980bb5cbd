"""Images through the sharded backends: a tiny random ImageGPT hyperfitted on the embedded digits by the single
backend, FSDP2 on 2 processes (launchers/torchrun.sh) and DeepSpeed ZeRO-3 on 2 processes (launchers/deepspeed.sh),
each rank accumulating 2 micro-batches a step, compared with the text test's helpers and tolerances: per-step loss
and gradient norm within 1e-5 relative, exported weights within 1e-5 absolute. Adam's eps is 1e-6, as in the
tensor-parallel tests: at 1e-8 a float32 rounding difference on a near-zero gradient element moved a weight by 6e-6
on 2 ranks. FSDP shards ImageGPT block by block (transformer.h.*), found by the general block rule."""

import sys

import pytest
from launch_helpers import LAUNCHERS, assert_matches, hyperfit_args, launch_env, run, step_records
from test_distributed_training import DS_FP32, STEPS

CONFIG = """\
model: {{path: {model}}}
data: {{modality: image, source: digits, seq_len: 17, num_samples: 16, num_validation: 4, num_contexts: 2}}
optim: {{name: adam, lr: 3.0e-3, eps: 1.0e-6}}
train: {{epochs: 4, global_batch_size: 8, micro_batch_size: 2, seed: 0}}
eval: {{every_epochs: 0, ttr_window: 8, batch_size: 4}}
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from hfdist.testing import tiny_imagegpt_folder

    root = tmp_path_factory.mktemp("distributed-images")
    model = tiny_imagegpt_folder(root / "tiny-imagegpt", size=4, levels=8)
    config = root / "tiny-image.yaml"
    config.write_text(CONFIG.format(model=model))
    return {"root": root, "model": model, "config": config}


@pytest.fixture(scope="module")
def single_run(setup):
    run_dir = setup["root"] / "single"
    run([sys.executable, "-m", "hfdist.cli", "hyperfit", *hyperfit_args(setup, run_dir)], launch_env())
    assert len(step_records(run_dir)) == STEPS
    return run_dir


def test_fsdp_blocks_of_imagegpt(setup):
    """The units FSDP2 makes of ImageGPT: its input embedding (untied: the head has 512 rows, the vocabulary 513),
    each block of transformer.h, and the root with the head."""
    from hfdist.config import ModelConfig
    from hfdist.distributed.parallelize import fsdp_units
    from hfdist.models import HyperfitModel, load_model

    model = HyperfitModel(load_model(ModelConfig(path=str(setup["model"]))))
    names = [name for name, _ in fsdp_units(model)]
    assert names == ["lm.transformer.wte", "lm.transformer.h.0", "lm.transformer.h.1", "root"]


def test_llama_fsdp_units_unchanged():
    from hfdist.distributed.parallelize import fsdp_units
    from hfdist.models import HyperfitModel
    from hfdist.testing import tiny_llama

    assert [n for n, _ in fsdp_units(HyperfitModel(tiny_llama()))] == [
        "lm.model.embed_tokens",
        "lm.model.layers.0",
        "lm.model.layers.1",
        "root",
    ]
    assert [n for n, _ in fsdp_units(HyperfitModel(tiny_llama(tie_word_embeddings=True)))] == [
        "lm.model.layers.0",
        "lm.model.layers.1",
        "root",
    ]


@pytest.mark.distributed
def test_fsdp_two_processes_match_single(setup, single_run):
    run_dir = setup["root"] / "fsdp"
    run(
        [LAUNCHERS / "torchrun.sh", *hyperfit_args(setup, run_dir, "--set", "distributed.backend=fsdp")],
        launch_env(GPUS_PER_NODE="2"),
    )
    assert_matches(run_dir, single_run)


@pytest.mark.distributed
def test_deepspeed_zero3_two_processes_match_single(setup, single_run):
    pytest.importorskip("deepspeed")
    run_dir = setup["root"] / "deepspeed"
    run(
        [LAUNCHERS / "deepspeed.sh", *hyperfit_args(setup, run_dir)],
        launch_env(NUM_GPUS="2", DS_CONFIG=str(DS_FP32)),
    )
    assert_matches(run_dir, single_run)

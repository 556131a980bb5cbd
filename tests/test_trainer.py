"""End-to-end single-process hyperfitting on a tiny real model: loss falls, runs repeat exactly, the model
exports and loads back, metrics land in metrics.jsonl and in TensorBoard event files."""

import json

import pytest
import torch

from hfdist.config import load_config
from hfdist.errors import HfdistError
from hfdist.monitor import read_metrics
from hfdist.trainer import train

OVERRIDES = [
    "data.seq_len=32",
    "data.num_samples=16",
    "data.num_validation=4",
    "data.num_contexts=2",
    "data.context_len=8",
    "data.mode=chunk",
    "eval.total_len=48",
    "eval.ttr_window=16",
    "train.epochs=8",
    "optim.lr=1e-2",
    "eval.every_epochs=4",
]


def _run(model_dir, run_dir, *extra):
    config = load_config(None, OVERRIDES + [f"model.path={model_dir}", *extra])
    return train(config, run_dir, progress=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from hfdist.testing import tiny_model_folder

    root = tmp_path_factory.mktemp("trainer")
    model_dir = tiny_model_folder(root / "tiny")
    run_dir = root / "run"
    summary = _run(model_dir, run_dir)
    return model_dir, run_dir, summary


def test_loss_falls_and_run_folder_is_complete(finished_run):
    _, run_dir, summary = finished_run
    records = read_metrics(run_dir / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert len(steps) == 16 and len(epochs) == 8
    assert [e["step"] for e in evals] == [0, 8, 16]  # before, every 4 epochs (the last one is the final eval)
    assert epochs[-1]["train/loss"] < 0.8 * epochs[0]["train/loss"]
    assert evals[-1]["eval/entropy"] < evals[0]["eval/entropy"]  # predictions sharpen as it hyperfits
    for key in ("train/loss", "train/entropy", "train/grad_norm", "train/lr", "perf/tokens_per_s"):
        assert key in steps[0]
    for name in (
        "config.yaml",
        "summary.json",
        "data/train_token_ids.npy",
        "data/contexts.npy",
        "data/selection.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ):
        assert (run_dir / name).is_file(), name
    assert summary["steps"] == 16 and summary["stopped_by"] == "epochs"
    assert json.loads((run_dir / "summary.json").read_text())["hyperfitted"]["eval/ttr16"] > 0


def test_tensorboard_tags_read_back(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir, _ = finished_run
    accumulator = EventAccumulator(str(run_dir / "tb"))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for tag in (
        "train/loss",
        "train/entropy",
        "train/grad_norm",
        "train/lr",
        "perf/tokens_per_s",
        "eval/loss",
        "eval/entropy",
        "eval/ttr16",
        "epoch/loss",
    ):
        assert tag in tags, tag
    losses = [e.value for e in accumulator.Scalars("train/loss")]
    jsonl = [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert losses == pytest.approx(jsonl, rel=1e-6)


def test_export_round_trip(finished_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, run_dir, _ = finished_run
    trained = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "model")
    assert tokenizer.eos_token_id == 2
    changed = [
        name for name, p in trained.state_dict().items() if not torch.equal(p, base.state_dict()[name])
    ]
    assert len(changed) == len(trained.state_dict())  # every parameter trained (all-parameter fine-tuning)
    # The exported weights reproduce the run's final validation loss.
    validation = torch.from_numpy(
        __import__("numpy").load(run_dir / "data" / "validation_token_ids.npy")
    ).long()
    with torch.no_grad():
        loss = trained(input_ids=validation, labels=validation).loss.item()
    final_eval = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert loss == pytest.approx(final_eval["eval/loss"], rel=1e-4)


def test_two_runs_give_identical_losses(finished_run, tmp_path):
    model_dir, run_dir, _ = finished_run
    _run(model_dir, tmp_path / "again")
    first = [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    second = [
        r["train/loss"] for r in read_metrics(tmp_path / "again" / "metrics.jsonl") if r["kind"] == "step"
    ]
    assert first == second


def test_refuses_to_overwrite_a_finished_run(finished_run):
    model_dir, run_dir, _ = finished_run
    before = (run_dir / "model" / "model.safetensors").read_bytes()
    with pytest.raises(HfdistError, match="already holds a run"):
        _run(model_dir, run_dir)
    assert (run_dir / "model" / "model.safetensors").read_bytes() == before


def test_target_loss_and_max_steps_stop_early(finished_run, tmp_path):
    model_dir, _, _ = finished_run
    summary = _run(model_dir, tmp_path / "target", "train.target_loss=100", "eval.every_epochs=0")
    assert summary["stopped_by"] == "target_loss" and summary["steps"] == 2
    summary = _run(model_dir, tmp_path / "max", "train.max_steps=3", "eval.every_epochs=0")
    assert summary["stopped_by"] == "max_steps" and summary["steps"] == 3


def test_resume_continues_the_loss_curve_exactly(finished_run, tmp_path):
    """Stop at step 5 (last checkpoint at step 4), resume: the records after step 4 are replaced, and steps
    5..16 match an uninterrupted run's bit for bit, with nothing logged twice."""
    model_dir, _, _ = finished_run
    full = tmp_path / "full"
    _run(model_dir, full, "checkpoint.every_steps=2", "checkpoint.keep_last=10", "eval.every_epochs=0")
    interrupted = tmp_path / "interrupted"
    _run(model_dir, interrupted, "checkpoint.every_steps=2", "eval.every_epochs=0", "train.max_steps=5")
    config = load_config(
        None, OVERRIDES + [f"model.path={model_dir}", "checkpoint.every_steps=2", "eval.every_epochs=0"]
    )
    train(config, interrupted, resume="latest", progress=False)

    def losses(run_dir):
        return [
            (r["step"], r["train/loss"])
            for r in read_metrics(run_dir / "metrics.jsonl")
            if r["kind"] == "step"
        ]

    resumed, reference = losses(interrupted), losses(full)
    assert [step for step, _ in resumed] == list(range(1, 17))
    assert resumed == reference
    epochs = lambda d: [r["train/loss"] for r in read_metrics(d / "metrics.jsonl") if r["kind"] == "epoch"]  # noqa
    assert epochs(interrupted) == epochs(full)
    from safetensors.torch import load_file

    a, b = (
        load_file(full / "model" / "model.safetensors"),
        load_file(interrupted / "model" / "model.safetensors"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiled_layers_train_like_eager(finished_run, tmp_path):
    """train.compile=true compiles each decoder layer (inductor, C++ on CPU); the loss curve matches eager's."""
    model_dir, run_dir, _ = finished_run
    from hfdist.distributed.single import SingleBackend
    from hfdist.models import decoder_layers

    _run(model_dir, tmp_path / "compiled", "train.compile=true", "train.epochs=2", "eval.every_epochs=0")
    eager = [r["train/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    compiled = [
        r["train/loss"] for r in read_metrics(tmp_path / "compiled" / "metrics.jsonl") if r["kind"] == "step"
    ]
    assert len(compiled) == 4
    assert compiled == pytest.approx(eager[:4], rel=1e-4)
    # The switch really compiles: the layers the backend builds carry a compiled forward.
    backend = SingleBackend(load_config(None, OVERRIDES + [f"model.path={model_dir}", "train.compile=true"]))
    from hfdist.trainer import build_model

    build_model(backend, backend.config, total_steps=1)
    assert all(layer._compiled_call_impl is not None for layer in decoder_layers(backend.model.lm))

"""A metric registered once (hfdist.metrics.register_metric) reaches every output: the rows of generation_metrics,
the report's table and its legend, the trainer's eval/NAME in metrics.jsonl, summary.json and the summary table."""

import json

import pytest

from hfdist import metrics as M
from hfdist.errors import HfdistError
from hfdist.report import format_table, table_legend


def _mean_id(ids):
    return sum(ids) / len(ids) if ids else 0.0


@pytest.fixture
def mean_token_id():
    metric = M.register_metric(
        "mean_token_id",
        "generations",
        lambda g: g.mean(_mean_id),
        modalities=("text",),
        during_training=True,
        summary_label="mean generated token id",
        columns={
            "text": M.Column("Mean id", digits=2, order=7, legend="Mean id: the mean generated token id.")
        },
    )
    yield metric
    del M.METRICS["mean_token_id"]


def test_the_built_in_order_is_the_outputs_order():
    rows = M.generation_metrics(
        [[1, 2, 3], [3, 2, 1]], texts=["a b", "b a"], training=[[1, 2, 3, 4]], min_run=2
    )
    assert list(rows) == [
        "num_generations",
        "mean_length",
        "ttr96",
        "distinct_1",
        "distinct_2",
        "distinct_3",
        "repetition_rate_4",
        "self_bleu",
        "word_ttr96",
        "overlap_mean_longest_run",
        "overlap_max_longest_run",
        "overlap_share_over_2",
    ]
    header = format_table({"original_greedy": rows}, min_run=2).splitlines()[0]
    assert header == (
        "| Model | Decoding | TTR-96 ↑ | Distinct-2 ↑ | Self-BLEU ↓ | Repeated 4-grams ↓ | Overlap > 2 tokens ↓ | "
        "Longest overlap (mean) | Tokens/s |"
    )


def test_a_registered_metric_reaches_the_rows_and_the_table(mean_token_id):
    rows = M.generation_metrics([[1, 2, 3], [4, 5, 6]])
    assert list(rows)[-1] == "mean_token_id" and rows["mean_token_id"] == 3.5
    assert "mean_token_id" not in M.generation_metrics([[1, 2]], modality="image", width=2)
    header, _, line = format_table({"hyperfitted_greedy": {**rows, "settings": {}}}).splitlines()
    assert header.endswith("| Mean id | Tokens/s |") and line.endswith("| 3.50 | - |")
    assert table_legend("text").endswith("Mean id: the mean generated token id.")
    with pytest.raises(HfdistError, match="metric 'mean_token_id': already registered"):
        M.register_metric("mean_token_id", "generations", len)
    with pytest.raises(HfdistError, match="on 'pixels' is not one of generations, heldout"):
        M.register_metric("other", "pixels", len)


def test_a_registered_metric_is_logged_in_training_and_summarised(mean_token_id, tmp_path, tiny_model_dir):
    from hfdist.config import load_config
    from hfdist.monitor import read_metrics
    from hfdist.trainer import format_summary, train

    overrides = ["data.mode=chunk", "data.seq_len=32", "data.num_samples=8", "data.num_validation=2"]
    overrides += ["data.num_contexts=2", "data.context_len=8", "train.epochs=1", "eval.total_len=48"]
    config = load_config(None, [f"model.path={tiny_model_dir}", *overrides, "eval.ttr_window=16"])
    summary = train(config, tmp_path / "run", progress=False)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals and all(0 < r["eval/mean_token_id"] < 384 for r in evals)
    assert list(evals[0])[-1] == "eval/mean_token_id"  # after the built-in measures
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["hyperfitted"]["eval/mean_token_id"] == evals[-1]["eval/mean_token_id"]
    lines = format_summary(summary).splitlines()
    assert lines[-1].startswith("| mean generated token id ")  # the last registered summary line

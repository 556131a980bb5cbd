"""The paper's text datasets on local files of their shape, and the extra held-out set (eval.extra)."""

import dataclasses
import gzip
import json
from pathlib import Path

import pytest
import torch

from hfdist.config import ExtraHeldOutConfig, load_config
from hfdist.data import EMBEDDED, build_data, load_run_data
from hfdist.errors import HfdistError
from hfdist.testing import tiny_tokenizer

PAPER = Path(__file__).parent.parent / "configs" / "paper"
# The columns of each hub dataset the paper configs name (BBC News: RealTimeData/bbc_news_alltime's).
COLUMNS = {
    "fiction": ["text"],
    "wikitext103": ["text"],
    "bbc-news": ["title", "published_date", "authors", "description", "section", "content", "link"],
}


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def austen_paragraphs(count: int) -> list[str]:
    with gzip.open(EMBEDDED["austen"], "rt") as f:
        chapters = [json.loads(line)["text"] for _, line in zip(range(8), f)]
    return [p for c in chapters for p in c.split("\n\n") if len(p) > 400][:count]


@pytest.mark.parametrize("dataset", sorted(COLUMNS))
def test_paper_text_configs_read_local_files_of_the_same_shape(tmp_path, tokenizer, dataset):
    """Each paper config's data section, with data.source pointed at a local parquet file with the hub set's
    columns, selects exact-length sequences from the configured text field (the upstream rule)."""
    import datasets

    config = load_config(PAPER / f"tinyllama-1.1b-{dataset}.yaml")
    texts = austen_paragraphs(40)
    table = {
        name: texts if name == config.data.text_field else [f"{name} {i}" for i in range(len(texts))]
        for name in COLUMNS[dataset]
    }
    path = tmp_path / f"{dataset}.parquet"
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    data_config = dataclasses.replace(
        config.data, source=str(path), seq_len=64, num_samples=12, num_validation=4, num_contexts=2
    )
    data = build_data(data_config, tokenizer)
    assert data.train.shape == (12, 64) and data.contexts.shape == (2, 32)
    first = data.selection["train_origins"][0]
    assert data.train[0].tolist() == tokenizer(texts[first], truncation=True, max_length=64)["input_ids"]


def test_extra_heldout_set_is_selected_saved_and_reloaded(tmp_path, tokenizer):
    config = load_config(
        None,
        [
            "data.mode=chunk",
            "data.seq_len=32",
            "data.num_samples=8",
            "data.num_validation=2",
            "data.num_contexts=2",
            "data.context_len=8",
        ],
    )
    extra = ExtraHeldOutConfig(source="sqlite_docs", name="sqlite", num_validation=3, num_contexts=2)
    data = build_data(config.data, tokenizer, extra)
    validation, contexts = data.extra["sqlite"]
    assert validation.shape == (3, 32) and contexts.shape == (2, 8)
    record = data.selection["extra"]["sqlite"]
    assert record["source"] == "sqlite_docs" and len(record["validation_origins"]) == 3
    # The windows come from the SQLite pages, not from Austen.
    with gzip.open(EMBEDDED["sqlite_docs"], "rt") as f:
        pages = [json.loads(line)["text"] for line in f]
    index, offset = record["validation_origins"][0]
    assert validation[0].tolist() == tokenizer(pages[index])["input_ids"][offset : offset + 32]
    data.save(tmp_path / "data")
    loaded = load_run_data(tmp_path / "data")
    assert torch.equal(loaded.extra["sqlite"][0], validation) and torch.equal(
        loaded.extra["sqlite"][1], contexts
    )
    with pytest.raises(
        HfdistError,
        match=r"eval.extra.source 'sqlite_docs': yields \d+ windows of 32 tokens, but "
        r"eval.extra.num_validation \(100000\) \+ num_contexts \(2\) need 100002",
    ):
        build_data(config.data, tokenizer, dataclasses.replace(extra, num_validation=100000))
    with pytest.raises(HfdistError, match="eval.extra.source './nowhere': no such file or folder"):
        build_data(config.data, tokenizer, dataclasses.replace(extra, source="./nowhere"))


def test_trainer_logs_the_extra_set_under_its_name(tmp_path, tiny_model_dir):
    from hfdist.monitor import read_metrics
    from hfdist.trainer import format_summary, train

    config = load_config(
        None,
        [
            f"model.path={tiny_model_dir}",
            "data.mode=chunk",
            "data.seq_len=32",
            "data.num_samples=8",
            "data.num_validation=2",
            "data.num_contexts=2",
            "data.context_len=8",
            "train.epochs=1",
            "eval.total_len=48",
            "eval.ttr_window=16",
            "eval.extra.source=sqlite_docs",
            "eval.extra.name=sqlite",
            "eval.extra.num_validation=2",
            "eval.extra.num_contexts=2",
        ],
    )
    summary = train(config, tmp_path / "run", progress=False)
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    for name in ("loss", "entropy", "top1_mass", "ttr16"):
        assert all(f"eval/sqlite/{name}" in r and f"eval/{name}" in r for r in evals)
    assert evals[0]["eval/sqlite/loss"] != evals[0]["eval/loss"]
    assert "validation entropy (nats) [sqlite]" in format_summary(summary)
    assert (tmp_path / "run" / "data" / "sqlite_contexts.npy").is_file()


def test_the_demo_is_measured_on_the_embedded_kjv_wisdom():
    """configs/demo.yaml's out-of-domain set: Proverbs (31 chapters) and Ecclesiastes (12), one record a chapter."""
    config = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert (config.eval.extra.source, config.eval.extra.name) == ("kjv_wisdom", "kjv")
    with gzip.open(EMBEDDED["kjv_wisdom"], "rt") as f:
        records = [json.loads(line) for line in f]
    assert [(r["book"], r["chapter"]) for r in records] == [("Proverbs", c) for c in range(1, 32)] + [
        ("Ecclesiastes", c) for c in range(1, 13)
    ]
    assert records[0]["text"].startswith("The proverbs of Solomon the son of David, king of Israel;")

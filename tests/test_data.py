"""Data selection: exact lengths, seeded and recorded, disjoint splits, clear errors for too little data."""

import json

import pytest
import torch

from hfdist.config import DataConfig
from hfdist.data import StepSampler, build_data, load_texts
from hfdist.errors import HfdistError
from hfdist.testing import tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _config(**kwargs):
    defaults = dict(
        source="austen",
        mode="chunk",
        seq_len=32,
        num_samples=12,
        num_validation=4,
        num_contexts=3,
        context_len=8,
        seed=0,
    )
    defaults.update(kwargs)
    return DataConfig(**defaults)


def test_chunk_mode_exact_lengths_and_disjoint_splits(tokenizer):
    data = build_data(_config(), tokenizer)
    assert data.train.shape == (12, 32) and data.validation.shape == (4, 32) and data.contexts.shape == (3, 8)
    origins = [
        tuple(o)
        for o in data.selection["train_origins"]
        + data.selection["validation_origins"]
        + data.selection["context_origins"]
    ]
    assert len(set(origins)) == len(origins)  # no window is used twice
    # Each selected window is exactly the tokens of the text at its recorded offset.
    texts = load_texts(_config())
    index, offset = data.selection["train_origins"][0]
    assert data.train[0].tolist() == tokenizer(texts[index])["input_ids"][offset : offset + 32]


def test_selection_is_seeded(tokenizer):
    a, b = build_data(_config(), tokenizer), build_data(_config(), tokenizer)
    c = build_data(_config(seed=1), tokenizer)
    assert torch.equal(a.train, b.train) and a.selection == b.selection
    assert not torch.equal(a.train, c.train)


def test_exact_mode_keeps_only_texts_reaching_seq_len(tmp_path, tokenizer):
    rows = [{"text": "word " * n} for n in (3, 50, 2, 80, 60, 1, 70)]
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = build_data(
        _config(source=str(path), mode="exact", seq_len=40, num_samples=2, num_validation=1, num_contexts=1),
        tokenizer,
    )
    assert data.train.shape == (2, 40)
    chosen = (
        data.selection["train_origins"]
        + data.selection["validation_origins"]
        + data.selection["context_origins"]
    )
    assert sorted(chosen) == [1, 3, 4, 6]  # the four texts long enough, none of the short ones


def test_too_little_data_is_an_error(tmp_path, tokenizer):
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": "word " * 50}) + "\n" for _ in range(5)))
    with pytest.raises(HfdistError, match=r"yields 5 texts of at least 40 tokens, but .* need 10"):
        build_data(
            _config(
                source=str(path), mode="exact", seq_len=40, num_samples=6, num_validation=2, num_contexts=2
            ),
            tokenizer,
        )


@pytest.mark.parametrize("kind", ["txt", "parquet", "csv"])
def test_local_file_kinds(tmp_path, tokenizer, kind):
    import datasets

    texts = ["The quick brown fox jumps over the lazy dog. " * 20 for _ in range(3)]
    path = tmp_path / f"corpus.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(texts))
    else:
        getattr(datasets.Dataset.from_dict({"text": texts}), f"to_{kind}")(str(path))
    data = build_data(
        _config(source=str(path), seq_len=16, num_samples=8, num_validation=2, num_contexts=1), tokenizer
    )
    assert data.train.shape == (8, 16)


def test_bad_sources(tmp_path, tokenizer):
    with pytest.raises(HfdistError, match="no such file or folder"):
        load_texts(_config(source="./missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(HfdistError, match="file is empty"):
        load_texts(_config(source=str(empty)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(HfdistError, match=r"data.text_field 'text': not a column .* \(columns: body\)"):
        load_texts(_config(source=str(wrong)))
    with pytest.raises(HfdistError, match="unsupported file type '.docx'"):
        (tmp_path / "a.docx").write_text("x")
        load_texts(_config(source=str(tmp_path / "a.docx")))
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(HfdistError, match="cannot be read"):
        load_texts(_config(source=str(latin)))


def test_step_sampler_same_global_batch_for_any_world_size():
    single = StepSampler(32, 8, 8, dp_rank=0, dp_size=1, seed=3)
    (whole,) = single.micro_batches(epoch=1, step_in_epoch=2)
    shards = []
    for rank in range(2):
        sampler = StepSampler(32, 8, 2, dp_rank=rank, dp_size=2, seed=3)
        micro = sampler.micro_batches(epoch=1, step_in_epoch=2)
        assert [len(m) for m in micro] == [2, 2]
        shards.extend(torch.cat(micro).tolist())
    assert shards == whole.tolist()
    # every sample exactly once per epoch
    epoch = torch.cat([single.micro_batches(0, s)[0] for s in range(single.steps_per_epoch)])
    assert sorted(epoch.tolist()) == list(range(32))


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="the overlapped copy needs CUDA"),
        ),
    ],
)
def test_prefetcher_hands_out_each_position_exactly(device):
    """Whatever the order of requests (in sequence, a jump as on resume, no next), each step gets its own batches."""
    from hfdist.data import BatchPrefetcher

    source = {i: [torch.full((2, 4), i), torch.full((1, 4), 100 + i)] for i in range(6)}
    loads = []
    prefetcher = BatchPrefetcher(lambda i: (loads.append(i), source[i])[1], torch.device(device))
    assert prefetcher.overlapped == (device == "cuda")
    for position, following in [(0, 1), (1, 2), (4, 5), (5, None), (2, 3)]:
        batches = prefetcher.get(position, following)
        assert [b.device.type for b in batches] == [device, device]
        assert [b.cpu().tolist() for b in batches] == [b.tolist() for b in source[position]]
    # CUDA: position 2 was loaded once ahead (after 1) and again after the jump; CPU: once per request.
    assert loads == ([0, 1, 2, 4, 5, 2, 3] if device == "cuda" else [0, 1, 4, 5, 2])

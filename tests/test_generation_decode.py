"""hfdist.generation.generate against Hugging Face model.generate on a real (tiny, random) Llama."""

import pytest
import torch

from hfdist.errors import HfdistError
from hfdist.generation import continuation_ids, generate, left_pad
from hfdist.testing import tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=256, seed=0)


def _prompts(lengths, seed=1, vocab=256):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _hf(model, ids, mask, new, eos=None, pad=0):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=pad
    )


def test_greedy_equals_hf_generate_single_prompt(model):
    ids, mask = left_pad(_prompts([9]), 0)
    ours = generate(model, ids, mask, max_new_tokens=40)
    assert torch.equal(ours, _hf(model, ids, mask, 40))
    # attention_mask=None means "no padding"
    assert torch.equal(generate(model, ids, max_new_tokens=40), ours)


def test_greedy_equals_hf_generate_left_padded_batch(model):
    ids, mask = left_pad(_prompts([7, 12, 3, 12, 1]), 0)
    assert (mask == 0).any()  # the batch really is padded
    ours = generate(model, ids, mask, max_new_tokens=33)
    assert ours.shape == (5, 12 + 33)
    assert torch.equal(ours, _hf(model, ids, mask, 33))


def test_tied_embeddings_model_equals_hf():
    tied = tiny_llama(vocab_size=300, seed=3, tie_word_embeddings=True)
    ids, mask = left_pad(_prompts([4, 6], seed=5, vocab=300), 0)
    assert torch.equal(generate(tied, ids, mask, max_new_tokens=20), _hf(tied, ids, mask, 20))


def test_eos_stops_rows_like_hf(model):
    ids, mask = left_pad(_prompts([7, 12, 3, 12]), 0)
    free = generate(model, ids, mask, max_new_tokens=30)
    eos = int(free[0, ids.shape[1] + 5])  # a token row 0 emits at step 5: row 0 must stop there
    ours = generate(model, ids, mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    ref = _hf(model, ids, mask, 30, eos=eos)
    assert torch.equal(ours, ref)
    assert (ours[0, ids.shape[1] + 6 :] == 0).all()  # padded after EOS
    conts = continuation_ids(ours, ids.shape[1], eos)
    assert eos not in conts[0] and len(conts[0]) <= 5


def test_output_is_cut_when_every_row_finished(model):
    ids, mask = left_pad(_prompts([5, 8]), 0)
    free = generate(model, ids, mask, max_new_tokens=20)
    p = ids.shape[1]
    eos = [int(free[0, p + 2]), int(free[1, p + 3])]  # both rows stop within 4 steps
    ours = generate(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0, check_every=16)
    ref = _hf(model, ids, mask, 20, eos=eos)
    assert ours.shape[1] < p + 20
    assert torch.equal(ours, ref)


def test_static_cache_equals_dynamic(model):
    ids, mask = left_pad(_prompts([6, 11, 2]), 0)
    dynamic = generate(model, ids, mask, max_new_tokens=25)
    static = generate(model, ids, mask, max_new_tokens=25, cache="static")
    assert torch.equal(dynamic, static)


def test_bad_inputs_raise_hfdist_error(model):
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(HfdistError, match="strategy 'beam'"):
        generate(model, ids, max_new_tokens=3, strategy="beam")
    with pytest.raises(HfdistError, match="top_p"):
        generate(model, ids, max_new_tokens=3, strategy="sample", top_p=1.5)
    with pytest.raises(HfdistError, match="attention_mask"):
        generate(model, ids, torch.ones(1, 4, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(HfdistError, match="cache 'paged'"):
        generate(model, ids, max_new_tokens=3, cache="paged")
    assert torch.equal(generate(model, ids, max_new_tokens=0), ids)


def test_sampling_with_a_seed_is_reproducible(model):
    ids, mask = left_pad(_prompts([5, 9, 9]), 0)
    kwargs = dict(max_new_tokens=30, strategy="sample", temperature=1.0, top_p=0.95, top_k=100, seed=123)
    first = generate(model, ids, mask, **kwargs)
    assert torch.equal(first, generate(model, ids, mask, **kwargs))
    other = generate(model, ids, mask, **{**kwargs, "seed": 124})
    assert not torch.equal(first, other)  # the seed matters (random model: near-uniform distributions)
    greedy = generate(model, ids, mask, max_new_tokens=30)
    assert not torch.equal(first, greedy)


def test_sampling_at_tiny_temperature_is_greedy(model):
    ids, mask = left_pad(_prompts([5, 9]), 0)
    cold = generate(model, ids, mask, max_new_tokens=15, strategy="sample", temperature=1e-4, seed=0)
    assert torch.equal(cold, generate(model, ids, mask, max_new_tokens=15))


@pytest.mark.parametrize(
    "lengths,eos_step", [([9], None), ([7, 12, 3, 12, 1], None), ([7, 12, 3, 12], 5), ([5, 8], 2)]
)
def test_ngram_drafting_equals_plain_greedy(model, lengths, eos_step):
    """draft='ngram' keeps exactly greedy's tokens (batched, left-padded, with EOS), in fewer forward passes."""
    ids, mask = left_pad(_prompts(lengths), 0)
    # A prompt that repeats gives the drafts something to find; the random model then tends to loop too.
    ids, mask = torch.cat([ids, ids], 1), torch.cat([mask, mask], 1)
    plain = generate(model, ids, mask, max_new_tokens=60)
    eos = None if eos_step is None else int(plain[0, ids.shape[1] + eos_step])
    plain = generate(model, ids, mask, max_new_tokens=60, eos_token_id=eos, pad_token_id=0)
    passes = []
    handle = model.register_forward_hook(lambda *a: passes.append(1))
    drafted = generate(
        model, ids, mask, max_new_tokens=60, eos_token_id=eos, pad_token_id=0, draft="ngram", draft_tokens=6
    )
    handle.remove()
    assert torch.equal(drafted, plain)
    if len(lengths) == 1:
        assert len(passes) < 60 // 2  # most guesses were right: far fewer passes than tokens


def test_ngram_drafting_with_blocker_equals_plain(model):
    from hfdist.generation import CitationBlocker

    ids, _ = left_pad(_prompts([10]), 0)
    ids = torch.cat([ids, ids, ids], 1)
    plain = generate(model, ids, max_new_tokens=50)
    blocker = CitationBlocker([plain[0, ids.shape[1] :].tolist()], n=2)  # blocks the model's own loop
    blocked = generate(model, ids, max_new_tokens=50, blocker=blocker)
    assert not torch.equal(blocked, plain)
    assert torch.equal(generate(model, ids, max_new_tokens=50, blocker=blocker, draft="ngram"), blocked)


def test_ngram_draft_lookup():
    from hfdist.generation import ngram_draft

    seq = torch.tensor([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7])
    # "5 6 7" occurs at 0 and 5: the latest with 2 tokens after it is at 5 -> "1 2".
    assert ngram_draft(seq, 3, 2).tolist() == [1, 2]
    # Asking for 4: no occurrence is followed by 4 tokens after position 5... index 0 is: "8 9 5 6".
    assert ngram_draft(seq, 3, 4).tolist() == [1, 2, 5, 6]
    assert ngram_draft(torch.tensor([1, 2, 3]), 2, 3).tolist() == []
    with pytest.raises(HfdistError, match="draft"):
        generate(
            tiny_llama(vocab_size=64),
            torch.tensor([[1, 2]]),
            max_new_tokens=3,
            strategy="sample",
            draft="ngram",
        )


def test_a_registered_strategy_decodes_and_is_offered_by_the_cli(model):
    """A strategy is one function in hfdist.generation.STRATEGIES: generate uses it by name, DecodeOptions checks the
    fields it reads, and `hfdist generate --strategy` offers it."""
    from hfdist.commands.generate import StrategyNames
    from hfdist.generation import STRATEGIES, DecodeOptions, register_strategy

    @register_strategy("least_likely", uses=("temperature",))
    def choose_least_likely(state, logits, step):
        return logits.argmin(-1)

    try:
        ids, mask = left_pad(_prompts([7, 4]), 0)
        out = generate(model, ids, mask, max_new_tokens=5, strategy="least_likely")
        expected = ids.clone()
        with torch.no_grad():  # the same choice, one full forward pass per step (no cache)
            for _ in range(5):
                full_mask = torch.cat(
                    [mask, torch.ones(len(ids), expected.shape[1] - ids.shape[1])], 1
                ).long()
                positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(expected, attention_mask=full_mask, position_ids=positions).logits[:, -1]
                expected = torch.cat([expected, logits.argmin(-1, keepdim=True)], 1)
        assert torch.equal(out, expected)
        assert "least_likely" in StrategyNames()
        with pytest.raises(HfdistError, match="temperature: must be > 0"):
            DecodeOptions(max_new_tokens=1, strategy="least_likely", temperature=0.0)
    finally:
        del STRATEGIES["least_likely"]
    with pytest.raises(HfdistError, match="strategy 'least_likely': unknown"):
        DecodeOptions(max_new_tokens=1, strategy="least_likely")


def test_generate_takes_decode_options_and_its_fields(model):
    from hfdist.generation import DecodeOptions

    ids, mask = left_pad(_prompts([6, 9]), 0)
    options = DecodeOptions(max_new_tokens=8, strategy="sample", temperature=0.8, seed=3)
    by_fields = generate(model, ids, mask, max_new_tokens=8, strategy="sample", temperature=0.8, seed=3)
    assert torch.equal(generate(model, ids, mask, options), by_fields)
    assert torch.equal(
        generate(model, ids, mask, options, seed=4),
        generate(model, ids, mask, max_new_tokens=8, strategy="sample", temperature=0.8, seed=4),
    )
    with pytest.raises(HfdistError, match="top_p: must be in"):
        generate(model, ids, mask, options, top_p=0.0)

"""Batched decoding with a KV cache for any Hugging Face causal LM, and the paper's citation blocker.

``generate`` is a small re-implementation of ``model.generate`` for the two strategies the paper compares
(``STRATEGIES``, where a strategy is registered with ``register_strategy``):

- ``greedy``: the arg-max token (the lowest token id on ties, as ``torch.argmax``), token for token the
  same output as ``model.generate(do_sample=False)`` in fp32, batched and left-padded;
- ``sample``: ``hfdist.kernels.sample`` with temperature, top-k, top-p and min-p, with counter-based
  per-row, per-step seeds derived from ``seed``, so a fixed ``seed`` reproduces the output.

How it decodes is one ``DecodeOptions`` (checked once when built); ``generate``'s keywords are its fields.

It keeps the loop lean because long sequences are the point: the output and attention-mask buffers are
allocated once, the model computes logits for the last position only (``logits_to_keep=1``), and the host
waits on the device only every ``check_every`` steps to see whether every row has emitted EOS.

Prompts are left-padded (``attention_mask`` 0 on the pads); position ids are computed from the mask exactly as
``transformers`` does (``cumsum(mask) - 1``, pads at 1). After a row emits an EOS token, its later positions
hold ``pad_token_id`` (default: the model's pad id, else the first EOS id), as in ``model.generate``; the
output is cut after the step at which the last row finished, so its width is ``prompt + steps run``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Sequence, Union

import numpy as np
import torch
from transformers import DynamicCache, StaticCache

from hfdist.errors import HfdistError
from hfdist.kernels import sample, sampling_seeds

logger = logging.getLogger(__name__)

CACHES = ("dynamic", "static")
DRAFTS = ("none", "ngram")
STATIC_CACHE_MULTIPLE = 128


# --------------------------------------------------------------------------------------------- citation blocker
# Two polynomial hashes modulo primes below 2**31: every product stays below 2**62, so numpy and torch int64
# compute them identically, without overflow, on any device. The pair gives a 62-bit key per n-gram.
_P1, _B1 = 2147483647, 1000003
_P2, _B2 = 2147483629, 999983


def _powers(base: int, prime: int, n: int) -> np.ndarray:
    """base**(n-1-i) mod prime for i in 0..n-1: the weights of the polynomial hash of an n-gram."""
    out = np.empty(n, dtype=np.int64)
    value = 1
    for i in range(n - 1, -1, -1):
        out[i] = value
        value = value * base % prime
    return out


def _hash_np(grams: np.ndarray, pw1: np.ndarray, pw2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    g = grams.astype(np.int64)
    h1 = ((g * pw1) % _P1).sum(-1) % _P1
    h2 = ((g * pw2) % _P2).sum(-1) % _P2
    return h1, h2


class CitationBlocker:
    """Blocks the token that would continue a training sequence, given the last ``n`` generated tokens.

    The paper's "citation blocker": at every decoding step, if the last ``n`` generated tokens of a row occur
    anywhere in the hyperfitting data, every token that follows that n-gram in the data gets logit -inf before
    the next token is chosen (greedy or sampled), so the model cannot keep quoting its training text. The n-gram
    must lie entirely inside the generated part (the issue's and upstream's rule): nothing is blocked during the
    first ``n`` steps. ``include_prompt=True`` also lets the n-gram reach back into the prompt.

    The index is built once over the training token ids: every (n-gram, next token) pair of every sequence
    (n-grams never cross two sequences), keyed by a 62-bit hash of the n-gram, in an open-addressing table
    with linear probing whose longest probe is ``max_probe``. A step looks up all rows at once on the logits'
    device: hash the ``B`` n-grams, compare ``max_probe`` slots, check the stored n-gram token for token (so a
    hash collision never blocks anything), then set the ``<= max_next`` continuations to -inf: O(1) per row,
    no host synchronisation, no scan of the data.
    """

    def __init__(self, sequences, n: int = 5, include_prompt: bool = False):
        if n < 1:
            raise HfdistError(f"blocker n: must be >= 1, got {n}")
        self.n = n
        self.include_prompt = include_prompt
        rows = _as_row_list(sequences)
        pairs = []
        for row in rows:
            if len(row) > n:
                pairs.append(np.lib.stride_tricks.sliding_window_view(row, n + 1))
        pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, n + 1), dtype=np.int64)
        self.num_pairs = len(pairs)
        # Group the continuations by n-gram: np.unique sorted the pairs, so equal n-grams are adjacent.
        grams, first, counts = np.unique(pairs[:, :n], axis=0, return_index=True, return_counts=True)
        self.num_ngrams = len(grams)
        self.max_next = int(counts.max()) if len(counts) else 0
        self._pw1, self._pw2 = _powers(_B1, _P1, n), _powers(_B2, _P2, n)
        h1, h2 = _hash_np(grams, self._pw1, self._pw2)
        keys = h1 * (1 << 31) + h2
        size = 16
        while size < 4 * max(len(grams), 1):  # load factor <= 1/4: probes stay short
            size *= 2
        table_key = np.full(size, -1, dtype=np.int64)
        table_val = np.zeros(size, dtype=np.int64)
        pending, probe = np.arange(len(grams)), 0
        while len(pending):  # vectorised linear-probing insertion: one round per probe distance
            slots = (h2[pending] + probe) & (size - 1)
            free = table_key[slots] == -1
            candidates, cand_slots = pending[free], slots[free]
            won_slots, first_idx = np.unique(cand_slots, return_index=True)
            winners = candidates[first_idx]
            table_key[won_slots], table_val[won_slots] = keys[winners], winners
            placed = np.zeros(len(grams), dtype=bool)
            placed[winners] = True
            pending = pending[~placed[pending]]
            probe += 1
        self.max_probe = max(probe, 1)
        self.table_size = size
        self._host = {
            "table_key": table_key,
            "table_val": table_val,
            "grams": grams.astype(np.int64),
            "start": first.astype(np.int64),
            "count": counts.astype(np.int64),
            "next": pairs[:, n].astype(np.int64) if len(pairs) else np.zeros(1, dtype=np.int64),
            "pw1": self._pw1,
            "pw2": self._pw2,
        }
        self._on: dict = {}

    def _tensors(self, device: torch.device) -> dict:
        key = str(device)
        if key not in self._on:
            self._on[key] = {k: torch.from_numpy(v).to(device) for k, v in self._host.items()}
            self._on[key]["probes"] = torch.arange(self.max_probe, device=device)
            self._on[key]["slots"] = torch.arange(max(self.max_next, 1), device=device)
        return self._on[key]

    def lookup(self, grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For n-grams [B, n]: the continuations [B, max_next] and a validity mask [B, max_next]."""
        g = grams.long()
        if self.num_ngrams == 0:
            empty = torch.zeros((len(g), 1), dtype=torch.long, device=g.device)
            return empty, empty.bool()
        t = self._tensors(grams.device)
        h1 = ((g * t["pw1"]) % _P1).sum(-1) % _P1
        h2 = ((g * t["pw2"]) % _P2).sum(-1) % _P2
        key = h1 * (1 << 31) + h2
        slots = (h2[:, None] + t["probes"]) & (self.table_size - 1)
        hit = t["table_key"][slots] == key[:, None]  # [B, max_probe]; at most one hit: keys are unique
        index = (t["table_val"][slots] * hit).sum(-1)
        found = hit.any(-1) & (t["grams"][index] == g).all(-1)  # exact check: no false positive on collision
        count = torch.where(found, t["count"][index], torch.zeros_like(index))
        cols = (t["start"][index][:, None] + t["slots"]).clamp_(max=len(self._host["next"]) - 1)
        valid = t["slots"] < count[:, None]
        return t["next"][cols], valid

    def block_(self, logits: torch.Tensor, grams: torch.Tensor) -> torch.Tensor:
        """Set to -inf, in place, the logits [B, V] of every training continuation of each row's n-gram."""
        if self.num_ngrams == 0:
            return logits
        tokens, valid = self.lookup(grams)
        # One scatter with no conflicting writes: invalid entries repeat the row's first entry; a row with
        # nothing to block writes its own logit back.
        first = tokens[:, :1]
        tokens = torch.where(valid, tokens, first)
        keep = logits.gather(1, first)
        fill = torch.where(valid[:, :1], torch.full_like(keep, float("-inf")), keep)
        logits.scatter_(1, tokens, fill.expand(-1, tokens.shape[1]))
        return logits

    def blocked_tokens(self, context: Sequence[int]) -> set[int]:
        """The tokens blocked after ``context`` (its last n tokens), for inspection and tests."""
        if len(context) < self.n:
            return set()
        tokens, valid = self.lookup(torch.tensor([list(context)[-self.n :]], dtype=torch.long))
        return set(tokens[0][valid[0]].tolist())


def _as_row_list(sequences) -> list[np.ndarray]:
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.cpu().numpy()
    if isinstance(sequences, np.ndarray):
        if sequences.ndim != 2:
            raise HfdistError(
                f"blocker sequences: expected a 2-D array of token ids, got shape {sequences.shape}"
            )
        return [row.astype(np.int64) for row in sequences]
    return [np.asarray(row, dtype=np.int64) for row in sequences]


# ----------------------------------------------------------------------------------------------- the engine
class _ForwardAdapter:
    """Calls ``model(...)`` with the keyword names this transformers version and model class accept."""

    def __init__(self, model, compile: bool = False):
        inner = model
        while hasattr(inner, "module") and not hasattr(inner, "config"):  # DDP / DeepSpeed engine wrappers
            inner = inner.module
        self.model = model
        self.config = inner.config
        params = inspect.signature(inner.forward).parameters
        # transformers 5.2x renamed past_key_values to cache (the old name still works, with a warning).
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
        self.cache_position = "cache_position" in params
        self.compiled = None
        if compile:
            # As transformers' own generate does for compileable caches: one graph for the decode step (fixed
            # shapes with the static cache), CUDA graphs on GPU ("reduce-overhead").
            mode = "reduce-overhead" if model_device(model).type == "cuda" else "default"
            self.compiled = torch.compile(model.forward, mode=mode, dynamic=False, fullgraph=False)

    def __call__(
        self,
        input_ids,
        attention_mask,
        position_ids,
        cache,
        past_length: int,
        decode: bool = False,
        keep: int = 1,
    ) -> torch.Tensor:
        """Logits [B, V] of the last position; with ``keep > 1``, [B, keep, V] of the last ``keep`` positions."""
        kwargs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            self.cache_kw: cache,
            "use_cache": True,
        }
        if self.keep_kw:
            kwargs[self.keep_kw] = keep
        if self.cache_position:  # older transformers index the cache with it (the static cache needs it)
            kwargs["cache_position"] = torch.arange(
                past_length, past_length + input_ids.shape[1], device=input_ids.device
            )
        if decode and self.compiled is not None:
            # The graph's output buffer is reused by the next replay: copy the logits out.
            return self.compiled(**kwargs).logits[:, -1, :].clone()
        logits = self.model(**kwargs).logits
        return logits[:, -1, :] if keep == 1 else logits[:, -keep:, :]


def make_cache(model, kind: str = "dynamic", max_cache_len: Optional[int] = None):
    """A fresh ``DynamicCache`` or ``StaticCache`` for ``model`` (works on transformers 5.17 to 5.24)."""

    config = getattr(model, "config", None) or model.module.config
    if kind == "dynamic":
        try:
            return DynamicCache(config=config)
        except TypeError:
            return DynamicCache()
    if kind == "static":
        return StaticCache(config=config, max_cache_len=max_cache_len)
    raise HfdistError(f"cache {kind!r}: unknown (choose from {', '.join(CACHES)})")


def _eos_ids(eos_token_id) -> list[int]:
    if eos_token_id is None:
        return []
    if isinstance(eos_token_id, int):
        return [eos_token_id]
    return [int(e) for e in eos_token_id]


def model_device(model) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


# ------------------------------------------------------------------------------------------- the strategies
@dataclass(frozen=True)
class Strategy:
    """A decoding strategy: ``choose(state, logits, step)`` returns the token [B] of generated position ``step``
    from the logits [B, V] (fp32, the blocker already applied); ``uses`` names the ``DecodeOptions`` fields it
    reads (they are checked, and ``hfdist generate`` records them with the generations)."""

    name: str
    choose: Callable[["DecodeState", torch.Tensor, int], torch.Tensor]
    uses: tuple[str, ...] = ()


STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str, uses: tuple[str, ...] = ()):
    """Decorator: register ``choose(state, logits, step) -> tokens`` as the strategy ``name`` (see ``Strategy``)."""

    def register(choose):
        if name in STRATEGIES:
            raise HfdistError(f"strategy {name!r}: already registered")
        STRATEGIES[name] = Strategy(name, choose, tuple(uses))
        return choose

    return register


@register_strategy("greedy")
def choose_greedy(state: "DecodeState", logits: torch.Tensor, step: int) -> torch.Tensor:
    """The arg-max token (the lowest id on ties, as ``torch.argmax`` and ``model.generate(do_sample=False)``)."""
    return logits.argmax(-1)


# The sampler's knobs: DecodeOptions fields named as hfdist.kernels.sample's keywords.
SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p")


@register_strategy("sample", uses=SAMPLING_KNOBS)
def choose_sample(state: "DecodeState", logits: torch.Tensor, step: int) -> torch.Tensor:
    """``hfdist.kernels.sample`` with the options' temperature, top-p, top-k and min-p."""
    options = state.options
    # Counter-based seeds, one per (seed, step, row): reproducible without a generator's state, and
    # on_invalid="flag" keeps the sampler from synchronising; a flagged row (all logits -inf or NaN)
    # is reported once at the end.
    seeds = (
        None if options.seed is None else sampling_seeds(options.seed, step, state.batch, device=state.device)
    )
    knobs = {name: getattr(options, name) for name in SAMPLING_KNOBS}
    token = sample(logits, **knobs, seed=seeds, backend=options.sampler_backend, on_invalid="flag")
    state.flag_invalid(token < 0)
    return token.clamp_(min=0)


@dataclass(frozen=True)
class DecodeOptions:
    """How ``generate`` decodes, checked once when built (each error names the field).

    ``max_new_tokens`` per row; ``strategy``: a name in ``STRATEGIES``; ``temperature``, ``top_p``, ``top_k`` (0
    disables), ``min_p`` (0 disables): the sampling knobs, checked when the strategy reads them (its ``uses``).
    ``seed``: row ``r`` at step ``t`` samples with ``hfdist.kernels.sampling_seeds(seed, t, B)[r]``, so a fixed
    seed reproduces the output on any backend; ``None`` draws from torch's global RNG. ``blocker``: a
    ``CitationBlocker`` applied before the strategy chooses. ``eos_token_id`` (an id or a list): a row stops after
    it emits one; later positions get ``pad_token_id``; ``None`` never stops early, which the TTR protocol needs.
    ``cache`` is ``dynamic`` or ``static`` (preallocated: every decode step then has the same shapes);
    ``compile=True`` (needs the static cache) runs the decode step through ``torch.compile`` (CUDA graphs on GPU) -
    worth it on a GPU for long generations, not on a CPU. ``check_every``: the host looks whether every row has
    finished every this many steps. ``sync_ranks``: with a sharded model (FSDP), every rank must run the same number
    of forward passes, so the "all rows finished" test is reduced over ranks.

    ``draft="ngram"`` (greedy, dynamic cache): prompt-lookup speculative decoding. Each forward pass feeds the
    newest token plus up to ``draft_tokens`` guessed ones: the tokens that followed the latest earlier
    occurrence of the row's last ``draft_ngram`` (or fewer) tokens in its own prompt and output (see
    :func:`ngram_draft`). The guesses are checked against the model's own arg-max at every position (the
    blocker included), the agreeing prefix is kept plus the model's next token, and the cache is cut back:
    the output is greedy's, produced in fewer passes when the text repeats (the original model's greedy loops,
    a hyperfitted model quoting its prompt). Tokens can differ from one-at-a-time greedy only where two logits
    tie to the last bits, since a pass over several positions rounds its matrix products differently. In a
    batch every row advances by the shortest agreeing prefix, so it pays off at batch 1, not at 32.
    """

    max_new_tokens: int
    strategy: str = "greedy"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None
    blocker: Optional[CitationBlocker] = None
    eos_token_id: Union[int, Sequence[int], None] = None
    pad_token_id: Optional[int] = None
    cache: Literal["dynamic", "static"] = "dynamic"
    compile: bool = False
    check_every: int = 8
    sampler_backend: str = "auto"
    sync_ranks: bool = False
    draft: Literal["none", "ngram"] = "none"
    draft_tokens: int = 8
    draft_ngram: int = 3

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise HfdistError(f"strategy {self.strategy!r}: unknown (choose from {', '.join(STRATEGIES)})")
        if self.max_new_tokens < 0:
            raise HfdistError(f"max_new_tokens: must be >= 0, got {self.max_new_tokens}")
        uses = STRATEGIES[self.strategy].uses
        if "temperature" in uses and not self.temperature > 0:
            raise HfdistError(f"temperature: must be > 0 for sampling, got {self.temperature}")
        if "top_p" in uses and not 0 < self.top_p <= 1:
            raise HfdistError(f"top_p: must be in (0, 1], got {self.top_p}")
        if "top_k" in uses and self.top_k < 0:
            raise HfdistError(f"top_k: must be >= 0 (0 disables), got {self.top_k}")
        if "min_p" in uses and not 0 <= self.min_p < 1:
            raise HfdistError(f"min_p: must be in [0, 1), got {self.min_p}")
        if self.check_every < 1:
            raise HfdistError(f"check_every: must be >= 1, got {self.check_every}")
        if self.cache not in CACHES:
            raise HfdistError(f"cache {self.cache!r}: unknown (choose from {', '.join(CACHES)})")
        if self.compile and self.cache != "static":
            raise HfdistError("compile=True needs cache='static' (fixed shapes for the compiled decode step)")
        if self.draft not in DRAFTS:
            raise HfdistError(f"draft {self.draft!r}: unknown (choose from {', '.join(DRAFTS)})")
        if self.draft != "none":
            if self.strategy != "greedy" or self.cache != "dynamic" or self.sync_ranks:
                raise HfdistError(
                    "draft='ngram': needs strategy='greedy', cache='dynamic' and an unsharded model"
                )
            if self.draft_tokens < 1 or self.draft_ngram < 1:
                raise HfdistError(
                    f"draft_tokens and draft_ngram: must be >= 1, got {self.draft_tokens} and "
                    f"{self.draft_ngram}"
                )

    @property
    def eos_ids(self) -> list[int]:
        return _eos_ids(self.eos_token_id)


class DecodeState:
    """One batch being decoded: the output buffer (prompt + generated ids), the attention masks and positions, the
    KV cache, which rows have finished, and the two per-step operations every decoding phase uses: ``choose`` (the
    next token from logits) and ``record`` (write it, padding rows that have finished)."""

    def __init__(
        self, model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], options: DecodeOptions
    ):
        if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise HfdistError(
                f"input_ids: expected integer ids [batch, length], got {tuple(input_ids.shape)} "
                f"{input_ids.dtype}"
            )
        self.options = options
        self.device = device = model_device(model)
        self.prompt = input_ids.to(device=device, dtype=torch.long)
        self.batch, self.prompt_len = self.prompt.shape
        self.prompt_mask = (
            torch.ones_like(self.prompt)
            if attention_mask is None
            else attention_mask.to(device=device, dtype=torch.long)
        )
        if self.prompt_mask.shape != self.prompt.shape:
            raise HfdistError(
                f"attention_mask: shape {tuple(self.prompt_mask.shape)} differs from input_ids "
                f"{tuple(self.prompt.shape)}"
            )
        self.model = model

    def start(self) -> None:
        """Allocate the buffers and the cache (only for a batch that generates something)."""
        options, device, batch, prompt_len = self.options, self.device, self.batch, self.prompt_len
        self.forward = _ForwardAdapter(self.model, compile=options.compile)
        self.eos = options.eos_ids
        pad = options.pad_token_id
        if pad is None:
            pad = getattr(self.forward.config, "pad_token_id", None)
            if pad is None:
                pad = self.eos[0] if self.eos else 0
        self.pad_token_id = pad
        self.eos_t = torch.tensor(self.eos, device=device, dtype=torch.long)
        total = prompt_len + options.max_new_tokens
        self.out = torch.full((batch, total), pad, dtype=torch.long, device=device)
        self.out[:, :prompt_len] = self.prompt
        self.full_mask = torch.ones((batch, total), dtype=torch.long, device=device)
        self.full_mask[:, :prompt_len] = self.prompt_mask
        # Left padding: real tokens are numbered from 0; pads get 1 (any valid index: they are masked out).
        mask = self.prompt_mask
        self.positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
        self.next_position = mask.sum(-1, keepdim=True)  # [B, 1]: position of the first generated token
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.last_step = torch.full((batch,), options.max_new_tokens - 1, dtype=torch.long, device=device)
        self.invalid = None  # rows a strategy flagged as having no valid token (flag_invalid)
        blocker = options.blocker
        self.blocker_start = 0 if blocker is None or blocker.include_prompt else blocker.n
        self.static_mask = None
        if options.cache == "static":
            # The static cache's length is rounded up so that one compiled decode graph serves nearby lengths; its
            # mask covers every slot (slots beyond the current position are excluded by causality).
            cache_len = -(-total // STATIC_CACHE_MULTIPLE) * STATIC_CACHE_MULTIPLE
            self.kv = make_cache(self.model, "static", max_cache_len=cache_len)
            self.static_mask = torch.ones((batch, cache_len), dtype=torch.long, device=device)
            self.static_mask[:, :prompt_len] = mask
        else:
            self.kv = make_cache(self.model, "dynamic")

    def choose(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """The token of generated position ``step`` (absolute ``prompt_len + step``) from its logits [B, V]."""
        options = self.options
        logits = logits.float()
        cur = self.prompt_len + step
        blocker = options.blocker
        if blocker is not None and step >= self.blocker_start and cur >= blocker.n:
            blocker.block_(logits, self.out[:, cur - blocker.n : cur])
        return STRATEGIES[options.strategy].choose(self, logits, step)

    def flag_invalid(self, rows: torch.Tensor) -> None:
        """Mark rows [B] (bool) that had no valid token: ``finish`` raises for them (one host sync, at the end)."""
        self.invalid = rows if self.invalid is None else self.invalid | rows

    def record(self, token: torch.Tensor, step: int) -> torch.Tensor:
        """Write generated position ``step``: rows that already emitted EOS get the pad token."""
        if self.eos:
            token = torch.where(self.finished, torch.full_like(token, self.pad_token_id), token)
            newly = torch.isin(token, self.eos_t) & ~self.finished
            self.last_step = torch.where(newly, torch.full_like(self.last_step, step), self.last_step)
            self.finished |= newly
        self.out[:, self.prompt_len + step] = token
        return token

    def all_finished(self) -> bool:
        """Every row has emitted EOS (on every rank, with ``sync_ranks``): one host sync."""
        done = self.finished.all()
        if (
            self.options.sync_ranks
            and torch.distributed.is_available()
            and torch.distributed.is_initialized()
        ):
            done = done.to(torch.int32)
            torch.distributed.all_reduce(done, op=torch.distributed.ReduceOp.MIN)
        return bool(done)


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    options: Optional[DecodeOptions] = None,
    **fields,
) -> torch.Tensor:
    """Continue each (left-padded) prompt by ``max_new_tokens`` tokens; returns ids [B, prompt + new].

    How: ``options`` (a ``DecodeOptions``), with any of its fields given as keywords replacing its values; or the
    keywords alone (``max_new_tokens=...`` at least): ``generate(model, ids, max_new_tokens=64, strategy="sample")``.
    The work is :func:`decode`.
    """
    options = DecodeOptions(**fields) if options is None else dataclasses.replace(options, **fields)
    return decode(model, input_ids, attention_mask, options)


@torch.no_grad()
def decode(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], options: DecodeOptions
) -> torch.Tensor:
    """The phases of a decode: prefill the prompts, then the decode steps (one token a pass, or drafted
    tokens checked a pass at a time), then finish (report invalid rows, cut after the last EOS)."""
    state = DecodeState(model, input_ids, attention_mask, options)
    if options.max_new_tokens == 0 or state.batch == 0:
        return state.prompt.clone()
    state.start()
    logits = prefill(state)
    if options.draft == "none":
        steps_run = decode_steps(state, logits)
    else:
        steps_run = decode_with_drafts(state, logits)
    return finish(state, steps_run)


def prefill(state: DecodeState) -> torch.Tensor:
    """One pass over the prompts, filling the cache; the logits of the last prompt position [B, V]."""
    return state.forward(state.prompt, state.prompt_mask, state.positions, state.kv, 0)


def decode_steps(state: DecodeState, logits: torch.Tensor) -> int:
    """One token per pass; returns the number of generated positions written. With EOS ids, the host checks
    whether every row has finished every ``check_every`` steps only."""
    options, prompt_len = state.options, state.prompt_len
    steps_run = options.max_new_tokens
    for step in range(options.max_new_tokens):
        cur = prompt_len + step
        token = state.record(state.choose(logits, step), step)
        if step == options.max_new_tokens - 1:
            break
        if state.eos and (step + 1) % options.check_every == 0 and state.all_finished():
            steps_run = step + 1
            break
        # A static cache attends over all max_cache_len slots: give it the whole mask (same shape every step;
        # slots not yet written are excluded by causality). A dynamic cache needs the mask of what it holds.
        step_mask = state.static_mask if options.cache == "static" else state.full_mask[:, : cur + 1]
        logits = state.forward(
            token[:, None], step_mask, state.next_position + step, state.kv, cur, decode=True
        )
    return steps_run


def finish(state: DecodeState, steps_run: int) -> torch.Tensor:
    """Raise for rows that had no valid token; cut the output after the step at which the last row finished."""
    options = state.options
    if state.invalid is not None and bool(state.invalid.any()):
        rows = state.invalid.nonzero().flatten().tolist()
        raise HfdistError(
            f"sampling: rows {rows} had no valid token at some step (logits all -inf or NaN; "
            "a blocker that blocks every token, or a diverged model)"
        )
    if state.eos:
        # Cut after the step at which the last row finished (what model.generate returns): one sync.
        steps_run = min(steps_run, int(state.last_step.max()) + 1)
        if options.sync_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([steps_run], device=state.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            steps_run = int(t)
    return state.out[:, : state.prompt_len + steps_run]


def ngram_draft(sequence: torch.Tensor, max_ngram: int, num_tokens: int) -> torch.Tensor:
    """Prompt-lookup drafting: up to ``num_tokens`` tokens that followed an earlier occurrence of the last ``n``
    tokens of ``sequence`` [L], for the largest ``n <= max_ngram`` that occurs; empty if none does.

    Of the occurrences, the latest one followed by ``num_tokens`` tokens is used (the freshest context, a full
    draft), else the earliest (the longest draft).
    """
    length = sequence.numel()
    for n in range(min(max_ngram, length - 1), 0, -1):
        windows = sequence[:-1].unfold(0, n, 1)  # every earlier n-gram, each followed by at least one token
        hits = (windows == sequence[-n:]).all(1).nonzero().flatten()
        if len(hits):
            follows = hits + n
            full = follows[follows + num_tokens <= length]
            begin = int(full[-1] if len(full) else follows[0])
            return sequence[begin : begin + num_tokens]
    return sequence[:0]


def decode_with_drafts(state: DecodeState, logits: torch.Tensor) -> int:
    """Greedy decoding with ``ngram_draft`` guesses checked in one pass (``generate(draft="ngram")``).

    The cache always holds every written position but the newest (``pending``), as in the plain loop.
    Returns the number of generated positions written.
    """
    options, out, prompt_len = state.options, state.out, state.prompt_len
    finished = state.finished if state.eos else None  # updated in place by record()
    step = 0
    pending = state.record(state.choose(logits, 0), 0)
    while step < options.max_new_tokens - 1 and not (finished is not None and bool(finished.all())):
        cur = prompt_len + step  # position of ``pending``
        room = (
            options.max_new_tokens - 1 - step
        )  # positions still to write after it: guesses + the model's next token
        drafts = [
            ngram_draft(row[: cur + 1], options.draft_ngram, min(options.draft_tokens, room - 1))
            for row in out
        ]
        k = min(len(d) for d in drafts)
        block = torch.stack([torch.cat([pending[i : i + 1], d[:k]]) for i, d in enumerate(drafts)])
        out[:, cur + 1 : cur + 1 + k] = block[:, 1:]  # tentatively: the blocker reads them while checking
        positions = state.next_position + step + torch.arange(k + 1, device=out.device)
        logits = state.forward(
            block, state.full_mask[:, : cur + 1 + k], positions, state.kv, cur, decode=k == 0, keep=k + 1
        )
        if k == 0:  # keep=1 gives [B, V]
            logits = logits[:, None]
        accepted = 0
        while True:  # check the guesses in order: position cur + 1 + j is decided by logits[:, j]
            token = state.choose(logits[:, accepted], step + 1 + accepted)
            agrees = token == block[:, accepted + 1] if accepted < k else None
            if finished is not None and agrees is not None:
                agrees |= finished  # a finished row writes pads whatever its guess was
            if accepted == k or not bool(agrees.all()):
                break
            state.record(token, step + 1 + accepted)
            accepted += 1
        pending = state.record(token, step + 1 + accepted)
        if k > accepted:  # drop the rejected guesses' keys and values
            state.kv.crop(-(k - accepted))
        step += 1 + accepted
    return step + 1


def continuation_ids(output: torch.Tensor, prompt_len: int, eos_token_id=None) -> list[list[int]]:
    """The generated ids of each row as lists, cut before the first EOS (tokens after EOS never count)."""
    eos = set(_eos_ids(eos_token_id))
    rows = []
    for row in output[:, prompt_len:].tolist():
        if eos:
            for i, tok in enumerate(row):
                if tok in eos:
                    row = row[:i]
                    break
        rows.append(row)
    return rows


def left_pad(sequences: Sequence[Sequence[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``input_ids`` and ``attention_mask`` [B, max_len]."""
    width = max((len(s) for s in sequences), default=0)
    ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        if len(seq):
            ids[i, width - len(seq) :] = torch.as_tensor(list(seq), dtype=torch.long)
            mask[i, width - len(seq) :] = 1
    return ids, mask


def generate_batched(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int = 32,
    pad_token_id: int = 0,
    eos_token_id=None,
    data_parallel: bool = False,
    **kwargs,
) -> list[list[int]]:
    """Generate for a list of token-id prompts in left-padded batches; returns the continuations (cut at EOS).

    ``data_parallel=True`` with ``torch.distributed`` initialised: each rank takes every world-th batch and the
    results are gathered on all ranks (for models replicated on every rank). Other keywords go to ``generate``.
    """
    rank, world = 0, 1
    if data_parallel and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results: dict[int, list[int]] = {}
    starts = list(range(0, len(prompts), batch_size))
    for start in starts[rank::world]:
        chunk = prompts[start : start + batch_size]
        ids, mask = left_pad(chunk, pad_token_id)
        out = generate(model, ids, mask, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)
        for i, cont in enumerate(continuation_ids(out.cpu(), ids.shape[1], eos_token_id)):
            results[start + i] = cont
    if world > 1:
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, results)
        for part in gathered:
            results.update(part)
    return [results[i] for i in range(len(prompts))]

"""The paper's measurements of generated text and of a model's predictions, each with its exact definition.

On generations (lists of token ids; a generation is the continuation only, never the prompt, cut before EOS):
- ``type_token_ratio``: unique ids / count over the last ``window`` (96) tokens (the upstream definition);
  ``word_type_token_ratio`` the same over whitespace-separated words; ``ttr_over_position`` the sliding window.
- ``distinct_n``: unique n-grams / all n-grams, pooled over the generations (Li et al., 2016).
- ``self_bleu``: mean sentence BLEU-4 of each generation against all the others as references
  (sacrebleu's ``sentence_bleu`` on token ids: exp smoothing, effective order), in [0, 1].
- ``dataset_overlap``: the longest run of tokens a generation shares with any training sequence, and the share
  of generations whose longest run exceeds ``min_run`` (10) tokens.
- ``repetition_rate``: 1 - unique n-grams / n-grams within each generation (n = 4), averaged over generations.

On generated images (colour-cluster ids, row by row, the continuation of a context of whole rows): the
paper's signs of degeneration, stripes and flat colour: ``distinct_tokens`` (distinct colour tokens),
``repeated_row_fraction`` (share of generated rows equal to the row above) and the TTR of the last 96 tokens.

On held-out text with a model (``heldout_stats``): next-token NLL (nats), perplexity, entropy, top-k mass.
``greedy_ttr`` runs the upstream protocol: greedy from 32-token contexts to 256 tokens, TTR of the last 96.

Every measure that is reported is registered once in ``METRICS`` (``register_metric``, at the end of this file): its
name, what it is computed on (generations or held-out next-token statistics), for which modality, whether training
logs it (``eval/NAME`` in metrics.jsonl, TensorBoard and summary.json), its line in the training summary and its
column in the comparison report's tables. ``generation_metrics``, ``heldout_stats``, the trainer's evaluation, its
summary and ``hfdist.report`` all read the registry.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch

from hfdist.errors import HfdistError
from hfdist.generation import continuation_ids, generate, model_device


# ------------------------------------------------------------------------------------------------ diversity
def type_token_ratio(token_ids: Sequence[int], window: int = 96) -> float:
    """Unique tokens / token count over the last ``window`` tokens (all of them if fewer); 0.0 if empty."""
    if window < 1:
        raise HfdistError(f"window: must be >= 1, got {window}")
    tail = list(token_ids)[-window:]
    return len(set(tail)) / len(tail) if tail else 0.0


def word_type_token_ratio(text: str, window: int = 96) -> float:
    """``type_token_ratio`` over the words of ``text`` (split on whitespace, case kept)."""
    return type_token_ratio(text.split(), window)


def ttr_over_position(token_ids: Sequence[int], window: int = 96) -> list[float]:
    """Sliding-window TTR: entry ``i`` is the TTR of tokens ``[i, i + window)``, for each full window.

    So entry ``i`` belongs to position ``i + window`` (the end of its window); a sequence of ``L >= window``
    tokens has ``L - window + 1`` entries, a shorter one none. Counted incrementally: O(L).
    """
    ids = list(token_ids)
    if window < 1:
        raise HfdistError(f"window: must be >= 1, got {window}")
    if len(ids) < window:
        return []
    counts = Counter(ids[:window])
    out = [len(counts) / window]
    for i in range(window, len(ids)):
        counts[ids[i]] += 1
        old = ids[i - window]
        counts[old] -= 1
        if counts[old] == 0:
            del counts[old]
        out.append(len(counts) / window)
    return out


def _ngrams(seq: Sequence, n: int) -> list[tuple]:
    return [tuple(seq[i : i + n]) for i in range(len(seq) - n + 1)]


def distinct_n(sequences: Iterable[Sequence[int]], n: int = 2) -> float:
    """Unique n-grams / all n-grams, pooled over all sequences; 0.0 when there is no n-gram."""
    if n < 1:
        raise HfdistError(f"n: must be >= 1, got {n}")
    grams = [g for seq in sequences for g in _ngrams(list(seq), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(sequences: Iterable[Sequence[int]], n: int = 4) -> float:
    """Mean over sequences of 1 - unique n-grams / n-grams (the share of n-grams that repeat an earlier one
    of the same sequence); sequences shorter than ``n`` are skipped; 0.0 if none is long enough."""
    rates = []
    for seq in sequences:
        grams = _ngrams(list(seq), n)
        if grams:
            rates.append(1.0 - len(set(grams)) / len(grams))
    return float(np.mean(rates)) if rates else 0.0


# ------------------------------------------------------------------------------------------ generated images
def distinct_tokens(token_ids: Sequence[int]) -> int:
    """The number of distinct ids (colour clusters) in a generation."""
    return len(set(token_ids))


def repeated_row_fraction(
    token_ids: Sequence[int], width: int, row_above: Optional[Sequence[int]] = None
) -> float:
    """The share of the generation's rows (``width`` tokens each, a trailing partial row ignored) that repeat the
    row above them exactly; the first row is compared with ``row_above`` (the context's last row) when given, else
    it is not counted. 0.0 when no row is counted."""
    if width < 1:
        raise HfdistError(f"width: must be >= 1, got {width}")
    ids = list(token_ids)
    rows = [ids[i : i + width] for i in range(0, len(ids) - width + 1, width)]
    if row_above is not None:
        above = list(row_above)
        if len(above) != width:
            raise HfdistError(f"row_above: expected {width} tokens, got {len(above)}")
        rows = [above] + rows
    pairs = list(zip(rows[:-1], rows[1:]))
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else 0.0


def image_completion_metrics(
    generations: Sequence[Sequence[int]], contexts=None, width: int = 32, window: int = 96
) -> dict:
    """Means over completed images: ``distinct_colors`` (distinct colour tokens in the generated part),
    ``repeated_rows`` (``repeated_row_fraction``, the first generated row compared with the context's last row
    when ``contexts`` [N, 1 + rows * width] are given) and ``ttr{window}`` (TTR of the last ``window`` tokens)."""
    measured = Generations([list(g) for g in generations], contexts=contexts, width=width, window=window)
    return {
        METRICS[name].key(window): METRICS[name].compute(measured)
        for name in ("distinct_colors", "repeated_rows", "ttr{window}")
    }


# --------------------------------------------------------------------------------------------------- BLEU
def _bleu_from_stats(
    correct: list[int], total: list[int], hyp_len: int, ref_len: int, smoothing: str
) -> float:
    """sacrebleu's ``BLEU.compute_bleu`` with effective order, on a 0..1 scale."""
    if hyp_len < ref_len:
        bp = math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0
    else:
        bp = 1.0
    if not any(correct):
        return 0.0
    log_sum, order, smooth = 0.0, 0, 1.0
    for c, t in zip(correct, total):
        if t == 0:
            break
        order += 1
        if c == 0:
            if smoothing == "exp":  # NIST / Chen & Cherry method 3: 1 / (2^k * total) for the k-th zero
                smooth *= 2
                log_sum += math.log(1.0 / (smooth * t))
            else:  # "none": a zero precision makes the score 0
                return 0.0
        else:
            log_sum += math.log(c / t)
    return bp * math.exp(log_sum / order)


def _closest_length(hyp_len: int, ref_lens: Iterable[int]) -> int:
    """The reference length closest to the hypothesis length; ties go to the shorter (as sacrebleu)."""
    return min(ref_lens, key=lambda r: (abs(r - hyp_len), r))


def sentence_bleu(
    hypothesis: Sequence[int], references: Sequence[Sequence[int]], max_order: int = 4, smoothing: str = "exp"
) -> float:
    """BLEU of one token sequence against several references, in [0, 1].

    Clipped n-gram precisions for n = 1..``max_order`` (a hypothesis n-gram counts at most as often as it
    occurs in the reference where it occurs most), their geometric mean over the orders the hypothesis is long
    enough for (effective order), times the brevity penalty ``exp(1 - r / h)`` when the hypothesis length
    ``h`` is below the closest reference length ``r``. ``smoothing="exp"`` replaces the k-th zero precision by
    ``1 / (2^k * total)``; ``"none"`` leaves it zero. Equals ``sacrebleu.sentence_bleu(...).score / 100``
    with ``tokenize="none"`` on the ids written as words.
    """
    hyp = list(hypothesis)
    ref_max: Counter = Counter()
    for ref in references:
        for g, c in Counter(g for n in range(1, max_order + 1) for g in _ngrams(list(ref), n)).items():
            if c > ref_max[g]:
                ref_max[g] = c
    return _sentence_bleu_stats(hyp, ref_max, [len(r) for r in references], max_order, smoothing)


def _sentence_bleu_stats(hyp: list, ref_max, ref_lens: list[int], max_order: int, smoothing: str) -> float:
    correct, total = [0] * max_order, [0] * max_order
    hyp_counts = Counter(g for n in range(1, max_order + 1) for g in _ngrams(hyp, n))
    for g, c in hyp_counts.items():
        correct[len(g) - 1] += min(c, ref_max(g) if callable(ref_max) else ref_max[g])
    for n in range(1, max_order + 1):
        total[n - 1] = max(len(hyp) - n + 1, 0)
    return _bleu_from_stats(correct, total, len(hyp), _closest_length(len(hyp), ref_lens), smoothing)


def self_bleu(sequences: Sequence[Sequence[int]], max_order: int = 4, smoothing: str = "exp") -> float:
    """Mean over generations of ``sentence_bleu(generation, all other generations)``, in [0, 1].

    Higher means the generations resemble each other more (less diverse). Needs at least two generations.
    The reference counts are pooled once: for each n-gram the largest and second-largest count over all
    generations, so "the maximum over the others" costs O(1) and the whole is O(total n-grams).
    """
    if smoothing not in ("exp", "none"):
        raise HfdistError(f"smoothing {smoothing!r}: unknown (choose from exp, none)")
    seqs = [list(s) for s in sequences]
    if len(seqs) < 2:
        raise HfdistError(f"self_bleu: needs at least 2 generations, got {len(seqs)}")
    best: dict = {}  # n-gram -> (largest count, its sequence, second-largest count)
    for i, seq in enumerate(seqs):
        for g, c in Counter(g for n in range(1, max_order + 1) for g in _ngrams(seq, n)).items():
            top, who, second = best.get(g, (0, -1, 0))
            if c > top:
                best[g] = (c, i, top)
            elif c > second:
                best[g] = (top, who, c)
    lengths = [len(s) for s in seqs]
    scores = []
    for i, seq in enumerate(seqs):

        def others_max(g, i=i):
            top, who, second = best[g]
            return second if who == i else top

        scores.append(
            _sentence_bleu_stats(seq, others_max, lengths[:i] + lengths[i + 1 :], max_order, smoothing)
        )
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------ dataset overlap
def _concat(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenated tokens, the row of each position and the end (exclusive) of that position's row."""
    arrays = [np.asarray(r, dtype=np.int64).reshape(-1) for r in rows]
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    tokens = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)
    row = np.repeat(np.arange(len(arrays)), lengths)
    ends = np.cumsum(lengths)
    return tokens, row, ends[row] if len(row) else np.zeros(0, dtype=np.int64)


def longest_common_runs(generations: Sequence[Sequence[int]], training) -> list[int]:
    """For each generation, the length of the longest run of consecutive tokens that also occurs,
    consecutively, inside one training sequence.

    Grows all candidate runs one token at a time: at length k, a (start in a generation) survives if its
    k-gram is among the surviving training k-grams, and a training start survives if its k-gram is among the
    generations'; the survivors of length k are the only candidates for k + 1. k-grams are compared by a
    64-bit polynomial hash (false match chance about 1e-19 per pair).
    """
    if isinstance(training, torch.Tensor):
        training = training.cpu().numpy()
    g_tok, g_row, g_end = _concat(generations)
    t_tok, _, t_end = _concat(training)
    best = np.zeros(len(generations), dtype=np.int64)
    base = np.uint64(1099511628211)
    q_pos, t_pos = np.arange(len(g_tok)), np.arange(len(t_tok))
    q_hash = np.zeros(len(q_pos), dtype=np.uint64)
    t_hash = np.zeros(len(t_pos), dtype=np.uint64)
    k = 0
    with np.errstate(over="ignore"):
        while len(q_pos) and len(t_pos):
            # Extend every surviving run by its next token (if its row has one).
            q_ok, t_ok = q_pos + k < g_end[q_pos], t_pos + k < t_end[t_pos]
            q_pos, q_hash = q_pos[q_ok], q_hash[q_ok]
            t_pos, t_hash = t_pos[t_ok], t_hash[t_ok]
            q_hash = q_hash * base + (g_tok[q_pos + k].astype(np.uint64) + np.uint64(1))
            t_hash = t_hash * base + (t_tok[t_pos + k].astype(np.uint64) + np.uint64(1))
            q_keep = np.isin(q_hash, t_hash)
            t_keep = np.isin(t_hash, q_hash)
            q_pos, q_hash = q_pos[q_keep], q_hash[q_keep]
            t_pos, t_hash = t_pos[t_keep], t_hash[t_keep]
            k += 1
            best[np.unique(g_row[q_pos])] = k
    return best.tolist()


def dataset_overlap(generations: Sequence[Sequence[int]], training, min_run: int = 10) -> dict:
    """Copying of the training data: per generation the longest common token run (``longest_common_runs``);
    ``mean_longest_run``, ``max_longest_run``, and ``share_over_min_run``: the share of generations whose
    longest run is longer than ``min_run`` tokens."""
    runs = longest_common_runs(generations, training)
    return {
        "longest_runs": runs,
        "mean_longest_run": float(np.mean(runs)) if runs else 0.0,
        "max_longest_run": int(max(runs)) if runs else 0,
        "min_run": min_run,
        "share_over_min_run": float(np.mean([r > min_run for r in runs])) if runs else 0.0,
    }


def generation_metrics(
    generations: Sequence[Sequence[int]],
    *,
    texts: Optional[Sequence[str]] = None,
    training=None,
    window: int = 96,
    min_run: int = 10,
    modality: str = "text",
    contexts=None,
    width: Optional[int] = None,
    during_training: bool = False,
) -> dict:
    """Every registered generation metric of ``modality`` for one set of generations (a row of the compare table),
    in registration order; those that need ``texts`` or ``training`` only when given. Images: ``width`` (tokens per
    row) and the ``contexts`` (the row above the first generated one). ``during_training``: only the metrics training
    logs."""
    measured = Generations(
        [list(g) for g in generations],
        texts=texts,
        training=training,
        contexts=contexts,
        width=width,
        window=window,
        min_run=min_run,
    )
    given = {"texts": texts is not None, "training": training is not None}
    return {
        metric.key(window, min_run): metric.compute(measured)
        for metric in registered("generations", modality, during_training)
        if metric.needs is None or given[metric.needs]
    }


def mean_ttr_over_position(generations: Sequence[Sequence[int]], window: int = 96) -> list[float]:
    """The mean of ``ttr_over_position`` over the generations long enough for each window position."""
    curves = [ttr_over_position(g, window) for g in generations]
    width = max((len(c) for c in curves), default=0)
    out = []
    for i in range(width):
        values = [c[i] for c in curves if len(c) > i]
        out.append(float(np.mean(values)))
    return out


# ------------------------------------------------------------------------------------ the model's predictions
@torch.no_grad()
def _predicted_logits(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor], batch_size: int
):
    """(logits [positions, V], targets [positions]) of each row's predicted positions (tokens 1..L-1 from the tokens
    before; a position counts when it and the token before are unmasked), one row at a time, in eval mode."""
    if input_ids.ndim != 2:
        raise HfdistError(f"input_ids: expected [batch, length], got shape {tuple(input_ids.shape)}")
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(input_ids), batch_size):
            ids = input_ids[start : start + batch_size].to(device=device, dtype=torch.long)
            mask = (
                torch.ones_like(ids)
                if attention_mask is None
                else attention_mask[start : start + batch_size].to(device=device, dtype=torch.long)
            )
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            for row in range(
                len(ids)
            ):  # one row at a time: at most [L, V] fp32 temporaries besides the logits
                keep = (mask[row, 1:] * mask[row, :-1]).bool()
                yield logits[row, :-1][keep].float(), ids[row, 1:][keep]
            del logits
    finally:
        model.train(was_training)


def next_token_stats(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, batch_size: int = 8
) -> dict:
    """Per predicted position (tokens 1..L-1 from the tokens before; a position counts when it and the
    token before are unmasked): ``nll`` (nats), ``entropy`` (nats), ``top1``/``top3``/``top5`` (probability
    mass of the k most probable tokens); each a float64 numpy array, positions of all rows concatenated."""
    parts: dict = {k: [] for k in ("nll", "entropy", "top1", "top3", "top5")}
    for logits, target in _predicted_logits(model, input_ids, attention_mask, batch_size):
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        parts["nll"].append(-logp.gather(1, target[:, None])[:, 0])
        parts["entropy"].append(-(p * logp).sum(-1))
        top = p.topk(min(5, p.shape[-1]), dim=-1).values.cumsum(-1)
        for k in (1, 3, 5):
            parts[f"top{k}"].append(top[:, min(k, top.shape[-1]) - 1])
    return {k: torch.cat(v).double().cpu().numpy() if v else np.zeros(0) for k, v in parts.items()}


def heldout_logits(
    model, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *, batch_size: int = 8
) -> torch.Tensor:
    """The model's next-token logits at every predicted held-out position (as ``next_token_stats`` counts them),
    [positions, V], fp32 on the host: positions x V x 4 bytes (16 x 127 x 49152: 0.4 GB for the demo)."""
    rows = [logits.cpu() for logits, _ in _predicted_logits(model, input_ids, attention_mask, batch_size)]
    if not rows:
        raise HfdistError("held-out logits: no predicted tokens (sequences shorter than 2 tokens?)")
    return torch.cat(rows)


def mean_entropy(logits: torch.Tensor, temperature: float = 1.0, chunk: int = 1024) -> float:
    """Mean entropy (nats) of ``softmax(logits / temperature)`` over the rows of ``logits`` [positions, V]."""
    total = 0.0
    for start in range(0, len(logits), chunk):
        logp = torch.log_softmax(logits[start : start + chunk].double() / temperature, dim=-1)
        total += float(-(logp.exp() * logp).sum())
    return total / len(logits)


def matched_temperature(
    logits: torch.Tensor, target_entropy: float, *, tolerance: float = 1e-4, max_steps: int = 60
) -> dict:
    """The sampling temperature T* at which the mean next-token entropy of ``logits`` (a model's, on held-out
    positions: ``heldout_logits``) equals ``target_entropy`` (another model's on the same positions), found by
    bisection (the entropy grows with T): ``{"temperature", "entropy", "target_entropy", "steps"}``."""
    if not target_entropy > 0:
        raise HfdistError(f"matched temperature: the target entropy must be > 0, got {target_entropy}")
    low, high = 1e-3, 1.0
    while mean_entropy(logits, high) < target_entropy:  # above the model's own entropy: T* > 1
        low, high = high, 2 * high
        if high > 1e3:
            raise HfdistError(
                f"matched temperature: the target entropy {target_entropy:.4f} nats is beyond this model's "
                "entropy at any temperature up to 1000"
            )
    steps, temperature, entropy = 0, high, mean_entropy(logits, high)
    while steps < max_steps and abs(entropy - target_entropy) > tolerance:
        temperature = (low * high) ** 0.5  # bisection of log T: the entropy changes over orders of magnitude
        entropy = mean_entropy(logits, temperature)
        low, high = (temperature, high) if entropy < target_entropy else (low, temperature)
        steps += 1
    return {"temperature": temperature, "entropy": entropy, "target_entropy": target_entropy, "steps": steps}


def summarize_next_token_stats(stats: dict, during_training: bool = False) -> dict:
    """The registered held-out measures of ``next_token_stats`` arrays (means over the predicted positions):
    ``loss`` (mean NLL, nats), ``perplexity`` = exp(loss), ``entropy`` (mean entropy of the predicted distribution,
    nats), ``top1_mass``/``top3_mass``/``top5_mass`` (mean probability of the 1/3/5 most probable tokens),
    ``num_tokens`` (predicted positions). ``during_training``: only the measures training logs."""
    if len(stats["nll"]) == 0:
        raise HfdistError("held-out statistics: no predicted tokens (sequences shorter than 2 tokens?)")
    return {metric.name: metric.compute(stats) for metric in registered("heldout", None, during_training)}


def heldout_stats(
    model,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 8,
    during_training: bool = False,
) -> dict:
    """Held-out next-token statistics, means over all predicted tokens (``summarize_next_token_stats`` of
    ``next_token_stats``): ``loss``, ``perplexity``, ``entropy``, ``top1_mass``, ``top3_mass``, ``top5_mass``,
    ``num_tokens``."""
    return summarize_next_token_stats(
        next_token_stats(model, input_ids, attention_mask, batch_size=batch_size), during_training
    )


def greedy_ttr(
    model,
    contexts: torch.Tensor,
    *,
    total_len: int = 256,
    window: int = 96,
    eos_token_id=None,
    batch_size: int = 32,
) -> dict:
    """The upstream TTR protocol: greedy decoding from each context (e.g. [B, 32]) until ``total_len`` tokens
    (context included), then the TTR of the last ``window`` generated tokens (cut at EOS if ``eos_token_id``).

    Returns ``ttr{window}`` (mean over contexts), ``ttr{window}_per_context`` and ``generations`` (the
    generated ids of each context, prompt excluded)."""

    if contexts.ndim != 2:
        raise HfdistError(
            f"contexts: expected [num_contexts, context_len], got shape {tuple(contexts.shape)}"
        )
    new_tokens = total_len - contexts.shape[1]
    if new_tokens < 1:
        raise HfdistError(f"total_len {total_len}: must exceed the context length {contexts.shape[1]}")
    was_training = model.training
    model.eval()
    generations = []
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        out = generate(model, chunk, max_new_tokens=new_tokens, eos_token_id=eos_token_id)
        generations.extend(continuation_ids(out.cpu(), chunk.shape[1], eos_token_id))
    model.train(was_training)
    per_context = [type_token_ratio(g, window) for g in generations]
    return {
        f"ttr{window}": float(np.mean(per_context)) if per_context else 0.0,
        f"ttr{window}_per_context": per_context,
        "generations": generations,
    }


# ------------------------------------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Column:
    """A metric's column in one table of the comparison report (``hfdist.report``); ``{window}`` and ``{min_run}``
    in ``header`` and ``legend`` are filled in."""

    header: str
    digits: int = 3
    percent: bool = False  # shown as a percentage with one decimal
    order: int = (
        0  # its place among the table's columns (sorted by it; equal ones keep the registration order)
    )
    legend: str = ""  # its sentence in the paragraph under the table


@dataclass(frozen=True)
class Metric:
    """One registered measure (see ``register_metric``)."""

    name: str  # its key everywhere ({window}, {min_run} filled in): eval/NAME, eval/<set>/NAME, the report's rows
    on: str  # "generations" (compute: Generations -> value) or "heldout" (compute: next_token_stats arrays -> value)
    compute: Callable[[Any], Any]
    modalities: tuple[str, ...] = ("text", "image")
    needs: Optional[str] = None  # "texts" or "training": computed only where the caller has them
    # Logged at each training evaluation (metrics.jsonl, TensorBoard, summary.json).
    during_training: bool = False
    summary_label: Optional[str] = None  # its line in the training summary (hfdist.trainer.format_summary)
    columns: dict = field(default_factory=dict)  # report table ("text", "image", "heldout") -> Column

    def key(self, window: int = 96, min_run: int = 10) -> str:
        return self.name.format(window=window, min_run=min_run)


ON = ("generations", "heldout")
NEEDS = (None, "texts", "training")
METRICS: dict[str, Metric] = {}  # in registration order: the order of every output's keys and columns


def register_metric(name: str, on: str, compute: Callable[[Any], Any], **spec) -> Metric:
    """Register the measure ``name``, computed ``on`` "generations" or "heldout" statistics by ``compute`` (the other
    fields: ``Metric``); returns it. Registering again under a name already taken is an error.

    From this alone the measure is computed (``generation_metrics`` or ``heldout_stats``), logged during training
    when ``during_training`` (``eval/NAME``; on the greedy generations from the held-out contexts for a generation
    measure), listed in the training summary with ``summary_label`` and shown in the report's ``columns``."""
    if name in METRICS:
        raise HfdistError(f"metric {name!r}: already registered")
    if on not in ON:
        raise HfdistError(f"metric {name!r}: on {on!r} is not one of {', '.join(ON)}")
    metric = Metric(name, on, compute, **spec)
    if metric.needs not in NEEDS:
        raise HfdistError(f"metric {name!r}: needs {metric.needs!r} is not one of texts, training")
    METRICS[name] = metric
    return metric


def registered(on: str, modality: Optional[str] = None, during_training: bool = False) -> list[Metric]:
    """The metrics computed ``on`` generations or held-out statistics, for ``modality`` (None: any), in registration
    order; ``during_training``: only those training logs."""
    return [
        m
        for m in METRICS.values()
        if m.on == on
        and (modality is None or modality in m.modalities)
        and (m.during_training or not during_training)
    ]


def table_columns(table: str) -> list[tuple[Metric, Column]]:
    """The columns of one report table ("text", "image", "heldout"): (metric, column), by ``Column.order``."""
    columns = [(m, m.columns[table]) for m in METRICS.values() if table in m.columns]
    return sorted(columns, key=lambda pair: pair[1].order)


def summary_measures(keys: Iterable[str]) -> list[tuple[str, str]]:
    """(name, label) of each metric with a summary label, in registration order; one with ``{window}`` in its name
    once per window found among ``keys`` (``eval/ttr96``, ``eval/<set>/ttr16``), smallest first."""
    keys = list(keys)
    out = []
    for metric in METRICS.values():
        if metric.summary_label is None:
            continue
        if "{window}" not in metric.name:
            out.append((metric.name, metric.summary_label))
            continue
        pattern = re.compile("/" + r"(\d+)".join(map(re.escape, metric.name.split("{window}"))) + "$")
        windows = sorted({int(found.group(1)) for k in keys if (found := pattern.search(k))})
        out += [(metric.key(w), metric.summary_label.format(window=w)) for w in windows]
    return out


@dataclass
class Generations:
    """One set of generations (ids, the continuation only) and what the metrics on them may read."""

    ids: list
    texts: Optional[Sequence[str]] = None
    training: Any = None
    contexts: Any = None  # images: [N, 1 + rows * width]; the row above each first generated row
    width: Optional[int] = None  # images: tokens per row
    window: int = 96
    min_run: int = 10

    def mean(self, per_generation: Callable[[list], float]) -> float:
        """The mean over the generations of ``per_generation``; 0.0 without generations."""
        return float(np.mean([per_generation(g) for g in self.ids])) if self.ids else 0.0

    @cached_property
    def overlap(self) -> dict:
        """``dataset_overlap`` with the training data, computed once for the measures that read it."""
        return dataset_overlap(self.ids, self.training, self.min_run)

    def rows_above(self) -> list:
        """Per generation, the context's last row (None without contexts, or for a context of the start token)."""
        if self.contexts is None:
            return [None] * len(self.ids)
        rows = (
            self.contexts.tolist() if hasattr(self.contexts, "tolist") else [list(c) for c in self.contexts]
        )
        return [c[-self.width :] if len(c) > self.width else None for c in rows]


# The registered measures, in the order of every output's keys. Held-out ones compute on ``next_token_stats`` arrays.
def _mean_of(array: str) -> Callable[[dict], float]:
    return lambda stats: float(stats[array].mean())


register_metric(
    "loss", "heldout", _mean_of("nll"), during_training=True, summary_label="validation loss (nats/token)"
)
register_metric(
    "perplexity",
    "heldout",
    lambda stats: math.exp(min(float(stats["nll"].mean()), 700.0)),
    during_training=True,
    summary_label="validation perplexity",
    columns={"heldout": Column("Perplexity", digits=2)},
)
register_metric(
    "entropy",
    "heldout",
    _mean_of("entropy"),
    during_training=True,
    summary_label="validation entropy (nats)",
    columns={"heldout": Column("Entropy (nats)")},
)
for _k in (1, 3, 5):
    register_metric(
        f"top{_k}_mass",
        "heldout",
        _mean_of(f"top{_k}"),
        during_training=True,
        summary_label="top-1 probability mass" if _k == 1 else None,
        columns={"heldout": Column(f"Top-{_k} mass")},
    )
register_metric(
    "num_tokens", "heldout", lambda stats: len(stats["nll"]), columns={"heldout": Column("Tokens")}
)

# Generation measures compute on ``Generations``.
register_metric("num_generations", "generations", lambda g: len(g.ids))
register_metric("mean_length", "generations", lambda g: g.mean(len))
TTR_LEGEND = "TTR-{window}: unique / total tokens over the last {window} generated tokens"
register_metric(
    "ttr{window}",
    "generations",
    lambda g: g.mean(lambda ids: type_token_ratio(ids, g.window)),
    during_training=True,
    summary_label="greedy TTR over last {window} tokens",
    columns={
        "text": Column("TTR-{window} ↑", order=1, legend=TTR_LEGEND + ", mean over contexts."),
        "image": Column("TTR-{window} ↑", order=3, legend=TTR_LEGEND + "."),
    },
)
for _n in (1, 2, 3):  # the table shows distinct-2
    register_metric(
        f"distinct_{_n}",
        "generations",
        lambda g, n=_n: distinct_n(g.ids, n),
        columns={
            "text": Column(
                "Distinct-2 ↑", order=2, legend="Distinct-2: unique / total bigrams over all generations."
            )
        }
        if _n == 2
        else {},
    )
register_metric(
    "repetition_rate_4",
    "generations",
    lambda g: repetition_rate(g.ids, 4),
    columns={
        "text": Column(
            "Repeated 4-grams ↓",
            order=4,
            legend="Repeated 4-grams: share of 4-grams repeating an earlier one in the same generation.",
        )
    },
)
register_metric(
    "self_bleu",
    "generations",
    lambda g: self_bleu(g.ids) if len(g.ids) >= 2 else None,
    columns={
        "text": Column(
            "Self-BLEU ↓",
            order=3,
            legend="Self-BLEU: mean sentence BLEU-4 (exp smoothing) of each generation against the others.",
        )
    },
)
register_metric(
    "word_ttr{window}",
    "generations",
    lambda g: float(np.mean([word_type_token_ratio(t, g.window) for t in g.texts])) if g.texts else 0.0,
    needs="texts",
)
register_metric(
    "overlap_mean_longest_run",
    "generations",
    lambda g: g.overlap["mean_longest_run"],
    needs="training",
    columns={
        "text": Column("Longest overlap (mean)", digits=1, order=6),
        "image": Column("Longest overlap (mean)", digits=1, order=5),
    },
)
register_metric(
    "overlap_max_longest_run", "generations", lambda g: g.overlap["max_longest_run"], needs="training"
)
OVERLAP_LEGEND = "Overlap: share of {} sharing a run of more than {{min_run}} {}"
register_metric(
    "overlap_share_over_{min_run}",
    "generations",
    lambda g: g.overlap["share_over_min_run"],
    needs="training",
    columns={
        "text": Column(
            "Overlap > {min_run} tokens ↓",
            percent=True,
            order=5,
            legend=OVERLAP_LEGEND.format(
                "generations",
                "consecutive tokens with a training sequence; longest overlap: mean longest shared run.",
            ),
        ),
        "image": Column(
            "Overlap > {min_run} tokens ↓",
            percent=True,
            order=4,
            legend=OVERLAP_LEGEND.format("completions", "tokens with a training image."),
        ),
    },
)
# The paper's signs of degeneration in generated images, logged during training too.
IMAGE_MEASURE = {"modalities": ("image",), "during_training": True}
register_metric(
    "distinct_colors",
    "generations",
    lambda g: g.mean(distinct_tokens),
    **IMAGE_MEASURE,
    summary_label="distinct colour tokens",
    columns={
        "image": Column(
            "Distinct colours ↑",
            digits=1,
            order=1,
            legend="Distinct colours: distinct colour tokens in the generated part, mean over images (flat colour: "
            "few).",
        )
    },
)


def _repeated_rows(g: Generations) -> float:
    if not g.ids:
        return 0.0
    return float(np.mean([repeated_row_fraction(ids, g.width, a) for ids, a in zip(g.ids, g.rows_above())]))


register_metric(
    "repeated_rows",
    "generations",
    _repeated_rows,
    **IMAGE_MEASURE,
    summary_label="rows repeating the row above",
    columns={
        "image": Column(
            "Repeated rows ↓",
            order=2,
            legend="Repeated rows: share of generated rows equal to the row above (the first compared with the "
            "context's last row; stripes: many).",
        )
    },
)

"""The paper's comparison of a base and a hyperfitted model: generations, metrics, a markdown table, plots.

``run_comparison`` decodes the same held-out contexts four ways (the rows of the paper's Table 1, without the
human-preference column, plus the blocker):

=============================  ===========  ==========================================================
row                            model        decoding
=============================  ===========  ==========================================================
``original_greedy``            base         greedy
``original_top_p``             base         sampling, top-p 0.9, temperature 0.7, top-k 50 (the paper's)
``hyperfitted_greedy``         hyperfitted  greedy
``hyperfitted_greedy_blocker`` hyperfitted  greedy + citation blocker (n = 5 over the training ids)
=============================  ===========  ==========================================================

and measures each (``hfdist.metrics.generation_metrics``), plus both models' next-token statistics on the
held-out sequences. It writes into ``out_dir`` (default ``RUN/compare``): ``report.md``, ``report.json``,
``generations_<row>.jsonl``, ``ttr_over_position.png``, ``training_curves.png``, ``top1_probability.png``.

An image run (``data.modality: image``, known from ``RUN/data/selection.json``) is compared as the paper does
for ImageGPT: each held-out image's first rows are completed to the full image by the first three rows (no
blocker), measured by the degeneration of the generated pixel tokens (``image_completion_metrics``: distinct
colour tokens, rows repeating the row above, TTR-96), and drawn in ``completions_grid.png``: per image the
original, the context, and the three completions, decoded through the base model's colour clusters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import yaml

from hfdist.adapters import count_configured_parameters, describe_trains
from hfdist.config import load_config
from hfdist.data import token_ids_to_pixels
from hfdist.errors import HfdistError
from hfdist.generation import CitationBlocker, DecodeOptions, continuation_ids, generate
from hfdist.io import (
    atomic_write_json,
    atomic_write_text,
    generation_records,
    load_token_array,
    write_jsonl,
)
from hfdist.metrics import (
    Column,
    generation_metrics,
    heldout_logits,
    matched_temperature,
    mean_ttr_over_position,
    next_token_stats,
    summarize_next_token_stats,
    table_columns,
)
from hfdist.models import (
    load_model,
    load_processor,
    load_tokenizer,
    model_config_for,
    resolve_device,
)
from hfdist.monitor import read_metrics
from hfdist.plots import (
    plot_completions_grid,
    plot_top1,
    plot_training_curves,
    plot_ttr_over_position,
)

logger = logging.getLogger(__name__)

ROWS = (
    "original_greedy",
    "original_top_p",
    "original_matched_entropy",
    "hyperfitted_greedy",
    "hyperfitted_greedy_blocker",
)
ROW_LABELS = {
    "original_greedy": ("Original", "Greedy"),
    "original_top_p": ("Original", "Top-p"),
    "original_matched_entropy": ("Original", "Sampled at matched entropy"),
    "hyperfitted_greedy": ("Hyperfitted", "Greedy"),
    "hyperfitted_greedy_blocker": ("Hyperfitted", "Greedy + citation blocker"),
}


def row_title(name: str) -> str:
    """A row's name in the plots: "Original greedy", "Original top-p", "Hyperfitted greedy + citation blocker"."""
    model, decoding = ROW_LABELS.get(name, (name, ""))
    return f"{model} {decoding.lower()}".strip()


def row_labels(name: str, settings: dict) -> tuple[str, str]:
    """A table row's model and decoding columns, the decoding with the settings that ran it; a row of a
    multi-run table (``compare_runs``: "RUN:row") has the run's name before its model."""
    run, _, name = name.rpartition(":")
    model, decoding = ROW_LABELS.get(name, (name, ""))
    if run:
        model = f"{run}: {model}"
    if name == "original_matched_entropy":
        decoding = f"Sampled at matched entropy (T*={settings.get('temperature'):.3f})"
    if name == "original_top_p":
        decoding = (
            f"Top-p (p={settings.get('top_p')}, T={settings.get('temperature')}, k={settings.get('top_k')})"
        )
    if name == "hyperfitted_greedy_blocker":
        decoding = f"Greedy + citation blocker (n={settings.get('blocker_n')})"
    return model, decoding


@dataclass
class CompareSettings:
    num_contexts: Optional[int] = None  # None: every context in the file
    max_new_tokens: int = 224  # the upstream protocol: 32-token contexts continued to 256 tokens
    top_p: float = 0.9  # the paper's top-p baseline: p 0.9, temperature 0.7, top-k 50
    temperature: float = 0.7
    top_k: int = 50
    seed: int = 0
    blocker_n: int = 5
    window: int = 96  # TTR window
    min_run: int = 10  # dataset overlap: share of generations sharing more than this many tokens
    batch_size: int = 32
    stop_at_eos: bool = False  # the protocol generates a fixed number of tokens
    device: str = "auto"
    dtype: str = "float32"
    matched_entropy: bool = (
        True  # text runs: the original model sampled at the hyperfitted one's entropy (T*)
    )
    include_original: bool = True  # the original model's greedy and top-p rows (compare_runs shares them)


# -------------------------------------------------------------------------------------------------- tables
def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _cell(value, column: Column) -> str:
    if column.percent:
        return "-" if value is None else f"{100 * value:.1f}%"
    return _fmt(value, column.digits)


def format_generation_table(
    rows: dict[str, dict], table: str = "text", window: int = 96, min_run: int = 10
) -> str:
    """The markdown table of one decoding per line: the model, the decoding, the registered columns of ``table``
    ("text": the paper's Table 1 layout; "image": the degeneration of generated pixel tokens), then tokens/s."""
    columns = table_columns(table)
    headers = [column.header.format(window=window, min_run=min_run) for _, column in columns]
    lines = [
        "| " + " | ".join(["Model", "Decoding", *headers, "Tokens/s"]) + " |",
        "|" + "---|" * (len(headers) + 3),
    ]
    for name, m in rows.items():
        cells = [_cell(m.get(metric.key(window, min_run)), column) for metric, column in columns]
        lines.append(
            "| "
            + " | ".join([*row_labels(name, m.get("settings", {})), *cells, _fmt(m.get("tokens_per_s"), 1)])
            + " |"
        )
    return "\n".join(lines)


def format_table(rows: dict[str, dict], window: int = 96, min_run: int = 10) -> str:
    """The markdown table of the generation metrics, one line per decoding (the paper's Table 1 layout)."""
    return format_generation_table(rows, "text", window, min_run)


def format_image_table(rows: dict[str, dict], window: int = 96, min_run: int = 10) -> str:
    """The image rows: degeneration of the generated pixel tokens, one line per decoding."""
    return format_generation_table(rows, "image", window, min_run)


def table_legend(table: str, window: int = 96, min_run: int = 10) -> str:
    """The paragraph under a table: the registered columns' legends."""
    legends = [column.legend for _, column in table_columns(table) if column.legend]
    return " ".join(legends).format(window=window, min_run=min_run)


def format_heldout_table(heldout: dict[str, dict]) -> str:
    """Both models' next-token statistics on the held-out sequences: the registered "heldout" columns."""
    columns = table_columns("heldout")
    lines = [
        "| " + " | ".join(["Model", *(column.header for _, column in columns)]) + " |",
        "|" + "---|" * (len(columns) + 1),
    ]
    for name, s in heldout.items():
        label = {"base": "Original", "hyperfitted": "Hyperfitted"}.get(name, name)
        lines.append(
            "| " + " | ".join([label, *(_cell(s.get(m.name), column) for m, column in columns)]) + " |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- comparison
def _read_run_config(run_dir: Path) -> dict:

    path = run_dir / "config.yaml"
    if not path.is_file():
        raise HfdistError(f"{str(path)!r}: missing (not a hyperfit run folder? pass --base)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        raise HfdistError(f"{str(path)!r}: not valid YAML") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("path"), str):
        raise HfdistError(f"{str(path)!r}: field model.path missing (the base model; or pass --base)")
    return model


def _image_geometry(run_dir: Path) -> Optional[dict]:
    """The image geometry a run recorded in data/selection.json (None for a text run)."""
    path = run_dir / "data" / "selection.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("image")
    except ValueError:
        raise HfdistError(f"{str(path)!r}: not valid JSON") from None


@dataclass
class ComparisonInputs:
    """What a comparison reads, resolved and checked before any model is loaded."""

    run: Optional[Path]  # the hyperfit run folder, if any
    base: str
    base_section: Optional[dict]  # the run's config.yaml model section (how to load the base model)
    hyperfitted: str
    contexts_path: Union[str, Path]  # as given (the report names it so)
    contexts: np.ndarray  # [N, L]
    train: Optional[np.ndarray]  # the blocker's and the overlap's training ids
    validation: Optional[np.ndarray]  # the held-out sequences of the next-token statistics
    image: Optional[dict]  # an image run's geometry (data/selection.json)
    out: Path
    settings: CompareSettings


def resolve_inputs(
    run_dir, base, hyperfitted, out_dir, contexts_path, train_path, validation_path, settings: CompareSettings
) -> ComparisonInputs:
    """The models, contexts, training and held-out data and output folder of a comparison (a run folder's defaults
    for what is not given), checked; an image run's settings fitted to its images."""
    run = Path(run_dir) if run_dir is not None else None
    if run is not None and not run.is_dir():
        raise HfdistError(f"--run {str(run)!r}: no such folder")
    base_section = None
    if run is not None:
        if base is None:
            base_section = _read_run_config(run)
            base = base_section["path"]
        # The merged model, or the adapter folder of a run that exported only that (export.adapter: adapter).
        only_adapter = not (run / "model").exists() and (run / "adapter").is_dir()
        hyperfitted = hyperfitted or str(run / ("adapter" if only_adapter else "model"))
        contexts_path = contexts_path or run / "data" / "contexts.npy"
        train_path = train_path or run / "data" / "train_token_ids.npy"
        validation_path = validation_path or run / "data" / "validation_token_ids.npy"
        out_dir = out_dir or run / "compare"
    for value, flag in (
        (base, "--base"),
        (hyperfitted, "--hyperfitted"),
        (contexts_path, "--contexts"),
        (out_dir, "--out"),
    ):
        if value is None:
            raise HfdistError(f"compare: {flag} is needed without --run")
    if run is not None and not Path(hyperfitted).exists():
        raise HfdistError(f"hyperfitted model {str(hyperfitted)!r}: no such folder (did the run finish?)")
    contexts = load_token_array(contexts_path, "contexts")
    if settings.num_contexts is not None:
        if not 2 <= settings.num_contexts <= len(contexts):
            raise HfdistError(
                f"--num-contexts {settings.num_contexts}: must be between 2 and the "
                f"{len(contexts)} contexts in {str(contexts_path)!r}"
            )
        contexts = contexts[: settings.num_contexts]
    if len(contexts) < 2:
        raise HfdistError(
            f"contexts {str(contexts_path)!r}: Self-BLEU needs at least 2 contexts, got {len(contexts)}"
        )
    train = (
        load_token_array(train_path, "training data") if train_path and Path(train_path).is_file() else None
    )
    if train is None:
        logger.warning("no training token ids (%s): no citation blocker row, no dataset overlap", train_path)
    validation = (
        load_token_array(validation_path, "validation data")
        if validation_path and Path(validation_path).is_file()
        else None
    )
    image = _image_geometry(run) if run is not None else None
    if image is not None:
        # The completion is the rest of the image, whatever --max-new-tokens says.
        new_tokens = image["height"] * image["width"] + 1 - contexts.shape[1]
        settings = dataclasses.replace(
            settings, max_new_tokens=new_tokens, window=min(settings.window, new_tokens)
        )
    return ComparisonInputs(
        run=run,
        base=base,
        base_section=base_section,
        hyperfitted=hyperfitted,
        contexts_path=contexts_path,
        contexts=contexts,
        train=train,
        validation=validation,
        image=image,
        out=Path(out_dir),
        settings=settings,
    )


@dataclass
class Decoded:
    """What decoding the rows gave: per row its metrics, TTR curve, first text and (images) completions; per model
    its held-out statistics and top-1 probabilities; the matched temperature; the image run's colour clusters."""

    rows: dict = dataclasses.field(default_factory=dict)
    curves: dict = dataclasses.field(default_factory=dict)
    sample_texts: dict = dataclasses.field(default_factory=dict)
    completions: dict = dataclasses.field(default_factory=dict)
    heldout: dict = dataclasses.field(default_factory=dict)
    top1: dict = dataclasses.field(default_factory=dict)
    matched_temperature: Optional[dict] = None
    clusters: Optional[np.ndarray] = None


def decoding_plans(inputs: ComparisonInputs) -> dict[str, list[tuple[str, dict]]]:
    """Per model, its rows: (name, the ``DecodeOptions`` fields that make the row), checked now. The
    matched-entropy row is added once its temperature is known (``decode_rows``)."""
    settings = inputs.settings
    plans = {"base": [], "hyperfitted": [("hyperfitted_greedy", {"strategy": "greedy"})]}
    if settings.include_original:
        knobs = {"top_p": settings.top_p, "temperature": settings.temperature, "top_k": settings.top_k}
        plans["base"] += [
            ("original_greedy", {"strategy": "greedy"}),
            ("original_top_p", {"strategy": "sample", **knobs, "seed": settings.seed}),
        ]
    # The blocker is a text device (the paper compares three rows for images).
    if inputs.train is not None and inputs.image is None:
        blocker = CitationBlocker(inputs.train, n=settings.blocker_n)
        plans["hyperfitted"].append(
            ("hyperfitted_greedy_blocker", {"strategy": "greedy", "blocker": blocker})
        )
    for rows in plans.values():
        for _, fields in rows:
            DecodeOptions(max_new_tokens=settings.max_new_tokens, **fields)
    return plans


def _decode_all(model, contexts: torch.Tensor, options: DecodeOptions, batch_size: int):
    """Generate for every context in batches; returns continuations (cut at EOS), stop flags and seconds."""

    continuations, stopped = [], []
    start_time = time.perf_counter()
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start : start + batch_size]
        out = generate(model, chunk, options=options).cpu()
        conts = continuation_ids(out, chunk.shape[1], options.eos_token_id)
        continuations.extend(conts)
        stopped.extend(options.eos_token_id is not None and len(c) < options.max_new_tokens for c in conts)
    return continuations, stopped, time.perf_counter() - start_time


def decode_row(
    decoded: Decoded, inputs: ComparisonInputs, name: str, fields: dict, model, path: str, tokenizer, eos, pad
) -> None:
    """Decode every context one row's way; measure it (``generation_metrics``) and write its generations."""
    settings, contexts = inputs.settings, inputs.contexts
    logger.info("compare: %s on %d contexts, %d new tokens", name, len(contexts), settings.max_new_tokens)
    options = DecodeOptions(
        max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad, **fields
    )
    conts, stopped, seconds = _decode_all(model, torch.from_numpy(contexts), options, settings.batch_size)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in conts] if tokenizer is not None else None
    row_settings = {
        "model": str(path),
        "max_new_tokens": settings.max_new_tokens,
        "stop_at_eos": settings.stop_at_eos,
        **{k: v for k, v in fields.items() if k != "blocker"},
    }
    if "blocker" in fields:
        row_settings["blocker_n"] = settings.blocker_n
    metrics = generation_metrics(
        conts,
        texts=texts,
        training=inputs.train,
        window=settings.window,
        min_run=settings.min_run,
        modality="image" if inputs.image is not None else "text",
        contexts=contexts,
        width=inputs.image["width"] if inputs.image is not None else None,
    )
    if inputs.image is not None:
        decoded.completions[name] = conts
    metrics["tokens_per_s"] = sum(len(c) for c in conts) / seconds if seconds > 0 else None
    metrics["seconds"] = seconds
    metrics["settings"] = row_settings
    decoded.rows[name] = metrics
    decoded.curves[name] = mean_ttr_over_position(conts, settings.window)
    if texts is not None:
        decoded.sample_texts[name] = texts[0]
    write_jsonl(
        inputs.out / f"generations_{name}.jsonl",
        generation_records(contexts.tolist(), conts, stopped, tokenizer, row_settings),
    )


def matched_entropy_row(decoded: Decoded, model, inputs: ComparisonInputs) -> tuple[str, dict]:
    """The matched-entropy control: the original model sampled (temperature only) at the T* where its mean
    next-token entropy on the held-out sequences equals the hyperfitted model's there (decoded first)."""
    logits = heldout_logits(model, torch.from_numpy(inputs.validation), batch_size=8)
    found = matched_temperature(logits, decoded.heldout["hyperfitted"]["entropy"])
    del logits
    logger.info(
        "compare: matched entropy %.4f nats at T* = %.4f (%d bisection steps)",
        found["entropy"],
        found["temperature"],
        found["steps"],
    )
    decoded.matched_temperature = found
    fields = {"strategy": "sample", "temperature": found["temperature"], "top_p": 1.0, "top_k": 0}
    return "original_matched_entropy", {**fields, "seed": inputs.settings.seed}


def decode_rows(inputs: ComparisonInputs, device: torch.device) -> Decoded:
    """Load each model in turn (the hyperfitted one first), decode its rows, and measure its next-token statistics
    on the held-out sequences; rows and statistics in the report's order."""
    settings, image = inputs.settings, inputs.image
    plans = decoding_plans(inputs)
    matched = settings.matched_entropy and image is None and inputs.validation is not None
    decoded = Decoded()
    for which, path in (("hyperfitted", inputs.hyperfitted), ("base", inputs.base)):
        section = inputs.base_section if which == "base" else None
        model_config = model_config_for(path, section, settings.dtype)
        logger.info("compare: loading the %s model %s", which, path)
        if image is not None:
            tokenizer = None  # pixels: no text to decode; the colour clusters draw the grid
            if decoded.clusters is None:
                decoded.clusters = np.asarray(load_processor(model_config, "image").clusters)
            eos, pad = None, image["start_token"]
        else:
            tokenizer = load_tokenizer(model_config)
            eos = tokenizer.eos_token_id if settings.stop_at_eos else None
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model = load_model(model_config, device).eval()
        if which == "base" and matched:
            plans["base"].append(matched_entropy_row(decoded, model, inputs))
        for name, fields in plans[which]:
            decode_row(decoded, inputs, name, fields, model, path, tokenizer, eos, pad)
        if inputs.validation is not None:
            stats = next_token_stats(model, torch.from_numpy(inputs.validation), batch_size=8)
            decoded.heldout[which] = summarize_next_token_stats(stats)
            decoded.top1[which] = stats["top1"]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    decoded.rows = {name: decoded.rows[name] for name in ROWS if name in decoded.rows}
    decoded.curves = {name: decoded.curves[name] for name in decoded.rows}
    decoded.heldout = {
        name: decoded.heldout[name] for name in ("base", "hyperfitted") if name in decoded.heldout
    }
    decoded.top1 = {name: decoded.top1[name] for name in ("base", "hyperfitted") if name in decoded.top1}
    return decoded


def write_plots(inputs: ComparisonInputs, decoded: Decoded) -> list[str]:
    """TTR over position, the run's training curves, top-1 probabilities (with held-out data) and, for an image
    run, the completions grid; returns their file names in the report's order."""
    out, settings, contexts, image = inputs.out, inputs.settings, inputs.contexts, inputs.image
    plot_ttr_over_position(
        {row_title(name): curve for name, curve in decoded.curves.items()},
        out / "ttr_over_position.png",
        settings.window,
    )
    metrics_path = inputs.run / "metrics.jsonl" if inputs.run is not None else None
    records = []
    if metrics_path is not None and metrics_path.is_file():
        records = read_metrics(metrics_path)
    plot_training_curves(records, out / "training_curves.png")
    plots = ["ttr_over_position.png", "training_curves.png"]
    if decoded.top1:
        plot_top1(decoded.top1, out / "top1_probability.png")
        plots.append("top1_probability.png")
    if image is not None:
        originals_path = Path(inputs.contexts_path).with_name("context_images.npy")
        full = (
            load_token_array(originals_path, "context images")[: len(contexts)]
            if originals_path.is_file()
            else None
        )
        if full is None:  # contexts from elsewhere: draw the contexts themselves as the originals
            logger.warning("no %s: the grid's original column shows the contexts only", originals_path)
            full = np.concatenate([contexts, np.full((len(contexts), settings.max_new_tokens), -1)], axis=1)

        def draw(rows):
            return token_ids_to_pixels(rows, decoded.clusters, image["height"], image["width"])

        plot_completions_grid(
            draw(full[:, 1:]),
            image["context_rows"],
            {
                row_title(name): draw(np.concatenate([contexts[:, 1:], np.asarray(c)], axis=1))
                for name, c in decoded.completions.items()
            },
            out / "completions_grid.png",
        )
        plots.insert(0, "completions_grid.png")
    return plots


def run_comparison(
    run_dir=None,
    *,
    base: Optional[str] = None,
    hyperfitted: Optional[str] = None,
    out_dir=None,
    contexts_path=None,
    train_path=None,
    validation_path=None,
    settings: Optional[CompareSettings] = None,
    **overrides,
) -> dict:
    """Run the paper's comparison and write the report; returns the report as a dict.

    With ``run_dir`` (a hyperfit run folder) everything has a default: the base model is config.yaml's
    ``model.path``, the hyperfitted one ``RUN/model``, contexts ``RUN/data/contexts.npy``, the blocker and overlap
    data ``RUN/data/train_token_ids.npy``, the held-out sequences ``RUN/data/validation_token_ids.npy``, the
    curves ``RUN/metrics.jsonl``, the output ``RUN/compare``. Without it, pass ``base``, ``hyperfitted``,
    ``contexts_path`` and ``out_dir`` (training and validation data are then optional). ``overrides`` set
    fields of ``CompareSettings`` (e.g. ``num_contexts=8``).

    The phases: ``resolve_inputs``, ``decode_rows`` (each model's rows and held-out statistics), ``write_plots``,
    then report.json and report.md (``format_report``).
    """
    settings = dataclasses.replace(settings or CompareSettings(), **overrides)
    inputs = resolve_inputs(
        run_dir, base, hyperfitted, out_dir, contexts_path, train_path, validation_path, settings
    )
    device = resolve_device(inputs.settings.device)
    inputs.out.mkdir(parents=True, exist_ok=True)
    decoded = decode_rows(inputs, device)
    plots = write_plots(inputs, decoded)
    report = {
        "base": str(inputs.base),
        "hyperfitted": str(inputs.hyperfitted),
        "run": str(inputs.run) if inputs.run is not None else None,
        "contexts": str(inputs.contexts_path),
        "num_contexts": len(inputs.contexts),
        "context_len": int(inputs.contexts.shape[1]),
        "settings": dataclasses.asdict(inputs.settings),
        "device": str(device),
        "rows": decoded.rows,
        "heldout": decoded.heldout,
        "matched_temperature": decoded.matched_temperature,
        "ttr_over_position": decoded.curves,
        "plots": plots,
        "image": inputs.image,
        "generations": {name: f"generations_{name}.jsonl" for name in decoded.rows},
    }
    atomic_write_json(inputs.out / "report.json", report)
    atomic_write_text(inputs.out / "report.md", format_report(report, decoded.sample_texts))
    logger.info("compare: report in %s", inputs.out)
    return report


def format_report(report: dict, sample_texts: Optional[dict] = None) -> str:
    s = report["settings"]
    image = report.get("image")
    parts = [
        "# Hyperfitting comparison",
        "",
        f"Base model `{report['base']}`, hyperfitted model `{report['hyperfitted']}`; "
        f"{report['num_contexts']} held-out contexts of {report['context_len']} tokens, each continued by "
        f"{s['max_new_tokens']} tokens{' (stopping at EOS)' if s['stop_at_eos'] else ''} on {report['device']}.",
        "",
    ]
    if image:
        parts += [
            f"Images of {image['height']}x{image['width']} pixels: each context is the start token and the first "
            f"{image['context_rows']} rows; the models complete the other {image['height'] - image['context_rows']}.",
            "",
            format_image_table(report["rows"], s["window"], s["min_run"]),
            "",
            table_legend("image", s["window"], s["min_run"]),
        ]
    else:
        parts += [
            format_table(report["rows"], s["window"], s["min_run"]),
            "",
            table_legend("text", s["window"], s["min_run"]),
        ]
        match = report.get("matched_temperature")
        if match:
            parts += [
                "",
                f"Sampled at matched entropy: the original model with temperature sampling only (no top-p or top-k) "
                f"at T* = {match['temperature']:.4f}, where its mean next-token entropy on the held-out sequences "
                f"({match['entropy']:.4f} nats) equals the hyperfitted model's ({match['target_entropy']:.4f}); T* "
                "found by bisection on the original model's held-out logits.",
            ]
    if report["heldout"]:
        parts += [
            "",
            f"## Next-token predictions on held-out {'images' if image else 'text'}",
            "",
            format_heldout_table(report["heldout"]),
        ]
    parts += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in report["plots"]]
    if sample_texts:
        parts += ["", "## First generation of each decoding", ""]
        for name, text in sample_texts.items():
            model, decoding = ROW_LABELS.get(name, (name, ""))
            snippet = " ".join(text.split())[:400]
            parts += [f"**{model}, {decoding.lower()}**: {snippet}", ""]
    return "\n".join(parts).rstrip() + "\n"


# ------------------------------------------------------------------------------------------- several runs
SHARED_ORIGINAL_ROWS = ("original_greedy", "original_top_p")


def compare_runs(run_dirs, *, out_dir=None, settings: Optional[CompareSettings] = None, **overrides) -> dict:
    """Several hyperfit runs side by side: each run's own comparison (``run_comparison`` into ``OUT/<run>``), then
    one table with a row per run and decoding (the original model's greedy and top-p rows once, when every run has
    the same base model and contexts), the runs' training facts (``run_facts``), and the plots overlaid. Writes
    ``OUT/report.md``, ``OUT/report.json``, ``OUT/ttr_over_position.png``, ``OUT/training_curves.png``."""
    settings = dataclasses.replace(settings or CompareSettings(), **overrides)
    runs = [Path(r) for r in run_dirs]
    if len(runs) < 2:
        raise HfdistError("--runs: give two run folders or more (one run: --run RUN)")
    for run in runs:
        if not (run / "config.yaml").is_file():
            raise HfdistError(f"--runs {str(run)!r}: not a hyperfit run folder (no config.yaml)")
    names = [run.name for run in runs]
    if len(set(names)) != len(names):
        raise HfdistError(
            f"--runs: two runs share a folder name ({', '.join(names)}); their rows need their names"
        )
    out = Path(out_dir) if out_dir is not None else runs[0].parent / "compare"
    out.mkdir(parents=True, exist_ok=True)
    reports, rows, curves = {}, {}, {}
    shared = None  # the first run's original rows, reused by the runs with the same base model and contexts
    for name, run in zip(names, runs):
        same = shared is not None and _same_original(runs[0], run)
        report = run_comparison(
            run, out_dir=out / name, settings=dataclasses.replace(settings, include_original=not same)
        )
        reports[name] = report
        for row, metrics in report["rows"].items():
            key = row if shared is None and row in SHARED_ORIGINAL_ROWS else f"{name}:{row}"
            rows[key] = metrics
            curves[f"{name}: {row_title(row)}" if key != row else row_title(row)] = report[
                "ttr_over_position"
            ][row]
        if shared is None:
            shared = name
    facts = {name: run_facts(run) for name, run in zip(names, runs)}
    plot_ttr_over_position(curves, out / "ttr_over_position.png", settings.window)
    plot_training_curves(
        {name: read_metrics(run / "metrics.jsonl") for name, run in zip(names, runs)},
        out / "training_curves.png",
    )
    combined = {
        "runs": {name: str(run) for name, run in zip(names, runs)},
        "settings": dataclasses.asdict(settings),
        "rows": rows,
        "facts": facts,
        "matched_temperature": {name: r.get("matched_temperature") for name, r in reports.items()},
        "heldout": {name: r["heldout"] for name, r in reports.items()},
        "plots": ["ttr_over_position.png", "training_curves.png"],
    }
    atomic_write_json(out / "report.json", combined)
    atomic_write_text(out / "report.md", format_runs_report(combined))
    logger.info("compare: report of %d runs in %s", len(runs), out)
    return combined


def _same_original(first: Path, run: Path) -> bool:
    """Whether two runs decode the same contexts with the same base model (their original rows are the same)."""
    same_base = _read_run_config(first) == _read_run_config(run)
    contexts = [load_token_array(r / "data" / "contexts.npy", "contexts") for r in (first, run)]
    return same_base and np.array_equal(*contexts)


def run_facts(run: Path) -> dict:
    """What a run cost and gave, from its own files: what trained and how many parameters (summary.json, else
    counted on the meta device from config.yaml), the highest peak memory and the median step time of its logged
    steps (metrics.jsonl), the last epoch's mean train loss, and the held-out measures before and after training
    on each held-out set (summary.json: ``eval/<measure>`` for the main set, ``eval/<name>/<measure>`` for each
    extra)."""
    config = load_config(run / "config.yaml")
    summary_path = run / "summary.json"
    if not summary_path.is_file():
        raise HfdistError(f"{str(summary_path)!r}: missing (did the run finish?)")
    summary = json.loads(summary_path.read_text())
    parameters = summary.get("parameters") or count_configured_parameters(config)
    steps = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "step"]
    sets = {"eval": config.data.source}
    sets.update(
        {f"eval/{config.eval.extra.name}": config.eval.extra.name} if config.eval.extra.source else {}
    )
    heldout = {}
    for prefix, label in sets.items():
        heldout[label] = {
            measure: {
                "base": summary["base"].get(f"{prefix}/{measure}"),
                "hyperfitted": summary["hyperfitted"].get(f"{prefix}/{measure}"),
            }
            for measure in (f"ttr{config.eval.ttr_window}", "entropy", "loss")
        }
    return {
        "trains": describe_trains(config),
        "learning_rate": config.optim.lr,
        "parameters": parameters,
        "peak_memory_gib": max((r["memory/peak_gib"] for r in steps), default=None),
        "step_time_s_median": float(np.median([r["perf/step_time_s"] for r in steps])) if steps else None,
        "steps": summary.get("steps"),
        "final_train_loss": summary.get("train_loss_last_epoch"),
        "heldout": heldout,
    }


def format_facts_table(facts: dict) -> str:
    """One line per run: what trained, its cost, and the held-out measures of each set (base -> hyperfitted)."""
    sets = list(next(iter(facts.values()))["heldout"])
    measures = [m for m in next(iter(next(iter(facts.values()))["heldout"].values())) if m != "loss"]
    header = [
        "Run",
        "Trains",
        "lr",
        "Trainable parameters",
        "Peak memory (GiB)",
        "s/step (median)",
        "Final train loss",
    ]
    header += [f"{s}: {m.replace('ttr', 'TTR-')}" for s in sets for m in measures]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    first = next(iter(facts.values()))
    base = ["base model", "-", "-", "-", "-", "-", "-"]
    base += [_fmt(first["heldout"][s][m]["base"]) for s in sets for m in measures]
    lines.append("| " + " | ".join(base) + " |")
    for name, f in facts.items():
        p = f["parameters"]
        cells = [
            name,
            f["trains"],
            f"{f['learning_rate']:g}",
            f"{p['trainable']:,} ({100 * p['trainable'] / p['total']:.1f}%)",
            _fmt(f["peak_memory_gib"], 2),
            _fmt(f["step_time_s_median"], 2),
            _fmt(f["final_train_loss"], 4),
        ]
        cells += [_fmt(f["heldout"][s][m]["hyperfitted"]) for s in sets for m in measures]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_runs_report(combined: dict) -> str:
    s = combined["settings"]
    runs = combined["runs"]
    parts = [
        "# Hyperfitting comparison of several runs",
        "",
        f"Runs: {', '.join(f'`{name}` ({path})' for name, path in runs.items())}. "
        "Each run's own report: `<run>/report.md`.",
        "",
        "## Training",
        "",
        format_facts_table(combined["facts"]),
        "",
        "Trainable parameters: what the optimizer updates (the rest is frozen). Peak memory: the highest per-process "
        "high-water mark logged during training (host RSS on a CPU, allocated GPU memory on CUDA). Held-out measures "
        "after training (the base model's in the first line): greedy TTR and mean next-token entropy (nats) on each "
        "held-out set.",
        "",
        "## Generations",
        "",
        format_table(combined["rows"], s["window"], s["min_run"]),
        "",
        "The original model's greedy and top-p rows are shared by the runs with its base model and contexts. "
        "Sampled at matched entropy: the original model with temperature sampling only, at the T* where its mean "
        "next-token entropy on the held-out sequences equals that run's hyperfitted model's (bisection).",
    ]
    parts += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in combined["plots"]]
    return "\n".join(parts).rstrip() + "\n"

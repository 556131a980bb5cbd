"""The comparison report's figures (PNG): TTR over position, training curves, the top-1 probability, the image
completions grid. Matplotlib's object API with the Agg canvas: no pyplot state, no display needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _figure(width: float = 7.0, height: float = 4.0):
    # Figure + Agg canvas directly: no pyplot, so no global backend state and no display needed.
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, bbox_inches="tight")
    tmp.replace(path)


def plot_ttr_over_position(curves: dict[str, list[float]], path, window: int = 96) -> None:
    """Mean sliding-window TTR against the position (in generated tokens) where each window ends; ``curves`` keyed
    by legend label."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    for label, curve in curves.items():
        if curve:
            ax.plot(np.arange(window, window + len(curve)), curve, label=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("generated tokens (end of window)")
    ax.set_ylabel(f"TTR over the last {window} tokens")
    ax.set_ylim(0, 1.02)
    ax.set_title("Type-token ratio over position")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8
        )  # below: never on a curve
    else:
        ax.text(
            0.5,
            0.5,
            f"generations shorter than the {window}-token window",
            ha="center",
            va="center",
            transform=ax.transAxes,
        )
    _save(fig, Path(path))


def plot_training_curves(records, path) -> None:
    """Per-epoch mean training loss (log scale) and entropy, with the held-out evaluations beside them; ``records``
    is one run's metrics.jsonl records, or several runs' keyed by name (overlaid)."""
    runs = records if isinstance(records, dict) else {"": records}
    fig = _figure(10, 4)
    for col, (metric, label) in enumerate((("loss", "loss (nats/token)"), ("entropy", "entropy (nats)"))):
        ax = fig.add_subplot(1, 2, col + 1)
        for run, run_records in runs.items():
            epochs = [r for r in run_records if r.get("kind") == "epoch"]
            evals = [r for r in run_records if r.get("kind") == "eval"]
            for rows, prefix, style in ((epochs, "train", "o-"), (evals, "eval", "s--")):
                points = [
                    (r.get("epoch", 0), r[f"{prefix}/{metric}"])
                    for r in rows
                    if isinstance(r.get(f"{prefix}/{metric}"), (int, float))
                ]
                if points:
                    x, y = zip(*points)
                    ax.plot(x, y, style, markersize=3, label=f"{run + ': ' if run else ''}{prefix} {metric}")
        if metric == "loss" and ax.has_data():
            ax.set_yscale("log")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8 if len(runs) == 1 else 6)
        else:
            ax.text(0.5, 0.5, "no records in metrics.jsonl", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Hyperfitting: loss and entropy per epoch")
    _save(fig, Path(path))


def plot_top1(top1: dict[str, np.ndarray], path) -> None:
    """Histogram of the top-1 next-token probability on held-out tokens, one per model."""
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0, 1, 41)
    for name, values in top1.items():
        if len(values):
            label = {"base": "Original", "hyperfitted": "Hyperfitted"}.get(name, name)
            ax.hist(
                values,
                bins=bins,
                alpha=0.55,
                density=True,
                label=f"{label} (mean {float(np.mean(values)):.2f})",
            )
    ax.set_xlabel("probability of the most probable next token")
    ax.set_ylabel("density")
    ax.set_title("Top-1 probability on held-out text")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, Path(path))


def plot_completions_grid(
    originals: np.ndarray, context_rows: int, completions: dict[str, np.ndarray], path, max_images: int = 8
) -> None:
    """One row per held-out image: the original, its context (the first ``context_rows`` rows, the rest blank),
    then each decoding's completion (``completions`` keyed by column title); all ``uint8 [N, H, W, 3]``, drawn pixel
    for pixel (no smoothing)."""
    count = min(max_images, len(originals))
    columns = [("Original", originals), ("Context", None)] + list(completions.items())
    height = 1.45 * count + 0.6
    fig = _figure(1.45 * len(columns), height)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.01, top=1 - 0.6 / height, wspace=0.08, hspace=0.08)
    for row in range(count):
        for col, (title, images) in enumerate(columns):
            ax = fig.add_subplot(count, len(columns), row * len(columns) + col + 1)
            if images is None:
                image = originals[row].copy()
                image[context_rows:] = 255
            else:
                image = images[row]
            ax.imshow(image, interpolation="nearest")
            if col == 1:  # where the generation starts
                ax.axhline(context_rows - 0.5, color="red", linewidth=0.8)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=7)
    fig.suptitle(f"Completions of held-out images from their first {context_rows} rows", fontsize=9)
    _save(fig, Path(path))

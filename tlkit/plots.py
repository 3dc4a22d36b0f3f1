"""PNG figures of a run: training curves with stage boundaries, and grids of thumbnails.

Figures are drawn on `matplotlib.figure.Figure` objects (Agg), never through pyplot, so
tlkit leaves the matplotlib backend of the calling program (a notebook, say) alone.
"""

import math

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator


def _stage(logs):
    return logs.get("stage_index", logs["stage"])


def plot_history(history, path, title="Training"):
    """Writes loss and accuracy curves (train and validation) per epoch as a PNG.

    Args:
        history: list of per-epoch dicts with `stage` (and `stage_index`), `loss`,
            `accuracy`, `val_loss`, `val_accuracy` (as in `StageResult.history`); a dashed
            line marks each stage boundary.
        path: PNG file to write.
        title: figure title.

    Returns:
        `path`.
    """
    epochs = range(1, len(history) + 1)
    figure = Figure(figsize=(10, 4), dpi=100)
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("loss", "accuracy")):
        axis.plot(epochs, [h[metric] for h in history], "o-", ms=3, label="train")
        axis.plot(epochs, [h[f"val_{metric}"] for h in history], "o-", ms=3, label="validation")
        boundaries = [i for i in range(1, len(history)) if _stage(history[i]) != _stage(history[i - 1])]
        for boundary in boundaries:
            axis.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
            axis.text(boundary + 0.6, axis.get_ylim()[1], history[boundary]["stage"],
                      va="top", fontsize=8, color="grey")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("epoch")
        axis.set_ylabel(metric)
        axis.grid(alpha=0.3)
        axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_thumbnails(thumbnails, captions, path, title):
    """Writes a grid of images, four to a row, each under its caption, as a PNG.

    Args:
        thumbnails: uint8 RGB arrays `(h, w, 3)` (or a sequence of them), at least one.
        captions: one short caption per thumbnail.
        path: PNG file to write.
        title: figure title.

    Returns:
        `path`.
    """
    columns = min(len(thumbnails), 4)
    rows = math.ceil(len(thumbnails) / columns)
    figure = Figure(figsize=(max(2.5 * columns, 4.0), 2.7 * rows + 0.4), dpi=100)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, thumbnail, caption in zip(axes, thumbnails, captions):
        axis.imshow(np.asarray(thumbnail, np.uint8))
        axis.set_title(caption, fontsize=9)
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path

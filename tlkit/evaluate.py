"""Evaluation: how well a classifier does on labelled images, and where it goes wrong.

    labelled folder --scan_data--> files --Classifier.predict--> probabilities ----+
    in-memory images + labels --model--> probabilities ----------------------------+
        --compute_metrics--> accuracy, top-k, per-class P/R/F1, confusion, calibration
        --> EvaluationReport (+ output_dir: metrics.json, confusion_matrix.png,
            reliability.png, mistakes.csv, mistakes.png)

`evaluate_folder` needs only an export (tlkit is not needed to train it again);
`evaluate_arrays` serves the trainer, which has the validation images in memory. Both end in
the same code, so the numbers and files are the same whichever way they were made.

A multi-label model (sigmoid outputs, multi-hot labels) is scored by
`compute_multi_label_metrics` instead: per-label precision, recall, F1, support and average
precision at the export's per-label thresholds (`choose_thresholds` picks them on the
validation split), mAP, subset accuracy and micro/macro averages. Its output folder gets
`metrics.json`, `mistakes.csv` and `mistakes.png` (no confusion matrix or reliability diagram:
they are about one class per image).
"""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from matplotlib.figure import Figure

from tlkit.data import file_digest, scan_data
from tlkit.errors import ConfigError, DataError
from tlkit.images import load_image
from tlkit.models import predict_probabilities
from tlkit.plots import plot_thumbnails
from tlkit.predict import Classifier, load
from tlkit.validation import check_number, check_thresholds

CALIBRATION_BINS = 15
"""Equal-width confidence bins of the expected calibration error and reliability diagram."""

THUMBNAIL_SIZE = 96
"""Side in pixels of the thumbnails in `mistakes.png`."""

OUTPUT_FILES = ("metrics.json", "confusion_matrix.png", "reliability.png", "mistakes.csv",
                "mistakes.png")
"""What `output_dir` receives (`mistakes.png` only when there is a mistake)."""

MULTI_LABEL_OUTPUT_FILES = ("metrics.json", "mistakes.csv", "mistakes.png")
"""What `output_dir` receives for a multi-label model."""

DEFAULT_THRESHOLD = 0.5
"""The threshold of a label `choose_thresholds` has no positive validation image for."""


# --- Metrics ------------------------------------------------------------------------------------


def compute_metrics(y_true, probabilities, class_names, top_k=(1, 3, 5)):
    """Classification metrics from true labels and predicted probabilities (numpy only).

    The predicted class is the most probable one (the first on ties, like `np.argmax`).

    - Precision of a class is its correct predictions over its predictions; a class that is
      never predicted has precision 0. Recall is its correct predictions over its support
      (0 for a class with no sample). F1 is their harmonic mean, 0 when both are 0.
    - The macro average is the unweighted mean over the classes that occur among the true
      labels or the predictions (scikit-learn's convention: a model class absent from the
      data and never predicted does not dilute it); the weighted average weighs every class
      by its support.
    - The expected calibration error (ECE) sorts the samples into `CALIBRATION_BINS` equal-
      width bins by their top-1 confidence (bin i holds confidences in (i/15, (i+1)/15]) and
      sums, over bins, the share of samples in the bin times |accuracy - mean confidence|.

    Args:
        y_true: integer class index per sample, shape `(n,)`, `n >= 1`.
        probabilities: class probabilities per sample, shape `(n, num_classes)`.
        class_names: class name per column of `probabilities`.
        top_k: an integer k or a sequence of them; top-k accuracy (the true class among the
            k most probable) is reported for each k <= num_classes.

    Returns:
        A JSON-ready dict:
        `num_samples`, `num_classes`, `class_names`, `accuracy`,
        `top_k_accuracy` (`{"top_1": ..., "top_3": ...}`),
        `per_class` (`{class: {"precision", "recall", "f1", "support"}}`),
        `macro_avg` and `weighted_avg` (`{"precision", "recall", "f1", "support"}`),
        `confusion_matrix` (list of rows; row = true class, column = predicted class),
        `ece`, and `reliability` (`bin_edges` (16 values) and per bin `count`, `confidence`
        (mean top-1 confidence) and `accuracy`, both None for an empty bin).

    Raises:
        ConfigError: if the shapes disagree, a label is out of range or `top_k` is not a
            positive integer (or a sequence of them).

    Example:

    >>> m = compute_metrics([0, 1], [[0.9, 0.1], [0.6, 0.4]], ["cat", "dog"], top_k=1)
    >>> m["accuracy"], m["per_class"]["dog"]["precision"]
    (0.5, 0.0)
    """
    y_true, probabilities, ks = _check_metric_inputs(y_true, probabilities, class_names, top_k)
    num_samples, num_classes = probabilities.shape
    ranked = np.argsort(-probabilities, axis=1, kind="stable")
    predicted = ranked[:, 0]
    correct = predicted == y_true

    confusion = np.bincount(y_true * num_classes + predicted,
                            minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    hits = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted_count = confusion.sum(axis=0)
    precision = _ratio(hits, predicted_count)
    recall = _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = (support > 0) | (predicted_count > 0)
    scores = {"precision": precision, "recall": recall, "f1": f1}

    confidence = probabilities[np.arange(num_samples), predicted]
    reliability, ece = _calibration(confidence, correct)
    return {
        "num_samples": int(num_samples),
        "num_classes": int(num_classes),
        "class_names": [str(c) for c in class_names],
        "accuracy": float(correct.mean()),
        "top_k_accuracy": {f"top_{k}": float((ranked[:, :k] == y_true[:, None]).any(axis=1).mean())
                           for k in ks},
        "per_class": {str(name): {**{key: float(values[i]) for key, values in scores.items()},
                                  "support": int(support[i])}
                      for i, name in enumerate(class_names)},
        "macro_avg": {**{key: float(values[present].mean()) for key, values in scores.items()},
                      "support": int(num_samples)},
        "weighted_avg": {**{key: float(np.dot(values, support) / num_samples)
                            for key, values in scores.items()},
                         "support": int(num_samples)},
        "confusion_matrix": confusion.tolist(),
        "ece": ece,
        "reliability": reliability,
    }


def choose_thresholds(y_true, probabilities):
    """Per-label decision thresholds that maximise each label's F1 on validation data.

    For each label, the candidates are the probabilities the model gave that label; an
    image has the label when its probability is >= the threshold. The candidate with the
    highest F1 wins, the lowest of equal ones (ties go to the lower threshold, predicting
    the label more often). Every threshold above the next lower probability and up to the
    winner makes the same decisions on these images; the one returned is halfway between
    the two (between 0 and the winner when it is the lowest), so an image scored a little
    below the validation images that have the label still gets it. A label with no
    positive image gets `DEFAULT_THRESHOLD`.

    Args:
        y_true: multi-hot matrix `(n, classes)`.
        probabilities: sigmoid outputs `(n, classes)`.

    Returns:
        A list of float thresholds, one per class (float32 values, as the export bakes
        them into its graph).

    Raises:
        ConfigError: if the shapes disagree.

    Example:

    >>> choose_thresholds([[1], [0], [1], [0]], [[0.9], [0.6], [0.3], [0.1]])
    [0.20000000298023224]
    """
    present, probabilities = _check_multi_label_inputs(y_true, probabilities, None)
    thresholds = []
    for label in range(probabilities.shape[1]):
        scores, positive = probabilities[:, label], present[:, label]
        if not positive.any():
            thresholds.append(float(np.float32(DEFAULT_THRESHOLD)))
            continue
        candidates = np.unique(scores)  # ascending
        predicted = len(scores) - np.searchsorted(np.sort(scores), candidates, side="left")
        hits = positive.sum() - np.searchsorted(np.sort(scores[positive]), candidates,
                                                side="left")
        f1 = 2 * hits / (predicted + positive.sum())
        best = int(np.argmax(f1))
        lower = candidates[best - 1] if best else np.float32(0.0)
        middle = np.float32((float(lower) + float(candidates[best])) / 2)
        thresholds.append(float(middle if middle > lower else candidates[best]))
    return thresholds


def average_precision(y_true, scores):
    """Average precision of one label: the area under its precision-recall steps.

    `sum over thresholds of (recall_k - recall_(k-1)) * precision_k`, the thresholds being
    the distinct scores from the highest down (tied scores are one threshold), as
    scikit-learn's `average_precision_score` computes it.

    Args:
        y_true: 0/1 (or bool) per image.
        scores: the label's probability per image.

    Returns:
        A float, or None when no image has the label (it is undefined then).

    Example:

    >>> average_precision([1, 0, 1], [0.9, 0.8, 0.3])
    0.8333333333333333
    """
    positive = np.asarray(y_true) > 0.5
    scores = np.asarray(scores, np.float64)
    if not positive.any():
        return None
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]  # end of each tie group
    hits = np.cumsum(positive)[last]
    precision = hits / (last + 1)
    recall = hits / positive.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def compute_multi_label_metrics(y_true, probabilities, class_names, thresholds=None):
    """Multi-label metrics from multi-hot labels and sigmoid probabilities (numpy only).

    An image has a label when its probability is >= the label's threshold.

    - Per label: precision, recall and F1 (0 where undefined, as `compute_metrics`), support
      (images with the label), the number predicted, average precision (`average_precision`,
      None for a label no image has) and the threshold.
    - `map`: the mean average precision over the labels some image has.
    - `subset_accuracy`: the share of images whose predicted label set is exactly the true
      one; `label_accuracy`: the share of (image, label) decisions that are right.
    - `micro_avg`: precision, recall and F1 of all decisions pooled; `macro_avg`: the mean
      over the labels that occur among the true labels or the predictions.

    Args:
        y_true: multi-hot matrix `(n, classes)`, `n >= 1`.
        probabilities: `(n, classes)`.
        class_names: a name per column.
        thresholds: a threshold per class; `None`: `DEFAULT_THRESHOLD` for each.

    Returns:
        A JSON-ready dict: `multi_label` (True), `num_samples`, `num_classes`,
        `class_names`, `thresholds`, `subset_accuracy`, `label_accuracy`, `map`,
        `per_class` (`{label: {"precision", "recall", "f1", "support", "predicted",
        "average_precision", "threshold"}}`), `micro_avg`, `macro_avg`.

    Raises:
        ConfigError: if the shapes or the thresholds disagree with the class names.

    Example:

    >>> m = compute_multi_label_metrics([[1, 1], [0, 1]], [[0.9, 0.2], [0.1, 0.7]],
    ...                                 ["cat", "dog"])
    >>> m["subset_accuracy"], m["per_class"]["dog"]["recall"]
    (0.5, 0.5)
    """
    present, probabilities = _check_multi_label_inputs(y_true, probabilities, class_names)
    thresholds = ([DEFAULT_THRESHOLD] * len(class_names) if thresholds is None
                  else check_thresholds(thresholds, len(class_names)))
    predicted = probabilities >= np.asarray(thresholds, np.float32)[None, :]
    hits = (predicted & present).sum(axis=0).astype(np.float64)
    support, predicted_count = present.sum(axis=0), predicted.sum(axis=0)
    precision, recall = _ratio(hits, predicted_count), _ratio(hits, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    ap = [average_precision(present[:, j], probabilities[:, j])
          for j in range(len(class_names))]
    occurring = (support > 0) | (predicted_count > 0)
    micro_p = _ratio(hits.sum(), predicted_count.sum())
    micro_r = _ratio(hits.sum(), support.sum())
    num_samples = len(present)
    return {
        "multi_label": True,
        "num_samples": int(num_samples),
        "num_classes": len(class_names),
        "class_names": [str(c) for c in class_names],
        "thresholds": [float(t) for t in thresholds],
        "subset_accuracy": float((predicted == present).all(axis=1).mean()),
        "label_accuracy": float((predicted == present).mean()),
        "map": float(np.mean([v for v in ap if v is not None])) if any(
            v is not None for v in ap) else None,
        "per_class": {str(name): {"precision": float(precision[j]), "recall": float(recall[j]),
                                  "f1": float(f1[j]), "support": int(support[j]),
                                  "predicted": int(predicted_count[j]),
                                  "average_precision": ap[j],
                                  "threshold": float(thresholds[j])}
                      for j, name in enumerate(class_names)},
        "micro_avg": {"precision": float(micro_p), "recall": float(micro_r),
                      "f1": float(_ratio(2 * micro_p * micro_r, micro_p + micro_r)),
                      "support": int(support.sum())},
        "macro_avg": {**{key: float(values[occurring].mean()) if occurring.any() else 0.0
                         for key, values in (("precision", precision), ("recall", recall),
                                             ("f1", f1))},
                      "support": int(support.sum())},
    }


def _check_multi_label_inputs(y_true, probabilities, class_names):
    """`(bool matrix of the true labels, float32 probabilities)`, or raises ConfigError."""
    probabilities = np.asarray(probabilities, np.float32)
    y_true = np.asarray(y_true)
    columns = probabilities.shape[1] if probabilities.ndim == 2 else None
    if class_names is not None and columns != len(class_names):
        raise ConfigError(
            f"`probabilities` must have shape (n, {len(class_names)}): one column per class "
            f"name. Received: probabilities.shape={probabilities.shape}")
    if probabilities.ndim != 2 or y_true.shape != probabilities.shape or not len(y_true):
        raise ConfigError(
            "`y_true` must be a multi-hot matrix with the shape of `probabilities`, at "
            f"least one row. Received: y_true.shape={y_true.shape}, "
            f"probabilities.shape={probabilities.shape}")
    return y_true > 0.5, probabilities


def _check_metric_inputs(y_true, probabilities, class_names, top_k):
    probabilities = np.asarray(probabilities, np.float64)
    y_true = np.asarray(y_true)
    num_classes = len(class_names)
    if probabilities.ndim != 2 or probabilities.shape[1] != num_classes:
        raise ConfigError(
            f"`probabilities` must have shape (n, {num_classes}): one column per class name. "
            f"Received: probabilities.shape={probabilities.shape}"
        )
    if y_true.shape != (len(probabilities),) or not len(y_true):
        raise ConfigError(
            f"`y_true` must hold one label per row of `probabilities` ({len(probabilities)}), "
            f"at least one. Received: y_true.shape={y_true.shape}"
        )
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 \
            or y_true.max() >= num_classes:
        raise ConfigError(
            f"`y_true` must hold integer class indices in [0, {num_classes - 1}]. Received: "
            f"y_true with values {sorted(set(y_true.tolist()))[:10]}"
        )
    return y_true.astype(np.int64), probabilities, _top_ks(top_k, num_classes)


def _top_ks(top_k, num_classes):
    """The sorted distinct k <= num_classes of an int or a sequence of ints (all >= 1)."""
    ks = list(top_k) if hasattr(top_k, "__iter__") and not isinstance(top_k, str) else [top_k]
    for k in ks:
        check_number("top_k", k, 1, integer=True)
    return sorted({int(k) for k in ks if k <= num_classes})


def _ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0."""
    denominator = np.asarray(denominator, np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(denominator),
                     where=denominator > 0)


def _calibration(confidence, correct):
    """Reliability-diagram data and the expected calibration error."""
    edges = np.linspace(0.0, 1.0, CALIBRATION_BINS + 1)
    bins = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(bins, minlength=CALIBRATION_BINS)
    confidence_sum = np.bincount(bins, weights=confidence, minlength=CALIBRATION_BINS)
    correct_sum = np.bincount(bins, weights=correct, minlength=CALIBRATION_BINS)
    mean_confidence = _ratio(confidence_sum, count)
    accuracy = _ratio(correct_sum, count)
    ece = float(np.sum(count * np.abs(accuracy - mean_confidence)) / len(confidence))

    def per_bin(values):
        return [float(v) if n else None for v, n in zip(values, count)]

    reliability = {"bin_edges": edges.tolist(), "count": count.tolist(),
                   "confidence": per_bin(mean_confidence), "accuracy": per_bin(accuracy)}
    return reliability, ece


# --- Reports ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mistake:
    """One wrongly classified sample."""

    index: int  # position among the evaluated samples
    source: str  # file path, or "array[i]" for in-memory images
    true: str  # true class name
    predicted: str  # predicted (top-1) class name
    confidence: float  # probability of the predicted class

    def to_dict(self):
        """JSON-ready form: file, true, predicted, confidence."""
        return {"file": self.source, "true": self.true, "predicted": self.predicted,
                "confidence": round(self.confidence, 6)}


@dataclass
class EvaluationReport:
    """Metrics of a classifier on labelled images, its mistakes and the files it skipped."""

    metrics: dict  # see `compute_metrics`
    mistakes: list  # `Mistake`s, the most confident first
    skipped: list = field(default_factory=list)  # (path, reason) of files that could not be read
    model: str | None = None  # the evaluated export, when there is one
    data: str | None = None  # the evaluated folder, when there is one

    def to_dict(self):
        """JSON-ready form (what `metrics.json` holds)."""
        return {"model": self.model, "data": self.data, "metrics": self.metrics,
                "mistakes": [m.to_dict() for m in self.mistakes],
                "skipped": [{"file": p, "reason": r} for p, r in self.skipped]}

    def to_text(self):
        """A plain-text report: accuracy, top-k, calibration error, the per-class table with
        macro and weighted averages, the confusion matrix and the skipped files."""
        m = self.metrics
        lines = [f"Model {self.model or '-'} on {self.data or '-'}"] if self.model or self.data \
            else []
        lines.append(f"{m['num_samples']} images, {len(self.mistakes)} mistakes, "
                     f"{len(self.skipped)} skipped")
        if m.get("multi_label"):
            lines += _multi_label_lines(m)
            if self.skipped:
                lines += ["", f"Skipped {len(self.skipped)} file(s) that could not be read:"]
                lines += [f"  {path}: {reason}" for path, reason in self.skipped]
            return "\n".join(lines)
        lines.append(f"accuracy        {m['accuracy']:.4f}")
        lines += [f"{key.replace('_', '-')} accuracy  {value:.4f}"
                  for key, value in m["top_k_accuracy"].items()]
        lines.append(f"ECE ({CALIBRATION_BINS} bins)   {m['ece']:.4f}")
        lines += ["", *_score_table(m), "",
                  "confusion matrix (rows: true class, columns: predicted class)",
                  *_confusion_table(m["class_names"], m["confusion_matrix"])]
        if self.skipped:
            lines += ["", f"Skipped {len(self.skipped)} file(s) that could not be read:"]
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def _score_table(metrics):
    """Lines of precision, recall, F1 and support per class, then the averages."""
    rows = list(metrics["per_class"].items())
    width = max(len("weighted avg"), *(len(name) for name, _ in rows))
    header = f"{'class':<{width}}  precision  recall      f1  support"

    def line(name, v):
        return (f"{name:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  {v['f1']:6.4f}"
                f"  {v['support']:7d}")

    return [header, *(line(n, v) for n, v in rows), "-" * len(header),
            line("macro avg", metrics["macro_avg"]),
            line("weighted avg", metrics["weighted_avg"])]


def _multi_label_lines(metrics):
    """The multi-label summary lines and the per-label table, then the averages."""
    mean_ap = "-" if metrics["map"] is None else f"{metrics['map']:.4f}"
    lines = [f"subset accuracy {metrics['subset_accuracy']:.4f}  (every label right)",
             f"label accuracy  {metrics['label_accuracy']:.4f}",
             f"mAP             {mean_ap}", ""]
    rows = list(metrics["per_class"].items())
    width = max(len("micro avg"), *(len(name) for name, _ in rows))
    header = (f"{'label':<{width}}  precision  recall      f1      AP  threshold  support"
              "  predicted")
    lines.append(header)
    for name, v in rows:
        ap = "     -" if v["average_precision"] is None else f"{v['average_precision']:6.4f}"
        lines.append(f"{name:<{width}}  {v['precision']:9.4f}  {v['recall']:6.4f}  "
                     f"{v['f1']:6.4f}  {ap}  {v['threshold']:9.4f}  {v['support']:7d}  "
                     f"{v['predicted']:9d}")
    lines.append("-" * len(header))
    for key in ("micro_avg", "macro_avg"):
        v = metrics[key]
        lines.append(f"{key.replace('_', ' '):<{width}}  {v['precision']:9.4f}  "
                     f"{v['recall']:6.4f}  {v['f1']:6.4f}")
    return lines


def _confusion_table(names, confusion):
    """Lines of the confusion matrix with class names on both axes."""
    digits = max(len(str(v)) for row in confusion for v in row)
    widths = [max(digits, len(n)) for n in names]
    first = max(len(n) for n in names)

    def line(label, cells):
        return f"{label:<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths))

    return [line("", names), *(line(n, row) for n, row in zip(names, confusion))]


def _find_multi_label_mistakes(present, probabilities, thresholds, class_names, sources):
    """Images whose predicted label set is not the true one, the most confident wrong
    decision first: a mistake's confidence is the largest probability of a label wrongly
    predicted, or 1 - the probability of a label wrongly missed."""
    predicted = probabilities >= np.asarray(thresholds, np.float32)[None, :]
    wrong_side = np.where(predicted, probabilities, 1.0 - probabilities)
    confidence = np.where(predicted != present, wrong_side, 0.0).max(axis=1)
    wrong = np.flatnonzero((predicted != present).any(axis=1))
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]

    def names(row):
        return ";".join(class_names[j] for j in np.flatnonzero(row))

    return [Mistake(int(i), str(sources[i]), names(present[i]), names(predicted[i]),
                    float(confidence[i])) for i in order]


def _find_mistakes(y_true, probabilities, class_names, sources):
    """The wrong predictions, the most confident first (ties: in sample order)."""
    predicted = np.argmax(probabilities, axis=1)
    confidence = probabilities[np.arange(len(predicted)), predicted]
    wrong = np.flatnonzero(predicted != y_true)
    order = wrong[np.argsort(-confidence[wrong], kind="stable")]
    return [Mistake(int(i), str(sources[i]), str(class_names[y_true[i]]),
                    str(class_names[predicted[i]]), float(confidence[i])) for i in order]


# --- Evaluation ---------------------------------------------------------------------------------


def evaluate_folder(data_dir, model=None, export_dir="saved_models", top_k=3, batch_size=64,
                    output_dir=None, worst=16, labels=None):
    """Evaluates an export on a labelled folder (one subfolder per class, or a label file).

    Only the export is needed: its class names, image size and resize policy come from its
    metadata, and every file is decoded with the training image contract.

    Args:
        data_dir: folder with one subfolder per class; the classes must be a subset of the
            model's (a model class may have no folder).
        model: an export version folder, a model folder (its highest version) or None for
            the newest export under `export_dir` (see `tlkit.predict.load`).
        export_dir: where to look when `model` is None.
        top_k: k (or a sequence of k) for top-k accuracy, besides top-1 accuracy.
        batch_size: images per forward pass.
        output_dir: if given, a folder (created if missing) that receives `OUTPUT_FILES`:
            `metrics.json` (`EvaluationReport.to_dict()`), `confusion_matrix.png`,
            `reliability.png`, `mistakes.csv` (file, true, predicted, confidence; the most
            confident mistakes first; only the header when there is none) and `mistakes.png`
            (thumbnails of the `worst` most confident mistakes; not written, and an old one
            removed, when there is none).
        worst: most thumbnails in `mistakes.png`.
        labels: a label file instead of class subfolders (`tlkit.data.scan_labels`); its
            labels must be among the model's classes. Every row is evaluated: a `split`
            column is not used (give a file of the rows to score). For a multi-label
            export, its label cells are `;`-separated label lists, and the same image in
            several class folders is one image with all of their labels.

    Returns:
        An `EvaluationReport`; files that cannot be decoded are left out of the metrics and
        listed in `skipped`.

    Raises:
        DataError: if the folder is missing, has a class folder (or label) the model does
            not know (the message names it), a label file has bad rows, or no image in it
            can be read.
        ExportError: if `model` is not a tlkit export.
        ConfigError: for a bad `top_k`, `batch_size`, `worst` or `output_dir`.

    Example:

    >>> report = evaluate_folder("data/test", "saved_models/digits/1", output_dir="eval")
    >>> print(report.to_text())
    """
    _check_evaluation_options(top_k, batch_size, worst)
    classifier = load(model, export_dir)
    class_names = classifier.class_names
    scan = scan_data(data_dir, labels, class_names=class_names,
                     multi_label=classifier.multi_label)
    predictions = classifier.predict(list(scan.files), top_k=len(class_names),
                                     batch_size=batch_size)
    index = {name: i for i, name in enumerate(class_names)}
    read = [i for i, p in enumerate(predictions) if p.error is None]
    skipped = [(p.source, p.error) for p in predictions if p.error is not None]
    if not read:
        raise DataError(f"No image in {str(data_dir)!r} could be read; nothing to evaluate "
                        f"({len(skipped)} file(s) skipped).")
    probabilities = np.zeros((len(read), len(class_names)))
    for row, i in enumerate(read):
        for label, probability in zip(predictions[i].labels, predictions[i].probabilities):
            probabilities[row, index[label]] = probability
    files = [scan.files[i] for i in read]
    if classifier.multi_label:
        truth, keep = _merged_truth(scan, read)
        probabilities, files = probabilities[keep], [files[i] for i in keep]
    else:
        truth = np.asarray(scan.labels)[read]
    return _report(truth, probabilities, class_names, files,
                   lambda i: load_image(files[i], THUMBNAIL_SIZE, classifier.resize),
                   top_k=top_k, output_dir=output_dir, worst=worst, skipped=skipped,
                   model=str(classifier.path),
                   data=str(data_dir) if labels is None else str(labels),
                   thresholds=classifier.thresholds if classifier.multi_label else None)


def _merged_truth(scan, read):
    """Multi-hot truth of the read files of a multi-label scan, the files with one content
    (the same image in several class folders) merged into their first: `(truth, positions
    into read kept)`."""
    matrix = scan.label_matrix()[read]
    first_of, keep = {}, []
    for position, index in enumerate(read):
        first = first_of.setdefault(file_digest(scan.files[index]), position)
        if first == position:
            keep.append(position)
        else:
            matrix[first] = np.maximum(matrix[first], matrix[position])
    return matrix[keep], keep


def evaluate_arrays(model, images, labels, class_names, top_k=3, batch_size=64,
                    output_dir=None, worst=16, sources=None, probabilities=None,
                    thresholds=None):
    """Evaluates a classifier on images already in memory (for example a validation split).

    Args:
        model: a `tlkit.predict.Classifier` (a loaded export) or a Keras classifier that maps
            float32 images 0..255 to probabilities (`tlkit.models.build_classifier`).
        images: uint8 (or 0..255 float) array `(n, size, size, 3)` at the model's input size.
        labels: integer class index per image, or multi-hot rows `(n, classes)` for a
            multi-label model (then the metrics are `compute_multi_label_metrics`').
        class_names: class name per model output.
        top_k, batch_size, output_dir, worst: as in `evaluate_folder` (`top_k` is not
            used for a multi-label model).
        sources: a name per image for the mistake list (for example its file path);
            `None` names them `array[i]`.
        probabilities: the model's probabilities for `images`, `(n, classes)`, when they
            are already computed (`tlkit.fit` computes them once per split for its metrics
            and this report); `None`: the model predicts them here.
        thresholds: a multi-label model's threshold per class; `None`: a loaded
            multi-label export's own, else `DEFAULT_THRESHOLD` for multi-hot `labels`.

    Returns:
        An `EvaluationReport` (with `skipped` empty).

    Raises:
        ConfigError: if the images, labels, class names or sources do not fit the model or
            each other, or an option is out of range.

    Example:

    >>> val = data.splits["val"]
    >>> report = evaluate_arrays(model, val.images, val.labels, data.class_names,
    ...                          sources=val.files, output_dir=run_dir / "evaluation")
    """
    _check_evaluation_options(top_k, batch_size, worst)
    images = np.asarray(images)
    size, outputs = _input_size(model), _output_count(model)
    if images.ndim != 4 or images.shape[1:] != (size, size, 3) or not len(images):
        raise ConfigError(
            f"`images` must be an array of shape (n, {size}, {size}, 3), n >= 1, for this "
            f"model. Received: images.shape={images.shape}"
        )
    if len(class_names) != outputs:
        raise ConfigError(f"`class_names` must name each of the model's {outputs} outputs. "
                          f"Received: {len(class_names)} names")
    if sources is None:
        sources = [f"array[{i}]" for i in range(len(images))]
    for name, values in (("labels", labels), ("sources", sources)):
        if len(values) != len(images):
            raise ConfigError(f"`{name}` must have one entry per image ({len(images)}). "
                              f"Received: {len(values)} {name}")
    if probabilities is not None:
        probabilities = np.asarray(probabilities)
        if probabilities.shape != (len(images), outputs):
            raise ConfigError(f"`probabilities` must have shape ({len(images)}, {outputs}): "
                              "one row per image, one column per class. Received: "
                              f"probabilities.shape={probabilities.shape}")
    elif isinstance(model, Classifier):
        probabilities = model.predict_arrays(images, batch_size)
    else:
        probabilities = predict_probabilities(model, images, batch_size)
    if np.ndim(labels) == 2 and thresholds is None:
        thresholds = (model.thresholds if isinstance(model, Classifier) and model.multi_label
                      else [DEFAULT_THRESHOLD] * outputs)
    return _report(labels, probabilities, class_names, list(sources), lambda i: images[i],
                   top_k=top_k, output_dir=output_dir, worst=worst, skipped=[],
                   model=str(model.path) if isinstance(model, Classifier) else None,
                   thresholds=thresholds if np.ndim(labels) == 2 else None)


def _check_evaluation_options(top_k, batch_size, worst):
    _top_ks(top_k, math.inf)
    check_number("batch_size", batch_size, 1, integer=True)
    check_number("worst", worst, 1, integer=True)


def _input_size(model):
    """The image side a Classifier or Keras model expects."""
    if isinstance(model, Classifier):
        return model.image_size
    if isinstance(model, keras.Model) and len(model.input_shape) == 4:
        return model.input_shape[1]
    raise ConfigError(
        "`model` must be a tlkit Classifier (tlkit.load) or a Keras image classifier with "
        f"input (None, size, size, 3). Received: model={model!r}"
    )


def _output_count(model):
    """The number of classes a Classifier or Keras model predicts."""
    return len(model.class_names) if isinstance(model, Classifier) else model.output_shape[-1]


def _report(y_true, probabilities, class_names, sources, thumbnail, *, top_k, output_dir,
            worst, skipped, model=None, data=None, thresholds=None):
    """Metrics, mistakes and (with `output_dir`) the output files: shared by both entries.
    `thresholds` given (a list, one per class) means a multi-label model."""
    if thresholds is not None:
        metrics = compute_multi_label_metrics(y_true, probabilities, class_names, thresholds)
        mistakes = _find_multi_label_mistakes(np.asarray(y_true) > 0.5,
                                              np.asarray(probabilities, np.float32),
                                              metrics["thresholds"], class_names, sources)
    else:
        metrics = compute_metrics(y_true, probabilities, class_names, top_k)
        mistakes = _find_mistakes(np.asarray(y_true, np.int64), np.asarray(probabilities),
                                  class_names, sources)
    report = EvaluationReport(metrics, mistakes, skipped, model, data)
    if output_dir is not None:
        _write_outputs(report, Path(output_dir), thumbnail, worst)
    return report


# --- Output files -------------------------------------------------------------------------------


def _write_outputs(report, folder, thumbnail, worst):
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"`output_dir` must be a folder that can be written. Received: "
                          f"output_dir={str(folder)!r} ({e.strerror})") from None
    (folder / "metrics.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    metrics = report.metrics
    if metrics.get("multi_label"):
        for name in set(OUTPUT_FILES) - set(MULTI_LABEL_OUTPUT_FILES):
            (folder / name).unlink(missing_ok=True)
    else:
        _plot_confusion(metrics["confusion_matrix"], metrics["class_names"],
                        folder / "confusion_matrix.png")
        _plot_reliability(metrics["reliability"], metrics["ece"], folder / "reliability.png")
    with open(folder / "mistakes.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "true", "predicted", "confidence"])
        writer.writeheader()
        writer.writerows(m.to_dict() for m in report.mistakes)
    (folder / "mistakes.png").unlink(missing_ok=True)
    if report.mistakes:
        _plot_mistakes(report.mistakes[:worst], thumbnail, len(report.mistakes),
                       folder / "mistakes.png")


def _save(figure, path):
    figure.tight_layout()
    figure.savefig(path)


def _plot_confusion(confusion, class_names, path):
    """Confusion matrix heat map with the count in every cell."""
    confusion = np.asarray(confusion)
    count = len(class_names)
    side = min(max(5.0, 0.5 * count + 2.5), 24.0)
    figure = Figure(figsize=(side, side), dpi=100)
    axis = figure.subplots()
    image = axis.imshow(confusion, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    ticks = np.arange(count)
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, class_names)
    axis.set_xlabel("predicted class")
    axis.set_ylabel("true class")
    threshold = confusion.max() / 2
    fontsize = max(4.0, min(10.0, 160.0 / count))
    for (row, column), value in np.ndenumerate(confusion):
        axis.text(column, row, str(value), ha="center", va="center", fontsize=fontsize,
                  color="white" if value > threshold else "black")
    axis.set_title(f"Confusion matrix ({confusion.sum()} images)")
    _save(figure, path)


def _plot_reliability(reliability, ece, path):
    """Reliability diagram: accuracy per confidence bin against the diagonal, counts below."""
    edges = np.asarray(reliability["bin_edges"])
    width = edges[1] - edges[0]
    left = edges[:-1]
    filled = [i for i, n in enumerate(reliability["count"]) if n]
    figure = Figure(figsize=(6, 7), dpi=100)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    top.plot([0, 1], [0, 1], "--", color="grey", label="perfect calibration")
    top.bar(left[filled], [reliability["accuracy"][i] for i in filled], width=width,
            align="edge", edgecolor="black", alpha=0.8, label="accuracy")
    top.plot([reliability["confidence"][i] for i in filled],
             [reliability["accuracy"][i] for i in filled], "o", color="crimson", ms=4,
             label="(mean confidence, accuracy)")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE = {ece:.4f}, {len(left)} bins)")
    top.legend(loc="upper left")
    top.grid(alpha=0.3)
    bottom.bar(left, reliability["count"], width=width, align="edge", edgecolor="black",
               color="grey")
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("images")
    _save(figure, path)


def _plot_mistakes(mistakes, thumbnail, total, path):
    """Thumbnails of the given mistakes, each titled "true -> predicted (confidence)"."""
    plot_thumbnails([thumbnail(m.index) for m in mistakes],
                    [f"{m.true} -> {m.predicted} ({m.confidence:.2f})" for m in mistakes],
                    path, f"Most confident mistakes ({len(mistakes)} of {total})")

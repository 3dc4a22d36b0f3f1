"""`tlkit audit`: the images of a labelled folder that are likely labelled wrong, ambiguous
or unlike every class.

    DATA_DIR (or a label file) --scan_data--> files and their given labels
        --decode_images--> uint8 images (unreadable files skipped and listed)
        --the frozen backbone, once (FeatureEngine; FeatureCache keyed by content)--> features
        --k-fold softmax heads: each image scored by the head that never saw it--> p (n, K)
        --confident learning on p--> label issues with a suggested label, ambiguous images
        --cosine similarity to the class means--> outliers
        --> AuditReport (+ output_dir: audit.csv, audit.json, audit.png)

The backbone runs once per image (and not at all on a rerun: the features are cached under
the files' content digests); the heads are multinomial logistic regressions on the
features, trained in numpy in seconds and deterministic for a seed.

Confident learning (Northcutt, Jiang and Chuang, "Confident Learning: Estimating
Uncertainty in Dataset Labels", JAIR 70, 2021) reads the out-of-sample probabilities with
one threshold per class, `t_j`, the mean probability of class j over the images labelled j
(its mean self-confidence). An image labelled i counts for class j when `p_j >= t_j`, and
for the most probable such class when there are several; these counts are the confident
joint `C[i, j]`. Calibrated to the class sizes (each row scaled to the images labelled i,
then the whole divided by n) it estimates the joint distribution of given and true labels,
`Q`; `1 - Q[i, i] / sum_j Q[i, j]` is the estimated share of wrong labels in class i. Which
images are label issues (`METHODS`):

- `self_confidence` (the default): as many images as the confident joint has off its
  diagonal, those with the lowest self-confidence `p_given` over the whole data (the
  `low_self_confidence` filter of cleanlab, the reference implementation). Chosen on
  benchmarks/audit_noise.py's development seeds, drawn from Fashion-MNIST's training file
  (RESULTS.md, section audit_noise_dev): a class whose images the heads find hard has many
  clean images of low self-confidence, and ranking over all classes spends the count on
  the least self-confident images wherever they are.
- `class_self_confidence`: in each class i, as many images as row i of the confident joint
  has off its diagonal, those of class i with the lowest self-confidence.
- `confident_joint`: every image counted off the diagonal of the confident joint.
- `noise_rate` ("prune by noise rate"): for each off-diagonal cell (i, j), the
  `round(n * Q[i, j])` images labelled i with the largest margin `p_j - p_i`, leaving out
  those whose most probable class is their given one.

An image flagged as an issue gets the class the confident joint counted it for as its
suggested label (else its most probable other class). An image that is not an issue is
*ambiguous* when two or more classes reach their thresholds, or when its two most probable
classes are within `AMBIGUOUS_MARGIN` of each other. An *outlier* is an image whose
features (centred on the data's mean) are far from every class: its cosine distance to the
nearest class mean (1 - the largest cosine similarity) is beyond Tukey's upper fence of the
log distances over the images (third quartile + 1.5 x interquartile range; in logs, since
distances are bounded below and skewed).

Multi-label (`multi_label`: a label file's `a;b` cells, or the same image in several class
folders, its copies merged by content as `tlkit.data.merge_copies` merges them for `fit`):
each label is a binary problem of its own, absent or present. The folds are stratified on
each image's rarest label; per fold and label a two-class head gives the out-of-sample
probability that the label is present, and confident learning on that label's two columns
(one threshold for presence, one for absence) finds the images whose given state of the
label is likely wrong: a label the image has but was not given ("missing"), or one it was
given but does not have ("extra"). Each issue is an (image, label) pair, ranked by the
probability of the state opposite to the given one; a label's estimated noise is the share
of images whose given state of it is wrong. Outliers are as above, with each label's mean
over the images that have it. Ambiguous images are not looked for: several labels claiming
one image is what multi-label means.
"""

import csv
import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tlkit.api import resolve_config
from tlkit.backbones import get_backbone
from tlkit.config import AUDIT_METHODS, AuditConfig, build_config
from tlkit.data import (LABEL_SEPARATOR, Split, decode_images, merge_copies, scan_data,
                        survey_folder)
from tlkit.errors import ConfigError, DataError
from tlkit.features import FeatureCache, FeatureEngine, split_features
from tlkit.models import build_backbone, build_classifier
from tlkit.plots import plot_thumbnails
from tlkit.validation import check_choice, check_number

METHODS = AUDIT_METHODS
"""`method` choices: see the module docstring."""

OUTPUT_FILES = ("audit.csv", "audit.json", "audit.png")
"""What `output_dir` receives (`audit.png` only when there is a suspect)."""

AMBIGUOUS_MARGIN = 0.1
"""An image whose two most probable classes are closer than this is ambiguous."""

OUTLIER_FENCE = 1.5
"""Tukey's factor: an outlier's log distance to the nearest class is above Q3 + 1.5 x IQR."""

MAX_STEPS = 2000
"""Most gradient steps of one softmax head (it stops sooner, see `train_softmax_head`)."""


# --- Out-of-sample probabilities ----------------------------------------------------------------


@dataclass(frozen=True)
class SoftmaxHead:
    """A multinomial logistic regression on features: centring, scaling, weights."""

    mean: np.ndarray  # (d,) subtracted from every feature vector
    scale: float  # then divided by this: the training features' root mean squared norm
    weights: np.ndarray  # (d + 1, K): the last row is the bias

    def predict(self, features):
        """Class probabilities `(n, K)` of float features `(n, d)`."""
        x = (np.asarray(features, np.float32) - self.mean) / self.scale
        return _softmax(x @ self.weights[:-1] + self.weights[-1])


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def train_softmax_head(features, labels, num_classes, weight_decay=1e-3):
    """Trains a multinomial logistic regression (softmax head) with L2 weight decay.

    The features are centred on their mean and scaled to a root mean squared norm of 1; the
    mean cross-entropy plus `weight_decay / 2 * |W|^2` (the bias is not penalised) is
    minimised by Nesterov's accelerated gradient for strongly convex functions, with the
    step 1/L from Bohning's bound on the softmax Hessian (L = lambda_max(X'X / n) / 2 +
    weight_decay), for `10 * sqrt(L / weight_decay)` steps (at most `MAX_STEPS`): the error
    then shrinks by about e^-10. Everything is plain numpy from zeros, so the same inputs
    give the same head.

    Args:
        features: float array `(n, d)`, n >= 1.
        labels: class index per row, in `0..num_classes - 1`.
        num_classes: K, the number of outputs (a class without rows gets a low bias).
        weight_decay: the L2 penalty, > 0.

    Returns:
        A `SoftmaxHead`.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    check_number("num_classes", num_classes, 2, integer=True)
    check_number("weight_decay", weight_decay, 0.0, 100.0, low_open=True)
    if features.ndim != 2 or not len(features) or labels.shape != (len(features),):
        raise ConfigError("`features` must be an array (n, d) with n >= 1 and `labels` one "
                          f"class per row. Received: features.shape={features.shape}, "
                          f"labels.shape={labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ConfigError(f"`labels` must be class indices in 0..{num_classes - 1}. "
                          f"Received: labels from {labels.min()} to {labels.max()}")
    mean = features.mean(axis=0)
    x = features - mean
    scale = float(np.sqrt(np.mean(np.sum(x * x, axis=1)))) or 1.0
    x = np.hstack([x / scale, np.ones((len(x), 1), np.float32)])
    targets = np.eye(num_classes, dtype=np.float32)[labels]
    lipschitz = 0.5 * _largest_eigenvalue(x.T @ x / len(x)) + weight_decay
    steps = min(MAX_STEPS, math.ceil(10 * math.sqrt(lipschitz / weight_decay)))
    momentum = np.float32((math.sqrt(lipschitz) - math.sqrt(weight_decay)) /
                          (math.sqrt(lipschitz) + math.sqrt(weight_decay)))
    decay = np.full((x.shape[1], 1), weight_decay, np.float32)
    decay[-1] = 0.0
    weights = previous = np.zeros((x.shape[1], num_classes), np.float32)
    for _ in range(steps):
        ahead = weights + momentum * (weights - previous)
        gradient = x.T @ (_softmax(x @ ahead) - targets) / len(x) + decay * ahead
        previous, weights = weights, ahead - gradient / np.float32(lipschitz)
    return SoftmaxHead(mean, scale, weights)


def _largest_eigenvalue(gram, iterations=50):
    """lambda_max of a symmetric positive semi-definite matrix by power iteration, from ones."""
    vector = np.ones(len(gram), np.float64)
    gram = gram.astype(np.float64)
    for _ in range(iterations):
        vector = gram @ vector
        norm = np.linalg.norm(vector)
        if norm == 0:
            return 0.0
        vector /= norm
    return float(vector @ gram @ vector)


def stratified_folds(labels, folds, seed):
    """A fold index per image: each class's images in a seeded random order, dealt round the
    folds, continuing from where the previous class stopped (so folds differ by at most one
    image in size)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    fold_of = np.zeros(len(labels), np.int64)
    dealt = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        fold_of[members] = (dealt + np.arange(len(members))) % folds
        dealt += len(members)
    return fold_of


def out_of_sample_probabilities(features, labels, num_classes, folds=5, seed=42,
                                weight_decay=1e-3):
    """Class probabilities of every image from a softmax head that never saw it.

    The images are dealt into folds (`stratified_folds`); for each fold a head
    (`train_softmax_head`, its centring and scaling included) is trained on the features and
    labels of the other folds only and predicts the images of this fold.

    Args:
        features: float array `(n, d)`.
        labels: given class index per image.
        num_classes: K.
        folds: the number of folds (>= 2), or a fold index per image.
        seed: seed of the folds.
        weight_decay: see `train_softmax_head`.

    Returns:
        `(probabilities (n, K), fold index per image)`.
    """
    labels = np.asarray(labels, np.int64)
    if np.ndim(folds) == 0:
        check_number("folds", folds, 2, integer=True)
        fold_of = stratified_folds(labels, folds, seed)
    else:
        fold_of = np.asarray(folds, np.int64)
        if fold_of.shape != labels.shape or len(np.unique(fold_of)) < 2:
            raise ConfigError("`folds` must be a number >= 2 or a fold index per image with "
                              f"at least two folds. Received: folds={folds!r}")
    probabilities = np.zeros((len(labels), num_classes), np.float32)
    for fold in np.unique(fold_of):
        held_out = fold_of == fold
        head = train_softmax_head(features[~held_out], labels[~held_out], num_classes,
                                  weight_decay)
        probabilities[held_out] = head.predict(features[held_out])
    return probabilities, fold_of


# --- Confident learning -------------------------------------------------------------------------


@dataclass
class ConfidentLearning:
    """What confident learning reads from out-of-sample probabilities (see the module
    docstring)."""

    thresholds: np.ndarray  # (K,) t_j: mean p_j over the images labelled j
    confident_joint: np.ndarray  # (K, K) counts: row = given label, column = counted class
    joint: np.ndarray  # (K, K) calibrated joint of given and true labels, sums to 1
    noise_rates: np.ndarray  # (K,) estimated share of wrong labels among each class's images
    label_issues: np.ndarray  # image indices, the least self-confident first
    suggested: np.ndarray  # (n,) the suggested label of an issue; the given one otherwise
    ambiguous: np.ndarray  # image indices (not issues) several classes claim, closest first
    margin: np.ndarray  # (n,) p_given - the largest other p: below 0 the model disagrees


def confident_learning(probabilities, labels, method="self_confidence"):
    """Finds likely wrong labels from out-of-sample probabilities (Northcutt et al. 2021).

    Args:
        probabilities: `(n, K)` out-of-sample class probabilities
            (`out_of_sample_probabilities`).
        labels: the given class index of each image.
        method: one of `METHODS` (see the module docstring).

    Returns:
        A `ConfidentLearning`.

    Example:

    >>> found = confident_learning(probabilities, labels)
    >>> [(files[i], names[labels[i]], names[found.suggested[i]]) for i in found.label_issues]
    """
    check_choice("method", method, METHODS)
    p = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    if p.ndim != 2 or labels.shape != (len(p),) or not len(p):
        raise ConfigError("`probabilities` must be (n, K) with one given label per row. "
                          f"Received: probabilities.shape={p.shape}, labels.shape={labels.shape}")
    n, k = p.shape
    rows = np.arange(n)
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([p[labels == j, j].mean() if counts[j] else np.inf
                           for j in range(k)])
    above = p >= thresholds
    counted = above.any(axis=1)
    counted_as = np.where(above, p, -1.0).argmax(axis=1)
    confident_joint = np.zeros((k, k), np.int64)
    np.add.at(confident_joint, (labels[counted], counted_as[counted]), 1)
    row_sums = np.maximum(confident_joint.sum(axis=1, keepdims=True), 1)
    joint = confident_joint / row_sums * counts[:, None]
    joint /= max(joint.sum(), 1e-12)
    noise_rates = 1.0 - np.diag(joint) / np.maximum(joint.sum(axis=1), 1e-12)
    self_confidence = p[rows, labels]
    others = p.copy()
    others[rows, labels] = -1.0
    margin = self_confidence - others.max(axis=1)
    off_diagonal = counted & (counted_as != labels)
    if method == "confident_joint":
        issue = off_diagonal
    elif method == "self_confidence":
        issue = np.zeros(n, bool)
        issue[np.argsort(self_confidence, kind="stable")[:int(off_diagonal.sum())]] = True
    elif method == "class_self_confidence":
        issue = np.zeros(n, bool)
        for label in range(k):
            members = np.flatnonzero(labels == label)
            number = int(off_diagonal[members].sum())
            issue[members[np.argsort(self_confidence[members], kind="stable")[:number]]] = True
    else:
        issue = _prune_by_noise_rate(p, labels, joint)
    suggested = labels.copy()
    suggested[issue] = np.where(off_diagonal, counted_as, others.argmax(axis=1))[issue]
    issues = np.flatnonzero(issue)
    issues = issues[np.argsort(self_confidence[issues], kind="stable")]
    top_two = np.sort(p, axis=1)[:, -2:]
    close = top_two[:, 1] - top_two[:, 0] < AMBIGUOUS_MARGIN
    ambiguous = np.flatnonzero(~issue & ((above.sum(axis=1) >= 2) | close))
    ambiguous = ambiguous[np.argsort(np.abs(margin[ambiguous]), kind="stable")]
    return ConfidentLearning(thresholds, confident_joint, joint, noise_rates, issues,
                             suggested, ambiguous, margin)


def _prune_by_noise_rate(p, labels, joint):
    """Per off-diagonal cell (i, j), the round(n Q[i, j]) images labelled i with the largest
    p_j - p_i; never one whose most probable class is its given one."""
    n, k = p.shape
    issue = np.zeros(n, bool)
    for given in range(k):
        members = np.flatnonzero(labels == given)
        for other in range(k):
            number = int(round(joint[given, other] * n)) if other != given else 0
            if number and len(members):
                margin = p[members, other] - p[members, given]
                issue[members[np.argsort(-margin, kind="stable")[:number]]] = True
    return issue & (p.argmax(axis=1) != labels)


def find_outliers(features, labels, num_classes):
    """Images far from every class in feature space.

    Features are centred on their mean and scaled to unit length; each class's mean
    direction is the normalised mean of its images' (for multi-label images, each label's
    mean over the images that have it). An image's score is its largest cosine similarity
    to a class mean, any class's (not only its own); it is an outlier when the log of its
    distance, log(1 - score), is above Tukey's upper fence over all images, Q3 +
    `OUTLIER_FENCE` x (Q3 - Q1).

    Args:
        features: float array `(n, d)`.
        labels: given class index per image, or a multi-hot matrix `(n, K)`.
        num_classes: K.

    Returns:
        `(score per image, outlier indices, the least similar first)`.
    """
    x = np.asarray(features, np.float64)
    x = x - x.mean(axis=0)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        images, classes = np.nonzero(labels > 0.5)
    else:
        images, classes = np.arange(len(labels)), labels
    means = np.zeros((num_classes, x.shape[1]))
    np.add.at(means, classes, x[images])
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    present = np.bincount(classes, minlength=num_classes) > 0
    scores = (x @ means[present].T).max(axis=1)
    distances = np.log(np.maximum(1.0 - scores, 1e-12))
    first, third = np.percentile(distances, [25, 75])
    outliers = np.flatnonzero(distances > third + OUTLIER_FENCE * (third - first))
    return scores, outliers[np.argsort(scores[outliers], kind="stable")]


# --- Multi-label: one binary problem per label --------------------------------------------------


def rarest_labels(label_matrix):
    """Per image, its label with the fewest images overall (`K` for an image with none): what
    the folds of a multi-label audit are stratified on."""
    present = np.asarray(label_matrix) > 0.5
    counts = present.sum(axis=0)
    rarest = np.where(present, counts, len(present) + 1).argmin(axis=1)
    return np.where(present.any(axis=1), rarest, present.shape[1])


def multi_label_probabilities(features, label_matrix, folds=5, seed=42, weight_decay=1e-3):
    """Out-of-sample probability of each label being present on each image.

    Each label is a binary problem of its own (absent / present). The images are dealt
    into folds stratified on their rarest label (`rarest_labels`, `stratified_folds`), so
    every fold gets its share of every rare label; for each fold and label a two-class
    softmax head (`train_softmax_head`: a logistic regression, what a sigmoid output is)
    trains on the other folds and scores this one.

    Args:
        features: float array `(n, d)`.
        label_matrix: multi-hot given labels `(n, K)`.
        folds: the number of folds (>= 2), or a fold index per image.
        seed: seed of the folds.
        weight_decay: see `train_softmax_head`.

    Returns:
        `(probabilities (n, K) of presence, fold index per image)`.
    """
    present = np.asarray(label_matrix) > 0.5
    if present.ndim != 2 or len(present) != len(features):
        raise ConfigError("`label_matrix` must be a multi-hot matrix (n, K) with one row per "
                          f"feature row. Received: label_matrix.shape={present.shape}, "
                          f"features.shape={np.shape(features)}")
    if np.ndim(folds) == 0:
        check_number("folds", folds, 2, integer=True)
        folds = stratified_folds(rarest_labels(present), folds, seed)
    probabilities = np.zeros(present.shape, np.float32)
    for label in range(present.shape[1]):
        p, fold_of = out_of_sample_probabilities(features, present[:, label].astype(np.int64),
                                                 2, folds, seed, weight_decay)
        probabilities[:, label] = p[:, 1]
    return probabilities, fold_of


def confident_learning_per_label(probabilities, label_matrix, method="self_confidence"):
    """Confident learning on each label's binary problem: the images where a label's given
    presence or absence is likely wrong.

    Label j's columns are `(1 - p_j, p_j)` and its given class is absent (0) or present
    (1); `confident_learning` then finds, with one threshold for presence and one for
    absence, the images whose given state of the label is likely wrong. Each issue is an
    (image, label) pair: the image likely has a label it was not given, or was given one it
    does not have.

    Args:
        probabilities: `(n, K)` out-of-sample presence probabilities
            (`multi_label_probabilities`).
        label_matrix: multi-hot given labels `(n, K)`.
        method: one of `METHODS`.

    Returns:
        `(learning, issues)`: a `ConfidentLearning` per label, and the issues as an int
        array `(m, 2)` of (image, label) pairs, the most confident in the opposite of the
        given state first.
    """
    p = np.asarray(probabilities, np.float64)
    present = np.asarray(label_matrix) > 0.5
    if p.ndim != 2 or present.shape != p.shape:
        raise ConfigError("`probabilities` and `label_matrix` must both be (n, K). Received: "
                          f"probabilities.shape={p.shape}, label_matrix.shape={present.shape}")
    learning = tuple(confident_learning(np.stack([1 - p[:, j], p[:, j]], axis=1),
                                        present[:, j].astype(np.int64), method)
                     for j in range(p.shape[1]))
    issues = np.array([(i, j) for j, found in enumerate(learning) for i in found.label_issues],
                      np.int64).reshape(-1, 2)
    opposite = _opposite_confidence(p, present, issues)
    return learning, issues[np.argsort(-opposite, kind="stable")]


def _opposite_confidence(p, present, issues):
    """p(the label's state is not the given one) of each (image, label) issue."""
    images, labels = issues[:, 0], issues[:, 1]
    return np.where(present[images, labels], 1.0 - p[images, labels], p[images, labels])


# --- Features -------------------------------------------------------------------------------



def _listed_sections(files, sections, skipped, limit):
    """The text lines of a report's flagged sections (`(title, indices, describe)`, each
    with up to `limit` files) and of its skipped files."""
    lines = []
    for title, indices, describe in sections:
        if len(indices):
            lines += ["", f"{title}: {len(indices)}"]
            lines += [f"  {files[i]}: {describe(i)}" for i in indices[:limit]]
            if len(indices) > limit:
                lines.append(f"  ... {len(indices) - limit} more in audit.csv")
    if skipped:
        lines += ["", f"Skipped {len(skipped)} file(s) that could not be decoded:"]
        lines += [f"  {path}: {reason}" for path, reason in skipped]
    return lines

@dataclass
class ImageFeatures:
    """The frozen backbone's pooled features of the files that decoded."""

    files: list  # the files that decoded, in the given order
    positions: np.ndarray  # index of each of them among the given files
    features: np.ndarray  # float32 (len(files), d)
    images: np.ndarray = field(repr=False)  # their uint8 pixels at the model's input size
    skipped: list = field(default_factory=list)  # (path, reason) of files that did not decode
    from_cache: bool = False  # the features were found in the feature cache
    engine: str = "tensorflow float32"  # what computed them


def image_features(files, backbone, weights, image_size, resize="squash", *, cache_dir=None,
                   feature_cache=True, workers=0, batch_size=64, seed=42, verbose=1,
                   decoded=None):
    """Decodes image files and computes their pooled features on a frozen backbone, once.

    Files are decoded with `tlkit.data.decode_images` (the training image contract;
    unreadable files are skipped and listed). The features are those `fit` trains its head
    on: preprocessing, the backbone in inference mode and the pooler
    (`tlkit.features.FeatureEngine`). With `feature_cache` they are kept in the
    `FeatureCache` under the files' content digests and everything they depend on, so a
    second call with the same files skips the backbone.

    Args:
        files: image paths.
        backbone: a registered backbone name (not `"auto"`).
        weights: `"imagenet"`, `"none"` or a weights file (see `tlkit.models.build_backbone`).
        image_size: the model input side.
        resize: the resize policy.
        cache_dir: folder of the feature cache (`<cache_dir>/features`); None: the user cache.
        feature_cache: read and write the feature cache.
        workers: decoding threads; 0: one per CPU core.
        batch_size: images per forward pass.
        seed: seeds Keras before the backbone is built (random weights are repeatable).
        verbose: 0 silent, else progress bars and a line on where the features came from.
        decoded: the `tlkit.data.DecodedImages` of `files` at `image_size` and `resize`,
            when they are decoded already (a file marked not ok there, such as a copy
            `tlkit.data.merge_copies` merged, is left out as an unreadable one is, without
            being listed as skipped); None decodes them here.

    Returns:
        An `ImageFeatures`.
    """
    import keras

    spec = get_backbone(backbone)
    keras.utils.set_random_seed(seed)
    model = build_classifier(spec.name, 2, image_size,
                             backbone_model=build_backbone(spec.name, image_size, weights))
    if decoded is None:
        decoded = decode_images(list(files), image_size, resize, workers=workers,
                                verbose=verbose)
    positions = np.flatnonzero(decoded.ok)
    usable = [files[i] for i in positions]
    split = Split("audit", decoded.cache, positions, np.zeros(len(positions), np.int64),
                  usable, [decoded.digests[i] for i in positions])
    cache = None
    if feature_cache:
        cache = FeatureCache(Path(cache_dir) / "features" if cache_dir else None)
    settings = dict(backbone_name=spec.name, image_size=image_size, resize=resize,
                    preprocessing=spec.preprocessing, augment="none", flip="none",
                    dtype_policy=model.get_layer("backbone").dtype_policy.name)
    engine = FeatureEngine(model, verbose=verbose)
    started = time.perf_counter()
    try:
        computed = split_features(model, split, split.digests, cache, settings,
                                  batch_size=batch_size, verbose=verbose, engine=engine)
        images = split.images
    finally:  # a disk-mode cache's temporary file goes with it, also on Ctrl-C
        decoded.cache.close()
    source = "from the cache" if computed.from_cache else "computed"
    if verbose:
        print(f"[audit] {spec.name} features of {len(usable)} images {source} in "
              f"{time.perf_counter() - started:.1f}s")
    return ImageFeatures(usable, positions, computed.features[0], images, decoded.skipped,
                         computed.from_cache, f"{engine.name} {engine.precision}"
                         if engine.name else "feature cache")


# --- The audit ----------------------------------------------------------------------------------


@dataclass
class AuditReport:
    """The audit of a labelled folder: per image its given label, out-of-sample
    probabilities and flags; the flagged images as index lists into `files`."""

    data_dir: str  # the audited folder
    class_names: tuple  # class names in label order
    files: tuple  # the images that decoded, in scan order
    labels: np.ndarray  # given class index per image
    probabilities: np.ndarray = field(repr=False)  # (n, K) out of sample
    fold_of: np.ndarray = field(repr=False)  # the fold each image was held out in
    learning: ConfidentLearning = field(repr=False)  # thresholds, joint, noise, issues
    outlier_scores: np.ndarray = field(repr=False)  # best cosine similarity to a class mean
    outliers: np.ndarray  # image indices, the least similar first
    skipped: list  # (path, reason) of files that could not be decoded
    ignored: list  # (path, reason) of entries the scan skipped
    settings: dict  # the resolved AuditConfig, as run
    features: np.ndarray = field(default=None, repr=False)  # (n, d) backbone features
    seconds: dict = field(default_factory=dict)  # decode and features, heads, total

    @property
    def label_issues(self):
        """Indices of the images likely labelled wrong, the least self-confident first."""
        return self.learning.label_issues

    @property
    def ambiguous(self):
        """Indices of the images (not label issues) that several classes claim."""
        return self.learning.ambiguous

    @property
    def suggested(self):
        """Suggested class index per image (the given one unless it is a label issue)."""
        return self.learning.suggested

    @property
    def self_confidence(self):
        """Out-of-sample probability of each image's given label."""
        return self.probabilities[np.arange(len(self.labels)), self.labels]

    @property
    def ranked(self):
        """Every suspect once, in the order to look at them: label issues, then ambiguous
        images, then outliers."""
        order = [*self.label_issues, *self.ambiguous, *self.outliers]
        return [int(i) for i in dict.fromkeys(order)]

    def rows(self):
        """One JSON-ready dict per image, the suspects first (in `ranked` order)."""
        rank = {index: position + 1 for position, index in enumerate(self.ranked)}
        issue, ambiguous, outlier = (set(map(int, s)) for s in
                                     (self.label_issues, self.ambiguous, self.outliers))
        predicted = self.probabilities.argmax(axis=1)
        names = self.class_names
        order = [*rank, *(i for i in range(len(self.files)) if i not in rank)]
        return [{"file": self.files[i], "given": names[self.labels[i]],
                 "suggested": names[self.suggested[i]], "label_issue": i in issue,
                 "ambiguous": i in ambiguous, "outlier": i in outlier,
                 "self_confidence": round(float(self.self_confidence[i]), 6),
                 "predicted": names[predicted[i]],
                 "predicted_probability": round(float(self.probabilities[i, predicted[i]]), 6),
                 "margin": round(float(self.learning.margin[i]), 6),
                 "outlier_score": round(float(self.outlier_scores[i]), 6),
                 "rank": rank.get(i)} for i in order]

    def to_dict(self):
        """A JSON-ready summary (what audit.json holds): settings, counts, per class its
        threshold, estimated share of wrong labels and issues; the confident joint; the
        flagged files; the skipped ones."""
        learning, names = self.learning, self.class_names
        issues_per_class = np.bincount(self.labels[self.label_issues], minlength=len(names))
        counts = np.bincount(self.labels, minlength=len(names))
        return {
            "data_dir": self.data_dir,
            "settings": dict(self.settings),
            "counts": {"images": len(self.files), "skipped": len(self.skipped),
                       "label_issues": len(self.label_issues),
                       "ambiguous": len(self.ambiguous), "outliers": len(self.outliers)},
            "estimated_label_errors": round(float(
                (1.0 - np.trace(learning.joint)) * len(self.files)), 1),
            "classes": {name: {"images": int(counts[j]),
                               "threshold": round(float(learning.thresholds[j]), 6),
                               "estimated_noise": round(float(learning.noise_rates[j]), 6),
                               "label_issues": int(issues_per_class[j])}
                        for j, name in enumerate(names)},
            "confident_joint": learning.confident_joint.tolist(),
            "label_issues": [self._entry(i) for i in self.label_issues],
            "ambiguous": [self._entry(i) for i in self.ambiguous],
            "outliers": [{"file": self.files[i], "given": names[self.labels[i]],
                          "outlier_score": round(float(self.outlier_scores[i]), 6)}
                         for i in self.outliers],
            "skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "seconds": dict(self.seconds),
        }

    def _entry(self, i):
        return {"file": self.files[i], "given": self.class_names[self.labels[i]],
                "suggested": self.class_names[self.suggested[i]],
                "self_confidence": round(float(self.self_confidence[i]), 6)}

    def to_table(self, limit=20):
        """A readable report: counts, per class the estimated share of wrong labels, then
        the first `limit` label issues, ambiguous images and outliers."""
        learning, names = self.learning, self.class_names
        lines = [f"{self.data_dir}: {len(self.files)} images in {len(names)} classes, "
                 f"{len(self.skipped)} skipped; {len(self.label_issues)} likely wrong labels, "
                 f"{len(self.ambiguous)} ambiguous, {len(self.outliers)} outliers "
                 f"({self.settings['backbone']} features, {self.settings['folds']}-fold heads, "
                 f"method {self.settings['method']}).", ""]
        width = max(len("class"), *(len(n) for n in names))
        issues_per_class = np.bincount(self.labels[self.label_issues], minlength=len(names))
        lines.append(f"{'class':<{width}}  images  threshold  est. noise  issues")
        for j, name in enumerate(names):
            lines.append(f"{name:<{width}}  {int(np.sum(self.labels == j)):>6}  "
                         f"{learning.thresholds[j]:>9.3f}  {learning.noise_rates[j]:>10.1%}  "
                         f"{issues_per_class[j]:>6}")
        sections = (("Likely wrong labels (given -> suggested, p(given))", self.label_issues,
                     lambda i: f"{names[self.labels[i]]} -> {names[self.suggested[i]]} "
                     f"({self.self_confidence[i]:.3f})"),
                    ("Ambiguous (given; top two classes)", self.ambiguous,
                     lambda i: f"{names[self.labels[i]]}; " + " / ".join(
                         f"{names[c]} {self.probabilities[i, c]:.2f}"
                         for c in np.argsort(-self.probabilities[i])[:2])),
                    ("Outliers (given; best class similarity)", self.outliers,
                     lambda i: f"{names[self.labels[i]]}; {self.outlier_scores[i]:.3f}"))
        return "\n".join(lines + _listed_sections(self.files, sections, self.skipped, limit))

    def caption(self, i):
        """The thumbnail caption of image `i`: "given -> suggested (p(given))", the two
        classes of an ambiguous one, or an outlier's score."""
        names, given = self.class_names, self.class_names[self.labels[i]]
        if i in set(map(int, self.label_issues)):
            return f"{given} -> {names[self.suggested[i]]} ({self.self_confidence[i]:.2f})"
        if i in set(map(int, self.ambiguous)):
            top = np.argsort(-self.probabilities[i])[:2]
            return f"{given}: {names[top[0]]} or {names[top[1]]}?"
        return f"{given}: outlier ({self.outlier_scores[i]:.2f})"


@dataclass
class MultiLabelAuditReport:
    """The audit of a multi-label data set: per image its given labels and the out-of-sample
    probability of each label; the likely wrong label decisions as (image, label) pairs.
    Ambiguous images are not looked for (several labels claiming an image is what
    multi-label means), so `ambiguous` is empty."""

    data_dir: str  # the audited folder
    class_names: tuple  # label names, in column order
    files: tuple  # the images that decoded (one per content), in scan order
    labels: np.ndarray  # bool (n, K): the given labels (of every merged copy)
    probabilities: np.ndarray = field(repr=False)  # (n, K) out-of-sample p(label present)
    fold_of: np.ndarray = field(repr=False)  # the fold each image was held out in
    learning: tuple = field(repr=False)  # a ConfidentLearning per label (absent, present)
    issues: np.ndarray = field(repr=False)  # (m, 2) (image, label) pairs, most confident first
    outlier_scores: np.ndarray = field(repr=False)  # best cosine similarity to a label mean
    outliers: np.ndarray  # image indices, the least similar first
    skipped: list  # (path, reason) of files that could not be decoded
    ignored: list  # (path, reason) of entries the scan skipped and merged copies
    settings: dict  # the resolved AuditConfig, as run
    features: np.ndarray = field(default=None, repr=False)  # (n, d) backbone features
    seconds: dict = field(default_factory=dict)  # decode and features, heads, total
    notes: list = field(default_factory=list)  # what was done to the data (copies merged)

    @property
    def suggested(self):
        """bool `(n, K)`: the given labels with every issue's label state flipped."""
        suggested = self.labels.copy()
        suggested[self.issues[:, 0], self.issues[:, 1]] ^= True
        return suggested

    @property
    def issue_confidence(self):
        """Per issue, the out-of-sample probability of the state opposite to the given one."""
        return _opposite_confidence(self.probabilities, self.labels, self.issues)

    @property
    def label_issues(self):
        """Indices of the images with at least one likely wrong label decision, in the
        order of their most confident issue."""
        return np.array(list(dict.fromkeys(self.issues[:, 0].tolist())), np.int64)

    @property
    def ambiguous(self):
        """Always empty: not looked for with multiple labels."""
        return np.zeros(0, np.int64)

    @property
    def ranked(self):
        """Every suspect once, in the order to look at them: images with label issues, then
        outliers."""
        return [int(i) for i in dict.fromkeys([*self.label_issues, *self.outliers])]

    def names(self, row):
        """The labels of a bool row by name, joined by `;` ("" for none)."""
        return LABEL_SEPARATOR.join(self.class_names[j] for j in np.flatnonzero(row))

    def _issues_of(self):
        """image -> [(label, given present, p(opposite))], in `issues` order."""
        by_image = {}
        for (i, j), confidence in zip(self.issues.tolist(), self.issue_confidence):
            by_image.setdefault(i, []).append((j, bool(self.labels[i, j]), float(confidence)))
        return by_image

    def rows(self):
        """One JSON-ready dict per image, the suspects first (in `ranked` order): given and
        suggested labels (`a;b`), flags, the issue labels (those the image likely has but
        was not given: `missing`; given but likely wrong: `extra`), the largest issue
        confidence, each label's probability, outlier score and rank."""
        rank = {index: position + 1 for position, index in enumerate(self.ranked)}
        by_image, outlier = self._issues_of(), set(map(int, self.outliers))
        suggested = self.suggested
        order = [*rank, *(i for i in range(len(self.files)) if i not in rank)]
        rows = []
        for i in order:
            found = by_image.get(i, [])
            rows.append({
                "file": self.files[i], "given": self.names(self.labels[i]),
                "suggested": self.names(suggested[i]), "label_issue": bool(found),
                "outlier": i in outlier,
                "issue_labels": LABEL_SEPARATOR.join(self.class_names[j] for j, _, _ in found),
                "missing": LABEL_SEPARATOR.join(self.class_names[j] for j, given, _ in found
                                                if not given),
                "extra": LABEL_SEPARATOR.join(self.class_names[j] for j, given, _ in found
                                              if given),
                "confidence": round(max(c for _, _, c in found), 6) if found else None,
                "probabilities": LABEL_SEPARATOR.join(
                    f"{name}={self.probabilities[i, j]:.3f}"
                    for j, name in enumerate(self.class_names)),
                "outlier_score": round(float(self.outlier_scores[i]), 6),
                "rank": rank.get(i)})
        return rows

    def to_dict(self):
        """A JSON-ready summary (what audit.json holds): settings, counts, per label its
        presence threshold, estimated share of images whose given state of it is wrong and
        its issues; each label's confident joint; the issues, outliers, merged copies and
        skipped files."""
        names, n = self.class_names, len(self.files)
        noise = [1.0 - float(np.trace(found.joint)) for found in self.learning]
        per_label = {j: [0, 0] for j in range(len(names))}  # missing, extra
        for i, j in self.issues.tolist():
            per_label[j][int(self.labels[i, j])] += 1
        return {
            "data_dir": self.data_dir,
            "settings": dict(self.settings),
            "multi_label": True,
            "counts": {"images": n, "skipped": len(self.skipped),
                       "label_issues": len(self.issues),
                       "images_with_label_issues": len(self.label_issues),
                       "outliers": len(self.outliers)},
            "estimated_label_errors": round(sum(noise) * n, 1),
            "labels": {name: {"images": int(self.labels[:, j].sum()),
                              "threshold": round(float(self.learning[j].thresholds[1]), 6),
                              "estimated_noise": round(noise[j], 6),
                              "label_issues": sum(per_label[j]),
                              "missing": per_label[j][0], "extra": per_label[j][1]}
                       for j, name in enumerate(names)},
            "confident_joint": {name: self.learning[j].confident_joint.tolist()
                                for j, name in enumerate(names)},
            "label_issues": [
                {"file": self.files[i], "label": names[j],
                 "given": "present" if self.labels[i, j] else "absent",
                 "suggested": "absent" if self.labels[i, j] else "present",
                 "confidence": round(float(c), 6), "given_labels": self.names(self.labels[i])}
                for (i, j), c in zip(self.issues.tolist(), self.issue_confidence)],
            "outliers": [{"file": self.files[i], "given": self.names(self.labels[i]),
                          "outlier_score": round(float(self.outlier_scores[i]), 6)}
                         for i in self.outliers],
            "notes": list(self.notes),
            "skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "seconds": dict(self.seconds),
        }

    def to_table(self, limit=20):
        """A readable report: counts, per label the estimated share of wrong decisions, then
        the first `limit` images with label issues and outliers."""
        names, suggested = self.class_names, self.suggested
        summary = self.to_dict()
        lines = [f"{self.data_dir}: {len(self.files)} images with {len(names)} labels, "
                 f"{len(self.skipped)} skipped; {len(self.issues)} likely wrong label(s) on "
                 f"{len(self.label_issues)} images, {len(self.outliers)} outliers "
                 f"({self.settings['backbone']} features, {self.settings['folds']}-fold heads "
                 f"per label, method {self.settings['method']}; multi-label: ambiguous "
                 "images are not looked for).", *(f"Note: {note}" for note in self.notes), ""]
        width = max(len("label"), *(len(n) for n in names))
        lines.append(f"{'label':<{width}}  images  threshold  est. noise  missing  extra")
        for name, entry in summary["labels"].items():
            lines.append(f"{name:<{width}}  {entry['images']:>6}  {entry['threshold']:>9.3f}  "
                         f"{entry['estimated_noise']:>10.1%}  {entry['missing']:>7}  "
                         f"{entry['extra']:>5}")
        by_image = self._issues_of()
        sections = (("Likely wrong labels (given -> suggested; label missing or extra, "
                     "p(opposite))", self.label_issues,
                     lambda i: f"{self.names(self.labels[i])} -> {self.names(suggested[i])} ("
                     + ", ".join(f"{names[j]} {'extra' if given else 'missing'} {c:.3f}"
                                 for j, given, c in by_image[i]) + ")"),
                    ("Outliers (given; best label similarity)", self.outliers,
                     lambda i: f"{self.names(self.labels[i])}; {self.outlier_scores[i]:.3f}"))
        return "\n".join(lines + _listed_sections(self.files, sections, self.skipped, limit))

    def caption(self, i):
        """The thumbnail caption of image `i`: "given a;b -> a;c", or an outlier's score."""
        given = self.names(self.labels[i]) or "(none)"
        if i in set(map(int, self.label_issues)):
            return f"given {given} -> {self.names(self.suggested[i]) or '(none)'}"
        return f"{given}: outlier ({self.outlier_scores[i]:.2f})"


def audit_labels(data_dir=None, *, config=None, output_dir=None, **options):
    """Finds the images of a labelled folder that are likely labelled wrong, ambiguous or
    outliers (see the module docstring for the method).

    Args:
        data_dir: folder with one subfolder per class (or, with `labels`, the folder a
            label file's relative paths are also looked up in).
        config: an `AuditConfig`; options given as keywords override it.
        output_dir: if given, a folder (created if missing) that receives `OUTPUT_FILES`:
            `audit.csv` (one row per image, the suspects first: file, given and suggested
            label, flags, self-confidence, most probable class, margin, outlier score,
            rank), `audit.json` (`AuditReport.to_dict()`) and `audit.png` (thumbnails of the
            first `thumbnails` suspects, "given -> suggested"; not written, and an old one
            removed, when there is none). With `multi_label`, an audit.csv row has the
            given and suggested labels as `a;b`, the flags and the issue labels
            (`MultiLabelAuditReport.rows`), and the captions read "given a;b -> a;c".
        **options: any field of `AuditConfig`: `labels` (a label file, see
            `tlkit.data.scan_labels`), `multi_label` (a label file's cells are `;`-separated
            label lists, and files with the same content, such as one image in several class
            folders, are one image with the labels of every copy, as
            `tlkit.data.load_image_data` merges them), `backbone`, `weights`, `image_size`
            (`"auto"` resolves as `tlkit.fit` resolves it), `resize`, `folds`,
            `weight_decay`, `method`, `seed`, `cache_dir`, `feature_cache`, `workers`,
            `batch_size`, `thumbnails`, `verbose`.

    Returns:
        An `AuditReport`; with `multi_label`, a `MultiLabelAuditReport`.

    Raises:
        ConfigError: for an invalid setting (named, with the value received).
        DataError: if the folder cannot be scanned, has fewer than two classes, or a class
            has fewer usable images than `folds`.
        WeightsError: if the backbone's weights cannot be loaded.

    Example:

    >>> report = audit_labels("data/photos", output_dir="audit")
    >>> [(report.files[i], report.class_names[report.suggested[i]])
    ...  for i in report.label_issues[:5]]
    """
    started = time.perf_counter()
    config = _audit_config(data_dir, config, options)
    backbone, weights, image_size = _resolve_model(config)
    # the one place labels are read
    scan = scan_data(config.data_dir, config.labels, multi_label=config.multi_label)
    given = scan.label_matrix() if config.multi_label else np.asarray(scan.labels, np.int64)
    _check_classes(scan, given, config.folds)
    decoded = decode_images(list(scan.files), image_size, config.resize,
                            workers=config.workers, verbose=config.verbose)
    merged, notes = [], []
    if config.multi_label:
        given, merged, note = merge_copies(scan, decoded)
        notes += [note] if note else []
    computed = image_features(scan.files, backbone, weights, image_size, config.resize,
                              cache_dir=config.cache_dir, feature_cache=config.feature_cache,
                              workers=config.workers, batch_size=config.batch_size,
                              seed=config.seed, verbose=config.verbose, decoded=decoded)
    labels = given[computed.positions]
    _check_classes(scan, labels, config.folds)
    features_done = time.perf_counter()
    num_classes = len(scan.class_names)
    settings = {**config.to_dict(), "backbone": backbone, "weights": weights,
                "image_size": image_size, "engine": computed.engine,
                "features_from_cache": computed.from_cache}
    common = dict(data_dir=scan.root, class_names=scan.class_names,
                  files=tuple(computed.files), skipped=list(computed.skipped),
                  ignored=list(scan.ignored) + merged, settings=settings,
                  features=computed.features)
    scores, outliers = find_outliers(computed.features, labels, num_classes)
    if config.multi_label:
        labels = labels > 0.5
        probabilities, fold_of = multi_label_probabilities(
            computed.features, labels, config.folds, config.seed, config.weight_decay)
        learning, issues = confident_learning_per_label(probabilities, labels, config.method)
        report = MultiLabelAuditReport(labels=labels, probabilities=probabilities,
                                       fold_of=fold_of, learning=learning, issues=issues,
                                       outlier_scores=scores, outliers=outliers, notes=notes,
                                       **common)
    else:
        probabilities, fold_of = out_of_sample_probabilities(
            computed.features, labels, num_classes, config.folds, config.seed,
            config.weight_decay)
        learning = confident_learning(probabilities, labels, config.method)
        report = AuditReport(labels=labels, probabilities=probabilities, fold_of=fold_of,
                             learning=learning, outlier_scores=scores, outliers=outliers,
                             **common)
    done = time.perf_counter()
    report.seconds = {"decode_and_features": round(features_done - started, 2),
                      "heads_and_flags": round(done - features_done, 2),
                      "total": round(done - started, 2)}
    if output_dir is not None:
        write_outputs(report, output_dir, computed.images)
    return report


def _audit_config(data_dir, config, options):
    if config is not None and not isinstance(config, AuditConfig):
        raise ConfigError(f"`config` must be an AuditConfig. Received: config={config!r}")
    values = config.to_dict() if config is not None else {}
    known = {f.name for f in dataclasses.fields(AuditConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"Unknown option(s) {unknown}; `audit_labels` takes "
                          f"{sorted(known - {'data_dir'})}.")
    values.update({k: v for k, v in options.items() if v is not None})
    if data_dir is not None:
        values["data_dir"] = data_dir
    if "data_dir" not in values:
        raise ConfigError("`data_dir` is required: the folder with one subfolder per class.")
    return AuditConfig(**values)


def _resolve_model(config):
    """`(backbone, weights, image_size)` with "auto" resolved as `tlkit.fit` resolves it
    (`tlkit.api.resolve_config`, on the same survey of the folder)."""
    fit_config = build_config(data_dir=config.data_dir, labels=config.labels,
                              backbone=config.backbone,
                              weights=config.weights, image_size=config.image_size,
                              resize=config.resize, verbose=0)
    survey = None
    if "auto" in (config.backbone, config.image_size):
        survey = survey_folder(config.data_dir, labels=config.labels)
    resolved = resolve_config(fit_config, survey)
    return resolved.model.backbone, resolved.model.weights, resolved.data.image_size


def _check_classes(scan, labels, folds):
    """Two classes at least, and each with at least `folds` images (labels: class indices,
    or a multi-hot matrix)."""
    if labels.ndim == 2:
        counts = np.rint(labels.sum(axis=0)).astype(np.int64)
    else:
        counts = np.bincount(labels, minlength=len(scan.class_names))
    if len(scan.class_names) < 2:
        raise DataError(f"Data folder {scan.root!r} has only one class "
                        f"({scan.class_names[0]!r}); an audit compares at least two.")
    short = [(name, int(c)) for name, c in zip(scan.class_names, counts) if c < folds]
    if short:
        raise DataError(
            f"Class {short[0][0]!r} has {short[0][1]} usable image(s); every class needs at "
            f"least `folds` ({folds}) so each fold's head sees it. Add images or lower "
            f"`folds`. Received: folds={folds}")


def write_outputs(report, output_dir, images):
    """Writes audit.csv, audit.json and audit.png (see `audit_labels`) into `output_dir`.

    Args:
        report: an `AuditReport` or a `MultiLabelAuditReport`.
        output_dir: the folder, created if missing.
        images: uint8 pixels of `report.files`, by position, for the thumbnails.

    Returns:
        The folder, as a `Path`.
    """
    folder = Path(output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"`output_dir` must be a folder that can be written. Received: "
                          f"output_dir={str(folder)!r} ({e.strerror})") from None
    rows = report.rows()
    with open(folder / "audit.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (folder / "audit.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    (folder / "audit.png").unlink(missing_ok=True)
    shown = report.ranked[:report.settings["thumbnails"]]
    if shown:
        plot_thumbnails([images[i] for i in shown], [report.caption(i) for i in shown],
                        folder / "audit.png",
                        f"Audit of {Path(report.data_dir).name}: {len(shown)} of "
                        f"{len(report.ranked)} suspects")
    return folder

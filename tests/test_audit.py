"""`tlkit audit`: confident learning on out-of-sample probabilities finds wrong labels, the
probabilities of an image never come from a head that saw it, and the command writes its
reports and names bad input."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from test_multilabel import LABELS, label_image, write_label_data
from tlkit.audit import (METHODS, audit_labels, confident_learning,
                         confident_learning_per_label, find_outliers,
                         multi_label_probabilities, out_of_sample_probabilities, rarest_labels,
                         stratified_folds, train_softmax_head)
from tlkit.cli import main
from tlkit.errors import ConfigError, DataError


def constructed(labels, true, seed=0, confidence=0.8):
    """Probabilities that put `confidence` (+- noise) on each image's true class."""
    rng = np.random.default_rng(seed)
    k = int(max(labels.max(), true.max())) + 1
    p = rng.uniform(0.0, 0.1, (len(true), k))
    p[np.arange(len(true)), true] = confidence + rng.uniform(-0.15, 0.15, len(true))
    return p / p.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("method", METHODS)
def test_a_flipped_label_is_found_with_its_true_class_suggested(method):
    true = np.repeat(np.arange(3), 30)
    given = true.copy()
    given[[5, 40]] = [1, 2]  # two images of class 0 and 1 labelled as another class
    p = constructed(given, true)
    p[[5, 40]] = [[0.94, 0.03, 0.03], [0.03, 0.94, 0.03]]  # which the model is sure of
    found = confident_learning(p, given, method)
    assert sorted(found.label_issues) == [5, 40]
    assert found.suggested[5] == 0 and found.suggested[40] == 1
    assert np.array_equal(np.delete(found.suggested, [5, 40]), np.delete(given, [5, 40]))
    assert found.confident_joint[1, 0] == 1 and found.confident_joint[2, 1] == 1


@pytest.mark.parametrize("method", METHODS)
def test_a_clean_set_flags_nothing(method):
    labels = np.repeat(np.arange(4), 25)
    found = confident_learning(constructed(labels, labels, seed=3), labels, method)
    assert len(found.label_issues) == 0
    assert np.all(found.noise_rates == 0)


def hard_class_probabilities():
    """Class 1 is hard (self-confidence 0.4-0.6). Image 30 (class 0, labelled 1) is one the
    heads are sure of; image 31 (class 0, labelled 1) reaches no threshold; image 60 (clean,
    class 2) leans to class 1 enough to count for it."""
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(3), 30)
    own = np.concatenate([rng.uniform(0.75, 0.9, 30), rng.uniform(0.4, 0.6, 30),
                          rng.uniform(0.7, 0.9, 30)])
    p = np.repeat(((1 - own) / 2)[:, None], 3, axis=1)
    p[np.arange(90), labels] = own
    p[30], p[31], p[60] = [0.94, 0.03, 0.03], [0.7, 0.1, 0.2], [0.02, 0.52, 0.46]
    return p, labels


def test_self_confidence_flags_the_least_self_confident_of_all_classes():
    p, labels = hard_class_probabilities()
    found = confident_learning(p, labels, "self_confidence")
    assert found.confident_joint[1, 0] == 1 and found.confident_joint[2, 1] == 1
    assert found.confident_joint.sum() - np.trace(found.confident_joint) == 2
    assert list(found.label_issues) == [30, 31]  # the count, spent where p_given is lowest
    assert found.suggested[30] == 0 and found.suggested[31] == 0


def test_class_self_confidence_spends_each_rows_count_in_its_own_class():
    p, labels = hard_class_probabilities()
    found = confident_learning(p, labels, "class_self_confidence")
    assert list(found.label_issues) == [30, 60]  # row 2's count goes to class 2's weakest
    assert found.suggested[60] == 1


def test_each_class_has_its_own_threshold_the_mean_self_confidence():
    labels = np.array([0, 0, 1, 1, 1])
    p = np.array([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.0, 1.0]])
    found = confident_learning(p, labels)
    np.testing.assert_allclose(found.thresholds, [0.8, 0.8])
    p[:, 1] = [0.1, 0.3, 0.5, 0.5, 0.5]
    p[:, 0] = 1 - p[:, 1]
    np.testing.assert_allclose(confident_learning(p, labels).thresholds, [0.8, 0.5])


def test_a_low_threshold_class_claims_an_image_the_argmax_would_not():
    # Class 1 is hard (mean self-confidence 0.4): an image labelled 0 with p_1 = 0.45 counts
    # for class 1 although class 0 is its most probable class, and p_0 is below class 0's
    # threshold, so confident learning flags it.
    labels = np.array([0, 0, 0, 0, 1, 1, 1])
    p1 = np.array([0.05, 0.05, 0.05, 0.45, 0.4, 0.4, 0.4])
    p = np.stack([1 - p1, p1], axis=1)
    found = confident_learning(p, labels, "confident_joint")
    assert list(found.label_issues) == [3] and found.suggested[3] == 1
    assert found.noise_rates[0] == pytest.approx(0.25)


def test_ambiguous_images_are_claimed_by_two_classes_and_not_issues():
    labels = np.repeat(np.arange(3), 10)
    p = constructed(labels, labels, seed=1)
    p[7] = [0.49, 0.49, 0.02]  # labelled 0, with class 1 as likely
    found = confident_learning(p, labels)
    assert 7 not in found.label_issues
    assert list(found.ambiguous) == [7]


def test_confident_learning_checks_its_inputs():
    with pytest.raises(ConfigError, match="method"):
        confident_learning(np.eye(2), np.array([0, 1]), "vote")
    with pytest.raises(ConfigError, match="probabilities"):
        confident_learning(np.eye(2), np.array([0, 1, 1]))


def test_the_softmax_head_learns_separable_classes_the_same_way_every_time():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    features = rng.normal(0, 0.3, (60, 5)) + np.eye(3, 5)[labels] * 3
    first = train_softmax_head(features, labels, 3)
    assert np.mean(first.predict(features).argmax(axis=1) == labels) == 1.0
    np.testing.assert_array_equal(first.weights, train_softmax_head(features, labels, 3).weights)
    with pytest.raises(ConfigError, match="labels"):
        train_softmax_head(features, labels + 1, 3)


def test_an_images_probabilities_do_not_depend_on_its_own_label():
    # With the folds fixed, changing image 0's label changes the heads of the other folds
    # (they train on it) but not the one that scores image 0 (it never sees it).
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(2), 20)
    features = rng.normal(0, 1, (40, 8)) + labels[:, None]
    folds = stratified_folds(labels, 4, seed=0)
    before, _ = out_of_sample_probabilities(features, labels, 2, folds)
    flipped = labels.copy()
    flipped[0] = 1 - flipped[0]
    after, _ = out_of_sample_probabilities(features, flipped, 2, folds)
    same_fold = folds == folds[0]
    np.testing.assert_array_equal(after[same_fold], before[same_fold])
    assert not np.allclose(after[~same_fold], before[~same_fold])


def test_out_of_sample_probabilities_cannot_memorise_random_labels():
    # 60 random 200-dimensional points with random labels: a head that saw an image
    # memorises its label; one that did not can only guess.
    rng = np.random.default_rng(2)
    features = rng.normal(0, 1, (60, 200))
    labels = rng.integers(0, 2, 60)
    seen = train_softmax_head(features, labels, 2, weight_decay=1e-4).predict(features)
    assert np.mean(seen[np.arange(60), labels]) > 0.9
    unseen, fold_of = out_of_sample_probabilities(features, labels, 2, folds=5,
                                                  weight_decay=1e-4)
    assert np.mean(unseen[np.arange(60), labels]) < 0.65
    assert sorted(np.bincount(fold_of)) == [12] * 5


def test_stratified_folds_spread_every_class():
    labels = np.array([0] * 10 + [1] * 5 + [2] * 3)
    folds = stratified_folds(labels, 3, seed=0)
    for label in range(3):
        assert len(set(folds[labels == label])) == 3
    assert sorted(np.bincount(folds)) == [6, 6, 6]


def test_an_image_far_from_every_class_is_an_outlier():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(2), 30)
    centres = np.zeros((2, 10))
    centres[0, 0] = centres[1, 1] = 5.0
    features = centres[labels] + rng.normal(0, 0.5, (60, 10))
    features[13] = 0.0
    features[13, 7] = -6.0  # in a direction no class has
    scores, outliers = find_outliers(features, labels, 2)
    assert list(outliers) == [13]
    assert scores[13] == scores.min()


# --- The whole audit and the command ----------------------------------------------------------


@pytest.fixture
def mislabelled(image_folder):
    """Three classes of 12 bar images; `a_000.png` moved into class b, a broken file in c."""
    root = image_folder(classes=("a", "b", "c"), per_class=12, size=16)
    shutil.move(root / "a" / "a_000.png", root / "b" / "a_000.png")
    (root / "c" / "broken.png").write_bytes(b"not an image")
    return root


def audit_args(root, tmp_path, *extra):
    return ["audit", str(root), "--backbone", "scratch", "--weights", "none",
            "--image-size", "16", "--cache-dir", str(tmp_path / "cache"), "--output-dir",
            str(tmp_path / "out"), *extra]


def test_the_command_writes_csv_json_and_png_and_reports_the_broken_file(mislabelled,
                                                                         tmp_path):
    result = CliRunner().invoke(main, audit_args(mislabelled, tmp_path))
    assert result.exit_code == 0, result.output
    moved = str(mislabelled / "b" / "a_000.png")
    assert f"{moved}: b -> a" in result.output
    assert "broken.png: not an image" in result.output
    with open(tmp_path / "out" / "audit.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 36
    assert rows[0]["file"] == moved and rows[0]["label_issue"] == "True"
    assert (rows[0]["given"], rows[0]["suggested"]) == ("b", "a")
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["counts"]["images"] == 36 and summary["counts"]["skipped"] == 1
    assert summary["skipped"][0]["file"].endswith("broken.png")
    assert summary["label_issues"][0]["file"] == moved
    assert summary["settings"]["folds"] == 5 and summary["settings"]["backbone"] == "scratch"
    assert set(summary["classes"]) == {"a", "b", "c"}
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000


def test_a_rerun_takes_the_features_from_the_cache(mislabelled, tmp_path):
    options = dict(backbone="scratch", weights="none", image_size=16,
                   cache_dir=tmp_path / "cache", verbose=0)
    first = audit_labels(mislabelled, **options)
    second = audit_labels(mislabelled, **options)
    assert not first.settings["features_from_cache"]
    assert second.settings["features_from_cache"]
    np.testing.assert_array_equal(first.probabilities, second.probabilities)
    assert list(first.label_issues) == list(second.label_issues)


def test_json_format_prints_the_summary(mislabelled, tmp_path):
    result = CliRunner().invoke(main, audit_args(mislabelled, tmp_path, "--format", "json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["counts"]["images"] == 36


@pytest.mark.parametrize("extra, message", [
    (["--folds", "1"], "`--folds` must be an integer >= 2"),
    (["--folds", "20"], "every class needs at least `--folds` (20)"),
    (["--image-size", "4"], "`--image-size` must be an integer >= 8"),
    (["--backbone", "nope"], "`--backbone` must be one of"),
])
def test_bad_settings_are_named_by_their_flags(mislabelled, tmp_path, extra, message):
    result = CliRunner().invoke(main, audit_args(mislabelled, tmp_path, *extra))
    assert result.exit_code == 1
    assert message in result.output, result.output
    assert "Traceback" not in result.output


def test_a_folder_with_one_class_is_refused(image_folder, tmp_path):
    root = image_folder(classes=("only",), per_class=6)
    result = CliRunner().invoke(main, audit_args(root, tmp_path))
    assert result.exit_code == 1 and "has only one class ('only')" in result.output


def test_the_library_names_its_arguments(mislabelled):
    with pytest.raises(ConfigError, match="`method` must be one of"):
        audit_labels(mislabelled, method="vote")
    with pytest.raises(ConfigError, match=r"Unknown option\(s\) \['fold'\]"):
        audit_labels(mislabelled, fold=3)
    with pytest.raises(DataError, match="does not exist"):
        audit_labels(mislabelled / "missing", backbone="scratch", weights="none",
                     image_size=16, verbose=0)


def test_a_label_file_is_audited_like_class_folders(image_folder, tmp_path):
    """The same images with a wrong label in a CSV (the files stay in their right folders):
    the audit reads the labels from the file and flags that row's image."""
    root = image_folder(classes=("a", "b", "c"), per_class=12, size=16)
    rows = ["path,label"] + [f"{p.relative_to(root)},{p.parent.name}"
                             for p in sorted(root.glob("*/*.png"))]
    rows[1] = "a/a_000.png,b"
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(main, audit_args(root, tmp_path, "--labels", str(labels)))
    assert result.exit_code == 0, result.output
    with open(tmp_path / "out" / "audit.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert Path(first["file"]) == root / "a" / "a_000.png"
    assert (first["given"], first["suggested"], first["label_issue"]) == ("b", "a", "True")


# --- Multi-label -------------------------------------------------------------------------------


def test_per_label_confident_learning_finds_a_missing_and_an_extra_label():
    # Three labels, each present on half the images; the model is sure of every label.
    rng = np.random.default_rng(0)
    true = rng.random((60, 3)) < 0.5
    p = np.where(true, rng.uniform(0.8, 0.95, true.shape), rng.uniform(0.05, 0.2, true.shape))
    given = true.copy()
    given[4, 1] = not true[4, 1]
    given[9, 2] = not true[9, 2]
    p[4, 1], p[9, 2] = (0.97 if true[4, 1] else 0.03), (0.99 if true[9, 2] else 0.01)
    learning, issues = confident_learning_per_label(p, given)
    assert issues.tolist() == [[9, 2], [4, 1]]  # the surer one first
    assert len(learning) == 3 and learning[0].noise_rates.max() == 0


def test_multi_label_folds_are_stratified_on_the_rarest_label():
    matrix = np.zeros((40, 3), bool)
    matrix[:, 0] = True  # everyone has a
    matrix[:5, 2] = True  # five have the rare c
    matrix[5:25, 1] = True
    assert rarest_labels(matrix).tolist() == [2] * 5 + [1] * 20 + [0] * 15
    _, fold_of = multi_label_probabilities(np.random.default_rng(0).normal(size=(40, 4)),
                                           matrix, folds=5)
    assert sorted(fold_of[:5]) == [0, 1, 2, 3, 4]  # one rare image in every fold


def write_multi_label_file(folder, rows):
    with open(folder / "audit_labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label"))
        writer.writerows(rows)
    return folder / "audit_labels.csv"


def read_rows(tmp_path):
    with open(tmp_path / "out" / "audit.csv", newline="") as f:
        return {Path(row["file"]).name: row for row in csv.DictReader(f)}


def test_multi_label_audit_flags_a_dropped_and_an_added_label(tmp_path):
    labels_file, rows = write_label_data(tmp_path / "photos")
    by_name = dict(rows)
    assert by_name["img/030.png"] == "a;b" and by_name["img/000.png"] == "a"
    by_name["img/030.png"] = "a"  # drops b: the image has both bars
    by_name["img/000.png"] = "a;c"  # adds c: the image has no c bar
    labels_file = write_multi_label_file(tmp_path / "photos", sorted(by_name.items()))
    result = CliRunner().invoke(main, audit_args(tmp_path / "photos", tmp_path, "--labels",
                                                 str(labels_file), "--multi-label"))
    assert result.exit_code == 0, result.output
    assert "030.png: a -> a;b (b missing" in result.output
    assert "000.png: a;c -> a (c extra" in result.output
    found = read_rows(tmp_path)
    assert (found["030.png"]["given"], found["030.png"]["suggested"]) == ("a", "a;b")
    assert (found["030.png"]["missing"], found["030.png"]["extra"]) == ("b", "")
    assert (found["000.png"]["given"], found["000.png"]["suggested"]) == ("a;c", "a")
    assert (found["000.png"]["missing"], found["000.png"]["extra"]) == ("", "c")
    assert found["030.png"]["label_issue"] == found["000.png"]["label_issue"] == "True"
    assert {found["030.png"]["rank"], found["000.png"]["rank"]} == {"1", "2"}
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["multi_label"] is True and summary["settings"]["multi_label"] is True
    issues = {(Path(e["file"]).name, e["label"], e["given"], e["suggested"])
              for e in summary["label_issues"][:2]}
    assert issues == {("030.png", "b", "absent", "present"),
                      ("000.png", "c", "present", "absent")}
    assert summary["labels"]["b"]["missing"] >= 1 and summary["labels"]["c"]["extra"] >= 1
    png = (tmp_path / "out" / "audit.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    report = audit_labels(tmp_path / "photos", labels=labels_file, multi_label=True,
                          backbone="scratch", weights="none", image_size=16,
                          cache_dir=tmp_path / "cache", verbose=0)
    first = next(i for i, f in enumerate(report.files) if Path(f).name == "030.png")
    assert report.caption(first) == "given a -> a;b"


def test_a_clean_multi_label_set_flags_few(tmp_path):
    labels_file, _ = write_label_data(tmp_path / "photos")
    report = audit_labels(tmp_path / "photos", labels=labels_file, multi_label=True,
                          backbone="scratch", weights="none", image_size=16,
                          cache_dir=tmp_path / "cache", verbose=0)
    assert report.probabilities.shape == (48, 3)
    assert len(report.issues) <= 2, report.to_table()  # of 144 label decisions
    assert np.mean((report.probabilities > 0.5) == report.labels) > 0.95


def test_the_same_image_in_two_folders_is_one_image_not_a_conflict(tmp_path):
    root = tmp_path / "tree"
    for label, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(8):
            image = label_image((label,), label * 100 + i)
            Image.fromarray(image).save(root / name / f"{name}_{i}.png")
    Image.fromarray(label_image((0, 1), 999)).save(root / "a" / "both.png")
    shutil.copy(root / "a" / "both.png", root / "b" / "copy_of_both.png")
    result = CliRunner().invoke(main, audit_args(root, tmp_path, "--multi-label"))
    assert result.exit_code == 0, result.output
    assert "2 file(s) with the same content" in result.output
    found = read_rows(tmp_path)
    assert len(found) == 25 and "copy_of_both.png" not in found
    assert found["both.png"]["given"] == "a;b"
    assert found["both.png"]["label_issue"] == "False", found["both.png"]
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["counts"]["images"] == 25
    # Single-label, the copies stay two images with a label each.
    result = CliRunner().invoke(main, audit_args(root, tmp_path))
    assert result.exit_code == 0, result.output
    assert len(read_rows(tmp_path)) == 26

"""Multi-label: `tlkit fit DATA --labels labels.csv --multi-label` (or the same image in several
class folders) trains a sigmoid head whose export returns per-label probabilities and the
labels above per-label thresholds.

Loading (label cells `a;b`, copies merged), the stratified split that keeps rare labels in
every split, the thresholds and average precision against hand-computed values, and the whole
path from the command line: fit, predict, evaluate, and the export from plain TensorFlow.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from tlkit import data as tdata
from tlkit.cli import main
from tlkit.config import DataConfig, build_config
from tlkit.errors import ConfigError, DataError, ExportError
from tlkit.evaluate import (average_precision, choose_thresholds,
                            compute_multi_label_metrics)

LABELS = ("a", "b", "c")
SIZE = 16
COLUMNS = {0: slice(0, 4), 1: slice(6, 10), 2: slice(12, 16)}  # each label's bright bar


def label_image(labels, index, seed=0):
    """Dark noise with a bright vertical bar at each label's columns: learnable, and an
    image with two labels carries both bars."""
    rng = np.random.default_rng(seed * 7919 + index)
    image = rng.integers(0, 50, (SIZE, SIZE, 3), dtype=np.uint8)
    for label in labels:
        image[:, COLUMNS[label], :] = 200 + rng.integers(0, 55, (SIZE, 4, 3), dtype=np.uint8)
    return image


# Label sets of the data set, and how many images of each: label c is rare among singles,
# and every pair appears.
SETS = {(0,): 12, (1,): 12, (2,): 6, (0, 1): 8, (0, 2): 5, (1, 2): 5}


def write_label_data(folder, sets=SETS, seed=0):
    """Images in `folder/img/` and `folder/labels.csv` listing them as `a;b` rows."""
    folder = Path(folder)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows, index = [], 0
    for labels, count in sets.items():
        for _ in range(count):
            name = f"img/{index:03d}.png"
            Image.fromarray(label_image(labels, index, seed)).save(folder / name)
            rows.append((name, ";".join(LABELS[j] for j in labels)))
            index += 1
    with open(folder / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "label"))
        writer.writerows(rows)
    return folder / "labels.csv", rows


def data_config(data_dir, **options):
    return DataConfig(str(data_dir), image_size=SIZE, cache="memory", workers=2,
                      multi_label=True, **options)


# --- Loading -------------------------------------------------------------------------------


def test_label_file_cells_load_as_multi_hot_rows(tmp_path):
    labels_file, rows = write_label_data(tmp_path / "photos")
    scan = tdata.scan_labels(labels_file, tmp_path / "photos", multi_label=True)
    assert scan.class_names == LABELS and scan.multi_label
    by_file = dict(zip((Path(f).name for f in scan.files), scan.labels))
    assert by_file["030.png"] == (0, 1)  # the first row of the a;b images

    data = tdata.load_image_data(data_config(tmp_path / "photos", labels=str(labels_file)))
    try:
        assert data.multi_label
        seen = {}
        for split in data.splits.values():
            assert split.labels.dtype == np.float32 and split.labels.shape == (len(split), 3)
            for file, row in zip(split.files, split.labels):
                seen[Path(file).name] = row.tolist()
        assert len(seen) == len(rows)
        assert seen["030.png"] == [1.0, 1.0, 0.0]
        assert seen["000.png"] == [1.0, 0.0, 0.0]
        total = sum(split.class_counts(3) for split in data.splits.values())
        assert total.tolist() == [12 + 8 + 5, 12 + 8 + 5, 6 + 5 + 5]
    finally:
        data.close()


def test_label_cell_spaces_repeats_and_empty_parts(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(label_image((0,), i)).save(folder / f"{i}.png")
    (folder / "labels.csv").write_text("path,label\n0.png, b ; a;\n1.png,a;a\n2.png, ; \n")
    with pytest.raises(DataError, match=r"line 4: 2.png: empty label"):
        tdata.scan_labels(folder / "labels.csv", multi_label=True)
    (folder / "labels.csv").write_text("path,label\n0.png, b ; a;\n1.png,a;a\n")
    scan = tdata.scan_labels(folder / "labels.csv", multi_label=True)
    assert scan.class_names == ("a", "b")
    assert dict(zip((Path(f).name for f in scan.files), scan.labels)) == {
        "0.png": (0, 1), "1.png": (0,)}
    # Without multi_label the cell is one label, as before.
    assert tdata.scan_labels(folder / "labels.csv").class_names == ("a;a", "b ; a;")


def test_same_image_in_two_class_folders_is_one_image_with_both_labels(tmp_path):
    root = tmp_path / "tree"
    for label, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(label_image((label,), label * 100 + i)).save(root / name / f"{name}_{i}.png")
    both = root / "a" / "both.png"
    Image.fromarray(label_image((0, 1), 999)).save(both)
    shutil.copy(both, root / "b" / "copy_of_both.png")

    data = tdata.load_image_data(data_config(root))
    try:
        rows = {Path(f).name: (name, row.tolist()) for name, split in data.splits.items()
                for f, row in zip(split.files, split.labels)}
        assert len(rows) == 25  # 3 x 8 + one image for the two copies
        assert rows["both.png"][1] == [1.0, 1.0, 0.0]
        assert "copy_of_both.png" not in rows
        assert any("copy_of_both.png" in path for path, _ in data.ignored)
        summary = data.summary()
        assert "2 file(s) with the same content" in summary and "merged into 1" in summary
        assert "Multi-label" in summary
        assert data.report()["multi_label"] is True
    finally:
        data.close()
    # The same folder without multi_label keeps each copy with its own label, as before.
    single = tdata.load_image_data(DataConfig(str(root), image_size=SIZE, cache="memory"))
    try:
        assert single.splits["train"].labels.ndim == 1
        assert any("identical image" in w for w in single.warnings)
    finally:
        single.close()



def test_doctor_reads_multi_label_data_as_fit_does(tmp_path):
    from tlkit.doctor import diagnose

    labels_file, _ = write_label_data(tmp_path / "photos")
    shutil.copy(tmp_path / "photos" / "img" / "000.png", tmp_path / "photos" / "img" / "dup.png")
    with open(labels_file, "a") as f:
        f.write("img/dup.png,b\n")  # image 000 (label a) again, labelled b: one image, a;b
    report = diagnose(tmp_path / "photos", labels=str(labels_file), multi_label=True,
                      verbose=0)
    data = tdata.load_image_data(data_config(tmp_path / "photos", labels=str(labels_file)))
    try:
        for name, split in data.splits.items():
            assert sorted(report.splits[name]) == sorted(split.files), name
        counts = sum(split.labels.sum(axis=0) for split in data.splits.values())
    finally:
        data.close()
    assert report.class_counts == {"a": 25, "b": 26, "c": 16} == dict(
        zip(LABELS, counts.astype(int).tolist()))
    assert report.multi_label and report.to_dict()["multi_label"] is True
    merged = [f for f in report.findings if f.code == "merged_copy"]
    assert [(Path(f.path).name, [Path(r).name for r in f.related]) for f in merged] == [
        ("dup.png", ["000.png"])]
    assert merged[0].severity == "info"
    assert not [f for f in report.findings if "duplicate" in f.code]
    table = report.to_table()
    assert table.splitlines()[2].split()[0] == "label" and "merges them" in table
    # Read as single labels, the `a;b` cells are labels of their own and the copy a clash.
    single = diagnose(tmp_path / "photos", labels=str(labels_file), verbose=0)
    assert "a;b" in single.class_names
    assert [f.code for f in single.findings if "duplicate" in f.code] == [
        "cross_class_duplicate"]


def test_doctor_command_takes_multi_label(tmp_path):
    labels_file, _ = write_label_data(tmp_path / "photos")
    result = CliRunner().invoke(main, ["doctor", str(tmp_path / "photos"), "--labels",
                                       str(labels_file), "--multi-label", "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["multi_label"] is True and report["class_names"] == list(LABELS)
    assert report["class_counts"] == {"a": 25, "b": 25, "c": 16}


# --- Splitting -----------------------------------------------------------------------------


def rare_label_matrix():
    """60 images: labels 0 and 1 common, label 2 on 3 images only (one shared with 0)."""
    labels = [(0,)] * 25 + [(1,)] * 25 + [(0, 1)] * 7 + [(2,), (2,), (0, 2)]
    return tdata.multi_hot(labels, 3)


@pytest.mark.parametrize("seed", range(8))
def test_split_keeps_a_rare_label_in_every_split(seed):
    matrix = rare_label_matrix()
    parts = tdata.split_multi_label_indices(matrix, {"val": 0.2}, seed)
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(60))
    for name in ("train", "val"):
        assert matrix[parts[name], 2].sum() >= 1, name
    # Each label's share, not the image count, is what is stratified: 20% of 33, 32, 3.
    assert matrix[parts["val"]].sum(axis=0).tolist() == [7, 6, 1]
    assert 8 <= len(parts["val"]) <= 15
    three = tdata.split_multi_label_indices(matrix, {"val": 0.2, "test": 0.1}, seed)
    for name in ("train", "val", "test"):
        assert matrix[three[name], 2].sum() == 1, name
        assert matrix[three[name], :2].sum(axis=0).min() >= 1


def test_split_is_seeded_and_balances_labels():
    matrix = rare_label_matrix()
    first = tdata.split_multi_label_indices(matrix, {"val": 0.25}, 3)
    again = tdata.split_multi_label_indices(matrix, {"val": 0.25}, 3)
    other = tdata.split_multi_label_indices(matrix, {"val": 0.25}, 4)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert any(not np.array_equal(first[k], other[k]) for k in first)
    share = matrix[first["val"]].sum(axis=0) / matrix.sum(axis=0)
    assert np.all(np.abs(share[:2] - 0.25) <= 0.06), share


def test_split_usable_takes_the_multi_label_split_for_a_matrix():
    matrix = rare_label_matrix()
    ok = np.ones(60, bool)
    ok[0] = False
    parts = tdata.split_usable(matrix, ok, [str(i) for i in range(60)], 0.2, 0.0, 0)
    assert 0 not in np.concatenate(list(parts.values()))
    assert matrix[parts["val"], 2].sum() >= 1


# --- Thresholds and metrics ----------------------------------------------------------------


def test_thresholds_maximise_each_labels_f1():
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    p = np.array([[0.9, 0.2, 0.7],
                  [0.4, 0.8, 0.1],
                  [0.6, 0.3, 0.2],
                  [0.1, 0.35, 0.3],
                  [0.3, 0.1, 0.9]], np.float32)
    # label 0: positives 0.9, 0.4, 0.3 against negatives 0.6, 0.1. Thresholds: 0.9 -> F1 0.5,
    # 0.6 -> 0.4, 0.4 -> 2*2/(3+3) = 0.667, 0.3 -> 2*3/(4+3) = 0.857, 0.1 -> 0.75: 0.3 wins,
    # and the threshold is halfway down to the next probability, 0.1: 0.2.
    # label 1: positives 0.8, 0.3; negatives 0.35, 0.2, 0.1: 0.8 -> 0.667, 0.35 -> 0.5,
    # 0.3 -> 2*2/(3+2) = 0.8, 0.2 -> 0.667: 0.3 wins; halfway to 0.2: 0.25.
    # label 2 has no positive: 0.5.
    thresholds = choose_thresholds(y, p)
    assert thresholds == pytest.approx([0.2, 0.25, 0.5])
    assert thresholds[1] == float(np.float32(0.25))  # exactly the float32 the graph compares
    predicted = p >= np.asarray(thresholds, np.float32)
    assert predicted[:, 0].tolist() == [True, True, True, False, True]
    assert predicted[:, 1].tolist() == [False, True, True, True, False]


def test_threshold_ties_go_to_the_lower_threshold():
    # 0.8 alone: F1 = 2/(1+2) = 0.667; down to 0.2 (all four): 2*2/(4+2) = 0.667 too; 0.6:
    # 2*1/(2+2) = 0.5; 0.4: 2*2/(3+2) = 0.8 wins; halfway down to 0.2: 0.3.
    assert choose_thresholds([[1], [0], [1], [0]], [[0.8], [0.6], [0.4], [0.2]]) == \
        pytest.approx([0.3])
    # Equal F1 at 0.8 (2/3) and at 0.2 (2*2/(4+2) = 2/3), nothing better in between: the
    # lower, 0.2, the lowest probability, so halfway down to 0: 0.1.
    assert choose_thresholds([[1], [0], [0], [1]], [[0.8], [0.6], [0.4], [0.2]]) == \
        pytest.approx([0.1])
    # Adjacent float32 values have no float32 between them: the winner itself is used.
    low = np.float32(0.5)
    high = np.nextafter(low, np.float32(1))
    assert choose_thresholds([[1], [0]], [[high], [low]]) == [float(high)]


def test_average_precision_against_hand_computed_values():
    # Ranked 0.9 (+), 0.8 (-), 0.7 (+), 0.2 (-), 0.1 (+): precision at each positive 1, 2/3,
    # 3/5 -> AP = (1 + 2/3 + 3/5) / 3.
    assert average_precision([1, 0, 1, 0, 1], [0.9, 0.8, 0.7, 0.2, 0.1]) == \
        pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision([1, 1, 0], [0.9, 0.8, 0.1]) == pytest.approx(1.0)
    # Tied scores are one threshold: (+, -) at 0.5 gives precision 1/2 at recall 1.
    assert average_precision([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert average_precision([0, 0], [0.5, 0.1]) is None


def test_multi_label_metrics_against_hand_computed_values():
    y = [[1, 0], [1, 1], [0, 1], [0, 0]]
    p = [[0.9, 0.2], [0.6, 0.4], [0.3, 0.7], [0.1, 0.8]]
    m = compute_multi_label_metrics(y, p, ["a", "b"], thresholds=[0.5, 0.5])
    # Predicted sets: {a}, {a}, {b}, {b}; true {a}, {a,b}, {b}, {}: rows 0 and 2 exact.
    assert m["subset_accuracy"] == pytest.approx(0.5)
    assert m["label_accuracy"] == pytest.approx(6 / 8)
    a, b = m["per_class"]["a"], m["per_class"]["b"]
    assert (a["precision"], a["recall"], a["support"]) == (1.0, 1.0, 2)
    assert b["precision"] == pytest.approx(0.5) and b["recall"] == pytest.approx(0.5)
    # AP of b: ranked 0.8 (-), 0.7 (+), 0.4 (+), 0.2 (-): (1/2 + 2/3) / 2.
    assert b["average_precision"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["map"] == pytest.approx((1.0 + (1 / 2 + 2 / 3) / 2) / 2)
    assert m["micro_avg"]["precision"] == pytest.approx(3 / 4)
    assert m["micro_avg"]["recall"] == pytest.approx(3 / 4)
    assert m["macro_avg"]["f1"] == pytest.approx((1.0 + 0.5) / 2)
    # Thresholds move the decisions: b at 0.75 predicts only the last image.
    m = compute_multi_label_metrics(y, p, ["a", "b"], thresholds=[0.5, 0.75])
    assert m["per_class"]["b"]["predicted"] == 1 and m["per_class"]["b"]["recall"] == 0.0
    with pytest.raises(ConfigError, match="thresholds"):
        compute_multi_label_metrics(y, p, ["a", "b"], thresholds=[0.5])


# --- Settings ------------------------------------------------------------------------------


def test_multi_label_setting(tmp_path):
    config = build_config(data_dir=str(tmp_path), multi_label=True)
    assert config.data.multi_label and config.to_dict()["data"]["multi_label"] is True
    assert build_config(data_dir=str(tmp_path), multi_label=True,
                        class_weight="auto").train.class_weight == "auto"
    with pytest.raises(ConfigError, match="multi_label"):
        DataConfig(str(tmp_path), multi_label="yes")


def test_class_weight_auto_weighs_each_labels_states_by_the_training_split(tmp_path,
                                                                            monkeypatch):
    import tlkit
    from tlkit import api
    from tlkit.api import balanced_label_weights
    from tlkit.training import run_schedule

    labels_file, _ = write_label_data(tmp_path / "photos")
    given = []

    def spy(model, groups, stages, train_ds, val_ds, settings, *args, **kwargs):
        given.append(settings.sample_weights)
        return run_schedule(model, groups, stages, train_ds, val_ds, settings, *args, **kwargs)

    monkeypatch.setattr(api, "run_schedule", spy)
    result = tlkit.fit(tmp_path / "photos", labels=labels_file, multi_label=True,
                       class_weight="auto", backbone="scratch", image_size=SIZE, epochs=1,
                       augment="none", flip="none", verbose=0, runs_dir=tmp_path / "runs",
                       export_dir=tmp_path / "sm")
    with open(result.run_dir / "splits.csv", newline="") as f:
        train = [row["class"].split(";") for row in csv.DictReader(f) if row["split"] == "train"]
    matrix = np.array([[name in row for name in LABELS] for row in train], np.float32)
    np.testing.assert_allclose(given[0], balanced_label_weights(matrix), rtol=1e-6)
    present = matrix.sum(axis=0)
    assert given[0].shape == (2, 3) and present[2] < present[0]
    assert given[0][1, 2] > given[0][1, 0]  # the rarer label c weighs more where present


# --- End to end ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multi_label_run(tmp_path_factory):
    """`tlkit fit DATA --labels labels.csv --multi-label` from the CLI: (folder, export)."""
    base = tmp_path_factory.mktemp("multilabel")
    labels_file, _ = write_label_data(base / "photos")
    result = CliRunner().invoke(main, [
        "fit", str(base / "photos"), "--labels", str(labels_file), "--multi-label",
        "--backbone", "scratch", "--image-size", str(SIZE), "--epochs", "25",
        "--patience", "25", "--flip", "none", "--augment", "none", "--test-split", "0.15",
        "--export-dir", str(base / "saved_models"), "--runs-dir", str(base / "runs"), "-q"])
    assert result.exit_code == 0, result.output
    export = Path(result.output.strip().splitlines()[-1])
    return base, export


def test_fit_exports_thresholds_and_a_fitting_model_card(multi_label_run):
    base, export = multi_label_run
    meta = json.loads((export / "assets" / "tlkit.json").read_text())
    assert meta["multi_label"] is True and meta["class_names"] == list(LABELS)
    assert len(meta["thresholds"]) == 3 and all(0 < t <= 1 for t in meta["thresholds"])
    assert meta["config"]["data"]["multi_label"] is True
    val = meta["evaluation"]["val"]
    assert val["map"] > 0.9 and val["subset_accuracy"] > 0.6, val
    assert set(val["per_class"]) == set(LABELS)
    card = (export / "assets" / "MODEL_CARD.md").read_text()
    assert "multi-label" in card and "subset accuracy" in card and "mAP" in card
    assert "| c | val |" in card
    run_dir = Path(meta["run_dir"])
    metrics = json.loads((run_dir / "evaluation_val" / "metrics.json").read_text())
    assert metrics["metrics"]["thresholds"] == meta["thresholds"]
    assert not (run_dir / "evaluation_val" / "confusion_matrix.png").exists()
    splits = list(csv.DictReader(open(run_dir / "splits.csv")))
    assert {"a;b", "a;c", "b;c"} <= {row["class"] for row in splits}
    for name in ("train", "val", "test"):  # every label in every split
        labels = {part for row in splits if row["split"] == name for part in
                  row["class"].split(";")}
        assert labels == set(LABELS), name
    assert json.loads((run_dir / "config.json").read_text())["data"]["multi_label"] is True


def test_init_from_continues_a_multi_label_run(multi_label_run, tmp_path):
    import tlkit

    base, export = multi_label_run
    run_dir = Path(json.loads((export / "assets" / "tlkit.json").read_text())["run_dir"])
    started = json.loads((run_dir / "history.json").read_text())[0]
    continued = tlkit.fit(base / "photos", labels=base / "photos" / "labels.csv",
                          multi_label=True, init_from=str(run_dir), epochs=1, flip="none",
                          augment="none", test_split=0.15, verbose=0,
                          runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm")
    first = continued.history[0]
    assert continued.model.get_layer("predictions").activation.__name__ == "sigmoid"
    assert first["val_loss"] < 0.5 * started["val_loss"], (first, started)
    meta = json.loads((continued.export_path / "assets" / "tlkit.json").read_text())
    assert meta["multi_label"] is True and len(meta["thresholds"]) == 3


def test_plain_tensorflow_serving_default_returns_labels_above_thresholds(multi_label_run):
    import tensorflow as tf

    _, export = multi_label_run
    meta = json.loads((export / "assets" / "tlkit.json").read_text())
    thresholds = np.asarray(meta["thresholds"], np.float32)
    sets = [(0,), (1,), (2,), (0, 1), (1, 2), (0, 2)]
    blobs = []
    for i, labels in enumerate(sets):
        buffer = Path(export.parent.parent.parent, f"probe{i}.png")
        Image.fromarray(label_image(labels, 5000 + i, seed=9)).save(buffer)
        blobs.append(buffer.read_bytes())
    serve = tf.saved_model.load(str(export)).signatures["serving_default"]
    out = serve(image_bytes=tf.constant(blobs))
    probabilities = out["probabilities"].numpy()
    predicted = out["predicted"].numpy()
    names = [v.decode() for v in out["class_names"].numpy()]
    assert probabilities.shape == (6, 3) and predicted.dtype == bool
    assert np.array_equal(predicted, probabilities >= thresholds)
    assert names == [";".join(LABELS[j] for j in np.flatnonzero(row)) for row in predicted]
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    assert not np.allclose(probabilities.sum(axis=1), 1.0)  # sigmoid, not softmax
    right = sum(name == ";".join(LABELS[j] for j in labels) for name, labels in zip(names, sets))
    assert right >= 5, names


def test_predict_cli_lists_every_label_above_threshold(multi_label_run, tmp_path):
    _, export = multi_label_run
    image = tmp_path / "both.png"
    Image.fromarray(label_image((0, 2), 7777, seed=5)).save(image)
    runner = CliRunner()
    table = runner.invoke(main, ["predict", str(image), "--model", str(export)])
    assert table.exit_code == 0, table.output
    assert "labels: a (" in table.output and ", c (" in table.output, table.output
    out = runner.invoke(main, ["predict", str(image), "--model", str(export), "--format",
                               "json"])
    (row,) = json.loads(out.output)
    assert [label for label, _ in row["predicted"]] in (["a", "c"], ["c", "a"])
    assert len(row["labels"]) == 3
    out = runner.invoke(main, ["predict", str(image), "--model", str(export), "--format", "csv",
                               "-k", "1"])
    header, line = list(csv.reader(out.output.splitlines()))
    assert header[:2] == ["file", "predicted"] and set(line[1].split(";")) == {"a", "c"}


def test_evaluate_cli_reports_per_label_metrics(multi_label_run, tmp_path):
    base, export = multi_label_run
    runner = CliRunner()
    out = runner.invoke(main, ["evaluate", str(base / "photos"), "--labels",
                               str(base / "photos" / "labels.csv"), "--model", str(export),
                               "--format", "json", "--output-dir", str(tmp_path / "eval")])
    assert out.exit_code == 0, out.output
    metrics = json.loads(out.output)["metrics"]
    assert metrics["num_samples"] == sum(SETS.values()) and metrics["map"] > 0.9
    assert {"subset_accuracy", "micro_avg", "macro_avg"} <= set(metrics)
    assert (tmp_path / "eval" / "mistakes.csv").is_file()
    table = runner.invoke(main, ["evaluate", str(base / "photos"), "--labels",
                                 str(base / "photos" / "labels.csv"), "--model", str(export)])
    assert "subset accuracy" in table.output and "mAP" in table.output


def test_serve_answers_rest_and_grpc_with_the_multi_label_outputs(multi_label_run):
    import base64
    import urllib.request

    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

    from tlkit.serve import ModelServer

    base, export = multi_label_run
    blobs = [(base / "photos" / "img" / f"{i:03d}.png").read_bytes() for i in (0, 30)]
    want = tf.saved_model.load(str(export)).signatures["serving_default"](
        image_bytes=tf.constant(blobs))
    with ModelServer(export, port=0, grpc_port=0) as server:
        body = {"instances": [{"image_bytes": {"b64": base64.b64encode(b).decode()}}
                              for b in blobs]}
        request = urllib.request.Request(server.rest_url + ":predict",
                                         data=json.dumps(body).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            rows = json.loads(response.read())["predictions"]
        assert [set(row) for row in rows] == [{"probabilities", "predicted", "class_names"}] * 2
        assert [row["class_names"] for row in rows] == \
            [v.decode() for v in want["class_names"].numpy()]
        assert [row["predicted"] for row in rows] == want["predicted"].numpy().tolist()
        np.testing.assert_allclose([row["probabilities"] for row in rows],
                                   want["probabilities"].numpy(), atol=1e-6)

        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        try:
            grpc_request = predict_pb2.PredictRequest()
            grpc_request.model_spec.name = export.parent.name
            grpc_request.model_spec.signature_name = "serving_default"
            grpc_request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(blobs))
            answer = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                grpc_request, 30)
        finally:
            channel.close()
        np.testing.assert_array_equal(tf.make_ndarray(answer.outputs["predicted"]),
                                      want["predicted"].numpy())
        np.testing.assert_array_equal(tf.make_ndarray(answer.outputs["class_names"]),
                                      want["class_names"].numpy())


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_tflite_converts_the_probabilities_and_the_thresholded_labels(multi_label_run,
                                                                      tmp_path, quantize):
    """TFLite computes `probabilities` and `predicted` (the thresholds in the graph); the
    joined `class_names` string is left out, as TFLite's built-in ops cannot join."""
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from tlkit.images import load_image
    from tlkit.tflite import export_tflite

    base, export = multi_label_run
    path = export_tflite(export, quantize=quantize, output_dir=tmp_path / "lite")
    meta = json.loads(path.with_suffix(".json").read_text())
    saved = json.loads((export / "assets" / "tlkit.json").read_text())
    assert meta["outputs"] == {"probabilities": "float32", "predicted": "bool"}
    assert meta["multi_label"] is True and meta["thresholds"] == saved["thresholds"]
    files = sorted((base / "photos").glob("**/*.png"))[:24]
    images = np.stack([load_image(f, SIZE) for f in files])
    want = tf.saved_model.load(str(export)).signatures["predict_images"](
        images=tf.constant(images, tf.float32))
    runner = Interpreter(model_path=str(path)).get_signature_runner("predict_images")
    (details,) = runner.get_input_details().values()
    got = runner(images=images.astype(details["dtype"]))
    assert set(got) == {"probabilities", "predicted"}
    assert got["predicted"].dtype == bool
    np.testing.assert_array_equal(got["predicted"],
                                  got["probabilities"] >= np.float32(saved["thresholds"]))
    if quantize == "none":
        np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-5)
        np.testing.assert_array_equal(got["predicted"], want["predicted"].numpy())
    else:
        agreement = (got["predicted"] == want["predicted"].numpy()).mean()
        assert agreement >= 0.9, agreement


def test_head_trains_on_cached_features_with_multi_hot_labels(multi_label_run, capsys):
    """A backbone with given weights is pretrained: the head stage trains on cached
    features, whose labels are the multi-hot rows, then one block is unfrozen."""
    import tlkit

    base, export = multi_label_run
    weights = Path(json.loads((export / "assets" / "tlkit.json").read_text())["run_dir"]) \
        / "backbone.weights.h5"
    result = tlkit.fit(base / "photos", labels=base / "photos" / "labels.csv",
                       multi_label=True, backbone="scratch", weights=str(weights),
                       image_size=SIZE, epochs=6, fine_tune_epochs=2, augment="none",
                       flip="none", name="cached", cache_dir=str(base / "cache"),
                       export_dir=base / "saved_models", runs_dir=base / "runs", verbose=2)
    printed = capsys.readouterr().out
    assert "[head] backbone features for" in printed, printed
    stages = [stage["stage"] for stage in json.loads(
        (result.run_dir / "schedule.json").read_text())]
    assert stages[0] == "head" and len(stages) == 2
    assert result.history[-1]["val_loss"] < 0.69  # learnt: below the chance BCE, ln 2
    meta = json.loads((result.export_path / "assets" / "tlkit.json").read_text())
    assert meta["multi_label"] and meta["evaluation"]["val"]["map"] > 0.9


def test_evaluate_a_class_folder_tree_merges_copies_into_one_image(multi_label_run, tmp_path):
    from tlkit.evaluate import evaluate_folder

    _, export = multi_label_run
    root = tmp_path / "tree"
    for label, name in enumerate(LABELS):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(label_image((label,), 8000 + label * 10 + i, seed=3)).save(
                root / name / f"{name}{i}.png")
    Image.fromarray(label_image((0, 2), 8100, seed=3)).save(root / "a" / "both.png")
    shutil.copy(root / "a" / "both.png", root / "c" / "both_again.png")
    report = evaluate_folder(root, export, output_dir=tmp_path / "eval")
    metrics = report.metrics
    assert metrics["num_samples"] == 10  # 9 single-label images and one with a and c
    assert metrics["per_class"]["a"]["support"] == 4
    assert metrics["per_class"]["c"]["support"] == 4 and metrics["per_class"]["b"]["support"] == 3
    assert metrics["subset_accuracy"] >= 0.8, report.to_text()
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == \
        sorted(n for n in ("metrics.json", "mistakes.csv", "mistakes.png")
               if n != "mistakes.png" or report.mistakes)


def test_export_checks_its_thresholds(tmp_path):
    from tlkit.export import export_classifier
    from tlkit.models import build_classifier

    model = build_classifier("scratch", 2, SIZE, multi_label=True)
    common = dict(image_size=SIZE, resize="squash")
    with pytest.raises(ExportError, match="one value in \\[0, 1\\] per class"):
        export_classifier(model, ["a", "b"], tmp_path, "m", thresholds=[0.5], **common)
    with pytest.raises(ExportError, match="cannot hold one"):
        export_classifier(model, ["a;x", "b"], tmp_path, "m", thresholds=[0.5, 0.5], **common)
    assert not (tmp_path / "m" / "1").exists()
    path = export_classifier(model, ["a", "b"], tmp_path, "m", thresholds=[0.0, 1.0], **common)
    meta = json.loads((path / "assets" / "tlkit.json").read_text())
    assert meta["multi_label"] is True and meta["thresholds"] == [0.0, 1.0]
    import tensorflow as tf

    out = tf.saved_model.load(str(path)).signatures["predict_images"](
        images=tf.zeros([2, SIZE, SIZE, 3]))
    assert out["predicted"].numpy().tolist() == [[True, False], [True, False]]
    assert [v.decode() for v in out["class_names"].numpy()] == ["a", "a"]
    assert model.get_layer("predictions").activation.__name__ == "sigmoid"


def test_a_split_column_and_a_validation_folder_work_with_multi_label(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rows = []
    for i, (labels, split) in enumerate([((0,), "train"), ((1,), "train"), ((0, 1), "train"),
                                         ((0, 1), "val"), ((1,), "val"), ((0,), "test")]):
        Image.fromarray(label_image(labels, i)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{';'.join(LABELS[j] for j in labels)},{split}")
    (folder / "labels.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    data = tdata.load_image_data(data_config(folder, labels=str(folder / "labels.csv")))
    try:
        assert data.fixed_split
        assert data.splits["val"].labels.tolist() == [[1.0, 1.0], [0.0, 1.0]]
        assert data.splits["val"].label_names(data.class_names) == ["a;b", "b"]
        assert data.splits["test"].labels.tolist() == [[1.0, 0.0]]
    finally:
        data.close()

    train, val = tmp_path / "train", tmp_path / "val"
    for root, offset in ((train, 0), (val, 50)):
        for label, name in enumerate(LABELS[:2]):
            (root / name).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(label_image((label,), offset + label * 10 + i)).save(
                    root / name / f"{name}{i}.png")
    Image.fromarray(label_image((0, 1), 99)).save(val / "a" / "both.png")
    shutil.copy(val / "a" / "both.png", val / "b" / "both.png")
    data = tdata.load_image_data(data_config(train, val_dir=str(val)))
    try:
        assert len(data.splits["val"]) == 9 and len(data.splits["train"]) == 8
        assert data.splits["val"].class_counts(2).tolist() == [5, 5]
        assert any(note.startswith(str(val)) and "merged into 1" in note for note in data.notes)
    finally:
        data.close()


def test_explain_signature_gives_the_multi_label_probabilities(multi_label_run):
    import tensorflow as tf

    base, export = multi_label_run
    saved = tf.saved_model.load(str(export))
    blob = tf.constant([(base / "photos" / "img" / "030.png").read_bytes()])  # a;b
    served = saved.signatures["serving_default"](image_bytes=blob)["probabilities"].numpy()
    explained = saved.signatures["explain"](image_bytes=blob,
                                            class_ids=tf.constant([0], tf.int64))
    np.testing.assert_allclose(explained["probabilities"].numpy(), served, atol=1e-5)
    assert explained["heatmaps"].shape == (1, SIZE, SIZE)

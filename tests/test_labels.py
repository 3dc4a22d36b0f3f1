"""Label files: `tlkit fit DATA --labels labels.csv` instead of one subfolder per class.

The scan (`scan_labels`, through `scan_data`) against the folder scan it stands in for, every
kind of bad row by line number, path resolution, the fixed split column, and the whole path
from the command line: fit, predict, evaluate, doctor, `--config`, and the export from plain
TensorFlow.
"""

import csv
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import make_class_image, write_image_folder
from tlkit import data as tdata
from tlkit.cli import main
from tlkit.config import DataConfig, FitConfig
from tlkit.doctor import diagnose, quarantine
from tlkit.errors import ConfigError, DataError

CLASSES = ("cat", "dog")


def write_csv(path, rows, header=("path", "label")):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)
    return path


def write_flat_images(folder, per_class=8, size=16, classes=CLASSES):
    """`per_class` images per class in one flat folder (`img_000.png`, ...); returns the
    `(name relative to folder, label)` rows."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, name in enumerate(classes):
        for index in range(per_class):
            file = f"img_{label * per_class + index:03d}.png"
            Image.fromarray(make_class_image(label, index, size)).save(folder / file)
            rows.append((file, name))
    return rows


def config(data_dir, labels, **options):
    options.setdefault("image_size", 8)
    options.setdefault("cache", "memory")
    options.setdefault("workers", 2)
    return DataConfig(str(data_dir), labels=str(labels), **options)


def load(data_dir, labels, seed=0, **options):
    return tdata.load_image_data(config(data_dir, labels, **options), seed=seed, verbose=0)


def split_files(data):
    return {name: sorted(split.files) for name, split in data.splits.items()}


def bad_lines(tmp_path, rows, header=("path", "label")):
    """Writes `data/a/`, `data/b/` with two images each and `data/labels.csv` of `rows`; returns the
    DataError `scan_labels` raises."""
    write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    labels = write_csv(tmp_path / "data" / "labels.csv", rows, header)
    with pytest.raises(DataError) as info:
        tdata.scan_labels(labels, tmp_path / "data")
    message = str(info.value)
    assert str(labels) in message
    return message


# The scan ----------------------------------------------------------------------------------


def test_a_label_file_of_a_class_folder_tree_scans_and_splits_as_the_folder(image_folder):
    root = image_folder(classes=("a", "b", "c"), per_class=9)
    folder = tdata.scan_folder(root)
    rows = [(str(Path(f).relative_to(root)), folder.class_names[label])
            for f, label in zip(folder.files, folder.labels)]
    labels = write_csv(root / "labels.csv", rows[::-1])  # row order does not matter
    scan = tdata.scan_data(root, labels)
    assert (scan.class_names, scan.files, scan.labels) == (
        folder.class_names, folder.files, folder.labels)
    assert scan.splits is None and scan.labels_file == str(labels) and scan.ignored == ()
    by_folder = tdata.load_image_data(DataConfig(str(root), image_size=8, cache="memory",
                                                 test_split=0.2), seed=3, verbose=0)
    by_labels = load(root, labels, seed=3, test_split=0.2)
    assert split_files(by_labels) == split_files(by_folder)
    assert by_labels.class_names == ["a", "b", "c"]


def test_without_a_split_column_the_split_is_seeded_and_stratified(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=10)
    rows += [(f"extra_{i}.png", "dog") for i in range(10)]
    for i in range(10):
        Image.fromarray(make_class_image(1, 100 + i)).save(tmp_path / "data" / f"extra_{i}.png")
    labels = write_csv(tmp_path / "labels.csv", rows)
    data = load(tmp_path / "data", labels, seed=5, val_split=0.2, test_split=0.1)
    counts = {name: split.class_counts(2).tolist() for name, split in data.splits.items()}
    assert counts == {"train": [7, 14], "val": [2, 4], "test": [1, 2]}
    assert split_files(load(tmp_path / "data", labels, seed=5, val_split=0.2,
                            test_split=0.1)) == split_files(data)
    assert split_files(load(tmp_path / "data", labels, seed=6, val_split=0.2,
                            test_split=0.1)) != split_files(data)
    assert not data.fixed_split and not data.warnings


def test_class_names_are_the_sorted_labels_and_paths_may_be_anywhere(tmp_path):
    write_flat_images(tmp_path / "data" / "img", per_class=3)
    absolute = tmp_path / "elsewhere" / "z.png"
    absolute.parent.mkdir()
    Image.fromarray(make_class_image(0, 50)).save(absolute)
    labels = write_csv(tmp_path / "data" / "labels.csv", [
        ("img/img_000.png", "zebra"), ("img/img_001.png", "ant"), (str(absolute), "mole"),
        ("./img/img_003.png", "ant")])
    scan = tdata.scan_labels(labels, tmp_path / "data")
    assert scan.class_names == ("ant", "mole", "zebra")
    assert [(Path(f).name, scan.class_names[label]) for f, label in
            zip(scan.files, scan.labels)] == [("img_001.png", "ant"), ("img_003.png", "ant"),
                                              ("z.png", "mole"), ("img_000.png", "zebra")]


def test_relative_paths_are_looked_up_next_to_the_csv_then_in_data(tmp_path):
    data_dir, meta = tmp_path / "data", tmp_path / "meta"
    write_flat_images(data_dir, per_class=2)
    write_flat_images(meta, per_class=1, classes=("x",))  # meta/img_000.png shadows data's
    labels = write_csv(meta / "labels.csv", [("img_000.png", "cat"), ("img_001.png", "cat"),
                                             ("img_002.png", "dog")])
    scan = tdata.scan_labels(labels, data_dir)
    assert sorted(scan.files) == sorted([str(meta / "img_000.png"),
                                         str(data_dir / "img_001.png"),
                                         str(data_dir / "img_002.png")])
    assert scan.root == str(data_dir)
    with pytest.raises(DataError, match=r"line 3: img_001\.png: file not found \(looked for "
                       + str(meta / "img_001.png")):
        tdata.scan_labels(labels)  # without DATA, only the CSV's folder


def test_the_same_row_twice_is_kept_once_and_reported(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=4)
    labels = write_csv(tmp_path / "data" / "labels.csv", [*rows, rows[0], ("./" + rows[1][0],
                                                                         rows[1][1])])
    scan = tdata.scan_labels(labels, tmp_path / "data")
    assert len(scan.files) == len(rows) == len(set(scan.files))
    assert [reason for _, reason in scan.ignored] == [
        f"listed again on line 10 of {labels} (line 2 is used)",
        f"listed again on line 11 of {labels} (line 3 is used)"]
    data = load(tmp_path / "data", labels)
    assert sum(len(s) for s in data.splits.values()) == len(rows)
    assert any("2 row(s) of" in w and "repeat" in w for w in data.warnings)
    assert data.report()["ignored"][0]["file"] == str(tmp_path / "data" / rows[0][0])


def test_a_listed_file_that_does_not_decode_is_skipped_and_reported(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=4)
    (tmp_path / "data" / "fake.png").write_text("not an image")
    labels = write_csv(tmp_path / "labels.csv", [*rows, ("fake.png", "cat")])
    data = load(tmp_path / "data", labels)
    assert [Path(p).name for p, _ in data.skipped] == ["fake.png"]
    assert sum(len(s) for s in data.splits.values()) == len(rows)


# Bad rows: each one named by line and file, all at once -------------------------------------


@pytest.mark.parametrize("row, expected", [
    (("missing.png", "cat"), r"line 4: missing\.png: file not found \(looked for \S+/data/"
                             r"missing\.png\)"),
    (("a/a_000.png", ""), r"line 4: a/a_000\.png: empty label"),
    (("a/a_000.png", "   "), r"line 4: a/a_000\.png: empty label"),
    (("", "cat"), r"line 4: empty path"),
    (("labels.csv", "cat"), r"line 4: labels\.csv: not an image file extension \('\.csv'\)"),
    (("a", "cat"), r"line 4: a: a folder, not an image file"),
    (("a/a_000.png", "cat", "x"), r"line 4: a/a_000\.png: 3 fields, the header has 2"),
    (("b/b_000.png", "cat"), r"line 4: b/b_000\.png: label 'cat', but line 3 lists the same "
                             r"file with label 'b'"),
])
def test_each_bad_row_is_an_error_naming_the_file_and_line(tmp_path, row, expected):
    message = bad_lines(tmp_path, [("a/a_000.png", "a"), ("b/b_000.png", "b"), row])
    assert "has 1 bad line(s)" in message
    assert len([line for line in message.splitlines() if line.startswith("  line")]) == 1
    assert re.search(expected, message), message


def test_a_missing_file_names_both_places_looked(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=2)
    labels = write_csv(tmp_path / "meta" / "labels.csv", [*rows, ("sub/nope.png", "cat")])
    with pytest.raises(DataError) as info:
        tdata.scan_labels(labels, tmp_path / "data")
    assert (f"line 6: sub/nope.png: file not found (looked for {tmp_path}/meta/sub/nope.png "
            f"or {tmp_path}/data/sub/nope.png)") in str(info.value)


@pytest.mark.parametrize("split, expected", [
    ("", "line 3: b/b_000.png: split '' is not one of ['train', 'val', 'test']"),
    ("validation", "line 3: b/b_000.png: split 'validation' is not one of"),
])
def test_a_split_column_needs_a_valid_value_on_every_row(tmp_path, split, expected):
    message = bad_lines(tmp_path, [("a/a_000.png", "a", "train"), ("b/b_000.png", "b", split)],
                        header=("path", "label", "split"))
    assert expected in message


def test_the_same_file_in_two_splits_is_an_error(tmp_path):
    message = bad_lines(tmp_path, [("a/a_000.png", "a", "train"), ("a/a_000.png", "a", "val")],
                        header=("path", "label", "split"))
    assert "line 3: a/a_000.png: split 'val', but line 2 lists the same file with split " \
           "'train'" in message


def test_every_bad_line_is_reported_at_once_up_to_ten_with_the_count(tmp_path):
    rows = [(f"missing_{i}.png", "a") for i in range(12)] + [("a/a_000.png", "")]
    message = bad_lines(tmp_path, rows)
    assert "has 13 bad line(s); fix them and run again" in message
    listed = [line for line in message.splitlines() if line.startswith("  line")]
    assert [line.split(":")[0] for line in listed] == [f"  line {n}" for n in range(2, 12)]
    assert message.endswith("... and 3 more.")


@pytest.mark.parametrize("header, expected", [
    (("file", "label"), r"line 1: no column \['path'\]"),
    (("path",), r"line 1: no column \['label'\]"),
    (("path", "label", "notes"), r"line 1: unknown column\(s\) \['notes'\]"),
    (("path", "label", "splits"), r"unknown column\(s\) \['splits'\]"),
    (("path", "label", "label"), r"repeated column\(s\) \['label'\]"),
    (("a/a_000.png", "a"), r"no column \['path', 'label'\]"),  # no header row
])
def test_the_header_must_name_path_and_label_and_nothing_else_but_split(tmp_path, header,
                                                                       expected):
    message = bad_lines(tmp_path, [("a/a_000.png", "a")], header=header)
    assert re.search(expected, message), message
    assert "a header with the columns path, label and optionally split" in message


def test_header_names_are_case_insensitive_and_values_stripped(tmp_path):
    write_image_folder(tmp_path / "data", classes=CLASSES, per_class=1)
    labels = write_csv(tmp_path / "data" / "l.csv", [(" cat/cat_000.png ", " cat ", " Train "),
                                                     ("dog/dog_000.png", "dog", "VAL")],
                       header=(" Path", "LABEL ", "Split"))
    scan = tdata.scan_labels(labels, tmp_path / "data")
    assert scan.class_names == CLASSES and scan.splits == ("train", "val")


@pytest.mark.parametrize("content, expected", [
    (b"", "is empty: it needs a header row"),
    (b"\n\n", "is empty: it needs a header row"),
    (b"path,label\n", "lists no image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\x00", "is not a UTF-8 text file"),
    (b'path,label\n"a.png"x,a\n', "is not a readable CSV file (line 2: "),
])
def test_an_empty_or_unreadable_label_file_is_an_error_naming_it(tmp_path, content, expected):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    with pytest.raises(DataError) as info:
        tdata.scan_labels(labels, tmp_path)
    assert f"Label file {str(labels)!r}" in str(info.value) and expected in str(info.value)


def test_a_missing_label_file_or_data_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="`labels_file` must be the path of a CSV file"):
        tdata.scan_labels(None, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        tdata.scan_labels(tmp_path / "nope.csv", tmp_path)
    with pytest.raises(DataError, match="is a folder"):
        tdata.scan_labels(tmp_path, tmp_path)
    labels = write_csv(tmp_path / "labels.csv", [])
    with pytest.raises(DataError, match="Data folder .*nope.* does not exist"):
        tdata.scan_labels(labels, tmp_path / "nope")


def test_expected_classes_refuse_an_unknown_label_with_its_line(tmp_path):
    write_flat_images(tmp_path, per_class=2)
    labels = write_csv(tmp_path / "labels.csv", [("img_000.png", "cat"), ("img_001.png", "cat"),
                                                 ("img_002.png", "dog")])
    scan = tdata.scan_labels(labels, tmp_path, class_names=("bird", "cat", "dog"))
    assert scan.class_names == ("bird", "cat", "dog") and scan.labels == (1, 1, 2)
    with pytest.raises(DataError, match=r"labels \['dog'\] \(first on line\(s\) \[4\]\) that "
                       r"are not among the expected classes \['cat', 'bird'\]"):
        tdata.scan_labels(labels, tmp_path, class_names=("cat", "bird"))


def test_one_label_is_an_error_naming_the_label_file(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=3, classes=("cat",))
    labels = write_csv(tmp_path / "labels.csv", rows)
    with pytest.raises(DataError, match=f"Label file '{labels}' has only one class"):
        load(tmp_path / "data", labels)


def test_labels_and_val_dir_are_refused_together(tmp_path):
    with pytest.raises(ConfigError, match="`labels` and `val_dir` cannot be combined"):
        DataConfig(str(tmp_path), labels="labels.csv", val_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="`labels` must be a CSV file path"):
        DataConfig(str(tmp_path), labels="")


# The fixed split ---------------------------------------------------------------------------


def fixed_split_data(tmp_path, per_class=6):
    rows = write_flat_images(tmp_path / "data", per_class=per_class)
    names = ["train", "train", "val", "test", "train", "val"] * per_class
    rows = [(path, label, names[i]) for i, (path, label) in enumerate(rows)]
    labels = write_csv(tmp_path / "labels.csv", rows, header=("path", "label", "split"))
    expected = {name: sorted(str(tmp_path / "data" / p) for p, _, s in rows if s == name)
                for name in ("train", "val", "test")}
    return labels, expected


@pytest.mark.parametrize("seed, val_split, test_split", [(0, 0.2, 0.0), (7, 0.5, 0.3)])
def test_a_split_column_is_the_split_exactly(tmp_path, seed, val_split, test_split):
    labels, expected = fixed_split_data(tmp_path)
    data = load(tmp_path / "data", labels, seed=seed, val_split=val_split,
                test_split=test_split)
    assert split_files(data) == expected
    assert data.fixed_split and data.report()["fixed_split"] is True
    assert (f"The split column of {labels} fixes the split: val_split={val_split} and "
            f"test_split={test_split} are not used.") in data.warnings
    for split in data.splits.values():  # labels follow their files
        assert [Path(f).name < "img_006.png" for f in split.files] == \
            [label == 0 for label in split.labels]


def test_a_fixed_split_needs_validation_and_training_images(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=3)
    for missing, other in (("val", "train"), ("train", "val")):
        labels = write_csv(tmp_path / f"no_{missing}.csv",
                           [(p, label, other if i % 3 else "test") for i, (p, label) in
                            enumerate(rows)], header=("path", "label", "split"))
        with pytest.raises(DataError, match=f"puts no usable image in the '{missing}' split"):
            load(tmp_path / "data", labels)


def test_a_class_missing_from_the_fixed_training_split_is_a_warning(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=3)
    labels = write_csv(tmp_path / "labels.csv",
                       [(p, label, "val" if label == "dog" else ("train", "val", "train")[i])
                        for i, (p, label) in enumerate(rows)],
                       header=("path", "label", "split"))
    data = load(tmp_path / "data", labels)
    assert any("['dog'] have no usable image in the 'train' split" in w for w in data.warnings)


def test_survey_and_doctor_read_the_label_file(tmp_path):
    labels, expected = fixed_split_data(tmp_path)
    survey = tdata.survey_folder(tmp_path / "data", labels=labels)
    assert (survey.images_per_class, survey.image_side) == (6, 16)
    report = diagnose(tmp_path / "data", labels=labels, min_size=8, verbose=0)
    assert {name: sorted(files) for name, files in report.splits.items()} == expected
    assert report.labels_file == str(labels) and report.fixed_split
    assert report.class_names == CLASSES and not report.errors
    assert f"split as `tlkit fit` makes it with the split column of {labels}" in \
        report.to_table()
    with pytest.raises(ConfigError, match="remove the rows of the files with errors"):
        quarantine(report, tmp_path / "quarantine")


# From the command line ---------------------------------------------------------------------


def invoke(*args):
    options = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters \
        else {}
    return CliRunner(**options).invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A flat folder of images labelled by a CSV outside it, with a fixed split, fit from the
    command line at 16 px."""
    base = tmp_path_factory.mktemp("labels_cli")
    rows = write_flat_images(base / "photos", per_class=10)
    names = ["train"] * 6 + ["val"] * 2 + ["test"] * 2
    rows = [(f"../photos/{p}", label, names[i % 10]) for i, (p, label) in enumerate(rows)]
    labels = write_csv(base / "meta" / "labels.csv", rows, header=("path", "label", "split"))
    result = invoke("fit", base / "photos", "--labels", labels, "--backbone", "scratch",
                    "--image-size", 16, "--epochs", 2, "--batch-size", 8, "--augment",
                    "none", "--export-dir", base / "saved_models", "--runs-dir",
                    base / "runs", "-q")
    assert result.exit_code == 0, result.output
    export = Path(result.stdout.strip())
    (run_dir,) = (base / "runs" / "photos").iterdir()
    return base, labels, rows, export, run_dir


def test_cli_fit_with_labels_writes_the_fixed_split_and_the_config(labelled):
    base, labels, rows, export, run_dir = labelled
    with open(run_dir / "splits.csv", newline="") as f:
        saved = sorted((Path(r["file"]).name, r["class"], r["split"]) for r in csv.DictReader(f))
    assert saved == sorted((Path(p).name, label, split) for p, label, split in rows)
    config = FitConfig.load(run_dir / "config.json")
    assert config.data.labels == str(labels) and config.data.data_dir == str(base / "photos")
    report = json.loads((run_dir / "data.json").read_text())
    assert report["class_names"] == list(CLASSES) and report["fixed_split"] is True
    assert report["counts"] == {"train": [6, 6], "val": [2, 2], "test": [2, 2]}
    assert (export / "assets" / "labels.txt").read_text() == "cat\ndog\n"
    assert "labels and split from" in (export / "assets" / "MODEL_CARD.md").read_text()


def test_cli_predict_and_plain_tensorflow_agree_on_the_export(labelled):
    import tensorflow as tf

    base, labels, rows, export, run_dir = labelled
    files = [str(base / "photos" / Path(p).name) for p, _, split in rows if split == "test"]
    result = invoke("predict", *files, "--model", export, "--format", "json", "--top-k", 2)
    assert result.exit_code == 0, result.output
    predicted = json.loads(result.stdout)
    assert [p["file"] for p in predicted] == files
    model = tf.saved_model.load(str(export))
    data = tf.stack([tf.io.read_file(f) for f in files])
    out = model.signatures["serving_default"](image_bytes=data)
    names = [n.decode() for n in out["class_names"].numpy()]
    assert names == [p["labels"][0] for p in predicted]
    assert set(names) <= set(CLASSES)
    probabilities = out["probabilities"].numpy()
    for row, p in zip(probabilities, predicted):
        by_name = dict(zip(p["labels"], p["probabilities"]))
        np.testing.assert_allclose(row, [by_name[c] for c in CLASSES], atol=1e-5)


def test_cli_evaluate_and_doctor_take_labels(labelled, tmp_path):
    base, labels, rows, export, run_dir = labelled
    result = invoke("evaluate", base / "photos", "--labels", labels, "--model", export,
                    "--format", "json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["metrics"]["num_samples"] == len(rows) and report["data"] == str(labels)
    result = invoke("doctor", base / "photos", "--labels", labels, "--format", "json",
                    "--min-size", 8)
    assert result.exit_code == 0, result.output
    doctor = json.loads(result.stdout)
    assert doctor["split_counts"] == {"train": 12, "val": 4, "test": 4}
    assert doctor["labels_file"] == str(labels)


def test_cli_fit_config_repeats_the_label_file_run(labelled):
    base, labels, rows, export, run_dir = labelled
    result = invoke("fit", "--config", run_dir / "config.json", "--epochs", 1, "--version", 9,
                    "-q")
    assert result.exit_code == 0, result.output
    assert Path(result.stdout.strip()) == export.parent / "9"
    second = max((base / "runs" / "photos").iterdir())
    assert second != run_dir
    assert (second / "splits.csv").read_text() == (run_dir / "splits.csv").read_text()


def test_cli_bad_label_file_is_one_clean_error_in_flags(tmp_path):
    rows = write_flat_images(tmp_path / "data", per_class=2)
    labels = write_csv(tmp_path / "labels.csv", [*rows, ("gone.png", "cat")])
    result = invoke("fit", tmp_path / "data", "--labels", labels, "--backbone", "scratch",
                    "--runs-dir", tmp_path / "runs", "--export-dir", tmp_path / "models")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"Label file '{labels}' has 1 bad line(s)" in result.stderr
    assert "line 6: gone.png: file not found" in result.stderr
    result = invoke("fit", tmp_path / "data", "--labels", labels, "--val-dir",
                    tmp_path / "data")
    assert result.exit_code == 1
    assert "`--labels` and `--val-dir` cannot be combined" in result.stderr
    result = invoke("doctor", tmp_path / "data", "--labels", labels)
    assert result.exit_code == 1 and "line 6: gone.png" in result.stderr

"""The `tlkit` command line through click's CliRunner: fit, predict, backbones, errors."""

import csv
import inspect
import io
import json
import os
import re
import shutil
import time

import pytest
from click.testing import CliRunner

import tlkit
from conftest import write_image_folder
from tlkit.backbones import list_backbones
from tlkit.cli import main

CLASSES = ("circle", "square", "star")


def invoke(*args):
    """Runs `tlkit ARGS` with stdout and stderr kept apart (click < 8.2 needs mix_stderr)."""
    options = {"mix_stderr": False} if "mix_stderr" in inspect.signature(CliRunner).parameters \
        else {}
    return CliRunner(**options).invoke(main, [str(a) for a in args])


def assert_clean_failure(result):
    """Exit code 1 through click (not an uncaught exception) and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def data_dir(base):
    return write_image_folder(base / "shapes", classes=CLASSES, per_class=8, size=20)


@pytest.fixture(scope="module")
def cli_fit(base, data_dir):
    return invoke("fit", data_dir, "--epochs", 1, "--image-size", 16, "--batch-size", 8,
                  "--lr", 0.01, "--augment", "none", "--flip", "none",
                  "--export-dir", base / "saved_models", "--runs-dir", base / "runs", "-q")


@pytest.fixture(scope="module")
def export_path(cli_fit):
    assert cli_fit.exit_code == 0, cli_fit.output
    return cli_fit.stdout.strip()


@pytest.fixture(scope="module")
def classifier(export_path):
    return tlkit.load(export_path)


@pytest.fixture(scope="module")
def probe(base):
    """A folder with images at three depths, a non-image and a hidden image."""
    root = base / "probe"
    write_image_folder(root / "x", classes=("one", "two"), per_class=2, size=24)
    write_image_folder(root / "x" / "deeper", classes=("three",), per_class=2, size=18,
                       fmt="jpg")
    write_image_folder(root, classes=("top",), per_class=1, size=20)
    (root / "notes.txt").write_text("not an image")
    write_image_folder(root / ".hidden", classes=("h",), per_class=1)
    return root


@pytest.fixture(scope="module")
def probe_files(probe):
    return sorted(str(p) for p in probe.rglob("*")
                  if p.suffix in (".png", ".jpg") and ".hidden" not in p.parts)


# --- Simple commands ---------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert tlkit.__version__ in result.stdout
    assert "tlkit" in result.stdout


@pytest.mark.parametrize("command", ["fit", "predict"])
def test_help_has_examples(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Example" in result.stdout


def test_backbones_lists_scratch_and_lenet5():
    result = invoke("backbones")
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.strip()}
    assert {"scratch", "lenet5"} <= set(list_backbones()) <= listed


# --- fit ---------------------------------------------------------------------------------------


def test_fit_prints_the_export_path(cli_fit, base):
    assert cli_fit.exit_code == 0, cli_fit.output
    expected = base / "saved_models" / "shapes" / "1"
    assert cli_fit.stdout == f"{expected}\n"
    assert (expected / "saved_model.pb").is_file()


def test_fit_with_a_saved_config_reruns_it(export_path, base):
    metadata = json.loads((base / "saved_models" / "shapes" / "1" / "assets" /
                           "tlkit.json").read_text())
    run_dir = metadata["run_dir"]
    result = invoke("fit", "--config", os.path.join(run_dir, "config.json"), "--epochs", 1,
                    "--name", "rerun", "-q")
    assert result.exit_code == 0, result.output
    rerun_export = base / "saved_models" / "rerun" / "1"
    assert result.stdout == f"{rerun_export}\n"
    rerun = json.loads((rerun_export / "assets" / "tlkit.json").read_text())
    original, repeated = metadata["config"], rerun["config"]
    assert repeated["export"]["name"] == "rerun"
    assert {**repeated, "export": None} == {**original, "export": None}
    assert rerun["epochs_trained"] == 1
    history = json.loads(open(os.path.join(run_dir, "history.json")).read())
    rerun_history = json.loads(open(os.path.join(rerun["run_dir"], "history.json")).read())
    for a, b in zip(history, rerun_history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-6)


def test_fit_on_one_class_fails_with_a_clear_message(image_folder, tmp_path):
    data = image_folder(classes=("only",), per_class=6)
    result = invoke("fit", data, "--epochs", 1, "--export-dir", tmp_path / "exports",
                    "--runs-dir", tmp_path / "runs", "-q")
    assert_clean_failure(result)
    [line] = error_lines(result)
    assert "one class" in line and "'only'" in line
    assert not (tmp_path / "exports").exists()
    assert not (tmp_path / "runs").exists()


def test_fit_with_an_unknown_backbone_lists_the_backbones(image_folder, tmp_path):
    data = image_folder(per_class=4)
    result = invoke("fit", data, "--backbone", "x", "--export-dir", tmp_path / "exports",
                    "--runs-dir", tmp_path / "runs", "-q")
    assert_clean_failure(result)
    [line] = error_lines(result)
    assert "`--backbone` must be one of" in line  # the library's `backbone`, in flags
    assert "Received: --backbone x" in line
    for name in list_backbones():
        assert repr(name) in line


# --- predict ---------------------------------------------------------------------------------


def _api(classifier, inputs, top_k):
    return [p.to_dict() for p in classifier.predict(inputs, top_k=top_k)]


def _assert_matches_api(rows, expected):
    assert [r["file"] for r in rows] == [e["file"] for e in expected]
    for row, want in zip(rows, expected):
        assert row["labels"] == want["labels"]
        assert row["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)


def _parse(output_format, stdout, top_k):
    if output_format == "json":
        return [{k: r[k] for k in ("file", "labels", "probabilities")}
                for r in json.loads(stdout)]
    if output_format == "csv":
        reader = csv.DictReader(io.StringIO(stdout))
        columns = [f"{kind}_{i}" for i in range(1, top_k + 1)
                   for kind in ("label", "probability")]
        assert reader.fieldnames == ["file", *columns, "error"]
        return [{"file": r["file"],
                 "labels": [r[f"label_{i}"] for i in range(1, top_k + 1)],
                 "probabilities": [float(r[f"probability_{i}"]) for i in range(1, top_k + 1)]}
                for r in reader]
    rows = []
    for line in stdout.splitlines():
        file, ranked = line.split("  ", 1)
        pairs = re.findall(r"(\S+) \((\d+\.\d)%\)", ranked)
        rows.append({"file": file, "labels": [label for label, _ in pairs],
                     "probabilities": [float(p) / 100 for _, p in pairs]})
    return rows


@pytest.mark.parametrize("output_format", ["table", "json", "csv"])
@pytest.mark.parametrize("on", ["files", "folder"])
def test_predict_formats_match_the_python_api(export_path, classifier, probe, probe_files,
                                              output_format, on):
    inputs = probe_files if on == "files" else [probe]
    result = invoke("predict", *inputs, "--model", export_path, "--format", output_format)
    assert result.exit_code == 0, result.output
    rows = _parse(output_format, result.stdout, 3)
    expected = _api(classifier, probe_files, 3)
    assert [r["file"] for r in rows] == probe_files
    if output_format == "table":  # percentages with one decimal
        assert [r["labels"] for r in rows] == [e["labels"] for e in expected]
        for row, want in zip(rows, expected):
            assert row["probabilities"] == pytest.approx(want["probabilities"], abs=0.0005)
    else:
        _assert_matches_api(rows, expected)


@pytest.mark.parametrize("output_format", ["table", "json", "csv"])
def test_top_k_2(export_path, probe_files, output_format):
    result = invoke("predict", *probe_files, "--model", export_path, "--top-k", 2,
                    "--format", output_format)
    assert result.exit_code == 0, result.output
    rows = _parse(output_format, result.stdout, 2)
    assert len(rows) == len(probe_files)
    for row in rows:
        assert len(row["labels"]) == 2 and len(set(row["labels"])) == 2
        assert set(row["labels"]) <= set(CLASSES)
        first, second = row["probabilities"]
        assert first >= second >= 0
        assert first + second <= 1 + 1e-6


def test_predict_reports_bad_files_and_predicts_the_rest(export_path, probe_files, tmp_path):
    missing = tmp_path / "missing.png"
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"this is not a png at all")
    good = probe_files[:2]
    result = invoke("predict", good[0], missing, corrupt, good[1], "--model", export_path,
                    "--format", "json")
    assert_clean_failure(result)
    rows = {r["file"]: r for r in json.loads(result.stdout)}
    assert [rows[f]["error"] for f in good] == [None, None]
    assert all(len(rows[f]["labels"]) == 3 for f in good)
    assert rows[str(missing)]["error"] and rows[str(corrupt)]["error"]
    lines = error_lines(result)
    assert len(lines) == 2
    assert str(missing) in lines[0] and str(corrupt) in lines[1]


def test_predict_table_skips_bad_files_on_stdout(export_path, probe_files, tmp_path):
    missing = tmp_path / "missing.png"
    result = invoke("predict", probe_files[0], missing, "--model", export_path)
    assert_clean_failure(result)
    assert result.stdout.startswith(probe_files[0])
    assert str(missing) not in result.stdout
    [line] = error_lines(result)
    assert str(missing) in line and "does not exist" in line


def test_predict_without_model_uses_the_newest_export(export_path, probe_files, tmp_path,
                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    renamed = tmp_path / "saved_models" / "aaa" / "1"
    plain = tmp_path / "saved_models" / "zzz" / "1"
    shutil.copytree(export_path, renamed)
    shutil.copytree(export_path, plain)
    meta_file = renamed / "assets" / "tlkit.json"
    meta = json.loads(meta_file.read_text())
    meta["class_names"] = [name.upper() for name in meta["class_names"]]
    meta_file.write_text(json.dumps(meta))

    def labels_when_newest(newest, older):
        now = time.time()
        os.utime(older / "saved_model.pb", (now - 1000, now - 1000))
        os.utime(newest / "saved_model.pb", (now, now))
        result = invoke("predict", probe_files[0], "--format", "json")
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)[0]["labels"]

    assert set(labels_when_newest(renamed, plain)) == {c.upper() for c in CLASSES}
    assert set(labels_when_newest(plain, renamed)) == set(CLASSES)


def test_predict_with_a_folder_that_is_not_an_export(tmp_path, probe_files):
    result = invoke("predict", probe_files[0], "--model", tmp_path)
    assert_clean_failure(result)
    assert result.stderr.strip().count("\n") == 0
    [line] = error_lines(result)
    assert "not a tlkit export" in line and str(tmp_path) in line


def test_fit_with_a_config_without_data_dir_fails_cleanly(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"data": {"val_split": 0.2}, "train": {"epochs": 1}}))
    result = invoke("fit", "--config", config, "-q")
    assert_clean_failure(result)
    [line] = error_lines(result)
    assert "data_dir" in line

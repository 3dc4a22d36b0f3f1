"""evaluate, explain and inspect through the CLI, on the shared digits export."""

import json
from pathlib import Path

import keras
from click.testing import CliRunner

from conftest import DIGITS
from tlkit.cli import main as cli
from tlkit.export import export_classifier
from tlkit.models import build_backbone, build_classifier


def run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_evaluate_reports_metrics_and_writes_its_files(digits_export, tmp_path):
    result = run("evaluate", DIGITS, "--model", digits_export, "--format", "json",
                 "--output-dir", tmp_path / "report")
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["num_samples"] == 1797 and metrics["accuracy"] > 0.5
    for name in ("metrics.json", "confusion_matrix.png", "reliability.png", "mistakes.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    text = run("evaluate", DIGITS, "--model", digits_export).output
    assert f"{metrics['accuracy']:.4f}"[:4] in text


def test_explain_writes_one_heatmap_per_image(digits_export, tmp_path):
    images = [DIGITS / "4" / "4_0004.png", DIGITS / "7" / "7_0061.png"]
    result = run("explain", *images, "--model", digits_export, "--out", tmp_path)
    lines = result.output.strip().splitlines()
    assert len(lines) == 2
    pngs = [Path(line.rsplit("-> ", 1)[1]) for line in lines]
    assert len(set(pngs)) == 2 and all(p.stat().st_size > 0 for p in pngs)


def test_inspect_counts_the_backbones_parameters():
    output = run("inspect", "--backbone", "lenet5", "--image-size", 32).output
    assert f"{build_backbone('lenet5', 32).count_params():,}" in output
    assert "c5" in output and "trainable" in output


def test_inspect_model_takes_an_export_through_its_run_folder(digits_run, tmp_path):
    by_run = run("inspect", "--model", digits_run.run_dir).output
    model = keras.saving.load_model(digits_run.run_dir / "model.keras")
    assert f"{model.count_params():,}" in by_run
    assert run("inspect", "--model", digits_run.export_path).output == by_run
    assert run("inspect", "--model", digits_run.export_path.parent).output == by_run

    bare = export_classifier(build_classifier("scratch", 2, 16), ["a", "b"], tmp_path, "bare",
                             image_size=16, resize="squash")
    refused = CliRunner().invoke(cli, ["inspect", "--model", str(bare)])
    assert refused.exit_code == 2
    assert "without its run folder" in refused.output and "--model" in refused.output

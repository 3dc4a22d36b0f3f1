"""The README's set-up commands stay true: the demo trains, holds out its example, predicts."""

import json
import re
import shlex
import shutil
import subprocess

import pytest
from click.testing import CliRunner

from tlkit.cli import main
from tlkit.api import resolve_config
from tlkit.config import build_config
from tlkit.data import load_image_data

from conftest import REPO


def readme_commands():
    """The two set-up commands: the first line of each fenced block after '## Set up'."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return [block.strip().splitlines()[0] for block in re.findall(r"```\n(.*?)```", section,
                                                                  re.S)]


def demo_steps():
    commands = readme_commands()
    assert len(commands) == 2, commands
    steps = [shlex.split(step) for step in commands[0].split("&&")]
    assert steps[0][:2] == ["pip", "install"]
    fit = next(s for s in steps if s[:2] == ["tlkit", "fit"])
    predict = next(s for s in steps if s[:2] == ["tlkit", "predict"])
    return fit, predict


def test_readme_has_exactly_two_setup_commands_and_the_test_one_is_ci():
    demo, tests = readme_commands()
    assert "tlkit fit data/digits" in demo and "tlkit predict" in demo
    assert tests == 'pip install -e ".[test]" && python -m pytest'
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[test]"' in ci and "python -m pytest" in ci


def _fit_options(fit):
    """The README's fit flags as tlkit.build_config options."""
    args, options = fit[3:], {}
    while args:
        flag, value = args[0], args[1]
        options[flag.removeprefix("--").replace("-", "_")] = value
        args = args[2:]
    for key in ("test_split", "val_split"):
        if key in options:
            options[key] = float(options[key])
    return options


def test_readme_prediction_example_is_held_out_of_training():
    fit, predict = demo_steps()
    config = resolve_config(build_config(data_dir=str(REPO / fit[2]), **_fit_options(fit)))
    data = load_image_data(config.data, seed=config.seed, verbose=0)
    try:
        target = str(REPO / predict[2])
        assert target in data.splits["test"].files
        assert target not in data.splits["train"].files + data.splits["val"].files
    finally:
        data.close()


@pytest.mark.slow
def test_readme_demo_reaches_97_percent_and_predicts_the_held_out_digit(tmp_path, monkeypatch):
    fit, predict = demo_steps()
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    fit_args = [str(REPO / fit[2]), *fit[3:], "-q"]
    result = runner.invoke(main, ["fit", *fit_args])
    assert result.exit_code == 0, result.output
    export = tmp_path / result.stdout.strip().splitlines()[-1]
    metrics = json.loads((export / "assets" / "tlkit.json").read_text())["metrics"]
    assert metrics["val"]["accuracy"] >= 0.97
    assert metrics["test"]["accuracy"] >= 0.97
    shown = runner.invoke(main, ["predict", str(REPO / predict[2]), "--top-k", "1"])
    assert shown.exit_code == 0, shown.output
    expected = (REPO / predict[2]).parent.name
    assert shown.stdout.split()[1] == expected


def test_console_script_is_installed():
    tlkit = shutil.which("tlkit")
    assert tlkit, "the `tlkit` console script is not on PATH: run pip install -e ."
    done = subprocess.run([tlkit, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "tlkit" in done.stdout

"""tlkit fit on a hostile folder: it completes, reports every bad file, uses every good one,
and stays under 2 GiB of memory."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from corpus import build_corpus

# Runs `tlkit fit` in a fresh process. As root every file is readable, so the process makes
# one file unreadable the way the kernel would for another user, then reports its peak RSS.
RUNNER = """
import builtins, json, os, sys
from pathlib import Path
locked = Path(os.environ["TLKIT_TEST_LOCKED"])
real_open = builtins.open
def guarded_open(file, *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and Path(file) == locked:
        raise PermissionError(13, "Permission denied", str(file))
    return real_open(file, *args, **kwargs)
if os.geteuid() == 0:
    builtins.open = guarded_open
from tlkit.cli import main
try:
    main(sys.argv[1:], standalone_mode=False)
finally:
    # VmHWM is this program's own peak: ru_maxrss would also count the parent's peak,
    # which Linux carries over into a child started with vfork or fork and exec.
    status = Path("/proc/self/status").read_text()
    peak = int(next(l.split()[1] for l in status.splitlines() if l.startswith("VmHWM:"))) * 1024
    Path(os.environ["TLKIT_TEST_PEAK"]).write_text(json.dumps(peak))
"""


@pytest.mark.slow
def test_fit_survives_a_hostile_folder(tmp_path):
    root = tmp_path / "data"
    corpus = build_corpus(root)
    huge = root / "b" / "huge_20000x20000.png"
    Image.new("1", (20000, 20000)).save(huge)  # ~50 KB on disk, 400 million pixels
    expected_errors = {**corpus["errors"], str(huge): "bomb"}
    corpus["locked"].chmod(0)

    env = {"TLKIT_TEST_LOCKED": str(corpus["locked"]), "TLKIT_TEST_PEAK": str(tmp_path / "peak"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, "fit", str(root), "--backbone", "scratch",
         "--image-size", "32", "--epochs", "1", "--augment", "none", "--flip", "none",
         "--runs-dir", str(tmp_path / "runs"), "--export-dir", str(tmp_path / "sm"), "-q"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]

    run = next((tmp_path / "runs" / "data").iterdir())
    skipped = {item["file"]: item["reason"] for item in
               json.loads((run / "data.json").read_text())["skipped"]}
    assert set(skipped) == set(expected_errors)
    for path, reason in skipped.items():
        assert reason, path
    assert "permission denied" in skipped[str(corpus["locked"])]
    assert "decompression bomb" in skipped[str(huge)]
    assert "400000000 pixels" in skipped[str(huge)] or "20000x20000" in skipped[str(huge)]
    assert "empty" in skipped[str(root / "a" / "empty.jpg")]

    with open(run / "splits.csv", newline="") as f:
        used = {row["file"] for row in csv.DictReader(f)}
    assert used == set(corpus["good"])  # nested, unicode and space-filled names included
    assert str(root / "a" / "nested" / "deeper" / "n_0.png") in used

    peak = json.loads((tmp_path / "peak").read_text())
    print(f"peak memory of tlkit fit: {peak / 1024**2:.0f} MiB")
    assert peak < 2 * 1024**3, f"peak memory {peak / 1024**2:.0f} MiB"
    assert Path(tmp_path / "sm" / "data" / "1" / "saved_model.pb").is_file()

"""tlkit doctor: a hostile data folder, every finding code, fit's split, quarantine."""

import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import ImageFile

from conftest import write_image_folder
from tlkit import data as tdata
from tlkit.config import DataConfig
from tlkit.doctor import CODES, SEVERITIES, _near_pairs, diagnose, quarantine
from tlkit.errors import ConfigError, DataError

from corpus import build_corpus, picture, png_header_claiming, save, unreadable, with_noise

def tree(root):
    """Every path under `root`, symlinks listed but not followed."""
    return sorted(os.path.join(folder, name) for folder, dirs, files in os.walk(root)
                  for name in dirs + files)


def by_path(report, code=None):
    """path -> list of findings (of one code, if given)."""
    found = {}
    for f in report.findings:
        if code is None or f.code == code:
            found.setdefault(f.path, []).append(f)
    return found


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """The corpus, doctor's report on it and fit's loader's view of it (same seed)."""
    root = tmp_path_factory.mktemp("hostile") / "data"
    corpus = build_corpus(root)
    with unreadable(corpus["locked"]):
        report = diagnose(root, workers=4, verbose=0)
        loaded = tdata.load_image_data(
            DataConfig(str(root), image_size=8, cache="memory", workers=2), seed=42, verbose=0)
    loaded.close()
    return root, corpus, report, loaded


# The hostile corpus -----------------------------------------------------------------------


def test_every_bad_file_is_an_error_with_its_code(hostile):
    _, corpus, report, _ = hostile
    errors = {f.path: f.code for f in report.errors}
    assert errors == corpus["errors"]
    for f in report.errors:
        assert f.severity == "error" and f.message
    messages = {f.path: f.message for f in report.errors}
    assert "bomb" in messages[str(Path(report.data_dir) / "a" / "bomb.png")]
    assert "<!DOCTYPE html>" in messages[str(Path(report.data_dir) / "a" / "page.png")]


def test_errors_are_exactly_the_files_fit_skips(hostile):
    _, corpus, report, loaded = hostile
    assert sorted(path for path, _ in loaded.skipped) == sorted(f.path for f in report.errors)


def test_good_files_are_usable_with_only_their_expected_notes(hostile):
    _, corpus, report, _ = hostile
    errors = {f.path for f in report.errors}
    assert not errors & set(corpus["good"])
    assert sorted(f for files in report.splits.values() for f in files) == corpus["good"]
    leak_codes = {"split_leak", "near_duplicate", "imbalance"}
    found = {path: {f.code for f in items if f.code not in leak_codes}
             for path, items in by_path(report).items() if path not in errors}
    found = {path: codes for path, codes in found.items() if codes}
    expected = {path: codes for path, codes in corpus["notes"].items() if codes}
    assert found == expected  # nested, unicode and spaced names among the silent ones


def test_info_findings_describe_the_conversion(hostile):
    _, corpus, report, _ = hostile
    a = Path(report.data_dir) / "a"
    messages = {(f.path, f.code): f.message for f in report.findings}
    assert "3 frames" in messages[str(a / "anim.gif"), "animated"]
    assert "2 pages" in messages[str(a / "pages.tiff"), "multi_page"]
    assert "CMYK" in messages[str(a / "cmyk.jpg"), "converted_mode"]
    assert "16-bit" in messages[str(a / "sixteen.png"), "converted_mode"]
    assert "transparency" in messages[str(a / "palette.png"), "converted_mode"]
    assert "alpha" in messages[str(a / "la.png"), "converted_mode"]
    assert "orientation 6" in messages[str(a / "rotated.jpg"), "exif_rotated"]
    assert "PNG" in messages[str(a / "wrong_ext.jpg"), "wrong_extension"]
    assert "6x6" in messages[str(a / "tiny.png"), "tiny"]
    for f in report.findings:
        assert f.severity == CODES[f.code]


def test_split_leak_names_both_twins_on_opposite_sides_of_fits_split(hostile):
    _, corpus, report, loaded = hostile
    twins = corpus["twins"]
    fit_split = {path: name for name, split in loaded.splits.items() for path in split.files}
    in_val = [t for t in twins if fit_split[t] == "val"]
    in_train = [t for t in twins if fit_split[t] == "train"]
    assert len(in_val) == 1 and len(in_train) == 2
    leaks = by_path(report, "split_leak")
    assert list(leaks) == in_val, "only the val twin leaks"
    (leak,) = leaks[in_val[0]]
    assert set(leak.related) == set(in_train)
    assert in_train[0] in leak.message and "'val'" in leak.message and "'train'" in leak.message
    near = by_path(report, "near_duplicate")
    assert list(near) == [in_train[1]]
    assert near[in_train[1]][0].related == (in_train[0],)
    assert leak.severity == "warning"
    warnings = [f.code for f in report.findings if f.severity == "warning"]
    assert warnings[0] == "split_leak", "leaks come first among warnings"


def test_exact_duplicates_within_and_across_classes(hostile):
    root, _, report, _ = hostile
    (dup,) = by_path(report, "duplicate")[str(root / "a" / "copy_of_a_00.png")]
    assert dup.related == (str(root / "a" / "a_00.png"),)
    (cross,) = by_path(report, "cross_class_duplicate")[str(root / "b" / "same_as_a_01.png")]
    assert cross.related == (str(root / "a" / "a_01.png"),)
    assert "'a'" in cross.message and "label" in cross.message


def test_ignored_entries_and_class_imbalance(hostile):
    root, corpus, report, loaded = hostile
    ignored = dict(report.ignored)
    for path in corpus["ignored"]:
        assert path in ignored
    assert "symlink" in ignored[str(root / "a" / "loop_dir")]
    assert report.class_counts == {"a": 22, "b": 9, "c": 3}
    assert report.imbalance == pytest.approx(22 / 3)
    (imbalance,) = by_path(report, "imbalance")[str(root)]
    assert "'a'" in imbalance.message and "'c'" in imbalance.message


def test_a_class_without_a_usable_image_is_named(image_folder):
    root = image_folder(classes=("a",), per_class=3)
    (root / "b").mkdir()
    (root / "b" / "broken.png").write_bytes(b"")
    report = diagnose(root, verbose=0)
    assert [(f.path, f.code) for f in report.errors] == [(str(root / "b" / "broken.png"),
                                                          "empty")]
    assert report.class_counts == {"a": 3, "b": 0} and report.imbalance is None
    (imbalance,) = by_path(report, "imbalance")[str(root)]
    assert "no usable image in class 'b'" in imbalance.message
    assert json.loads(json.dumps(report.to_dict()))["imbalance"] is None


def test_splits_equal_fits_on_the_hostile_corpus(hostile):
    _, _, report, loaded = hostile
    for name in tdata.SPLITS:
        fit_files = loaded.splits[name].files if name in loaded.splits else []
        assert list(report.splits[name]) == fit_files, name


def test_to_dict_is_json_ready(hostile):
    _, corpus, report, _ = hostile
    values = json.loads(json.dumps(report.to_dict()))
    assert values["summary"]["files"] == len(report.files)
    assert values["summary"]["error"] == len(corpus["errors"])
    assert {f["path"]: f["code"] for f in values["findings"] if f["severity"] == "error"} \
        == corpus["errors"]
    assert values["class_counts"] == {"a": 22, "b": 9, "c": 3}
    assert sorted(values["splits"]["val"]) == sorted(report.splits["val"])
    assert {item["path"] for item in values["ignored"]} >= set(corpus["ignored"])


def test_to_table_names_every_error_file_and_the_class_counts(hostile):
    root, corpus, report, _ = hostile
    table = report.to_table()
    lines = table.splitlines()
    for path, code in corpus["errors"].items():
        assert any(path in line and f"[{code}]" in line for line in lines), path
    for f in report.findings:
        assert f.path in table
    row = next(line for line in lines if line.startswith("c "))
    assert row.split() == ["c", "3", "0", "2", "1"]  # files, errors, train, val
    headings = [line.split(" (")[0] for line in lines
                if line.startswith(("Errors (", "Warnings (", "Info (", "Ignored ("))]
    assert headings == ["Errors", "Warnings", "Info", "Ignored"]
    assert f"Errors ({len(corpus['errors'])})" in table


@pytest.mark.parametrize("claim, max_pixels", [
    ((100_000, 100_000), None),  # so large that Pillow itself refuses to open it
    ((300, 200), 50_000),  # opens, but has more pixels than max_pixels
])
def test_a_bomb_is_refused_from_its_header_and_never_decoded(tmp_path, monkeypatch, claim,
                                                             max_pixels):
    root = write_image_folder(tmp_path / "data", per_class=3)
    bomb = root / "a" / "bomb.png"
    bomb.write_bytes(png_header_claiming(*claim))
    decoded = []
    real_load = ImageFile.ImageFile.load

    def spy(image):
        if image.tile:  # pixels still to decode (later calls are no-ops)
            decoded.append(image.filename)
        return real_load(image)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    options = {"max_pixels": max_pixels} if max_pixels else {}
    report = diagnose(root, verbose=0, workers=1, **options)
    assert [(f.path, f.code) for f in report.errors] == [(str(bomb), "bomb")]
    assert str(bomb) not in decoded
    assert sorted(decoded) == sorted(str(p) for p in root.rglob("*_00?.png")), \
        "each good file is decoded once"


def test_fifo_and_self_link_are_skipped_not_a_hang(tmp_path):
    root = write_image_folder(tmp_path / "data", per_class=3)
    fifo = root / "b" / "pipe.jpg"
    os.mkfifo(fifo)  # opening it would wait forever for a writer
    result = {}
    worker = threading.Thread(target=lambda: result.update(report=diagnose(root, verbose=0)),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "diagnose blocks on a FIFO"
    report = result["report"]
    assert report.errors == [] and str(fifo) not in report.files
    assert (str(fifo), "not a regular file (a FIFO, device or broken link)") in report.ignored


# fit's split, on clean data -----------------------------------------------------------------


@pytest.mark.parametrize("seed, val_split, test_split", [(42, 0.2, 0.0), (7, 0.25, 0.2)])
def test_split_equals_load_image_data(image_folder, seed, val_split, test_split):
    root = image_folder(classes=("a", "b", "c"), per_class=9, size=16)
    loaded = tdata.load_image_data(
        DataConfig(str(root), val_split=val_split, test_split=test_split, image_size=8,
                   cache="memory"), seed=seed, verbose=0)
    loaded.close()
    report = diagnose(root, val_split=val_split, test_split=test_split, seed=seed, verbose=1)
    for name in tdata.SPLITS:
        fit_files = loaded.splits[name].files if name in loaded.splits else []
        assert list(report.splits[name]) == fit_files, name
    assert len(report.splits["val"]) == 3 * round(9 * val_split)
    assert report.errors == []


# quarantine -------------------------------------------------------------------------------


def test_quarantine_moves_exactly_the_error_files(tmp_path):
    root = tmp_path / "data"
    corpus = build_corpus(root)
    with unreadable(corpus["locked"]):
        report = diagnose(root, verbose=0)
    dest = tmp_path / "quarantine"
    taken = dest / "a" / "empty.jpg"  # a file already there is never overwritten
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"keep me")
    before = tree(root)

    moved = quarantine(report, dest)

    assert sorted(src for src, _ in moved) == sorted(corpus["errors"])
    for src, dst in moved:
        assert not os.path.lexists(src)
        assert os.path.lexists(dst)
        assert Path(dst).relative_to(dest).parent == Path(src).relative_to(root).parent
    moved_to = dict(moved)
    assert taken.read_bytes() == b"keep me"
    assert moved_to[str(root / "a" / "empty.jpg")] == str(dest / "a" / "empty-1.jpg")
    assert Path(moved_to[str(root / "a" / "bomb.png")]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert tree(root) == sorted(set(before) - set(corpus["errors"]))
    again = diagnose(root, verbose=0)
    assert again.errors == []
    assert sorted(f for files in again.splits.values() for f in files) == corpus["good"]


@pytest.mark.parametrize("inside", [".", "a/quarantine", "new/folder"])
def test_quarantine_refuses_a_destination_inside_the_data_folder(image_folder, inside):
    root = image_folder(per_class=3)
    (root / "a" / "broken.png").write_bytes(b"")
    report = diagnose(root, verbose=0)
    with pytest.raises(ValueError, match="outside the data folder") as info:
        quarantine(report, root / inside)
    assert "dest_dir=" in str(info.value)
    assert (root / "a" / "broken.png").exists()


def test_quarantine_with_nothing_to_move(image_folder, tmp_path):
    report = diagnose(image_folder(per_class=3), verbose=0)
    assert quarantine(report, tmp_path / "q") == []


def test_quarantine_checks_its_report_argument(tmp_path):
    with pytest.raises(ConfigError, match="DoctorReport"):
        quarantine({"findings": []}, tmp_path / "q")


# Arguments and helpers --------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("val_split", 1.5), ("val_split", 0.0), ("test_split", -0.1), ("seed", -1), ("seed", 1.5),
    ("workers", -2), ("max_pixels", 0), ("min_size", -1), ("near_duplicates", "yes"),
    ("verbose", 5),
])
def test_diagnose_rejects_bad_arguments_naming_them(image_folder, option, value):
    root = image_folder(per_class=3)
    with pytest.raises(ConfigError, match=f"`{option}`") as info:
        diagnose(root, **{"verbose": 0, option: value})
    assert f"{option}=" in str(info.value)


def test_diagnose_missing_folder_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        diagnose(tmp_path / "nope", verbose=0)


def test_near_duplicates_can_be_turned_off(tmp_path):
    root = tmp_path / "data"
    for index in range(4):
        save(root / "a" / f"a{index}.png", picture(100 + index))
        save(root / "b" / f"b{index}.png", picture(200 + index))
    save(root / "b" / "twin.png", with_noise(picture(100), 3))
    found = {f.code for f in diagnose(root, verbose=0).findings}
    assert found & {"split_leak", "near_duplicate"}
    report = diagnose(root, verbose=0, near_duplicates=False)
    assert not {f.code for f in report.findings} & {"split_leak", "near_duplicate"}
    assert report.settings["near_duplicates"] is False


def test_near_pairs_finds_every_pair_within_the_threshold():
    rng = np.random.default_rng(0)
    hashes = [int(h) for h in rng.integers(0, 2**63, 300, dtype=np.uint64)]
    for flips in range(1, 7):  # plant pairs 1..6 bits apart
        bits = rng.choice(64, flips, replace=False)
        hashes.append(hashes[flips] ^ int(sum(1 << int(b) for b in bits)))
    brute = [(i, j, bin(hashes[i] ^ hashes[j]).count("1"))
             for i in range(len(hashes)) for j in range(i + 1, len(hashes))]
    expected = sorted(p for p in brute if p[2] <= 4)
    assert len(expected) >= 4
    assert sorted(_near_pairs(hashes, 4)) == expected


def test_severities_and_codes_are_consistent():
    assert set(CODES.values()) == set(SEVERITIES)


def test_doctor_command_table_json_and_quarantine(tmp_path):
    from click.testing import CliRunner

    from tlkit.cli import main

    root = write_image_folder(tmp_path / "data", per_class=4)
    (root / "a" / "broken.png").write_bytes(b"<html>not an image</html>")
    runner = CliRunner()
    table = runner.invoke(main, ["doctor", str(root)])
    assert table.exit_code == 1 and "broken.png" in table.stdout
    as_json = runner.invoke(main, ["doctor", str(root), "--format", "json"])
    payload = json.loads(as_json.stdout)
    assert [f["path"] for f in payload["findings"] if f["severity"] == "error"] == [
        str(root / "a" / "broken.png")]
    moved = runner.invoke(main, ["doctor", str(root), "--quarantine", str(tmp_path / "q")])
    assert moved.exit_code == 0, moved.output
    assert (tmp_path / "q" / "a" / "broken.png").is_file()
    assert not (root / "a" / "broken.png").exists()
    assert runner.invoke(main, ["doctor", str(root)]).exit_code == 0


def test_fit_warns_when_near_duplicates_straddle_its_split(tmp_path):
    import tlkit
    from PIL import Image

    folder = write_image_folder(tmp_path / "twins", per_class=10, size=32)
    for original in sorted(folder.rglob("*.png")):  # a retouched copy of every image
        pixels = np.array(Image.open(original))
        pixels[0, 0] ^= 1
        Image.fromarray(pixels).save(original.with_name(f"{original.stem}_copy.png"))
    result = tlkit.fit(folder, backbone="scratch", image_size=32, epochs=1, augment="none",
                       flip="none", runs_dir=tmp_path / "runs", export_dir=tmp_path / "sm",
                       verbose=0)
    (warning,) = [w for w in json.loads((result.run_dir / "data.json").read_text())["warnings"]
                  if "straddle the splits" in w]
    assert "near-duplicate image pair(s)" in warning and f"tlkit doctor {folder}" in warning

"""The loader: folder scan, stratified split, decoding with skipped files, caches, datasets."""

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tlkit import data as tdata
from tlkit import images
from tlkit.augment import build_augmenter
from tlkit.config import DataConfig
from tlkit.errors import DataError

# Helpers ----------------------------------------------------------------------------------


def write_png(path, pixels):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path)
    return path


def noise(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def write_id_folder(root, classes=("a", "b", "c"), per_class=8, size=8):
    """Solid images whose pixels encode their identity: red = 40 * label + 20, green = id.

    Returns the folder and a dict from file path to (label, id).
    """
    root = Path(root)
    truth = {}
    for label, name in enumerate(classes):
        for index in range(per_class):
            ident = label * per_class + index
            pixels = np.empty((size, size, 3), np.uint8)
            pixels[...] = (40 * label + 20, ident, 255 - ident)
            truth[str(write_png(root / name / f"{index:03d}.png", pixels))] = (label, ident)
    return root, truth


def truncated_jpeg_bytes():
    buffer = io.BytesIO()
    Image.fromarray(noise(99, 64)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


def config(data_dir, **options):
    options.setdefault("image_size", 8)
    options.setdefault("cache", "memory")
    options.setdefault("workers", 2)
    return DataConfig(str(data_dir), **options)


def load(data_dir, seed=0, **options):
    return tdata.load_image_data(config(data_dir, **options), seed=seed, verbose=0)


def batches(dataset):
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in dataset))
    return list(xs), list(ys)


# scan_folder ------------------------------------------------------------------------------


def test_scan_folder_classes_are_sorted_subfolders_with_matching_labels(tmp_path):
    for name in ("c_eel", "a_dog", "b_cat"):
        for index in range(2):
            write_png(tmp_path / name / f"{name}_{index}.png", noise(index))
    scan = tdata.scan_folder(tmp_path)
    assert scan.class_names == ("a_dog", "b_cat", "c_eel")
    assert len(scan.files) == len(scan.labels) == 6
    for path, label in zip(scan.files, scan.labels):
        assert Path(path).parent.name == scan.class_names[label]
    assert scan.root == str(tmp_path)


def test_scan_folder_nested_images_belong_to_top_level_class(tmp_path):
    write_png(tmp_path / "a" / "top.png", noise(1))
    write_png(tmp_path / "a" / "sub" / "deeper" / "deep.png", noise(2))
    write_png(tmp_path / "b" / "x" / "only_nested.jpg", noise(3))
    scan = tdata.scan_folder(tmp_path)
    assert scan.class_names == ("a", "b")  # "sub", "x", "deeper" are not classes
    by_name = {Path(f).name: scan.class_names[label] for f, label in zip(scan.files, scan.labels)}
    assert by_name == {"top.png": "a", "deep.png": "a", "only_nested.jpg": "b"}


def test_scan_folder_ignores_hidden_and_non_image_entries(tmp_path):
    good = [write_png(tmp_path / "a" / "one.png", noise(1)),
            write_png(tmp_path / "a" / "TWO.JPG", noise(2)),
            write_png(tmp_path / "b" / "three.png", noise(3))]
    write_png(tmp_path / "a" / ".hidden" / "secret.png", noise(4))
    write_png(tmp_path / ".hidden_class" / "x.png", noise(5))
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    notes = tmp_path / "a" / "notes.txt"
    notes.write_text("labels were checked by hand\n")
    thumbs = tmp_path / "b" / "Thumbs.db"
    thumbs.write_bytes(b"\xd0\xcf\x11\xe0")
    scan = tdata.scan_folder(tmp_path)
    assert scan.class_names == ("a", "b")
    assert sorted(scan.files) == sorted(str(p) for p in good)
    ignored = dict(scan.ignored)
    assert str(notes) in ignored and str(thumbs) in ignored
    assert "extension" in ignored[str(notes)]
    for hidden in (tmp_path / "a" / ".hidden", tmp_path / "a" / ".DS_Store"):
        assert str(hidden) in ignored and ignored[str(hidden)] == "hidden"
    assert not any(".hidden" in f or ".DS_Store" in f for f in scan.files)


def scan_within(folder, seconds, message):
    """`scan_folder(folder)`, failing with `message` if it has not returned in `seconds`."""
    result = {}
    worker = threading.Thread(target=lambda: result.update(scan=tdata.scan_folder(folder)),
                              daemon=True)
    worker.start()
    worker.join(timeout=seconds)
    assert not worker.is_alive(), message
    return result["scan"]


def test_scan_folder_does_not_follow_symlinked_folders_or_loops(tmp_path):
    data_dir = tmp_path / "data"
    outside = tmp_path / "outside"
    write_png(data_dir / "a" / "a0.png", noise(1))
    write_png(data_dir / "b" / "b0.png", noise(2))
    write_png(outside / "elsewhere.png", noise(3))
    (data_dir / "a" / "linked").symlink_to(outside, target_is_directory=True)
    (data_dir / "b" / "loop").symlink_to(data_dir / "b", target_is_directory=True)
    (data_dir / "b" / "sub").mkdir()
    (data_dir / "b" / "sub" / "up").symlink_to(data_dir, target_is_directory=True)
    scan = scan_within(data_dir, 20, "scan_folder hangs on a symlink loop")
    assert sorted(Path(f).name for f in scan.files) == ["a0.png", "b0.png"]
    ignored = dict(scan.ignored)
    for link in ("a/linked", "b/loop", "b/sub/up"):
        assert "symlink" in ignored[str(data_dir / link)]


def test_scan_folder_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        tdata.scan_folder(tmp_path / "nope")
    assert "nope" in str(info.value)


def test_scan_folder_file_instead_of_folder(tmp_path):
    path = write_png(tmp_path / "image.png", noise(1))
    with pytest.raises(DataError, match="not a folder") as info:
        tdata.scan_folder(path)
    assert str(path) in str(info.value)


def test_scan_folder_without_subfolders(tmp_path):
    write_png(tmp_path / "loose.png", noise(1))
    with pytest.raises(DataError, match="no class subfolders") as info:
        tdata.scan_folder(tmp_path)
    assert "<class>" in str(info.value)


def test_scan_folder_class_without_images(tmp_path):
    write_png(tmp_path / "a" / "a0.png", noise(1))
    (tmp_path / "empty_class").mkdir()
    (tmp_path / "empty_class" / "readme.txt").write_text("nothing here")
    with pytest.raises(DataError, match="no image files") as info:
        tdata.scan_folder(tmp_path)
    assert "empty_class" in str(info.value)


# split_indices ----------------------------------------------------------------------------


def _distinct(n):
    return [f"digest-{i}" for i in range(n)]


def _labels(counts):
    return np.repeat(np.arange(len(counts)), counts)


def _check_partition(parts, n):
    together = np.concatenate([parts[name] for name in tdata.SPLITS])
    assert sorted(together.tolist()) == list(range(n)), "an index is missing or in two splits"
    for name in tdata.SPLITS:
        assert (np.diff(parts[name]) > 0).all()


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_indices_is_stratified_and_a_partition(seed):
    counts = [10, 25, 7, 40, 3]
    labels = _labels(counts)
    parts = tdata.split_indices(labels, _distinct(len(labels)), {"val": 0.2}, seed)
    _check_partition(parts, len(labels))
    assert len(parts["test"]) == 0
    for label, n in enumerate(counts):
        in_val = int((labels[parts["val"]] == label).sum())
        assert abs(in_val - round(n * 0.2)) <= 1, (label, n, in_val)
        assert (labels[parts["train"]] == label).sum() == n - in_val


def test_split_indices_is_deterministic_per_seed():
    labels = _labels([30, 30, 30])
    digests = _distinct(90)
    first = tdata.split_indices(labels, digests, {"val": 0.2}, 5)
    again = tdata.split_indices(labels, digests, {"val": 0.2}, 5)
    other = tdata.split_indices(labels, digests, {"val": 0.2}, 6)
    for name in tdata.SPLITS:
        np.testing.assert_array_equal(first[name], again[name])
    assert not np.array_equal(first["val"], other["val"])


def test_split_indices_test_split_makes_a_third_stratified_split():
    counts = [20, 30, 50]
    labels = _labels(counts)
    parts = tdata.split_indices(labels, _distinct(100), {"val": 0.2, "test": 0.1}, 3)
    _check_partition(parts, 100)
    for label, n in enumerate(counts):
        for name, fraction in (("val", 0.2), ("test", 0.1)):
            share = int((labels[parts[name]] == label).sum())
            assert abs(share - round(n * fraction)) <= 1, (name, label, share)
        assert (labels[parts["train"]] == label).sum() > 0


@pytest.mark.parametrize("seed", range(12))
def test_split_indices_keeps_identical_files_in_one_split(seed):
    labels = _labels([12, 12, 12])
    digests = _distinct(36)
    groups = [[0, 5, 11], [3, 14], [7, 20, 30], [15, 16], [25, 26, 27, 35]]
    for number, group in enumerate(groups):  # within a class and across classes
        for index in group:
            digests[index] = f"same-{number}"
    parts = tdata.split_indices(labels, digests, {"val": 0.25, "test": 0.1}, seed)
    _check_partition(parts, 36)
    where = {int(i): name for name, indices in parts.items() for i in indices}
    for group in groups:
        assert len({where[i] for i in group}) == 1, (group, [where[i] for i in group])


# load_image_data --------------------------------------------------------------------------


def test_load_image_data_skips_bad_files_and_keeps_the_good(image_folder):
    root = image_folder(classes=("a", "b"), per_class=6, size=12)
    good = sorted(str(p) for p in root.rglob("*.png"))
    bad = {
        root / "a" / "truncated.jpg": truncated_jpeg_bytes(),
        root / "a" / "empty.png": b"",
        root / "b" / "text.png": b"this is a text file, not a PNG\n",
    }
    for path, content in bad.items():
        path.write_bytes(content)
    loaded = load(root, seed=3)
    try:
        skipped = dict(loaded.skipped)
        assert sorted(skipped) == sorted(str(p) for p in bad)
        assert "empty" in skipped[str(root / "a" / "empty.png")]
        assert "not an image" in skipped[str(root / "b" / "text.png")]
        assert "truncated" in skipped[str(root / "a" / "truncated.jpg")]
        used = sorted(f for split in loaded.splits.values() for f in split.files)
        assert used == good
        assert set(loaded.splits) == {"train", "val"}
        summary = loaded.summary()
        assert "Skipped 3" in summary
        for path in bad:
            assert str(path) in summary and skipped[str(path)] in summary
        report = loaded.report()
        assert sorted(item["file"] for item in report["skipped"]) == sorted(skipped)
    finally:
        loaded.close()


def test_load_image_data_cached_pixels_are_the_image_contract(image_folder):
    root = image_folder(classes=("a", "b"), per_class=4, size=20)
    loaded = load(root, image_size=12, resize="pad")
    try:
        for split in loaded.splits.values():
            for image, path, label in zip(split.images, split.files, split.labels):
                np.testing.assert_array_equal(image, images.load_image(path, 12, "pad"))
                assert Path(path).parent.name == loaded.class_names[label]
    finally:
        loaded.close()


def test_load_image_data_one_class_is_an_error(image_folder):
    root = image_folder(classes=("only",), per_class=4)
    with pytest.raises(DataError, match="one class") as info:
        load(root)
    assert "'only'" in str(info.value)


def test_load_image_data_class_with_only_corrupt_files_is_an_error(image_folder):
    root = image_folder(classes=("good",), per_class=4)
    (root / "broken").mkdir()
    (root / "broken" / "x.png").write_bytes(b"")
    (root / "broken" / "y.jpg").write_bytes(truncated_jpeg_bytes())
    with pytest.raises(DataError) as info:
        load(root)
    assert "'broken'" in str(info.value)


def test_load_image_data_val_dir_is_the_validation_split(tmp_path):
    train_dir, _ = write_id_folder(tmp_path / "train", classes=("a", "b"), per_class=5)
    val_dir, _ = write_id_folder(tmp_path / "val", classes=("a", "b"), per_class=2)
    (val_dir / "a" / "bad.png").write_bytes(b"")
    loaded = load(train_dir, val_dir=str(val_dir))
    try:
        val, train = loaded.splits["val"], loaded.splits["train"]
        expected_val = sorted(str(p) for p in val_dir.rglob("*.png") if p.name != "bad.png")
        assert sorted(val.files) == expected_val
        assert sorted(train.files) == sorted(str(p) for p in train_dir.rglob("*.png"))
        assert "test" not in loaded.splits
        assert dict(loaded.skipped).keys() == {str(val_dir / "a" / "bad.png")}
        for image, path, label in zip(val.images, val.files, val.labels):
            np.testing.assert_array_equal(image, images.load_image(path, 8))
            assert Path(path).parent.name == loaded.class_names[label]
    finally:
        loaded.close()


def test_load_image_data_val_dir_with_unknown_class_is_an_error(tmp_path):
    train_dir, _ = write_id_folder(tmp_path / "train", classes=("a", "b"), per_class=3)
    val_dir, _ = write_id_folder(tmp_path / "val", classes=("a", "zzz"), per_class=1)
    with pytest.raises(DataError, match="zzz"):
        load(train_dir, val_dir=str(val_dir))


def test_load_image_data_test_split(tmp_path):
    root, _ = write_id_folder(tmp_path / "d", classes=("a", "b"), per_class=10)
    loaded = load(root, val_split=0.2, test_split=0.2)
    try:
        assert set(loaded.splits) == {"train", "val", "test"}
        for name in ("val", "test"):
            assert loaded.splits[name].class_counts(2).tolist() == [2, 2]
        assert loaded.splits["train"].class_counts(2).tolist() == [6, 6]
    finally:
        loaded.close()


def test_disk_cache_equals_memory_cache_and_is_removed_on_close(tmp_path):
    root, _ = write_id_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=6)
    for index in range(6):  # add some texture so equal pixels are not trivial
        write_png(root / "a" / f"noise_{index}.png", noise(index, 16))
    cache_dir = tmp_path / "cache"
    memory = load(root, seed=4, cache="memory", image_size=10)
    disk = load(root, seed=4, cache="disk", cache_dir=str(cache_dir), image_size=10)
    try:
        assert memory.splits["train"].cache.mode == "memory"
        assert disk.splits["train"].cache.mode == "disk"
        assert isinstance(disk.splits["train"].cache.array, np.memmap)
        assert len([p for p in cache_dir.rglob("*") if p.is_file()]) == 1
        assert set(memory.splits) == set(disk.splits)
        for name in memory.splits:
            m, d = memory.splits[name], disk.splits[name]
            assert m.files == d.files
            np.testing.assert_array_equal(m.labels, d.labels)
            np.testing.assert_array_equal(m.images, d.images)
            m_x, m_y = batches(tdata.make_dataset(m, batch_size=4))
            d_x, d_y = batches(tdata.make_dataset(d, batch_size=4))
            assert len(m_x) == len(d_x) == -(-len(m) // 4)
            for a, b in zip(m_x + m_y, d_x + d_y):
                np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(np.concatenate(m_x), m.images.astype(np.float32))
            np.testing.assert_array_equal(np.concatenate(m_y), m.labels)
    finally:
        memory.close()
        disk.close()
    assert [p for p in cache_dir.rglob("*") if p.is_file()] == []


def test_disk_cache_with_val_dir_removes_every_file_on_close(tmp_path):
    train_dir, _ = write_id_folder(tmp_path / "train", classes=("a", "b"), per_class=3)
    val_dir, _ = write_id_folder(tmp_path / "val", classes=("a", "b"), per_class=1)
    cache_dir = tmp_path / "cache"
    loaded = load(train_dir, val_dir=str(val_dir), cache="disk", cache_dir=str(cache_dir))
    assert len([p for p in cache_dir.rglob("*") if p.is_file()]) == 2
    loaded.close()
    assert [p for p in cache_dir.rglob("*") if p.is_file()] == []


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_shuffled_batches_keep_labels_with_their_images(tmp_path, cache):
    root, truth = write_id_folder(tmp_path / "d", classes=("a", "b", "c"), per_class=8)
    loaded = load(root, seed=1, cache=cache, cache_dir=str(tmp_path / "cache"))
    try:
        train = loaded.splits["train"]
        cached = {int(image[0, 0, 1]): (image, label)
                  for image, label in zip(train.images, train.labels)}
        assert len(cached) == len(train)
        for path, label in zip(train.files, train.labels):  # cache matches the files
            assert truth[path][0] == label and truth[path][1] in cached
        dataset = tdata.make_dataset(train, batch_size=5, shuffle=True, seed=11)
        orders = []
        for _ in range(2):
            order = []
            for x, y in dataset:
                assert x.dtype.name == "float32" and y.dtype.name == "int64"
                for image, label in zip(x.numpy(), y.numpy()):
                    ident = int(image[0, 0, 1])
                    cached_image, cached_label = cached[ident]
                    np.testing.assert_array_equal(image, cached_image.astype(np.float32))
                    assert label == cached_label
                    assert image[0, 0, 0] == 40 * label + 20  # the file's own pixels say so
                    order.append(ident)
            assert sorted(order) == sorted(cached)  # every image once per epoch
            orders.append(order)
        assert orders[0] != orders[1], "the order must change between epochs"
        again = [int(i) for x, _ in tdata.make_dataset(train, 5, shuffle=True, seed=11)
                 for i in x.numpy()[:, 0, 0, 1]]
        assert again == orders[0], "the same seed must give the same first epoch"
    finally:
        loaded.close()


def test_make_dataset_with_augmenter_gives_float32_in_pixel_range(tmp_path):
    root = tmp_path / "d"
    for label, name in enumerate(("a", "b")):
        for index in range(6):
            pixels = noise(label * 10 + index, 16)
            pixels[:8] = 255  # saturated areas push brightness/contrast to the limits
            write_png(root / name / f"{index}.png", pixels)
    loaded = load(root, image_size=16, seed=2)
    try:
        augmenter = build_augmenter("standard", "horizontal", seed=1)
        train = loaded.splits["train"]
        dataset = tdata.make_dataset(train, batch_size=4, shuffle=True, seed=1,
                                     augmenter=augmenter)
        seen, changed = 0, False
        originals = train.images.astype(np.float32)
        for _ in range(2):
            for x, y in dataset:
                assert x.dtype.name == "float32"
                assert tuple(x.shape[1:]) == (16, 16, 3)
                values = x.numpy()
                assert values.min() >= -0.5 and values.max() <= 255.5
                changed |= not any(np.array_equal(v, o) for v in values for o in originals)
                seen += len(y)
        assert seen == 2 * len(train)
        assert changed, "the augmenter left every image untouched"
    finally:
        loaded.close()


# The bundled digits -----------------------------------------------------------------------


def test_digits_have_10_classes_and_1797_files(digits_dir):
    scan = tdata.scan_folder(digits_dir)
    assert scan.class_names == tuple(str(d) for d in range(10))
    assert len(scan.files) == 1797
    assert [p for p, reason in scan.ignored if reason != "hidden"] == []


def test_digits_default_split_is_stratified(digits_dir):
    loaded = tdata.load_image_data(
        DataConfig(str(digits_dir), image_size=8, cache="memory"), verbose=0
    )
    try:
        assert loaded.skipped == []
        assert set(loaded.splits) == {"train", "val"}
        per_class = np.bincount(tdata.scan_folder(digits_dir).labels, minlength=10)
        val = loaded.splits["val"].class_counts(10)
        train = loaded.splits["train"].class_counts(10)
        np.testing.assert_array_equal(val + train, per_class)
        for n, v in zip(per_class, val):
            assert abs(int(v) - round(n * 0.2)) <= 1
        assert not set(loaded.splits["val"].files) & set(loaded.splits["train"].files)
    finally:
        loaded.close()


def test_scan_skips_fifos_and_broken_links_instead_of_hanging(tmp_path):
    import os

    from conftest import write_image_folder

    root = write_image_folder(tmp_path / "data", per_class=3)
    os.mkfifo(root / "a" / "pipe.png")
    (root / "b" / "gone.png").symlink_to(root / "b" / "missing.png")
    scan = scan_within(root, 20, "scan_folder blocked")
    ignored = dict(scan.ignored)
    for name in ("a/pipe.png", "b/gone.png"):
        assert ignored[str(root / name)].startswith("not a regular file")
        assert str(root / name) not in scan.files


def test_auto_cache_counts_memory_the_system_can_reclaim():
    from tlkit.data import _available_memory

    meminfo = {key: int(value.split()[0]) * 1024 for key, value in
               (line.split(":", 1) for line in open("/proc/meminfo"))}
    # Other processes move both figures a little between the two readings.
    assert abs(_available_memory() - meminfo["MemAvailable"]) < 256 << 20

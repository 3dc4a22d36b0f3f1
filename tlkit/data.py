"""From a folder of images to training tensors: scan, validate, decode once, split, batch.

    DATA_DIR/<class>/**/<image>  --scan_folder-->  files and labels
    (or a label file, path,label[,split] rows  --scan_labels-->  the same; `scan_data` picks)
        --decode (threads, Pillow, the image contract)-->  uint8 cache (RAM or disk)
        --split_indices (stratified, seeded, duplicates together)-->  train / val / test
        --make_dataset-->  tf.data batches (shuffled, augmented when training, prefetched)

Every file is decoded once, before training starts: a file that fails is skipped and listed
with its reason, so a bad image can never stop an epoch halfway.
"""

import csv
import hashlib
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


import numpy as np
import tensorflow as tf
from PIL import Image

from tlkit import images as image_ops
from tlkit.errors import ConfigError, DataError, ImageError

SPLITS = ("train", "val", "test")

LABEL_COLUMNS = ("path", "label")
"""The columns every label file has (`scan_labels`)."""

SPLIT_COLUMN = "split"
"""A label file's optional column that fixes each file's split (one of `SPLITS`)."""

MAX_LISTED_LINES = 10
"""Most bad lines of a label file one error message lists (it gives the total too)."""

LABEL_SEPARATOR = ";"
"""What separates the labels of one image in a label file's label cell (`multi_label`)."""


def image_extensions():
    """The file extensions tlkit treats as images: every one Pillow registers a decoder for."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN)


@dataclass(frozen=True)
class FolderScan:
    """The image files found in a class-per-subfolder tree, or listed in a label file."""

    root: str  # the scanned folder (for a label file: the data folder, else the file's)
    class_names: tuple  # sorted names of the top-level subfolders, or of the labels
    files: tuple  # image file paths, sorted within each class
    labels: tuple  # class index of each file
    ignored: tuple  # (path, reason) of entries that are not images, not followed, repeated
    splits: tuple | None = None  # split name of each file, fixed by a label file, or None
    labels_file: str | None = None  # the label file read, or None for class subfolders
    multi_label: bool = False  # labels holds a tuple of class indices per file

    def label_matrix(self):
        """The labels as a multi-hot float32 matrix `(files, classes)`."""
        return multi_hot(self.labels, len(self.class_names))

    def describe(self):
        """Where the labels come from, for messages: the label file, or the data folder."""
        if self.labels_file is not None:
            return f"Label file {self.labels_file!r}"
        return f"Data folder {self.root!r}"


def multi_hot(labels, num_classes):
    """A float32 matrix `(n, num_classes)` with 1 at each class index of each row.

    Args:
        labels: per row, a class index or a sequence of class indices.
        num_classes: the number of columns.

    Example:

    >>> multi_hot([0, (1, 2)], 3).tolist()
    [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    """
    matrix = np.zeros((len(labels), num_classes), np.float32)
    for row, label in enumerate(labels):
        matrix[row, list(label) if isinstance(label, (tuple, list)) else label] = 1.0
    return matrix


def scan_data(data_dir, labels=None, class_names=None, multi_label=False):
    """Finds the labelled images of a data set: in class subfolders, or in a label file.

    Every reader of labelled images (`load_image_data`, `survey_folder`,
    `tlkit.doctor.diagnose`, `tlkit.evaluate.evaluate_folder`) scans through here.

    Args:
        data_dir: the data folder: one subfolder per class, or, with `labels`, the folder
            a label file's relative paths are looked up in after the file's own folder.
        labels: a label file (see `scan_labels`), or `None` for class subfolders.
        class_names: expected classes (a validation folder, a model's classes); `None`
            takes the classes found.
        multi_label: read a label file's label cells as `;`-separated label lists (see
            `scan_labels`). Class folders are scanned as they are: the same image in
            several of them is merged into one multi-label image after decoding
            (`load_image_data`).

    Returns:
        A `FolderScan`.

    Raises:
        DataError: as `scan_folder` or `scan_labels`.
    """
    if labels is None:
        return scan_folder(data_dir, class_names)
    return scan_labels(labels, data_dir, class_names, multi_label=multi_label)


def scan_folder(data_dir, class_names=None):
    """Finds the images in `data_dir`, one top-level subfolder per class.

    Images in nested folders belong to their top-level class. Hidden files and folders,
    files whose extension is not an image format Pillow reads, and symlinked folders (never
    followed, so links cannot loop) are listed in `ignored`.

    Args:
        data_dir: the folder to scan.
        class_names: expected classes (for a validation folder); `None` takes the
            subfolders found. A subfolder that is not one of them is an error.

    Returns:
        A `FolderScan`.

    Raises:
        DataError: if the folder is missing, has no class subfolders, or a class has no
            image files.
    """
    root = Path(data_dir)
    if not root.exists():
        raise DataError(f"Data folder {str(root)!r} does not exist.")
    if not root.is_dir():
        raise DataError(f"Data folder {str(root)!r} is not a folder.")
    extensions = image_extensions()
    ignored = []
    found = []
    for entry in sorted(root.iterdir()):
        reason = _skip_reason(entry)
        if reason is None and not entry.is_dir():
            reason = "not in a class folder (images go in DATA_DIR/<class>/)"
        if reason:
            ignored.append((str(entry), reason))
        else:
            found.append(entry.name)
    if not found:
        raise DataError(
            f"Data folder {str(root)!r} has no class subfolders. Put each class's images in "
            "its own subfolder: DATA_DIR/<class>/<image>."
        )
    if class_names is not None:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DataError(
                f"Folder {str(root)!r} has class folders {unknown} that are not among the "
                f"expected classes {list(class_names)}."
            )
    else:
        class_names = found
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_files = _walk_class(root / name, extensions, ignored) if name in found else []
        if not class_files and (root / name).exists():
            raise DataError(
                f"Class folder {str(root / name)!r} has no image files. Add images or remove "
                "the folder."
            )
        files += class_files
        labels += [label] * len(class_files)
    return FolderScan(str(root), tuple(class_names), tuple(files), tuple(labels), tuple(ignored))


def _skip_reason(entry):
    if entry.name.startswith("."):
        return "hidden"
    if entry.is_symlink() and entry.is_dir():
        return "symlinked folder (not followed)"
    return None


def _walk_class(folder, extensions, ignored):
    files = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        here = Path(dirpath)
        for name in list(dirnames):
            reason = _skip_reason(here / name)
            if reason:
                ignored.append((str(here / name), reason))
                dirnames.remove(name)
        dirnames.sort()
        for name in sorted(filenames):
            path = here / name
            reason = _skip_reason(path)
            if reason is None and path.suffix.lower() not in extensions:
                reason = "not an image file extension"
            if reason is None and not path.is_file():
                reason = "not a regular file (a FIFO, device or broken link)"
            if reason:
                ignored.append((str(path), reason))
            else:
                files.append(str(path))
    return sorted(files)


def scan_labels(labels_file, data_dir=None, class_names=None, multi_label=False):
    """Reads a label file: a CSV with a header row and one image per row.

    Columns: `path` and `label`, and optionally `split` (`train`, `val` or `test`; then
    every row needs one, and it fixes the split instead of `val_split`/`test_split`). Any
    other column is an error (a misspelt `split` must not silently become a random split).
    Column names and values have surrounding spaces stripped; names and split values are
    case-insensitive. A relative path is looked up next to the label file first, then in
    `data_dir`; an absolute path is used as it is. Blank lines are skipped. Class names
    are the sorted distinct labels.

    Every row is checked before anything is decoded, and every bad row is reported at
    once, by line number: an empty path or label, a file that is missing, a folder or not
    a regular file, an extension that is not an image format, a bad split value, a row
    with more fields than the header, the same path with two labels (or two splits). The
    same path listed again with the same label is kept once, and the repeat is listed in
    `ignored`. A file that is there but does not decode is left to the decoder, which
    skips and reports it as it does for class folders.

    Args:
        labels_file: the CSV file (UTF-8, comma-separated).
        data_dir: the second folder relative paths are looked up in; `None`: only the
            label file's folder.
        class_names: expected classes (a model's); `None` takes the labels found. A
            label that is not one of them is an error.
        multi_label: a label cell lists every label of its image, separated by `;`
            (`cat;dog`; spaces around each are stripped, empty parts dropped, a cell with
            no label left is an empty label). Class names are then the sorted distinct
            labels, and the scan's `labels` holds a tuple of class indices per file.

    Returns:
        A `FolderScan` whose `root` is `data_dir` (or the label file's folder),
        `labels_file` the file, and `splits` the split of each file when the `split`
        column is there (else `None`).

    Raises:
        ConfigError: if `labels_file` is not a path.
        DataError: naming the file, if it cannot be read as a CSV, lacks a column or
            has an unknown one, lists no image, or has bad rows (up to
            `MAX_LISTED_LINES` of them with their line numbers, and how many in all).

    Example:

    >>> scan = scan_labels("photos/labels.csv", "photos")
    >>> scan.class_names, scan.files[0]
    (('cat', 'dog'), 'photos/img/0001.jpg')
    """
    if not isinstance(labels_file, (str, os.PathLike)) or not os.fspath(labels_file):
        raise ConfigError(f"`labels_file` must be the path of a CSV file. Received: "
                          f"labels_file={labels_file!r}")
    source = Path(labels_file)
    where = f"Label file {str(source)!r}"
    if data_dir is not None and not Path(data_dir).is_dir():
        raise DataError(f"Data folder {str(data_dir)!r} does not exist or is not a folder.")
    rows, problems, split_column = _read_label_rows(source, where)
    bases = [source.parent]
    if data_dir is not None and Path(data_dir).resolve() != source.parent.resolve():
        bases.append(Path(data_dir))
    extensions = image_extensions()
    ignored, entries = [], {}  # entries: key -> (line, file, label, split)
    for line, path, label, split in rows:
        if multi_label:
            label = LABEL_SEPARATOR.join(sorted({part.strip() for part in
                                                 label.split(LABEL_SEPARATOR)} - {""}))
        problem, file = _label_row_problem(path, label, split, split_column, bases,
                                           extensions)
        if problem:
            problems.append((line, problem))
            continue
        key = os.path.normpath(os.path.abspath(file))
        if key in entries:
            first, _, first_label, first_split = entries[key]
            if (first_label, first_split) != (label, split):
                what, before, now = (("label", first_label, label) if first_label != label
                                     else ("split", first_split, split))
                problems.append((line, f"{path}: {what} {now!r}, but line {first} lists the "
                                       f"same file with {what} {before!r}"))
            else:
                ignored.append((file, f"listed again on line {line} of {source} (line "
                                      f"{first} is used)"))
            continue
        entries[key] = (line, file, label, split)
    if problems:
        problems.sort()
        listed = [f"  line {line}: {problem}" for line, problem in problems[:MAX_LISTED_LINES]]
        more = len(problems) - len(listed)
        raise DataError(f"{where} has {len(problems)} bad line(s); fix them and run again:\n"
                        + "\n".join(listed) + (f"\n  ... and {more} more." if more else ""))
    if not entries:
        raise DataError(f"{where} lists no image: add rows `path,label` below its header.")
    def parts(label):
        return label.split(LABEL_SEPARATOR) if multi_label else [label]

    found = sorted({part for _, _, label, _ in entries.values() for part in parts(label)})
    if class_names is not None:
        unknown = [label for label in found if label not in class_names]
        if unknown:
            first = [min(e[0] for e in entries.values() if label in parts(e[2]))
                     for label in unknown]
            raise DataError(
                f"{where} has labels {unknown} (first on line(s) {first}) that are not among "
                f"the expected classes {list(class_names)}."
            )
    else:
        class_names = found
    index = {name: i for i, name in enumerate(class_names)}

    def label_of(entry):
        indices = tuple(sorted(index[part] for part in parts(entry[2])))
        return indices if multi_label else indices[0]

    ordered = sorted(entries.values(), key=lambda e: (index[parts(e[2])[0]], e[1]))
    root = str(data_dir) if data_dir is not None else str(source.parent)
    return FolderScan(root, tuple(class_names), tuple(e[1] for e in ordered),
                      tuple(label_of(e) for e in ordered), tuple(ignored),
                      tuple(e[3] for e in ordered) if split_column else None, str(source),
                      multi_label=multi_label)


def _read_label_rows(source, where):
    """`(line, path, label, split)` of each non-blank row, `(line, problem)` of rows with
    too many fields, and whether a split column is there; the header and the file's
    readability are checked here."""
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except IsADirectoryError:
        raise DataError(f"{where} is a folder; give a CSV file of path,label rows.") from None
    except FileNotFoundError:
        raise DataError(f"{where} does not exist.") from None
    except OSError as e:
        raise DataError(f"{where} cannot be read: {e.strerror or e}.") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not a UTF-8 text file; give a CSV file of path,label "
                        "rows.") from None
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    rows, problems, header, line = [], [], None, 0
    try:
        for row in reader:
            start, line = line + 1, reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if header is None:
                header = _label_header(row, where, start)
                continue
            if len(row) > len(header):
                problems.append((start, f"{row[0].strip()}: {len(row)} fields, the header "
                                        f"has {len(header)}"))
                continue
            values = dict(zip(header, (cell.strip() for cell in row)))
            rows.append((start, values.get("path", ""), values.get("label", ""),
                         values.get(SPLIT_COLUMN, "").lower() if SPLIT_COLUMN in header
                         else None))
    except csv.Error as e:
        raise DataError(f"{where} is not a readable CSV file (line {reader.line_num}: {e}).") \
            from None
    if header is None:
        raise DataError(f"{where} is empty: it needs a header row `path,label` (and "
                        "optionally `split`), then one row per image.")
    return rows, problems, SPLIT_COLUMN in header


def _label_header(row, where, line):
    header = [cell.strip().lower() for cell in row]
    allowed = (*LABEL_COLUMNS, SPLIT_COLUMN)
    missing = [name for name in LABEL_COLUMNS if name not in header]
    unknown = [name for name in header if name not in allowed]
    repeated = sorted({name for name in header if header.count(name) > 1})
    if missing or unknown or repeated:
        problems = ([f"no column {missing}"] if missing else []) + \
            ([f"unknown column(s) {unknown}"] if unknown else []) + \
            ([f"repeated column(s) {repeated}"] if repeated else [])
        raise DataError(
            f"{where} line {line}: {'; '.join(problems)}. Its first line must be a header "
            f"with the columns {', '.join(LABEL_COLUMNS)} and optionally {SPLIT_COLUMN} "
            f"({', '.join(SPLITS)}). Received: {row}"
        )
    return header


def _label_row_problem(path, label, split, split_column, bases, extensions):
    """`(problem, None)` for a bad row, else `(None, the file's path)`."""
    problems = []
    if not path:
        problems.append("empty path")
    if not label:
        problems.append("empty label")
    elif "\n" in label or "\r" in label:
        problems.append(f"label {label!r} has a line break")
    if split_column and split not in SPLITS:
        problems.append(f"split {split!r} is not one of {list(SPLITS)}")
    file = None
    if path:
        candidates = [Path(path)] if Path(path).is_absolute() else [b / path for b in bases]
        file = next((c for c in candidates if os.path.lexists(c)), None)
        if file is None:
            places = " or ".join(str(c) for c in candidates)
            problems.append(f"file not found (looked for {places})")
        elif file.is_dir():
            problems.append("a folder, not an image file")
        elif file.suffix.lower() not in extensions:
            problems.append(f"not an image file extension ({file.suffix or 'none'!r})")
        elif not file.is_file():
            problems.append("not a regular file (a FIFO, device or broken link)")
    if problems:
        return (f"{path}: " if path else "") + "; ".join(problems), None
    return None, str(file)


class ImageCache:
    """Decoded, resized uint8 images, in memory or in a file on disk (`np.memmap`).

    Decoding is paid once per run: every epoch reads from here.
    """

    def __init__(self, count, image_size, mode="auto", cache_dir=None):
        shape = (count, image_size, image_size, 3)
        nbytes = int(np.prod(shape))
        if mode == "auto":
            mode = "disk" if nbytes > _available_memory() // 2 else "memory"
        self.mode = mode
        self._file = None
        if mode == "memory":
            self.array = np.zeros(shape, np.uint8)
        else:
            folder = Path(cache_dir or default_cache_dir()) / "images"
            folder.mkdir(parents=True, exist_ok=True)
            self._file = tempfile.NamedTemporaryFile(dir=folder, suffix=".u8")
            self.array = np.memmap(self._file.name, np.uint8, "w+", shape=shape)

    @property
    def nbytes(self):
        """Size of the cached pixels in bytes."""
        return self.array.nbytes

    def close(self):
        """Deletes the disk file, if any."""
        if self._file is not None:
            self.array = None
            self._file.close()
            self._file = None


def default_cache_dir():
    """`$TLKIT_CACHE_DIR`, or `$XDG_CACHE_HOME/tlkit`, or `~/.cache/tlkit`."""
    if os.environ.get("TLKIT_CACHE_DIR"):
        return Path(os.environ["TLKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tlkit"


def _available_memory():
    """Bytes the system can give without swapping: Linux's MemAvailable (free memory plus
    the page cache it can drop), else free pages, else 4 GiB."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass
class DecodedImages:
    """The result of decoding a list of files into an `ImageCache`."""

    cache: ImageCache  # pixels of every file, by position (failed files stay zero)
    ok: np.ndarray  # bool per file: decoded
    digests: list  # SHA-1 of each file's bytes (None where unreadable)
    skipped: list  # (path, reason) of files that failed


def decode_images(files, image_size, resize="squash", cache="auto", cache_dir=None,
                  workers=0, max_pixels=image_ops.DEFAULT_MAX_PIXELS, verbose=1):
    """Decodes and resizes every file into a uint8 cache, in parallel, with a progress bar.

    Args:
        files: image paths.
        image_size: side of the square output.
        resize: resize policy, see `tlkit.images.RESIZE_POLICIES`.
        cache: `"memory"`, `"disk"` or `"auto"` (disk when the pixels need more than half
            the free memory).
        cache_dir: folder for a disk cache.
        workers: decoding threads; 0 uses one per CPU core.
        max_pixels: larger images are skipped as possible decompression bombs.
        verbose: 0 silent, else a progress bar.

    Returns:
        `DecodedImages`.
    """
    import keras

    cache = ImageCache(len(files), image_size, cache, cache_dir)
    resize_fn = image_ops.resize_fn(resize, image_size)
    ok = np.zeros(len(files), bool)
    digests = [None] * len(files)
    skipped = []

    def work(index):
        path = files[index]
        try:
            pixels = image_ops.decode_file(path, max_pixels, image_size)
            cache.array[index] = resize_fn(pixels).numpy()
            digests[index] = file_digest(path)
            ok[index] = True
        except ImageError as e:
            return (e.path, e.reason)
        except OSError as e:
            return (path, f"cannot read file: {e.strerror or e}")
        return None

    progbar = keras.utils.Progbar(len(files), unit_name="image") if verbose and files else None
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, failure in enumerate(pool.map(work, range(len(files))), start=1):
            if failure:
                skipped.append(failure)
            if progbar and (done % 64 == 0 or done == len(files)):
                progbar.update(done)
    return DecodedImages(cache, ok, digests, skipped)


def file_digest(path, chunk=1 << 20):
    """SHA-1 of a file's bytes, read in chunks (a huge file never sits in memory)."""
    sha1 = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            sha1.update(block)
    return sha1.hexdigest()


def split_usable(labels, ok, digests, val_split, test_split, seed, fixed=None):
    """The split `load_image_data` makes: file indices per split, over the usable files.

    Args:
        labels: class index per file, or a multi-hot matrix `(files, classes)`: then the
            split is `split_multi_label_indices`'s.
        ok: bool per file, whether it decoded.
        digests: content digest per file.
        val_split: validation fraction (0 when a validation folder is used).
        test_split: test fraction.
        seed: seed of the split.
        fixed: split name per file (a label file's `split` column, `FolderScan.splits`),
            or `None`. When given, it is the split, and the fractions and seed are not
            used.

    Returns:
        A dict from split name to a sorted array of file indices.
    """
    usable = np.flatnonzero(ok)
    if fixed is not None:
        names = np.asarray(fixed, dtype=object)[usable]
        return {name: usable[names == name] for name in SPLITS}
    fractions = {"test": test_split, "val": val_split}
    labels = np.asarray(labels)
    if labels.ndim == 2:
        parts = split_multi_label_indices(labels[usable], fractions, seed)
    else:
        parts = split_indices(labels[usable], [digests[i] for i in usable], fractions, seed)
    return {name: usable[positions] for name, positions in parts.items()}


def split_indices(labels, digests, fractions, seed):
    """A seeded, stratified split that keeps identical files in the same split.

    Each class is split on its own so every split has the class's share of images. Files
    with the same content (same digest) form one group that goes to one split as a whole,
    even when the copies sit in different classes, so no image is trained on and validated.

    Args:
        labels: class index per file.
        digests: content digest per file (files with equal digests are kept together).
        fractions: dict with the fraction of each class for `"val"` and `"test"`; the rest
            is `"train"`.
        seed: seed of the shuffle.

    Returns:
        A dict from split name to a sorted numpy array of indices into `labels`.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    group_split = {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        groups = {}
        for index in members:
            groups.setdefault(digests[index], []).append(index)
        targets = _split_targets(len(members), fractions)
        counts = dict.fromkeys(SPLITS, 0)
        free = []
        for digest, group in groups.items():
            if digest in group_split:
                counts[group_split[digest]] += len(group)
            else:
                free.append(digest)
        for position in rng.permutation(len(free)):
            digest = free[position]
            size = len(groups[digest])
            name = next((s for s in ("test", "val") if counts[s] + size <= targets[s]), "train")
            group_split[digest] = name
            counts[name] += size
    assignment = np.array([group_split[digests[i]] for i in range(len(labels))])
    return {name: np.flatnonzero(assignment == name) for name in SPLITS}


def split_multi_label_indices(label_matrix, fractions, seed):
    """A seeded split of multi-label images that keeps every label's share in each split.

    Iterative stratification (Sechidis, Tsoumakas and Vlahavas, 2011): each split wants
    its fraction of every label's images; the label with the fewest images not yet placed
    goes first, and each of its images (in a seeded random order) goes to the split that
    still wants the most of that label (ties: the one that wants the most images, then
    test, val, train), which then wants one fewer of each of the image's labels. Rare
    labels are placed first, while every split can still take them. A label with at
    least 3 images wants at least one in val (and in test, when there is one), and a
    last pass moves one image of such a label from train to a split that has none of
    it, if one of its images can leave train without taking the last train image of
    another label. Identical files are one row here (`load_image_data` merges them
    first), so they cannot straddle the splits.

    Args:
        label_matrix: multi-hot matrix `(n, classes)`; every row has at least one label.
        fractions: dict with the fraction of images for `"val"` and `"test"`; the rest is
            `"train"`.
        seed: seed of the order images are placed in.

    Returns:
        A dict from split name to a sorted numpy array of row indices.

    Example:

    >>> parts = split_multi_label_indices(multi_hot([0, 0, 1, (0, 1), 1, 1], 2),
    ...                                   {"val": 0.34}, seed=0)
    >>> sorted(len(p) for p in parts.values())
    [0, 2, 4]
    """
    present = np.asarray(label_matrix) > 0.5
    count = len(present)
    rng = np.random.default_rng(seed)
    held = [s for s in ("test", "val") if fractions.get(s, 0.0) > 0]
    ratio = {s: float(fractions.get(s, 0.0)) for s in held}
    ratio["train"] = 1.0 - sum(ratio.values())
    names = [*held, "train"]
    per_label = present.sum(axis=0).astype(np.float64)
    wanted = {s: per_label * ratio[s] for s in names}
    for name in held:
        wanted[name] = np.where(per_label >= 3, np.maximum(wanted[name], 1.0), wanted[name])
    wanted["train"] = per_label - sum(wanted[s] for s in held)
    wanted_total = {s: count * ratio[s] for s in names}
    assignment = np.full(count, "", dtype=object)
    order = rng.permutation(count)
    left = present.copy()
    while left.any():
        remaining = left.sum(axis=0)
        label = int(np.argmin(np.where(remaining > 0, remaining, np.inf)))
        for row in order[present[order, label] & (assignment[order] == "")]:
            name = max(names, key=lambda s: (wanted[s][label], wanted_total[s]))
            assignment[row] = name
            wanted[name] = wanted[name] - present[row]
            wanted_total[name] -= 1
            left[row] = False
    assignment[assignment == ""] = "train"  # rows without a label
    for name in held:
        _give_missing_labels(present, assignment, name)
    return {name: np.flatnonzero(assignment == name) for name in SPLITS}


def _give_missing_labels(present, assignment, name):
    """Moves, for each label with >= 3 images and none in split `name`, one of its train
    images there: the one with the fewest labels whose other labels all stay in train."""
    for label in np.flatnonzero(present.sum(axis=0) >= 3):
        if (present[assignment == name, label]).any():
            continue
        train = assignment == "train"
        in_train = present[train].sum(axis=0)
        candidates = [row for row in np.flatnonzero(train & present[:, label])
                      if all(in_train[other] > 1 for other in np.flatnonzero(present[row]))]
        if candidates:
            assignment[min(candidates, key=lambda row: present[row].sum())] = name


def _split_targets(count, fractions):
    targets = {}
    for name, minimum_count in (("test", 3), ("val", 2)):
        fraction = fractions.get(name, 0.0)
        target = int(round(count * fraction))
        if fraction > 0 and target == 0 and count >= minimum_count:
            target = 1
        targets[name] = target
    while targets["test"] + targets["val"] >= count and (targets["test"] or targets["val"]):
        largest = max(("test", "val"), key=lambda s: targets[s])
        targets[largest] -= 1
    return targets


@dataclass
class Split:
    """One split of the data: indices into the shared cache, labels and file names."""

    name: str
    cache: ImageCache = field(repr=False)
    indices: np.ndarray
    labels: np.ndarray
    files: list
    digests: list = field(default_factory=list, repr=False)  # SHA-1 of each file

    def __len__(self):
        return len(self.indices)

    @property
    def images(self):
        """The split's uint8 images, shape `(n, size, size, 3)`."""
        return np.asarray(self.cache.array[self.indices])

    def class_counts(self, num_classes):
        """Number of images per class index (a multi-label image counts for each label)."""
        if self.labels.ndim == 2:
            return np.rint(self.labels.sum(axis=0)).astype(np.int64)
        return np.bincount(self.labels, minlength=num_classes)

    def label_names(self, class_names):
        """The label of each image by name; a multi-label image's labels joined by `;`."""
        if self.labels.ndim == 2:
            return [LABEL_SEPARATOR.join(class_names[j] for j in np.flatnonzero(row > 0.5))
                    for row in self.labels]
        return [class_names[label] for label in self.labels]


@dataclass
class ImageData:
    """A loaded data set: class names, splits and everything that was left out."""

    class_names: list
    image_size: int
    resize: str
    splits: dict  # split name -> Split (only the non-empty ones)
    skipped: list  # (path, reason) of image files that could not be used
    ignored: list  # (path, reason) of entries that are not images or were not followed
    warnings: list = field(default_factory=list)
    fixed_split: bool = False  # a label file's split column made the split
    multi_label: bool = False  # labels are multi-hot rows (see `load_image_data`)
    notes: list = field(default_factory=list)  # what was done to the data, said once

    @property
    def num_classes(self):
        return len(self.class_names)

    def summary(self):
        """A text table of images per class per split, then skipped files and warnings."""
        names = [s for s in SPLITS if s in self.splits]
        width = max(len("images" if self.multi_label else "class"),
                    *(len(c) for c in self.class_names))
        lines = ["  ".join([f"{'class':<{width}}", *(f"{n:>6}" for n in names)])]
        counts = {n: self.splits[n].class_counts(self.num_classes) for n in names}
        for index, class_name in enumerate(self.class_names):
            cells = (f"{int(counts[n][index]):>6}" for n in names)
            lines.append("  ".join([f"{class_name:<{width}}", *cells]))
        totals = (f"{len(self.splits[n]):>6}" for n in names)
        lines.append("  ".join([f"{'images':<{width}}" if self.multi_label else
                                f"{'total':<{width}}", *totals]))
        if self.multi_label:
            lines.append("Multi-label: an image counts once for each of its labels.")
        lines += [f"Note: {note}" for note in self.notes]
        if self.skipped:
            lines.append(f"Skipped {len(self.skipped)} file(s) that could not be used:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        non_hidden = [p for p, reason in self.ignored if reason != "hidden"]
        if non_hidden:
            lines.append(f"Ignored {len(non_hidden)} non-image, unfollowed or repeated "
                         "entr(ies).")
        lines += [f"Warning: {w}" for w in self.warnings]
        return "\n".join(lines)

    def report(self):
        """A JSON-ready dict of the split sizes, the skipped files and the warnings."""
        return {
            "class_names": list(self.class_names),
            "counts": {n: self.splits[n].class_counts(self.num_classes).tolist()
                       for n in self.splits},
            "skipped": [{"file": p, "reason": r} for p, r in self.skipped],
            "ignored": [{"file": p, "reason": r} for p, r in self.ignored],
            "warnings": list(self.warnings),
            "fixed_split": self.fixed_split,
            "multi_label": self.multi_label,
            "images": {n: len(self.splits[n]) for n in self.splits},
            "notes": list(self.notes),
        }

    def close(self):
        """Frees the image cache (deletes a disk cache file)."""
        for split in self.splits.values():
            split.cache.close()


def load_image_data(config, seed=42, verbose=1):
    """Scans, validates, decodes and splits the images a `DataConfig` points at.

    The images are the class subfolders of `config.data_dir`, or the rows of the label
    file `config.labels` (see `scan_labels`); a label file's `split` column, when it has
    one, is the split (`val_split` and `test_split` are then not used, and a warning says
    so).

    With `config.multi_label`, every split's `labels` is a multi-hot float32 matrix
    `(images, classes)`: a label file's `;`-separated labels, and files with the same
    content (the same SHA-1) are one image with the labels of every copy (the same image
    in several class folders, or listed under several paths), the first copy's file
    standing for it (the others are listed under `ignored`, and a note in the summary says
    how many were merged). The split is `split_multi_label_indices`'s.

    Args:
        config: a `tlkit.config.DataConfig` whose `image_size` is resolved (an integer).
        seed: seed of the split.
        verbose: 0 silent, else progress bars while decoding.

    Returns:
        `ImageData` with `"train"`, `"val"` and, when `test_split > 0`, `"test"` splits.

    Raises:
        DataError: if the folder or label file cannot be used (missing, no classes,
            fewer than two classes, a class with no usable image, bad label-file rows, a
            fixed split without training or validation images).
    """
    scan = scan_data(config.data_dir, config.labels, multi_label=config.multi_label)
    if len(scan.class_names) < 2:
        raise DataError(
            f"{scan.describe()} has only one class ({scan.class_names[0]!r}); a "
            "classifier needs at least two (class subfolders, or labels)."
        )
    decode = dict(image_size=config.image_size, resize=config.resize, cache=config.cache,
                  cache_dir=config.cache_dir, workers=config.workers, verbose=verbose)
    decoded = decode_images(scan.files, **decode)
    notes, merged = [], []
    if config.multi_label:
        labels, merged, note = merge_copies(scan, decoded)
        notes += [note] if note else []
    else:
        labels = np.asarray(scan.labels, np.int64)
    _check_every_class_usable(scan, labels, decoded.ok)
    parts = split_usable(labels, decoded.ok, decoded.digests,
                         0.0 if config.val_dir else config.val_split, config.test_split, seed,
                         fixed=scan.splits)
    splits = {name: Split(name, decoded.cache, indices, labels[indices],
                          [scan.files[i] for i in indices],
                          [decoded.digests[i] for i in indices])
              for name, indices in parts.items() if len(indices)}
    skipped, ignored = list(decoded.skipped), list(scan.ignored) + merged
    if config.val_dir:
        val_scan = scan_folder(config.val_dir, class_names=scan.class_names)
        val_decoded = decode_images(val_scan.files, **decode)
        if config.multi_label:
            val_labels, val_merged, note = merge_copies(val_scan, val_decoded)
            notes += [f"{config.val_dir}: {note}"] if note else []
            ignored += val_merged
        else:
            val_labels = np.asarray(val_scan.labels, np.int64)
        val_usable = np.flatnonzero(val_decoded.ok)
        val_labels = val_labels[val_usable]
        splits["val"] = Split("val", val_decoded.cache, val_usable, val_labels,
                              [val_scan.files[i] for i in val_usable],
                              [val_decoded.digests[i] for i in val_usable])
        skipped += val_decoded.skipped
        ignored += val_scan.ignored
    data = ImageData(list(scan.class_names), config.image_size, config.resize, splits,
                     skipped, ignored,
                     [] if config.multi_label else _duplicate_warnings(scan, labels, decoded),
                     fixed_split=scan.splits is not None, multi_label=config.multi_label,
                     notes=notes)
    repeated = len(scan.ignored) if scan.labels_file else 0
    if repeated:
        data.warnings.append(
            f"{repeated} row(s) of {scan.labels_file} repeat the path and label of an earlier "
            "row; each file is used once (the repeats are listed as ignored).")
    if scan.splits is not None:
        _check_fixed_split(scan, data)
        data.warnings.append(
            f"The split column of {scan.labels_file} fixes the split: val_split="
            f"{config.val_split} and test_split={config.test_split} are not used.")
    elif "val" not in splits or not len(splits["val"]):
        data.close()
        raise DataError(
            f"No validation images: {scan.root!r} is too small for val_split="
            f"{config.val_split}. Add images, raise `val_split` or pass `val_dir`."
        )
    return data


def _check_fixed_split(scan, data):
    """A label file's split needs usable training and validation images."""
    for name in ("train", "val"):
        if name not in data.splits:
            data.close()
            raise DataError(
                f"{scan.describe()} puts no usable image in the {name!r} split: give some "
                f"rows split={name} (training needs both train and val images)."
            )
    trained = data.splits["train"].class_counts(data.num_classes)
    missing = [c for i, c in enumerate(data.class_names) if not trained[i]]
    if missing:
        data.warnings.append(f"Class(es) {missing} have no usable image in the 'train' split "
                             f"of {scan.labels_file}: the model cannot learn them.")


def _check_every_class_usable(scan, labels, ok):
    for label, name in enumerate(scan.class_names):
        members = labels[:, label] > 0.5 if labels.ndim == 2 else labels == label
        if not ok[members].any():
            fix = (f"its files or remove its rows from {scan.labels_file}" if scan.labels_file
                   else f"or remove {scan.root}/{name}")
            raise DataError(
                f"Class {name!r} has no image that can be decoded (all of its files were "
                f"skipped; see the list above). Fix {fix}."
            )


def merge_copies(scan, decoded):
    """Multi-hot labels of a multi-label scan, with the files of one content merged into one
    image: the same image in several class folders, or listed under several paths of a
    label file, is one image with the labels of every copy.

    The first decoded copy (in scan order) gets the labels of every copy and stands for the
    image; the other copies are marked not ok in `decoded.ok` (changed in place), so they
    are left out as the skipped files are.

    Args:
        scan: a `FolderScan` (its `label_matrix()` and `files`).
        decoded: the `DecodedImages` of `scan.files`, or anything with their `ok` (a bool
            array, changed in place) and `digests` (as `tlkit.doctor.diagnose` passes).

    Returns:
        `(labels, ignored, note)`: the multi-hot float32 matrix `(files, classes)` (a merged
        copy's row stays its own), `(path, reason)` of each merged copy, and a sentence
        saying how many files were merged (None when none were).
    """
    labels = scan.label_matrix()
    first_of, merged = {}, []
    for index in np.flatnonzero(decoded.ok):
        first = first_of.setdefault(decoded.digests[index], index)
        if first != index:
            labels[first] = np.maximum(labels[first], labels[index])
            decoded.ok[index] = False
            merged.append((first, index))
    if not merged:
        return labels, [], None
    images = len({first for first, _ in merged})
    ignored = [(scan.files[index], f"same content as {scan.files[first]}: one image with the "
                                   "labels of both") for first, index in merged]
    return labels, ignored, (f"{len(merged) + images} file(s) with the same content (one image "
                             "in several class folders or rows) were merged into "
                             f"{images} multi-label image(s) with the labels of every copy.")


def _duplicate_warnings(scan, labels, decoded):
    classes_of = {}
    for index in np.flatnonzero(decoded.ok):
        classes_of.setdefault(decoded.digests[index], set()).add(int(labels[index]))
    clashes = sum(1 for classes in classes_of.values() if len(classes) > 1)
    if not clashes:
        return []
    return [f"{clashes} identical image(s) appear in more than one class; each copy keeps "
            "its label (check for mislabelled files)."]


def make_dataset(split, batch_size, shuffle=False, seed=None, augmenter=None):
    """Batches a split as a `tf.data.Dataset` of `(float32 images 0..255, labels)`: int64
    class indices, or float32 multi-hot rows for a multi-label split.

    Args:
        split: a `Split`.
        batch_size: images per batch.
        shuffle: reshuffle every epoch (seeded by `seed`).
        seed: seed of the shuffle.
        augmenter: a Keras model applied to each batch with `training=True` (see
            `tlkit.augment.build_augmenter`), or `None`.

    Returns:
        A prefetched `tf.data.Dataset`.
    """
    if isinstance(split.cache.array, np.memmap):
        dataset = _memmap_dataset(split, batch_size, shuffle, seed)
    else:
        dataset = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
        if shuffle:
            dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size)
    dataset = dataset.map(lambda x, y: (tf.cast(x, tf.float32), y),
                          num_parallel_calls=tf.data.AUTOTUNE)
    if augmenter is not None:
        # Sequential on purpose: the random layers share one seed state, and parallel calls
        # would consume it in a different order each run, breaking `seed` repeatability.
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y))
    return dataset.prefetch(tf.data.AUTOTUNE)


def _memmap_dataset(split, batch_size, shuffle, seed):
    array, indices, labels = split.cache.array, split.indices, split.labels
    size = array.shape[1]

    def gather(positions):
        positions = np.sort(positions)
        return np.asarray(array[indices[positions]]), labels[positions]

    dataset = tf.data.Dataset.range(len(split))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size).map(
        lambda p: tf.numpy_function(gather, [p], (tf.uint8, tf.as_dtype(labels.dtype))),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return dataset.map(lambda x, y: (tf.ensure_shape(x, [None, size, size, 3]),
                                     tf.ensure_shape(y, [None, *labels.shape[1:]])))


@dataclass(frozen=True)
class DataSurvey:
    """What the data-dependent `"auto"` settings are chosen from (`tlkit.api.resolve_config`)."""

    images_per_class: int  # images of the smallest class, before any split
    image_side: int  # median shorter side, in pixels, of a sample of the images


def survey_folder(data_dir, sample=64, labels=None):
    """Counts the images of each class and reads the size of a sample of them from their
    headers (no pixels are decoded); unreadable files are left to the loader to report.

    Args:
        data_dir: a folder with one subfolder per class.
        sample: how many images, spread evenly over the folder, to read sizes from.
        labels: a label file instead of class subfolders (see `scan_data`).

    Returns:
        A `DataSurvey`.

    Raises:
        DataError: as `scan_data`.
    """
    scan = scan_data(data_dir, labels)
    counts = np.bincount(scan.labels, minlength=len(scan.class_names))
    count = min(sample, len(scan.files))
    picks = np.unique(np.linspace(0, len(scan.files) - 1, count).astype(int))
    sides = []
    for index in picks:
        try:
            with Image.open(scan.files[index]) as image:
                sides.append(min(image.size))
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
    return DataSurvey(int(counts.min()), int(np.median(sides)) if sides else 0)

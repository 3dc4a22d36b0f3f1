"""Checks a data folder before training: what `tlkit fit` would skip, convert or leak.

    DATA_DIR (or a label file)  --scan_data-->  image files (and the entries it ignores)
        --check every file (threads): SHA-1 of its bytes, `decode_file` (the one decode fit
          does), Pillow's header facts (no pixels), a 64-bit pHash of a 32x32 thumbnail-->
        --split_indices, with exactly the inputs fit gives it-->  where fit puts each file
        --digests and perceptual hashes-->  duplicates, near-duplicates, split leaks
        -->  DoctorReport: findings by severity, class counts, a text table or JSON

Each finding has a severity: `"error"` (fit skips the file), `"warning"` (fit uses it, but it
is worth a look) or `"info"` (fit converts it automatically). `quarantine` moves the files
with errors out of the data folder.
"""

import errno
import hashlib
import os
import shutil
import stat
from bisect import bisect_left
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

from tlkit import images as image_ops
from tlkit.config import DataConfig, FitConfig
from tlkit.data import SPLITS, merge_copies, scan_data, split_usable
from tlkit.errors import ConfigError, ImageError
from tlkit.validation import check_choice, check_number

SEVERITIES = ("error", "warning", "info")

CODES = {
    # errors: `tlkit fit` skips the file
    "unreadable": "error",  # no permission, a pipe or device, a broken or looping link
    "empty": "error",  # 0 bytes
    "not_image": "error",  # text, HTML, ... under an image extension
    "bomb": "error",  # more pixels than `max_pixels`: refused from the header
    "truncated": "error",  # truncated or corrupt image data
    # warnings: used by fit, worth a look
    "split_leak": "warning",  # near-duplicates on both sides of fit's split
    "cross_class_duplicate": "warning",  # the same file in two classes: mislabelled?
    "near_duplicate": "warning",  # nearly the same picture in the same split
    "duplicate": "warning",  # an exact copy in the same class
    "wrong_extension": "warning",  # e.g. a PNG named .jpg
    "tiny": "warning",  # a side shorter than `min_size`
    "imbalance": "warning",  # class sizes differ by more than `IMBALANCE_RATIO`
    # info: converted automatically
    "animated": "info",  # first frame used
    "multi_page": "info",  # first page used
    "converted_mode": "info",  # CMYK, 16-bit, palette or alpha converted to 8-bit RGB
    "exif_rotated": "info",  # EXIF orientation applied
    "merged_copy": "info",  # multi-label: a copy whose labels join its original's
}
"""Every finding code, with its severity, in the order reports list them."""

NEAR_DUPLICATE_BITS = 4
"""Two images whose 64-bit perceptual hashes differ in at most this many bits are
near-duplicates."""

IMBALANCE_RATIO = 3.0
"""The largest class may have up to this many times the usable images of the smallest."""

_HEADINGS = {
    "error": "Errors ({}): `tlkit fit` skips these files",
    "warning": "Warnings ({}): used for training, worth a look",
    "info": "Info ({}): converted automatically",
}
_PAGED_FORMATS = ("TIFF", "MPO")  # several frames are pages (or views), not an animation
_SAME_FORMAT = {"MPO": "JPEG"}  # a camera's multi-picture JPEG is rightly named .jpg
_ORIENTATIONS = {
    2: "mirrored left to right",
    3: "rotated 180 degrees",
    4: "mirrored top to bottom",
    5: "transposed",
    6: "rotated 90 degrees clockwise",
    7: "transversed",
    8: "rotated 90 degrees counter-clockwise",
}
_READ_CHUNK = 1 << 20
_MAX_RELATED = 10  # files named in `related` of one near-duplicate finding
_DCT_SIZE = 32
_DCT = np.cos(np.pi * np.outer(np.arange(_DCT_SIZE), 2 * np.arange(_DCT_SIZE) + 1)
              / (2 * _DCT_SIZE))  # DCT-II basis, unnormalised as in the usual pHash


@dataclass(frozen=True)
class Finding:
    """One thing worth knowing about one file (for `imbalance`, about the data folder)."""

    path: str  # the file, as `tlkit.data.scan_data` lists it
    severity: str  # "error" | "warning" | "info", see `SEVERITIES`
    code: str  # stable short name, a key of `CODES`
    message: str  # what is wrong or notable, and what fit does about it
    related: tuple = ()  # the other files involved: the original of a copy, a leaking twin

    def to_dict(self):
        """The finding as JSON-ready data."""
        return {**asdict(self), "related": list(self.related)}


def _finding(path, code, message, related=()):
    return Finding(str(path), CODES[code], code, message, tuple(related))


@dataclass
class DoctorReport:
    """What `diagnose` found in a data folder, with the split `tlkit fit` would make."""

    data_dir: str  # the scanned folder
    class_names: tuple  # class names in label order
    files: tuple  # every image file the scan found, in scan order
    labels: tuple  # class index of each file; multi-label: a tuple of class indices
    class_counts: dict  # class name -> usable images (those fit trains and validates on)
    splits: dict  # split name -> files fit puts there (usable files only)
    findings: list  # `Finding`s: errors, then warnings, then info; by code, then path
    ignored: tuple  # (path, reason) of entries the scan skips: hidden, not images, links
    settings: dict  # the split and check settings the report was made with
    labels_file: str | None = None  # the label file scanned, or None for class subfolders
    fixed_split: bool = False  # the label file's split column made the split
    multi_label: bool = False  # files may have several labels (counts are per label)

    @property
    def errors(self):
        """The error findings: one per file that `tlkit fit` would skip."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def imbalance(self):
        """Usable images of the largest class over the smallest; `None` if one has none."""
        smallest = min(self.class_counts.values())
        return max(self.class_counts.values()) / smallest if smallest else None

    def to_dict(self):
        """The report as JSON-ready data (what `tlkit doctor --format json` prints)."""
        counts = Counter(f.severity for f in self.findings)
        return {
            "data_dir": self.data_dir,
            "labels_file": self.labels_file,
            "fixed_split": self.fixed_split,
            "multi_label": self.multi_label,
            "settings": dict(self.settings),
            "class_names": list(self.class_names),
            "class_counts": dict(self.class_counts),
            "imbalance": self.imbalance,
            "split_counts": {name: len(files) for name, files in self.splits.items()},
            "summary": {"files": len(self.files), **{s: counts[s] for s in SEVERITIES}},
            "findings": [f.to_dict() for f in self.findings],
            "splits": {name: list(files) for name, files in self.splits.items()},
            "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
        }

    def to_table(self):
        """A readable report: images per class and split, then findings by severity.

        Returns:
            A string: one table row per class (files found, files with errors, images per
            split), then one line per finding, naming the file and the problem, grouped by
            severity, then the ignored entries.
        """
        s = self.settings
        split = (f"the split column of {self.labels_file}" if self.fixed_split else
                 f"val_split={s['val_split']}, test_split={s['test_split']}, seed={s['seed']}")
        lines = [f"{self.labels_file or self.data_dir}: {len(self.files)} image file(s) in "
                 f"{len(self.class_names)} class(es); split as `tlkit fit` makes it with "
                 f"{split}.", ""]
        lines += self._class_table()
        for severity in SEVERITIES:
            chosen = [f for f in self.findings if f.severity == severity]
            if chosen:
                lines += ["", _HEADINGS[severity].format(len(chosen))]
                lines += [f"  {f.path}: [{f.code}] {f.message}" for f in chosen]
        if not self.findings:
            lines += ["", "No problems found."]
        if self.ignored:
            lines += ["", f"Ignored ({len(self.ignored)}): hidden, not an image file or not "
                      "followed"]
            lines += [f"  {path}: {reason}" for path, reason in self.ignored]
        return "\n".join(lines)

    def _class_table(self):
        names = [n for n in SPLITS if n != "test" or self.splits.get("test")
                 or (self.settings["test_split"] > 0 and not self.fixed_split)]
        labels_of = dict(zip(self.files, (_label_set(labels, self.multi_label)
                                          for labels in self.labels)))

        def count(paths):
            return Counter(label for path in paths for label in labels_of[path])

        found, failed = count(self.files), count(f.path for f in self.errors)
        in_split = {n: count(self.splits[n]) for n in names}
        first = "label" if self.multi_label else "class"
        width = max(len(first), *(len(c) for c in self.class_names))
        header = ["files", "errors", *names]
        lines = ["  ".join([f"{first:<{width}}", *(f"{h:>6}" for h in header)])]
        for label, name in enumerate(self.class_names):
            cells = [found[label], failed[label], *(in_split[n][label] for n in names)]
            lines.append("  ".join([f"{name:<{width}}", *(f"{c:>6}" for c in cells)]))
        totals = [len(self.files), len(self.errors), *(len(self.splits[n]) for n in names)]
        lines.append("  ".join([f"{'total':<{width}}", *(f"{c:>6}" for c in totals)]))
        return lines


def _label_set(labels, multi_label):
    """The class indices of one file's `DoctorReport.labels` entry."""
    return tuple(labels) if multi_label else (labels,)


def diagnose(data_dir, val_split=DataConfig.val_split, test_split=DataConfig.test_split,
             seed=FitConfig.seed, workers=DataConfig.workers,
             max_pixels=image_ops.DEFAULT_MAX_PIXELS, min_size=16, near_duplicates=True,
             verbose=1, labels=None, multi_label=DataConfig.multi_label):
    """Checks every image file of a data folder the way `tlkit fit` would read it.

    Every file found by `tlkit.data.scan_data` is read and decoded once, in parallel,
    with `tlkit.images.decode_file` (so the errors are exactly the files fit skips; a
    decompression bomb is refused from its header and never decoded). Pillow's header
    tells what fit converts (animation, pages, colour mode, EXIF orientation). A 64-bit
    perceptual hash (pHash) of a 32x32 thumbnail finds near-duplicates (at most
    `NEAR_DUPLICATE_BITS` bits apart). The split is the one fit makes with the same
    `val_split`, `test_split` and `seed`, so near-duplicates on both sides of it (a leak
    that inflates validation and test scores) are named.

    Args:
        data_dir: folder with one subfolder per class.
        val_split: fraction of each class fit holds out for validation.
        test_split: fraction of each class fit holds out as a test set.
        seed: seed of fit's split.
        workers: decoding threads; 0 uses one per CPU core.
        max_pixels: larger images are errors (possible decompression bombs), as in fit.
        min_size: images with a side shorter than this many pixels get a `tiny` warning;
            0 turns the check off.
        near_duplicates: look for near-duplicates and split leaks (perceptual hashes).
        verbose: 0 silent, else a progress bar.
        labels: a label file instead of class subfolders (`tlkit.data.scan_labels`); a
            `split` column in it is the split (then `val_split`, `test_split` and `seed`
            are not used), as in fit.
        multi_label: read the data as `fit(multi_label=True)` does: a label file's cells
            are `;`-separated label lists, and the files of one content (the same image in
            several class folders or rows) are one image with the labels of every copy
            (`tlkit.data.merge_copies`; each merged copy is an info finding, not a
            cross-class duplicate); counts are images per label, the split is fit's
            multi-label split.

    Returns:
        A `DoctorReport`.

    Raises:
        ConfigError: if an argument is invalid (named, with the value received).
        DataError: if the folder cannot be scanned (missing, no class subfolders, a class
            folder with no image files) or the label file has bad rows.

    Example:

    >>> report = diagnose("data/digits", min_size=8, verbose=0)
    >>> [f.path for f in report.errors]
    []
    """
    config = DataConfig(data_dir, labels=labels, val_split=val_split, test_split=test_split,
                        workers=workers, multi_label=multi_label)  # validated as fit does
    check_number("seed", seed, 0, 2**31 - 1, integer=True)
    check_number("max_pixels", max_pixels, 1, integer=True)
    check_number("min_size", min_size, 0, integer=True)
    check_choice("near_duplicates", near_duplicates, (True, False))
    check_choice("verbose", verbose, (0, 1, 2))

    scan = scan_data(config.data_dir, config.labels, multi_label=config.multi_label)
    checks = _check_files(scan.files, max_pixels, min_size, near_duplicates, config.workers,
                          verbose)
    digests = [check.digest for check in checks]
    findings = [_finding(path, code, message) for path, check in zip(scan.files, checks)
                for code, message in check.notes]
    if config.multi_label:
        ok = np.array([check.usable for check in checks], bool)
        labels, merged, _ = merge_copies(scan, SimpleNamespace(ok=ok, digests=digests))
        usable = np.flatnonzero(ok)  # without the merged copies
        index_of = {path: i for i, path in enumerate(scan.files)}
        first_of = {digests[i]: i for i in reversed(usable)}
        for path, _ in merged:
            original = scan.files[first_of[digests[index_of[path]]]]
            findings.append(_finding(path, "merged_copy", (
                f"the same image as {original}: fit merges them into one image with the "
                "labels of both"), [original]))
        originals = list(usable)
        report_labels = tuple(tuple(int(i) for i in np.flatnonzero(row > 0.5))
                              for row in labels)
        class_counts = dict(zip(scan.class_names,
                                (int(n) for n in (labels[usable] > 0.5).sum(axis=0))))
    else:
        labels = np.asarray(scan.labels, np.int64)
        usable = np.flatnonzero([check.usable for check in checks])
        duplicates, originals = _duplicate_findings(scan, usable, checks)
        findings += duplicates
        report_labels = scan.labels
        class_counts = {name: int(np.sum(labels[usable] == label))
                        for label, name in enumerate(scan.class_names)}
    split_of = _fit_split(labels, usable, digests, config.val_split, config.test_split, seed,
                          scan.splits)
    if near_duplicates:
        findings += _near_duplicate_findings(scan, originals, checks, split_of)
    findings += _imbalance_findings(scan.root, class_counts)
    order = list(CODES)
    findings.sort(key=lambda f: (SEVERITIES.index(f.severity), order.index(f.code), f.path))

    splits = {name: tuple(scan.files[i] for i in sorted(split_of) if split_of[i] == name)
              for name in SPLITS}
    settings = {"val_split": config.val_split, "test_split": config.test_split, "seed": seed,
                "max_pixels": max_pixels, "min_size": min_size,
                "near_duplicates": near_duplicates,
                "near_duplicate_bits": NEAR_DUPLICATE_BITS if near_duplicates else None}
    return DoctorReport(scan.root, scan.class_names, scan.files, report_labels, class_counts,
                        splits, findings, scan.ignored, settings, scan.labels_file,
                        scan.splits is not None, config.multi_label)


def quarantine(report, dest_dir):
    """Moves every file with an error finding out of the data folder into `dest_dir`.

    Files keep their path relative to the data folder (`DATA_DIR/a/x.jpg` goes to
    `dest_dir/a/x.jpg`), so nothing is lost and each can be fixed and moved back. Nothing
    is deleted or overwritten: when the target exists, the file gets a free name
    (`x-1.jpg`, `x-2.jpg`, ...).

    Args:
        report: a `DoctorReport` from `diagnose`.
        dest_dir: the quarantine folder (created if missing). It must be outside the data
            folder, where it would be scanned again as a class.

    Returns:
        A list of `(source, destination)` path strings, one per moved file.

    Raises:
        ConfigError: (a `ValueError`) if `report` is not a `DoctorReport`, was made from
            a label file (whose rows would then name missing files: remove the rows
            instead), or `dest_dir` is inside the data folder.
    """
    if not isinstance(report, DoctorReport):
        raise ConfigError("`report` must be a DoctorReport from `tlkit.doctor.diagnose`. "
                          f"Received: report={report!r}")
    if report.labels_file is not None:
        raise ConfigError(
            f"Files listed in a label file stay where they are: remove the rows of the "
            f"files with errors from {report.labels_file} instead (moving them would make "
            f"them missing files). Received: report.labels_file={report.labels_file!r}"
        )
    root = Path(report.data_dir)
    dest = Path(dest_dir)
    resolved_root, resolved_dest = root.resolve(), dest.resolve()
    if resolved_dest == resolved_root or resolved_root in resolved_dest.parents:
        raise ConfigError(
            f"`dest_dir` must be outside the data folder {str(root)!r}: files moved there "
            f"would be scanned again as a class. Received: dest_dir={str(dest_dir)!r}"
        )
    moved = []
    for path in sorted({f.path for f in report.errors}):
        target = dest / Path(path).relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        target = _reserve_free_name(target)
        try:
            _move(path, target)
        except BaseException:
            target.unlink(missing_ok=True)  # the placeholder, or a partial copy
            raise
        moved.append((path, str(target)))
    return moved


def _reserve_free_name(target):
    """Creates an empty placeholder at `target`, or `name-N.ext` if taken; returns it."""
    candidate, number = target, 0
    while True:
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return candidate
        except FileExistsError:
            number += 1
            candidate = target.with_name(f"{target.stem}-{number}{target.suffix}")


def _move(source, target):
    """Renames `source` over its own placeholder `target`, or copies it across file systems."""
    try:
        os.replace(source, target)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        target.unlink()
        shutil.move(source, target)


# Per-file checks (run in worker threads) -------------------------------------------------


@dataclass
class _FileCheck:
    """What one file's worker found."""

    usable: bool = False  # decoded: fit trains on it
    digest: str | None = None  # SHA-1 of the file's bytes, as fit computes it
    phash: int | None = None  # 64-bit perceptual hash of a usable file
    notes: list = field(default_factory=list)  # (code, message) of the file's findings


def _check_files(files, max_pixels, min_size, hashing, workers, verbose):
    """Runs `_check_file` on every file in a thread pool, with a progress bar."""
    import keras

    extensions = Image.registered_extensions()
    progbar = keras.utils.Progbar(len(files), unit_name="image") if verbose and files else None
    checks = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        jobs = pool.map(lambda path: _check_file(path, max_pixels, min_size, hashing,
                                                 extensions), files)
        for done, check in enumerate(jobs, start=1):
            checks.append(check)
            if progbar and (done % 64 == 0 or done == len(files)):
                progbar.update(done)
    return checks


def _check_file(path, max_pixels, min_size, hashing, extensions):
    """Reads, decodes and inspects one file as fit would; keeps no full-size pixels."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return _FileCheck(notes=[("unreadable", "not a regular file (a pipe, socket or "
                                      "device): reading it could block or never end")])
        digest, size, head = _read(path)
    except OSError as e:
        return _FileCheck(notes=[("unreadable", f"cannot read file: {e.strerror or e}")])
    try:
        pixels = image_ops.decode_file(path, max_pixels)
    except ImageError as e:
        code = "empty" if size == 0 else _refusal(path, max_pixels)
        hint = _text_hint(head) if code == "not_image" else ""
        return _FileCheck(digest=digest, notes=[(code, e.reason + hint)])
    notes = _header_notes(path, extensions)
    height, width = pixels.shape[:2]
    if min(height, width) < min_size:
        notes.append(("tiny", f"{width}x{height} pixels, a side under min_size={min_size}: "
                              "little detail once resized to the model input"))
    return _FileCheck(True, digest, _phash(pixels) if hashing else None, notes)


def _read(path):
    """SHA-1 of a file's bytes (read in chunks), its size and its first bytes."""
    sha1, size, head = hashlib.sha1(), 0, b""
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            head = head or chunk[:64]
            sha1.update(chunk)
            size += len(chunk)
    return sha1.hexdigest(), size, head


def _refusal(path, max_pixels):
    """The error code of a non-empty file `decode_file` refused, from Pillow's header."""
    try:
        with Image.open(path) as image:
            return "bomb" if image.width * image.height > max_pixels else "truncated"
    except Image.DecompressionBombError:
        return "bomb"
    except Image.UnidentifiedImageError:
        return "not_image"
    except (OSError, SyntaxError, ValueError, EOFError):
        return "truncated"


def _text_hint(head):
    """`; it holds text (starts '<html>')` when a file's first bytes are readable text."""
    text = head.decode("utf-8", "ignore")
    readable = len(text.encode()) >= len(head) - 3 and text.strip() and all(
        c.isprintable() or c in "\t\r\n" for c in text)
    return f"; it holds text (starts {text.strip()[:24]!r})" if readable else ""


def _header_notes(path, extensions):
    """Findings from Pillow's header of a file that decoded: format, frames, mode, EXIF."""
    try:
        with Image.open(path) as image:
            return _notes_from_header(image, path, extensions)
    except (OSError, SyntaxError, ValueError, EOFError):
        return []  # changed since it decoded a moment ago: nothing more to say


def _notes_from_header(image, path, extensions):
    notes = []
    suffix = Path(path).suffix
    expected = extensions.get(suffix.lower())
    if expected and _SAME_FORMAT.get(image.format, image.format) != expected:
        notes.append(("wrong_extension", f"a {image.format} file named {suffix!r} (the "
                                         f"extension of {expected}); fit reads it by content"))
    frames = _frame_count(image)
    if frames > 1:
        code, unit = ("multi_page", "pages") if image.format in _PAGED_FORMATS else (
            "animated", "frames")
        notes.append((code, f"{image.format} with {frames} {unit}: fit uses the first"))
    mode_note = _mode_note(image, path)
    if mode_note:
        notes.append(("converted_mode", mode_note))
    orientation = _orientation(image)
    if orientation in _ORIENTATIONS:
        notes.append(("exif_rotated", f"EXIF orientation {orientation}: fit shows the image "
                                      f"{_ORIENTATIONS[orientation]}, as the camera meant"))
    return notes


def _frame_count(image):
    try:
        return getattr(image, "n_frames", 1)
    except (OSError, SyntaxError, ValueError, EOFError):
        return 1  # a damaged later frame: fit reads only the first


def _mode_note(image, path):
    """How `decode_file` converts this image's mode to 8-bit RGB, or None if it need not."""
    mode = image.mode
    if mode in image_ops.HIGH_BIT_MODES or image_ops.is_16_bit_color_png(image, path):
        return f"{mode} with 16-bit (or wider) samples: scaled to 8 bits (value / 257)"
    if mode == "P":
        dropped = "; transparency dropped" if "transparency" in image.info else ""
        return f"palette image: colours converted to RGB{dropped}"
    if mode.endswith(("A", "a")):
        return f"{mode}: alpha channel dropped (transparent areas keep their stored colour)"
    if mode in ("RGB", "L", "1"):
        return None
    return f"{mode} colours converted to RGB"


def _orientation(image):
    """The EXIF orientation from the header, without decoding the pixels."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1  # Pillow would decode the whole PNG to look for an eXIf chunk after it
    return image.getexif().get(image_ops.ORIENTATION_TAG, 1)


def _phash(pixels):
    """64-bit perceptual hash (pHash) of an RGB array.

    The 8x8 lowest frequencies of the DCT of a 32x32 gray thumbnail, each above or below
    their median: it survives re-encoding, noise, brightness changes and resizing. The
    thumbnail is the only copy made, so no full-size image outlives the caller.
    """
    thumb = Image.fromarray(pixels).resize((_DCT_SIZE, _DCT_SIZE), Image.Resampling.BOX)
    gray = np.asarray(thumb.convert("L"), np.float64)
    low = (_DCT @ gray @ _DCT.T)[:8, :8]
    return int(np.packbits(low > np.median(low)).view(">u8")[0])


# The folder as a whole -------------------------------------------------------------------


def _fit_split(labels, usable, digests, val_split, test_split, seed, fixed):
    """File index -> split name, for the usable files, exactly as `load_image_data` splits."""
    if not len(usable):
        return {}
    ok = np.zeros(len(labels), bool)
    ok[usable] = True
    parts = split_usable(labels, ok, digests, val_split, test_split, seed, fixed)
    return {int(i): name for name, indices in parts.items() for i in indices}


def _duplicate_findings(scan, usable, checks):
    """Exact copies (equal SHA-1) among usable files; returns findings and the originals."""
    groups = {}
    for index in usable:
        groups.setdefault(checks[index].digest, []).append(int(index))
    findings = []
    for original, *copies in groups.values():
        first, first_class = scan.files[original], scan.class_names[scan.labels[original]]
        for copy in copies:
            if scan.labels[copy] == scan.labels[original]:
                findings.append(_finding(scan.files[copy], "duplicate", (
                    f"an exact copy of {first}: it counts twice in training (fit keeps "
                    "copies in one split)"), [first]))
            else:
                findings.append(_finding(scan.files[copy], "cross_class_duplicate", (
                    f"identical to {first} in class {first_class!r}: the same image under "
                    "two labels, one is probably wrong"), [first]))
    return findings, sorted(group[0] for group in groups.values())


def _near_duplicate_findings(scan, originals, checks, split_of):
    """Near-duplicates among the originals: across fit's split (leaks) or within a split.

    Files are grouped by equal hash first, so a thousand blank images make one group, not
    half a million pairs. A leak is reported on the file in the later split (val after
    train, test after both), naming its twins in earlier splits; a near-duplicate within
    a split is reported on the later file, naming its earlier twins. Nearest twins first.
    """
    if not originals:
        return []
    hashes = np.array([checks[i].phash for i in originals], np.uint64)
    unique, group_of = np.unique(hashes, return_inverse=True)
    group_of = group_of.tolist()
    neighbours = {g: [(0, g)] for g in range(len(unique))}
    for a, b, bits in _near_pairs(unique, NEAR_DUPLICATE_BITS):
        neighbours[a].append((bits, b))
        neighbours[b].append((bits, a))
    members = {}  # (hash group, split) -> originals there, in scan order
    for index, group in zip(originals, group_of):
        members.setdefault((group, split_of[index]), []).append(index)
    findings = []
    for index, group in zip(originals, group_of):
        split = split_of[index]
        leaks = [(bits, s, members[other, s]) for bits, other in neighbours[group]
                 for s in SPLITS[:SPLITS.index(split)] if (other, s) in members]
        if leaks:
            total, twins = _nearest(leaks)
            bits, twin, twin_split = twins[0]
            findings.append(_finding(scan.files[index], "split_leak", (
                f"fit puts this file in {split!r} and its near-duplicate {scan.files[twin]} "
                f"in {twin_split!r} ({_likeness(bits)}{_classes(scan, index, twin)}): "
                f"{split!r} is not independent of {twin_split!r}, so its scores come out "
                f"too high. Remove one of them{_more(total)}."),
                [scan.files[t] for _, t, _ in twins]))
        earlier = [(bits, split, members[other, split][:bisect_left(members[other, split],
                                                                     index)])
                   for bits, other in neighbours[group] if (other, split) in members]
        total, twins = _nearest(earlier)
        if total:
            bits, twin, _ = twins[0]
            findings.append(_finding(scan.files[index], "near_duplicate", (
                f"a near-duplicate of {scan.files[twin]} ({_likeness(bits)}"
                f"{_classes(scan, index, twin)}), both in {split!r}{_more(total)}"),
                [scan.files[t] for _, t, _ in twins]))
    return findings


def _nearest(entries):
    """Of `[(bits, split, file indices)]`: the number of files, and the nearest few as
    `(bits, index, split)` (at most `_MAX_RELATED`, so blank images cannot explode it)."""
    total = sum(len(indices) for _, _, indices in entries)
    nearest = sorted((bits, index, split) for bits, split, indices in entries
                     for index in indices[:_MAX_RELATED])
    return total, nearest[:_MAX_RELATED]


def _more(total):
    return f" ({total - 1} more near-duplicate(s); see related)" if total > 1 else ""


def _likeness(bits):
    return "the same perceptual hash" if bits == 0 else f"{bits} of 64 hash bits differ"


def _classes(scan, index, twin):
    a, b = (scan.class_names[scan.labels[i]] for i in (index, twin))
    return "" if a == b else f"; classes {a!r} and {b!r}: one may be mislabelled"


def _near_pairs(hashes, max_bits):
    """Pairs `(i, j, bits)`, i < j, of distinct 64-bit hashes at most `max_bits` apart.

    Pigeonhole: cut the 64 bits into `max_bits + 1` bands; hashes that differ in at most
    `max_bits` bits agree on a whole band, so only hashes sharing a band value are compared.
    """
    hashes = np.asarray(hashes, np.uint64)
    bands = max_bits + 1
    width = -(-64 // bands)
    candidates = [np.empty((0, 2), np.int64)]
    for band in range(bands):
        keys = (hashes >> np.uint64(band * width)) & np.uint64((1 << width) - 1)
        order = np.argsort(keys, kind="stable")
        ranked = keys[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        ends = np.r_[starts[1:], len(ranked)]
        for start, end in zip(starts, ends):
            if end - start > 1:
                i, j = np.triu_indices(end - start, 1)
                members = np.sort(order[start:end])
                candidates.append(np.stack([members[i], members[j]], axis=1))
    pairs = np.unique(np.concatenate(candidates), axis=0)
    differing = (hashes[pairs[:, 0]] ^ hashes[pairs[:, 1]]).astype(">u8")
    bits = np.unpackbits(differing.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    return [(int(i), int(j), int(b)) for (i, j), b in zip(pairs, bits) if b <= max_bits]


def _imbalance_findings(root, class_counts):
    empty = [name for name, count in class_counts.items() if count == 0]
    if empty:
        return [_finding(root, "imbalance", (
            f"no usable image in class {', '.join(map(repr, empty))}: `tlkit fit` refuses to "
            "train until every class has one"))]
    smallest = min(class_counts, key=class_counts.get)
    largest = max(class_counts, key=class_counts.get)
    low, high = class_counts[smallest], class_counts[largest]
    if high / low <= IMBALANCE_RATIO:
        return []
    return [_finding(root, "imbalance", (
        f"class {largest!r} has {high} usable images and class {smallest!r} {low} (ratio "
        f"{high / low:.1f} > {IMBALANCE_RATIO:g}): consider more images of the small "
        "classes, or `--class-weight auto`"))]


def split_leaks(data, max_bits=NEAR_DUPLICATE_BITS):
    """Near-duplicate pairs that straddle the splits of loaded `ImageData` (fit's check).

    Hashes the decoded, resized images fit already holds, so it costs no second decode.

    Args:
        data: `tlkit.data.ImageData` from `load_image_data`.
        max_bits: largest pHash distance counted as a near-duplicate.

    Returns:
        A list of `(file_a, split_a, file_b, split_b, bits)`.
    """
    files, names, hashes = [], [], []
    for name, split in data.splits.items():
        for position, file in enumerate(split.files):
            files.append(file)
            names.append(name)
            hashes.append(_phash(np.asarray(split.cache.array[split.indices[position]])))
    return [(files[i], names[i], files[j], names[j], bits)
            for i, j, bits in _near_pairs(hashes, max_bits) if names[i] != names[j]]

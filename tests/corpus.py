"""A hostile data folder generated on the fly: real pictures mixed with every kind of bad
file tlkit meets (shared by the doctor and the end-to-end fit tests)."""

import builtins
import contextlib
import io
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFilter

from conftest import png_header_claiming

EXIF_ORIENTATION = 0x0112

# Helpers ----------------------------------------------------------------------------------


def picture(seed, size=48):
    """A photo-like RGB picture: a smooth colour gradient and soft ellipses, one per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    ramps = rng.uniform(0, 255, 3)
    base = np.stack([ramps[0] * x + 40 * (1 - y), ramps[1] * y, ramps[2] * x * y], axis=-1)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 8, size // 2, 2)
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return np.asarray(image.filter(ImageFilter.GaussianBlur(1)))


def with_noise(pixels, seed, amplitude=4):
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, pixels.shape)
    return np.clip(pixels.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def save(path, image, fmt=None, **options):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, fmt, **options)
    return path


def encoded(pixels, fmt, **options):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt, **options)
    return buffer.getvalue()


@contextlib.contextmanager
def unreadable(path):
    """Makes `path` unreadable: mode 000, and, as root (who reads anything), an `open` that
    raises PermissionError for that one path, as the kernel would for another user.

    Pillow opens files through `builtins.open`, so the patch reaches decoding too.
    """
    path = Path(path)
    path.chmod(0)
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file) == path:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        if os.geteuid() == 0:
            patch.setattr(builtins, "open", guarded_open)
        yield
    path.chmod(0o644)


def build_corpus(root):
    """A data folder of real images mixed with every kind of bad file tlkit meets.

    Returns a dict: "errors" (path -> code), "notes" (path -> codes expected on a usable
    file), "good" (every usable path), "ignored" (paths the scan must skip), "twins"
    (the near-duplicate pictures of class c), "locked" (the unreadable file).
    """
    root = Path(root)
    a, b, c = root / "a", root / "b", root / "c"
    notes = {}
    good = [save(a / f"a_{i:02d}.png", picture(i)) for i in range(8)]
    good += [save(a / "nested" / "deeper" / "n_0.png", picture(8)),
             save(a / "ünïcödé 名前.png", picture(9)),
             save(a / "with  many spaces .png", picture(10))]

    def note(path, *codes):
        notes[str(path)] = set(codes)
        good.append(path)

    wrong = a / "wrong_ext.jpg"
    wrong.write_bytes(encoded(picture(11), "PNG"))
    note(wrong, "wrong_extension")
    note(save(a / "cmyk.jpg", Image.fromarray(picture(12)).convert("CMYK")), "converted_mode")
    sixteen = a / "sixteen.png"
    samples = picture(13).astype(np.uint16) * 257 + 100
    sixteen.write_bytes(tf.io.encode_png(tf.constant(samples, tf.uint16)).numpy())
    note(sixteen, "converted_mode")
    palette = Image.fromarray(picture(14)).quantize(16)
    note(save(a / "palette.png", palette, transparency=0), "converted_mode")
    note(save(a / "la.png", Image.fromarray(picture(15)).convert("LA")), "converted_mode")
    frames = [Image.fromarray(picture(16 + k)) for k in range(3)]
    frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    note(a / "anim.gif", "animated", "converted_mode")  # GIF frames are palette images
    Image.fromarray(picture(19)).save(a / "pages.tiff", save_all=True,
                                      append_images=[Image.fromarray(picture(20))])
    note(a / "pages.tiff", "multi_page")
    note(save(a / "photo.webp", picture(21)))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    note(save(a / "rotated.jpg", picture(22), exif=exif, quality=95), "exif_rotated")
    note(save(a / "tiny.png", picture(23, size=6)), "tiny")
    copy = a / "copy_of_a_00.png"
    copy.write_bytes((a / "a_00.png").read_bytes())
    note(copy, "duplicate")

    good += [save(b / f"b_{i:02d}.png", picture(30 + i)) for i in range(8)]
    cross = b / "same_as_a_01.png"
    cross.write_bytes((a / "a_01.png").read_bytes())
    note(cross, "cross_class_duplicate")

    # Class c: one picture three times (exact, with faint noise, noisy and re-encoded as
    # JPEG). fit puts 1 of 3 images of a class in val, so the twins straddle the split.
    original = picture(50)
    twins = [save(c / "twin_0.png", original), save(c / "twin_1.png", with_noise(original, 1)),
             save(c / "twin_2.jpg", with_noise(original, 2), quality=90)]
    good += twins

    errors = {
        a / "truncated.jpg": ("truncated", encoded(picture(60, 64), "JPEG", quality=90)[:900]),
        a / "empty.jpg": ("empty", b""),
        a / "notes.jpg": ("not_image", b"labels were checked by hand\n"),
        a / "page.png": ("not_image", b"<!DOCTYPE html><html><body>404</body></html>\n"),
        a / "bomb.png": ("bomb", png_header_claiming(100_000, 100_000)),
        a / "locked.png": ("unreadable", encoded(picture(61), "PNG")),
    }
    for path, (_, content) in errors.items():
        path.write_bytes(content)
    errors = {str(path): code for path, (code, _) in errors.items()}
    (a / "loop.jpg").symlink_to("loop.jpg")  # a link to itself: not a regular file

    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (a / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (a / "loop_dir").symlink_to(a, target_is_directory=True)
    ignored = [root / ".DS_Store", a / "Thumbs.db", a / "loop_dir"]
    return {"errors": errors, "notes": notes, "good": sorted(str(p) for p in good),
            "ignored": [str(p) for p in ignored], "twins": [str(p) for p in twins],
            "locked": a / "locked.png"}

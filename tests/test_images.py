"""The image contract: Pillow decoding, the shared resize, and training/serving agreement."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import png_header_claiming
from tlkit import images
from tlkit.errors import ImageError

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
EXIF_ORIENTATION = 0x0112


# Helpers ----------------------------------------------------------------------------------


def photo(height, width, seed=0):
    """Photo-like RGB content: smooth colour gradients plus noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    base = np.stack(
        [x / width * 255, y / height * 255, (x + y) / (width + height) * 255], axis=-1
    )
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def solid(height, width, color):
    return np.broadcast_to(np.array(color, np.uint8), (height, width, 3)).copy()


def save(path, image, fmt=None, **options):
    """Saves a PIL image or a uint8 array with Pillow; returns the path."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(path, fmt, **options)
    return path


def palette_image(height, width, colors, seed=0):
    """A mode-P image using exactly `colors` (list of RGB tuples), and its RGB truth."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, len(colors), (height, width), dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    flat = [c for color in colors for c in color]
    image.putpalette(flat + [0] * (768 - len(flat)))
    return image, np.array(colors, np.uint8)[indices]


def write_png16(path, samples):
    """Writes a 16-bit PNG (gray or RGB) from a uint16 array (h, w, c) with TensorFlow."""
    path.write_bytes(tf.io.encode_png(tf.constant(samples, tf.uint16)).numpy())
    return path


def exif_with_orientation(orientation):
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = orientation
    return exif


def serving(path, image_size, resize):
    """The exported graph's view of a file: TF decode of its bytes, then the shared resize."""
    data = tf.constant(path.read_bytes())
    decoded = images.decode_bytes(data, image_size=image_size)
    return images.resize_image(decoded, image_size, resize).numpy()


def max_abs_diff(a, b):
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    return int(np.abs(a.astype(np.int64) - b.astype(np.int64)).max())


# decode_file: formats and modes -----------------------------------------------------------


def _case_png(tmp):
    pixels = photo(12, 20)
    return save(tmp / "rgb.png", pixels), pixels


def _case_bmp(tmp):
    pixels = photo(12, 20)
    return save(tmp / "rgb.bmp", pixels), pixels


def _case_webp(tmp):
    pixels = photo(12, 20)
    return save(tmp / "rgb.webp", pixels, lossless=True), pixels


def _case_gray(tmp):
    gray = photo(12, 20)[..., 0]
    return save(tmp / "gray.png", gray), np.repeat(gray[..., None], 3, axis=-1)


def _case_palette_transparent(tmp):
    image, truth = palette_image(12, 20, [RED, GREEN, BLUE, (10, 20, 30)])
    return save(tmp / "pal.png", image, transparency=1), truth


def _case_rgba(tmp):
    pixels = photo(12, 20)
    alpha = np.random.default_rng(5).integers(0, 256, (12, 20, 1), dtype=np.uint8)
    return save(tmp / "rgba.png", np.concatenate([pixels, alpha], axis=-1)), pixels


def _case_la(tmp):
    gray = photo(12, 20)[..., 0]
    alpha = np.random.default_rng(5).integers(0, 256, (12, 20), dtype=np.uint8)
    image = Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return save(tmp / "la.png", image), np.repeat(gray[..., None], 3, axis=-1)


def _case_gif_animated(tmp):
    frames = [Image.fromarray(solid(12, 20, color)) for color in (RED, GREEN, BLUE)]
    frames[0].save(tmp / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(tmp / "anim.gif").n_frames == 3
    return tmp / "anim.gif", solid(12, 20, RED)


def _case_tiff_multipage(tmp):
    first = photo(12, 20)
    second = Image.fromarray(solid(12, 20, GREEN))
    Image.fromarray(first).save(tmp / "pages.tiff", save_all=True, append_images=[second])
    assert Image.open(tmp / "pages.tiff").n_frames == 2
    return tmp / "pages.tiff", first


LOSSLESS_CASES = {
    "png_rgb": _case_png,
    "bmp_rgb": _case_bmp,
    "webp_lossless": _case_webp,
    "png_grayscale_L": _case_gray,
    "png_palette_with_transparency": _case_palette_transparent,
    "png_rgba": _case_rgba,
    "png_la": _case_la,
    "gif_animated_first_frame": _case_gif_animated,
    "tiff_multipage_first_page": _case_tiff_multipage,
}


@pytest.mark.parametrize("case", sorted(LOSSLESS_CASES))
def test_decode_file_lossless_formats_give_exact_rgb(tmp_path, case):
    path, expected = LOSSLESS_CASES[case](tmp_path)
    decoded = images.decode_file(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (12, 20, 3)
    np.testing.assert_array_equal(decoded, expected)


@pytest.mark.parametrize("mode", ["RGB", "L", "CMYK"])
def test_decode_file_jpeg_gives_rgb_close_to_source(tmp_path, mode):
    pixels = solid(16, 24, (200, 40, 90))
    pixels[:, 12:] = (30, 160, 220)
    source = Image.fromarray(pixels).convert(mode)
    path = save(tmp_path / f"{mode}.jpg", source, quality=95)
    assert Image.open(path).mode == mode
    decoded = images.decode_file(path)
    assert decoded.dtype == np.uint8
    assert decoded.shape == (16, 24, 3)
    expected = np.asarray(source.convert("RGB"), np.float64)
    assert np.abs(decoded - expected).mean() < 6
    if mode == "L":
        assert (decoded == decoded[..., :1]).all()  # gray: three equal channels


def test_decode_file_scales_16_bit_gray_by_1_over_257_rounded(tmp_path):
    # value -> round(value / 257), worked out by hand; 1000 must give 4, not a clipped 255.
    values = [0, 128, 129, 256, 385, 386, 1000, 32896, 65407, 65535]
    expected = [0, 0, 1, 1, 1, 2, 4, 128, 255, 255]
    path = write_png16(tmp_path / "gray16.png", np.array(values, np.uint16).reshape(2, 5, 1))
    assert Image.open(path).mode.startswith("I")
    decoded = images.decode_file(path)
    assert decoded.shape == (2, 5, 3) and decoded.dtype == np.uint8
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel].ravel(), expected)


def test_decode_file_scales_16_bit_rgb_by_1_over_257_rounded(tmp_path):
    values = np.array([[[0, 383, 400], [1000, 32896, 65535]]], np.uint16)
    expected = np.array([[[0, 1, 2], [4, 128, 255]]], np.uint8)  # round(v / 257), by hand
    path = write_png16(tmp_path / "rgb16.png", values)
    np.testing.assert_array_equal(images.decode_file(path), expected)


def _asymmetric_jpeg(path, orientation=None):
    """A 32-high, 48-wide black JPEG with a white 16x16 block in its top-left corner."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :16] = 255
    options = {"quality": 95}
    if orientation is not None:
        options["exif"] = exif_with_orientation(orientation)
    return save(path, pixels, "JPEG", **options)


def _bright_quadrant(image):
    """Which corner ('top-left', ...) holds the bright block; asserts the others are dark."""
    gray = image.astype(np.float64).mean(axis=-1)
    corners = {
        "top-left": gray[:16, :16], "top-right": gray[:16, -16:],
        "bottom-left": gray[-16:, :16], "bottom-right": gray[-16:, -16:],
    }
    bright = [name for name, block in corners.items() if block.mean() > 200]
    dark = [name for name, block in corners.items() if block.mean() < 30]
    assert len(bright) == 1 and len(dark) == 3, {k: v.mean() for k, v in corners.items()}
    return bright[0]


@pytest.mark.parametrize(
    "orientation, shape, corner",
    [
        (None, (32, 48, 3), "top-left"),
        (1, (32, 48, 3), "top-left"),
        (3, (32, 48, 3), "bottom-right"),  # rotated 180 degrees
        (6, (48, 32, 3), "top-right"),  # shown rotated 90 degrees clockwise
        (8, (48, 32, 3), "bottom-left"),  # shown rotated 90 degrees counter-clockwise
    ],
)
def test_decode_file_applies_exif_orientation(tmp_path, orientation, shape, corner):
    path = _asymmetric_jpeg(tmp_path / "oriented.jpg", orientation)
    decoded = images.decode_file(path)
    assert decoded.shape == shape
    assert _bright_quadrant(decoded) == corner


# decode_file: errors ----------------------------------------------------------------------


def _truncated_jpeg():
    buffer = io.BytesIO()
    Image.fromarray(photo(64, 64)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


BAD_FILES = {
    "empty.jpg": (b"", ["empty"]),
    "notes.jpg": (b"just some text, not a picture\n", ["not an image"]),
    "page.png": (b"<!DOCTYPE html><html><body>404</body></html>\n", ["not an image"]),
    "truncated.jpg": (_truncated_jpeg(), ["truncated", "corrupt"]),
    "bomb.png": (png_header_claiming(100_000, 100_000), ["pixels"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_decode_file_bad_files_raise_image_error_with_reason(tmp_path, name):
    content, words = BAD_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        images.decode_file(path)
    assert info.value.path == str(path)
    assert any(word in info.value.reason.lower() for word in words), info.value.reason
    assert str(path) in str(info.value)


def test_decode_file_refuses_more_pixels_than_max_pixels(tmp_path):
    path = save(tmp_path / "big.png", solid(20, 30, RED))
    assert images.decode_file(path, max_pixels=600).shape == (20, 30, 3)
    with pytest.raises(ImageError) as info:
        images.decode_file(path, max_pixels=599)
    assert info.value.path == str(path)
    assert "pixels" in info.value.reason and "30x20" in info.value.reason


def test_decode_file_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "missing.png"
    with pytest.raises(ImageError) as info:
        images.decode_file(path)
    assert info.value.path == str(path)
    assert "does not exist" in info.value.reason


def test_load_image_raises_image_error_for_bad_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        images.load_image(path, 16)


# resize_image -----------------------------------------------------------------------------


@pytest.mark.parametrize("resize", images.RESIZE_POLICIES)
@pytest.mark.parametrize("shape", [(10, 20), (20, 10), (7, 7), (3, 50), (4, 4)])
@pytest.mark.parametrize("size", [8, 32])
def test_resize_image_output_shape_and_dtype(resize, shape, size):
    result = images.resize_image(photo(*shape), size, resize)
    assert result.dtype == tf.uint8
    assert tuple(result.shape) == (size, size, 3)


def test_resize_pad_keeps_aspect_with_black_bars_top_and_bottom():
    wide = solid(10, 20, WHITE)  # 20 wide, 10 high
    out = images.resize_image(wide, 10, "pad").numpy()
    white_rows = (out == 255).all(axis=(1, 2))
    black_rows = (out == 0).all(axis=(1, 2))
    assert white_rows.sum() == 5 and black_rows.sum() == 5  # aspect 2:1 kept: 10 x 5
    assert black_rows[0] and black_rows[-1]
    assert white_rows[4] and white_rows[5]  # the picture sits in the centre
    top = int(np.argmax(white_rows))
    assert abs(top - (10 - 5 - top)) <= 1  # bars of (nearly) equal height
    assert white_rows[top : top + 5].all()


def test_resize_pad_of_tall_image_has_black_bars_left_and_right():
    tall = solid(20, 10, WHITE)
    out = images.resize_image(tall, 10, "pad").numpy()
    white_cols = (out == 255).all(axis=(0, 2))
    black_cols = (out == 0).all(axis=(0, 2))
    assert white_cols.sum() == 5 and black_cols.sum() == 5
    assert black_cols[0] and black_cols[-1] and white_cols[4] and white_cols[5]


def test_resize_pad_of_square_image_has_no_bars():
    out = images.resize_image(solid(6, 6, WHITE), 12, "pad").numpy()
    assert (out == 255).all()


def _red_left_blue_right(height, width):
    image = solid(height, width, RED)
    image[:, width // 2 :] = BLUE
    return image


def test_resize_crop_keeps_the_centre():
    image = _red_left_blue_right(10, 20)
    out = images.resize_image(image, 10, "crop").numpy()
    np.testing.assert_array_equal(out, image[:, 5:15])  # no scaling needed: centre square


def test_resize_crop_downscaled_keeps_the_centre_of_wide_and_tall_images():
    out = images.resize_image(_red_left_blue_right(20, 40), 8, "crop").numpy()
    left, right = out[:, :3].astype(int), out[:, -3:].astype(int)
    assert (left[..., 0] > 200).all() and (left[..., 2] < 50).all()
    assert (right[..., 2] > 200).all() and (right[..., 0] < 50).all()
    tall = np.transpose(_red_left_blue_right(20, 40), (1, 0, 2))  # red top, blue bottom
    out = images.resize_image(tall, 8, "crop").numpy().astype(int)
    assert (out[:3, :, 0] > 200).all() and (out[-3:, :, 2] > 200).all()


def test_resize_squash_of_constant_image_stays_constant():
    color = (37, 91, 200)
    for shape in [(13, 29), (29, 13), (5, 5), (64, 3)]:
        out = images.resize_image(solid(*shape, color), 16, "squash").numpy()
        assert (out == np.array(color, np.uint8)).all(), shape


def test_resize_squash_stretches_both_axes():
    image = _red_left_blue_right(10, 40)
    out = images.resize_image(image, 8, "squash").numpy().astype(int)
    assert (out[:, :3, 0] > 200).all() and (out[:, -3:, 2] > 200).all()  # both halves kept


@pytest.mark.parametrize("resize", images.RESIZE_POLICIES)
def test_resize_upscales(resize):
    image = np.zeros((4, 4, 3), np.uint8)
    image[:, 2:] = 255  # left half black, right half white
    out = images.resize_image(image, 32, resize).numpy().astype(int)
    assert out.shape == (32, 32, 3)
    assert (out[:, 0] == 0).all() and (out[:, -1] == 255).all()
    assert (np.diff(out[..., 0], axis=1) >= 0).all()  # a smooth ramp, no wrap-around
    assert 0 < out[0, 16, 0] or 0 < out[0, 15, 0]


@pytest.mark.parametrize("resize", images.RESIZE_POLICIES)
def test_resize_downscale_is_antialiased(resize):
    lines = np.zeros((64, 64, 3), np.uint8)
    lines[:, ::8] = 255  # thin vertical lines, one column in eight
    out = images.resize_image(lines, 8, resize).numpy().astype(np.float64)
    # An antialiased resize averages each 8-column cell to ~255/8; point sampling would
    # miss the lines entirely (0) or hit them (255).
    assert np.all(np.abs(out - 255 / 8) < 12), out[..., 0]


@pytest.mark.parametrize("bad", ["stretch", "", None, "Squash"])
def test_resize_image_rejects_unknown_policy(bad):
    with pytest.raises(ValueError, match="resize") as info:
        images.resize_image(solid(4, 4, RED), 8, bad)
    assert repr(bad) in str(info.value)


def test_load_image_rejects_unknown_policy(tmp_path):
    path = save(tmp_path / "a.png", solid(4, 4, RED))
    with pytest.raises(ValueError, match="resize"):
        images.load_image(path, 8, "fit")


# Training/serving agreement ---------------------------------------------------------------


AGREEMENT_KINDS = [
    "jpeg_photo_640x480", "jpeg_photo_444_progressive", "jpeg_grayscale", "jpeg_cmyk",
    "jpeg_8x8", "png_photo_640x480", "png_grayscale", "png_palette",
    "png_palette_with_transparency", "png_16bit_gray", "png_rgba", "png_8x8",
    "gif_animated", "bmp_rgb",
]


def _agreement_files(folder):
    """Files of every kind the serving graph must decode exactly as Pillow does."""
    big, small = photo(480, 640, seed=1), photo(8, 8, seed=2)
    palette, _ = palette_image(30, 40, [RED, GREEN, BLUE, (90, 90, 20), (5, 200, 180)])
    quantized = Image.fromarray(photo(30, 40, seed=3)).quantize(64)
    gray16 = np.random.default_rng(4).integers(0, 65536, (30, 40, 1), dtype=np.uint16)
    files = {
        "jpeg_photo_640x480": save(folder / "photo.jpg", big, quality=90),
        "jpeg_photo_444_progressive": save(folder / "prog.jpg", photo(37, 53), quality=85,
                                           subsampling=0, progressive=True),
        "jpeg_grayscale": save(folder / "gray.jpg", photo(30, 40)[..., 1]),
        "jpeg_cmyk": save(folder / "cmyk.jpg", Image.fromarray(photo(30, 40)).convert("CMYK")),
        "jpeg_8x8": save(folder / "small.jpg", small),
        "png_photo_640x480": save(folder / "photo.png", big),
        "png_grayscale": save(folder / "gray.png", photo(30, 40)[..., 1]),
        "png_palette": save(folder / "pal.png", palette),
        "png_palette_with_transparency": save(folder / "palt.png", quantized, transparency=7),
        "png_16bit_gray": write_png16(folder / "gray16.png", gray16),
        "png_rgba": save(folder / "rgba.png", np.dstack([photo(30, 40), photo(30, 40)[..., 0]])),
        "png_8x8": save(folder / "small.png", small),
        "gif_animated": folder / "anim.gif",
        "bmp_rgb": save(folder / "rgb.bmp", photo(30, 40)),
    }
    frames = [Image.fromarray(photo(30, 40, seed=s)).quantize(32) for s in (5, 6)]
    frames[0].save(files["gif_animated"], save_all=True, append_images=frames[1:])
    return files


@pytest.fixture(scope="module")
def agreement_files(tmp_path_factory):
    files = _agreement_files(tmp_path_factory.mktemp("agreement"))
    assert sorted(files) == sorted(AGREEMENT_KINDS)
    return files


@pytest.mark.parametrize("resize", images.RESIZE_POLICIES)
@pytest.mark.parametrize("kind", AGREEMENT_KINDS)
@pytest.mark.parametrize("size", [24, 100])
def test_training_and_serving_give_identical_pixels(agreement_files, kind, resize, size):
    path = agreement_files[kind]
    trained_on = images.load_image(path, size, resize)
    assert trained_on.shape == (size, size, 3) and trained_on.dtype == np.uint8
    assert max_abs_diff(trained_on, serving(path, size, resize)) == 0


@pytest.mark.parametrize("kind", AGREEMENT_KINDS)
def test_decode_bytes_equals_decode_file(agreement_files, kind):
    path = agreement_files[kind]
    decoded = images.decode_bytes(tf.constant(path.read_bytes()))
    assert decoded.dtype == tf.uint8
    assert max_abs_diff(images.decode_file(path), decoded.numpy()) == 0


def test_decode_bytes_in_tf_function_with_string_signature(agreement_files):
    @tf.function(input_signature=[tf.TensorSpec([], tf.string)])
    def serve(data):
        return images.decode_bytes(data), images.resize_image(
            images.decode_bytes(data, image_size=32), 32, "pad")

    concrete = serve.get_concrete_function()
    assert concrete.structured_outputs[0].shape.as_list() == [None, None, 3]
    assert concrete.structured_outputs[1].shape.as_list() == [32, 32, 3]
    for kind in AGREEMENT_KINDS:  # one traced graph serves every format
        path = agreement_files[kind]
        decoded, resized = serve(tf.constant(path.read_bytes()))
        assert max_abs_diff(decoded.numpy(), images.decode_file(path)) == 0, kind
        assert max_abs_diff(resized.numpy(), images.load_image(path, 32, "pad")) == 0, kind
    assert serve.experimental_get_tracing_count() == 1


# Cases where the Pillow and TensorFlow decoders differ by default --------------------


def _exif_png(path):
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:16, :16] = 255
    return save(path, pixels, exif=exif_with_orientation(6))


@pytest.mark.parametrize("name", ["oriented.jpg", "oriented.png"])
def test_serving_applies_exif_orientation_like_training(tmp_path, name):
    if name.endswith(".jpg"):
        path = _asymmetric_jpeg(tmp_path / name, orientation=6)
    else:
        path = _exif_png(tmp_path / name)
    decoded = images.decode_bytes(tf.constant(path.read_bytes())).numpy()
    assert decoded.shape == (48, 32, 3)
    assert _bright_quadrant(decoded) == "top-right"


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_serving_applies_every_exif_orientation_like_training(tmp_path, orientation, fmt):
    pixels = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    path = save(tmp_path / f"o{orientation}.{fmt.lower()}", pixels, fmt,
                exif=exif_with_orientation(orientation), **({"quality": 95} if fmt == "JPEG" else {}))
    served = images.decode_bytes(tf.constant(path.read_bytes())).numpy()
    np.testing.assert_array_equal(served, images.decode_file(path))
    assert served.shape[:2] == ((6, 10) if orientation <= 4 else (10, 6))


def test_serving_decodes_palette_bmp_like_training(tmp_path):
    image, truth = palette_image(6, 10, [RED, GREEN, BLUE])
    path = save(tmp_path / "pal.bmp", image)
    assert Image.open(path).mode == "P"
    np.testing.assert_array_equal(images.decode_file(path), truth)
    np.testing.assert_array_equal(images.decode_bytes(tf.constant(path.read_bytes())).numpy(),
                                  truth)


def test_serving_decodes_transparent_gif_like_training(tmp_path):
    image, truth = palette_image(6, 10, [RED, GREEN, BLUE])
    path = save(tmp_path / "transparent.gif", image, transparency=1)
    decoded = images.decode_bytes(tf.constant(path.read_bytes())).numpy()
    assert max_abs_diff(images.decode_file(path), decoded) == 0


def test_serving_decodes_webp_with_alpha(tmp_path):
    pixels = photo(10, 14)
    alpha = np.full((10, 14, 1), 200, np.uint8)
    path = save(tmp_path / "alpha.webp", np.concatenate([pixels, alpha], -1), lossless=True)
    np.testing.assert_array_equal(images.decode_file(path), pixels)
    decoded = images.decode_bytes(tf.constant(path.read_bytes())).numpy()
    np.testing.assert_array_equal(decoded, pixels)


# --- Large JPEGs decode at a reduced DCT scale, alike in training and serving ----------------


@pytest.mark.parametrize("size, scale", [(300, 2), (150, 4), (75, 8), (301, 1)])
@pytest.mark.parametrize("quality, subsampling", [(75, 2), (90, 0)])  # 4:2:0 and 4:4:4
def test_scaled_jpeg_decode_is_bit_exact_between_training_and_serving(tmp_path, size, scale,
                                                                      quality, subsampling):
    path = save(tmp_path / "photo.jpg", photo(601, 803, seed=9), quality=quality,
                subsampling=subsampling)
    assert images.jpeg_scale(601, 803, size) == scale
    trained = images.decode_file(path, image_size=size)
    assert trained.shape == (-(-601 // scale), -(-803 // scale), 3)
    served = images.decode_bytes(tf.constant(path.read_bytes()), image_size=size).numpy()
    assert max_abs_diff(trained, served) == 0
    for resize in images.RESIZE_POLICIES:
        assert max_abs_diff(images.load_image(path, size, resize),
                            serving(path, size, resize)) == 0, resize


@pytest.mark.parametrize("orientation", [6, 8])
def test_scaled_jpeg_decode_applies_exif_orientation_alike(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = save(tmp_path / "rotated.jpg", photo(400, 640, seed=3), quality=85, exif=exif)
    trained = images.decode_file(path, image_size=100)
    assert trained.shape == (160, 100, 3)  # 1/4 scale of 400x640, then turned
    for resize in images.RESIZE_POLICIES:
        assert max_abs_diff(images.load_image(path, 100, resize),
                            serving(path, 100, resize)) == 0, resize


def test_full_size_decode_without_image_size(tmp_path):
    path = save(tmp_path / "photo.jpg", photo(601, 803), quality=90)
    assert images.decode_file(path).shape == (601, 803, 3)
    assert images.decode_bytes(tf.constant(path.read_bytes())).shape == (601, 803, 3)

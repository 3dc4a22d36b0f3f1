"""Write scikit-learn's bundled handwritten digits as one PNG per image.

The 1,797 images are the test part of the UCI "Optical Recognition of Handwritten Digits"
data set (optdigits), as shipped in `sklearn.datasets.load_digits`: 8x8 pixels, each pixel a
count from 0 to 16 of the "on" pixels in a 4x4 block of the original 32x32 bitmap. This script
scales 0..16 to 0..255 (rounded) and writes grayscale PNGs, one folder per class:

    data/digits/<label>/<label>_<index>.png

where <index> is the image's position in `load_digits()`, so any file can be traced back to
the original data. Run it from the repository root: `python data/make_digits.py`.
Needs scikit-learn, numpy and Pillow; tlkit itself does not need scikit-learn.
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out_dir=Path(__file__).resolve().parent / "digits"):
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    for index, (image, label) in enumerate(zip(images, digits.target)):
        folder = out_dir / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{label}_{index:04d}.png", optimize=True)
    print(f"wrote {len(images)} images to {out_dir}")


if __name__ == "__main__":
    main()

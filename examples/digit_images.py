"""Write scikit-learn's bundled 8x8 digits as a folder of class sub-folders of PNG files.

    python examples/digit_images.py runs/digits/images            # all ten digits
    python examples/digit_images.py runs/digits/images 5 6 7 8 9  # some classes

Layout: FOLDER/<digit>/<n>.png, the input `tl-ray train` reads for backbone kind keras-image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

target = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/digits/images")
classes = [int(c) for c in sys.argv[2:]] or list(range(10))
bunch = load_digits()
for i, (pixels, label) in enumerate(zip(bunch.images, bunch.target)):
    if label in classes:
        (target / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255 / 16).astype(np.uint8)).save(target / str(label) / f"{i:04d}.png")
print(target)

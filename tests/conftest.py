"""Shared fixtures."""

import numpy as np
import pytest
from PIL import Image


def write_segmentation_tree(root, layouts, n=3, seed=0):
    """Generated sets in the layouts of data/segmentation.py: n random JPEGs per set, of varied sizes, with
    labels of random classes and a strip of the set's ignore value, saved as its format (8-bit PNG or
    16-bit TIFF). Returns {set: [(image path, label array)]}."""
    from data.segmentation import LAYOUTS

    rng = np.random.default_rng(seed)
    written = {}
    for name in layouts:
        layout = LAYOUTS[name]
        (root / layout.images).mkdir(parents=True, exist_ok=True)
        (root / layout.labels).mkdir(parents=True, exist_ok=True)
        written[name] = []
        for i in range(n):
            w, h = 40 + 4 * i, 30 + 2 * i
            stem = f"{name}_{i:04d}"
            image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / layout.images / f"{stem}.jpg", quality=95)
            label = rng.integers(0, layout.classes, (h, w))
            label[:, :3] = layout.ignore
            dtype = np.uint16 if layout.ext == ".tif" else np.uint8
            Image.fromarray(label.astype(dtype)).save(root / layout.labels / f"{stem}{layout.ext}")
            written[name].append((root / layout.images / f"{stem}.jpg", label))
    return written


@pytest.fixture(scope="module")
def segmentation_root(tmp_path_factory):
    """Every set of data/segmentation.py, 3 images each, under one root."""
    from data.segmentation import LAYOUTS

    root = tmp_path_factory.mktemp("datasets")
    write_segmentation_tree(root, list(LAYOUTS))
    return root

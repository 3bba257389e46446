"""Fixtures shared by several test files."""

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model import CLIP, PRESETS
from clip_weights import save_clip


@pytest.fixture(scope="session")
def tree(tmp_path_factory):
    """A two-class folder task (train/ and val/, --data folder) and a random tiny CLIP at tree/tiny.safetensors."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        for label, name in enumerate(("cat", "dog")):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 60, (36, 36, 3), dtype=np.uint8) + np.uint8(120 * label)
                Image.fromarray(pixels).save(root / split / name / f"{i}.jpg")
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), root / "tiny.safetensors")
    return root

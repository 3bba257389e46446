"""Fixtures shared by the test modules: a tiny ImageNet-layout tree and a two-class folder task, each with a
random tiny CLIP; the flags of a tiny train.py run; a count of the optimiser steps a run takes; the merge
reference at alpha; the segmentation datasets in their prepared layouts."""

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.optim.optimizer import register_optimizer_step_post_hook

import clip_weights
from clip_model import CLIP, PRESETS
from clip_weights import save_clip
from data.imagenet import IMAGENET_R_INDICES, IMAGENET_WNIDS

WNIDS = [IMAGENET_WNIDS[i] for i in IMAGENET_R_INDICES[:4]]  # real wnids, also in ImageNet-R


def _images(folder, n, label, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # class-dependent colour so there is something to learn
        base = np.zeros((40, 40, 3), np.uint8) + np.uint8(60 * label)
        noise = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / f"{i}.JPEG")


@pytest.fixture(scope="session")
def imagenet_tree(tmp_path_factory):
    """root/{train,val}/<wnid> (4 classes, 8 + 3 images each), V2 integer folders, an ImageNet-R subset,
    and root/tiny.safetensors, a random tiny CLIP. Tests write their runs elsewhere (tmp_path)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(WNIDS):
        _images(root / "train" / wnid, 8, label, rng)
        _images(root / "val" / wnid, 3, label, rng)
        _images(root / "imagenetv2-matched-frequency-format-val" / str(label), 2, label, rng)
        if label < 3:
            _images(root / "imagenet-r" / wnid, 2, label, rng)
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), root / "tiny.safetensors")
    return root


@pytest.fixture(scope="session")
def train_args(imagenet_tree):
    """train_args(run_dir, *extra): train.py's flags for a run on imagenet_tree with the tiny CLIP, global
    batch 8 (4 steps per epoch), no worker processes, 2 warm-up steps; later flags override earlier ones."""

    def make(run_dir, *extra):
        return [
            "--data",
            "imagenet",
            "--data-root",
            str(imagenet_tree),
            "--model",
            str(imagenet_tree / "tiny.safetensors"),
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--warmup",
            "2",
            "--run-dir",
            str(run_dir),
            *extra,
        ]

    return make


@pytest.fixture
def optimizer_steps():
    """A list that gets one entry per optimiser step taken in this process while the test runs (any
    torch.optim optimiser): a resumed run must take only the steps it has left."""
    steps = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: steps.append(type(optimizer).__name__))
    yield steps
    handle.remove()


@pytest.fixture(scope="session")
def at_alpha():
    """Independent reference for the merge at alpha: at_alpha(model, alpha) is an unmerged copy whose
    update is scaled in the method's own parameters (R-Adapter's W_adp or up factor B, LoRA's B, SSF's
    gamma - 1 and beta)."""

    def scaled(model, alpha):
        ref = copy.deepcopy(model)
        with torch.no_grad():
            for name, p in ref.named_parameters():
                if name.endswith((".adapter.W_adp", ".adapter.B", ".lora_B", ".beta")):
                    p.mul_(alpha)
                elif name.endswith(".gamma"):
                    p.copy_(1 + alpha * (p - 1))
        return ref

    return scaled


# ----------------------------------------------------------- segmentation
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


# ----------------------------------------------------------- signals and checkpoints
def step_of(ckpt):
    return torch.load(ckpt, weights_only=True)["step"]


def catches(pid, signum):
    """Whether process pid has a handler for signum installed (Linux: SigCgt in /proc/pid/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(mask >> (signum - 1) & 1)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty download cache; returns the hosts a download tried to reach."""
    tried = []

    def refuse(address, *args, **kwargs):
        tried.append(address[0])
        raise OSError("network unreachable")

    monkeypatch.setattr(clip_weights.socket, "create_connection", refuse)
    monkeypatch.setattr(clip_weights, "CACHE_DIR", tmp_path / "cache")
    return tried

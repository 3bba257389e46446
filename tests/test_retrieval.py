"""retrieval.py: recall@k by hand, the Karpathy readers on a tiny tree, and train.py --data coco end to end."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retrieval
import train
from clip_model import CLIP, PRESETS, save_clip, tokenize

COCO_SPLITS = {"train": 3, "restval": 2, "val": 1, "test": 3}  # images per split
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "grey", "pink", "brown"]


def _jpeg(path, value, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.uint8(value) + rng.integers(0, 40, (40, 40, 3), dtype=np.uint8)).save(path)


def _karpathy_tree(root, name, splits, rng):
    """A fake ROOT/dataset_<name>.json (5 captions per image, 6 per test image) + tiny JPEGs."""
    images = []
    for split, n in splits.items():
        for _ in range(n):
            i = len(images)
            folder = ("train2014" if split == "train" else "val2014") if name == "coco" else "flickr30k-images"
            filename = f"{name}_{i:06d}.jpg"
            _jpeg(root / folder / filename, 25 * i, rng)
            n_captions = 6 if split == "test" else 5  # (some real COCO test images have 6 or 7)
            entry = {"filename": filename, "split": split, "imgid": i,
                     "sentences": [{"raw": f"a {COLOURS[i]} square, view {k}", "imgid": i} for k in range(n_captions)]}
            if name == "coco":
                entry |= {"filepath": folder, "cocoid": 1000 + i}
            images.append(entry)
    (root / retrieval.DATASETS[name]).write_text(json.dumps({"images": images, "dataset": name}))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """ROOT = COCO layout with ROOT/flickr30k in the Flickr30k layout, and a random tiny CLIP."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    _karpathy_tree(root, "coco", COCO_SPLITS, rng)
    _karpathy_tree(root / "flickr30k", "flickr30k", {"train": 1, "val": 1, "test": 2}, rng)
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), root / "tiny.safetensors")
    return root


def test_recall_at_k_by_hand():
    # sims[i, t], image i vs caption t; captions 2i and 2i+1 describe image i.
    sims = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.3, 0.35],   # own caption ranks 1st
                         [0.7, 0.6, 0.1, 0.25, 0.5, 0.3],   # best own caption (t3) ranks 5th
                         [0.1, 0.2, 0.3, 0.9, 0.55, 0.4]])  # best own caption (t4) ranks 2nd
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    r = retrieval.recall_at_k(torch.eye(3), sims.T, text_to_image, ks=(1, 2, 5))
    # caption -> image ranks of the right image, per column: 1, 3, 3, 2, 1, 1
    expected = {"i2t_R@1": 100 / 3, "i2t_R@2": 200 / 3, "i2t_R@5": 100.0,
                "t2i_R@1": 50.0, "t2i_R@2": 400 / 6, "t2i_R@5": 100.0}
    assert r == pytest.approx({**expected, "rsum": sum(expected.values())})
    assert list(retrieval.recall_at_k(torch.eye(3), sims.T, text_to_image)) == [
        "i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


def test_karpathy_reader(tree):
    data = retrieval.build_retrieval("coco", str(tree), context_length=20)
    assert len(data.train) == 25 and data.row_tokens.shape == (25, 20)  # (train + restval) x 5 captions
    assert data.row_image_id.tolist() == [i for i in range(5) for _ in range(5)]  # one image id per 5 captions
    assert torch.equal(data.row_tokens[7], tokenize("a green square, view 2", 20)[0])
    path, row = data.train.samples[7]
    assert row == 7 and Path(path) == tree / "train2014" / "coco_000001.jpg"

    coco, flickr = data.tests
    assert (coco.name, len(coco.images), len(coco.tokens)) == ("coco", 3, 15)  # 6th captions dropped
    assert coco.text_to_image.tolist() == [i for i in range(3) for _ in range(5)]
    assert Path(coco.images.samples[0][0]) == tree / "val2014" / "coco_000006.jpg"
    assert (flickr.name, len(flickr.images), len(flickr.tokens)) == ("flickr30k", 2, 10)
    assert Path(flickr.images.samples[1][0]) == tree / "flickr30k" / "flickr30k-images" / "flickr30k_000003.jpg"

    own = retrieval.build_retrieval("flickr30k", str(tree / "flickr30k"), context_length=20)
    assert len(own.train) == 5 and [t.name for t in own.tests] == ["flickr30k"]


def test_bad_trees_are_clear_errors(tree, tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset_coco.json"):
        retrieval.build_retrieval("coco", str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="dataset_coco.json: not a Karpathy split file"):
        retrieval.build_retrieval("coco", str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match="dataset_coco.json: not a Karpathy split file.*filepath"):
        retrieval.build_retrieval("coco", str(tmp_path))
    entry = {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "a cat"}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(FileNotFoundError, match="1 listed images are missing.*val2014/a.jpg"):
        retrieval.build_retrieval("coco", str(tmp_path))
    with pytest.raises(ValueError, match="--ood imagenet-r"):
        retrieval.build_retrieval("coco", str(tree), ood={"imagenet-r": str(tmp_path)})


def test_train_coco_end_to_end(tree, tmp_path, monkeypatch):
    labels, real = [], train.mpm_nce_loss

    def recording(f, g, y, **kwargs):
        labels.append(y.tolist())
        return real(f, g, y, **kwargs)

    monkeypatch.setattr(train, "mpm_nce_loss", recording)
    train.main(["--data", "coco", "--data-root", str(tree), "--model", str(tree / "tiny.safetensors"),
                "--method", "zero-shot,full-ft,r-adapter", "--epochs", "1", "--batch-size", "8", "--warmup", "1",
                "--workers", "0", "--run-dir", str(tmp_path)])
    # MPM-NCE labels are image ids: 8 captions of 5 images always share some
    assert labels and all(set(y) <= set(range(5)) and len(set(y)) < len(y) for y in labels)
    config = json.loads((tmp_path / "r-adapter" / "config.json").read_text())
    assert (config["alpha"], config["epsilon"]) == (0.8, 0.0)  # the retrieval recipe
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["method", "trainable", "test", "i2t_R@1", "i2t_R@5", "i2t_R@10",
                             "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]
    methods = ("zero-shot", "full-ft", "WiSE-FT (α=0.8)", "R-Adapter (α=0.8)")
    assert [(r["method"], r["test"]) for r in rows] == [(m, t) for m in methods for t in ("coco", "flickr30k")]
    assert all(float(r["i2t_R@10"]) == 100 == float(r["t2i_R@10"]) for r in rows)  # 3 and 2 test images
    assert (tmp_path / "r-adapter" / "merged.safetensors").exists()


def test_classification_only_flags_are_refused(tree, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "coco", "--data-root", str(tree), "--method", "clipfit"])
    assert "--data coco is retrieval" in capsys.readouterr().err

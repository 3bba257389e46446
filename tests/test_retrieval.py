"""retrieval.py: recall@k by hand, the Karpathy readers on a tiny tree, train.py --data coco end to end,
and evaluate.py's retrieval alpha sweep."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import evaluate
import mpm_nce
import r_adapter
import train
from clip_model import CLIP, PRESETS, tokenize
from clip_weights import load_clip, save_clip
from data import DataError, retrieval

COCO_SPLITS = {"train": 3, "restval": 2, "val": 1, "test": 3}  # images per split
COLOURS = ["red", "green", "blue", "yellow", "white", "black", "grey", "pink", "brown"]
METRICS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum"]


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
            entry = {
                "filename": filename,
                "split": split,
                "imgid": i,
                "sentences": [{"raw": f"a {COLOURS[i]} square, view {k}", "imgid": i} for k in range(n_captions)],
            }
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


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _metrics(row):
    return {k: row[k] for k in METRICS}


def test_recall_at_k_by_hand():
    # sims[i, t], image i vs caption t; captions 2i and 2i+1 describe image i.
    sims = torch.tensor(
        [
            [0.9, 0.1, 0.8, 0.2, 0.3, 0.35],  # own caption ranks 1st
            [0.7, 0.6, 0.1, 0.25, 0.5, 0.3],  # best own caption (t3) ranks 5th
            [0.1, 0.2, 0.3, 0.9, 0.55, 0.4],
        ]
    )  # best own caption (t4) ranks 2nd
    text_to_image = torch.tensor([0, 0, 1, 1, 2, 2])
    r = evaluate.recall_at_k(torch.eye(3), sims.T, text_to_image, ks=(1, 2, 5))
    # caption -> image ranks of the right image, per column: 1, 3, 3, 2, 1, 1
    expected = {
        "i2t_R@1": 100 / 3,
        "i2t_R@2": 200 / 3,
        "i2t_R@5": 100.0,
        "t2i_R@1": 50.0,
        "t2i_R@2": 400 / 6,
        "t2i_R@5": 100.0,
    }
    assert r == pytest.approx({**expected, "rsum": sum(expected.values())})
    assert list(evaluate.recall_at_k(torch.eye(3), sims.T, text_to_image)) == [
        "i2t_R@1",
        "i2t_R@5",
        "i2t_R@10",
        "t2i_R@1",
        "t2i_R@5",
        "t2i_R@10",
        "rsum",
    ]


def test_karpathy_reader(tree):
    data = retrieval.build("coco", str(tree), context_length=20)
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

    own = retrieval.build("flickr30k", str(tree / "flickr30k"), context_length=20)
    assert len(own.train) == 5 and [t.name for t in own.tests] == ["flickr30k"]


def test_bad_trees_are_clear_errors(tree, tmp_path):
    with pytest.raises(DataError, match="dataset_coco.json"):
        retrieval.build("coco", str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text('{"images": [')
    with pytest.raises(ValueError, match="dataset_coco.json: not a Karpathy split file"):
        retrieval.build("coco", str(tmp_path))
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    with pytest.raises(ValueError, match="dataset_coco.json: not a Karpathy split file.*filepath"):
        retrieval.build("coco", str(tmp_path))
    entry = {"filepath": "val2014", "filename": "a.jpg", "split": "test", "sentences": [{"raw": "a cat"}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": [entry]}))
    with pytest.raises(DataError, match="1 listed images are missing.*val2014/a.jpg"):
        retrieval.build("coco", str(tmp_path))
    with pytest.raises(ValueError, match="--ood imagenet-r"):
        retrieval.build("coco", str(tree), ood={"imagenet-r": str(tmp_path)})


def test_train_coco_end_to_end(tree, tmp_path, monkeypatch):
    labels, real = [], mpm_nce.mpm_nce_loss

    def recording(f, g, y, **kwargs):
        labels.append(y.tolist())
        return real(f, g, y, **kwargs)

    monkeypatch.setattr(mpm_nce, "mpm_nce_loss", recording)
    train.main(
        [
            "--data",
            "coco",
            "--data-root",
            str(tree),
            "--model",
            str(tree / "tiny.safetensors"),
            "--method",
            "zero-shot,full-ft,r-adapter",
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--run-dir",
            str(tmp_path),
            "--sweep",
        ]
    )
    # MPM-NCE labels are image ids: 8 captions of 5 images always share some
    assert labels and all(set(y) <= set(range(5)) and len(set(y)) < len(y) for y in labels)
    config = json.loads((tmp_path / "r-adapter" / "config.json").read_text())
    assert (config["alpha"], config["epsilon"]) == (0.8, 0.0)  # the retrieval recipe
    rows = _csv(tmp_path / "results.csv")
    assert list(rows[0]) == ["method", "run", "alpha", "trainable", "test", *METRICS]
    methods = ("zero-shot", "full-ft", "WiSE-FT (α=0.8)", "R-Adapter (α=0.8)")
    assert [(r["method"], r["test"]) for r in rows] == [(m, t) for m in methods for t in ("coco", "flickr30k")]
    assert all(float(r["i2t_R@10"]) == 100 == float(r["t2i_R@10"]) for r in rows)  # 3 and 2 test images
    assert (tmp_path / "r-adapter" / "merged.safetensors").exists()

    # --sweep: WiSE-FT (after full-ft) and R-Adapter at alpha 0, 0.1, ..., 1 on both test sets
    sweep = _csv(tmp_path / "alpha_sweep.csv")
    assert list(sweep[0]) == ["method", "alpha", "test", *METRICS]
    assert [(r["method"], float(r["alpha"]), r["test"]) for r in sweep] == [
        (m, a / 10, t) for m in ("WiSE-FT", "R-Adapter") for a in range(11) for t in ("coco", "flickr30k")
    ]
    table = {(r["method"], r["test"]): _metrics(r) for r in rows}
    at = {(r["method"], float(r["alpha"]), r["test"]): _metrics(r) for r in sweep}
    for t in ("coco", "flickr30k"):  # the sweep's ends and alpha 0.8 are the table's rows
        assert at["WiSE-FT", 0, t] == at["R-Adapter", 0, t] == table["zero-shot", t]
        assert at["WiSE-FT", 1, t] == table["full-ft", t]
        assert at["WiSE-FT", 0.8, t] == table["WiSE-FT (α=0.8)", t]
        assert at["R-Adapter", 0.8, t] == table["R-Adapter (α=0.8)", t]
    assert (tmp_path / "alpha_sweep.png").stat().st_size > 1000


def test_evaluate_retrieval_sweep(tree, tmp_path):
    model = load_clip(tree / "tiny.safetensors")
    r_adapter.add_adapters(model)
    torch.manual_seed(0)
    with torch.no_grad():  # random adapters (zero-initialised ones would be the zero-shot model at any alpha)
        for name, p in r_adapter.adapter_parameters(model):
            if name.endswith("W_adp"):
                p.normal_(std=0.3)
    checkpoints.save_adapters(model, tmp_path / "adapters.safetensors")
    common = ["--model", str(tree / "tiny.safetensors"), "--workers", "0"]
    coco = ["--data", "coco", "--data-root", str(tree)]
    evaluate.main([*common, *coco, "--out", str(tmp_path / "zero-shot")])
    evaluate.main(
        [
            *common,
            *coco,
            "--adapters",
            str(tmp_path / "adapters.safetensors"),
            "--alpha",
            "0,0.5,1",
            "--out",
            str(tmp_path / "sweep"),
        ]
    )

    zero_shot, sweep = _csv(tmp_path / "zero-shot" / "results.csv"), _csv(tmp_path / "sweep" / "results.csv")
    assert list(sweep[0]) == ["alpha", "test", *METRICS]
    assert [(float(r["alpha"]), r["test"]) for r in zero_shot] == [(0, "coco"), (0, "flickr30k")]
    tests = ("coco", "flickr30k")
    assert [(float(r["alpha"]), r["test"]) for r in sweep] == [(a, t) for a in (0, 0.5, 1) for t in tests]
    assert [_metrics(r) for r in sweep[:2]] == [_metrics(r) for r in zero_shot]  # alpha 0 is zero-shot CLIP
    assert [_metrics(r) for r in sweep[4:]] != [_metrics(r) for r in zero_shot]  # the adapters do change it
    assert (tmp_path / "sweep" / "alpha_sweep.png").stat().st_size > 1000  # coco rsum vs flickr30k rsum
    assert not (tmp_path / "zero-shot" / "alpha_sweep.png").exists()

    # one test set (Flickr30k alone): rsum against alpha
    evaluate.main(
        [
            *common,
            "--data",
            "flickr30k",
            "--data-root",
            str(tree / "flickr30k"),
            "--adapters",
            str(tmp_path / "adapters.safetensors"),
            "--alpha",
            "0,1",
            "--out",
            str(tmp_path / "f"),
        ]
    )
    assert [r["test"] for r in _csv(tmp_path / "f" / "results.csv")] == ["flickr30k", "flickr30k"]
    assert (tmp_path / "f" / "alpha_sweep.png").stat().st_size > 1000


def test_classification_only_flags_are_refused(tree, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "coco", "--data-root", str(tree), "--method", "clipfit"])
    assert "--data coco is retrieval" in capsys.readouterr().err

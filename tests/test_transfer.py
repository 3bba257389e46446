"""transfer.py: ImageNet 16-shot training, then the same weights on CoOp datasets and ImageNet shifts,
averaged over seeds, on a generated CoOp-layout root (tiny CLIP, CPU)."""

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_coop import make_dtd

import evaluate
import transfer
from clip_model import CLIP, PRESETS
from clip_weights import save_clip
from data.imagenet import IMAGENET_R_INDICES, IMAGENET_WNIDS

WNIDS = [IMAGENET_WNIDS[i] for i in IMAGENET_R_INDICES[:3]]  # real wnids, also in ImageNet-R


def _images(folder, n, label, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.uint8(70 * label) + rng.integers(0, 60, (24, 24, 3), dtype=np.uint8)).save(
            folder / f"{i}.jpg"
        )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """CoOp's layout: imagenet/images/{train,val}, two shifts where DATASETS.md puts them, and DTD."""
    root = tmp_path_factory.mktemp("coop")
    rng = np.random.default_rng(0)
    for label, wnid in enumerate(WNIDS):
        _images(root / "imagenet" / "images" / "train" / wnid, 16, label, rng)  # 16 shots
        _images(root / "imagenet" / "images" / "val" / wnid, 2, label, rng)
        _images(root / transfer.SHIFTS["imagenet-v2"] / str(label), 2, label, rng)  # task class index
        _images(root / transfer.SHIFTS["imagenet-r"] / wnid, 2, label, rng)
    make_dtd(root)
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), root / "tiny.safetensors")
    return root


def run(root, out, *extra):
    return transfer.main(
        ["--data-root", str(root), "--model", str(root / "tiny.safetensors"), "--workers", "0", "--run-dir", str(out)]
        + list(extra)
    )


def test_one_table_averaged_over_seeds(root, tmp_path, capsys):
    out = tmp_path / "xd"
    run(root, out, "--method", "zero-shot,coop", "--seeds", "2", "--max-steps", "1", "--batch-size", "8")
    printed = capsys.readouterr().out
    assert "eurosat: not found under" in printed and "dtd: not found" not in printed  # absent targets: one line
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"zero-shot", "coop"}
    assert [k for k in rows["coop"] if not k.endswith("_se")] == [
        "method",
        "imagenet",
        "dtd",
        "xd_avg",
        "imagenet-v2",
        "imagenet-r",
        "dg_avg",
    ]
    with open(out / "seeds.csv") as f:
        seeds = list(csv.DictReader(f))
    assert [(r["method"], r["seed"]) for r in seeds] == [
        ("zero-shot", "1"),
        ("zero-shot", "2"),
        ("coop", "1"),
        ("coop", "2"),
    ]
    for r in seeds:
        assert float(r["dg_avg"]) == pytest.approx((float(r["imagenet-v2"]) + float(r["imagenet-r"])) / 2)
        assert float(r["xd_avg"]) == pytest.approx(float(r["dtd"]))  # the only target found
    coop = [r for r in seeds if r["method"] == "coop"]
    for k in ("imagenet", "dtd", "dg_avg"):
        values = [float(r[k]) for r in coop]
        assert float(rows["coop"][k]) == pytest.approx(sum(values) / 2)
        assert float(rows["coop"][f"{k}_se"]) == pytest.approx(abs(values[0] - values[1]) / 2)  # sd / sqrt(2)
    assert float(rows["zero-shot"]["dtd_se"]) == 0  # nothing trains: every seed scores alike
    assert (out / "seed2" / "coop" / "prompt_learner.safetensors").exists()
    assert json.loads((out / "seed2" / "coop" / "config.json").read_text())["seed"] == 2


def test_targets_are_scored_as_evaluate_py_scores_them(root, tmp_path):
    """The zero-shot row's DTD cell equals evaluate.py's own zero-shot run on DTD (its CoOp prompt)."""
    rows = run(root, tmp_path / "xd", "--method", "zero-shot", "--seeds", "1")
    evaluate.main(
        ["--model", str(root / "tiny.safetensors"), "--data", "dtd", "--data-root", str(root), "--workers", "0"]
        + ["--out", str(tmp_path / "eval")]
    )
    with open(tmp_path / "eval" / "results.csv") as f:
        assert rows[0]["dtd"] == pytest.approx(float(next(csv.DictReader(f))["dtd"]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shots", "4"], "--shots: transfer.py sets it"),
        (["--data=dtd"], "--data: transfer.py sets it"),
        (["--method", "linear-probe"], "linear-probe"),
        (["--seeds", "0"], "--seeds 0"),
    ],
)
def test_bad_flags_are_one_line(root, argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        transfer.main(["--data-root", str(root), *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err

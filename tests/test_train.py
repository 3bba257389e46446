"""train.py and evaluate.py end to end on a tiny ImageNet-layout tree, tiny CLIP, CPU."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import data
import evaluate
import train
from clip_model import CLIP, PRESETS
from clip_weights import save_clip
from data.imagenet import IMAGENET_R_INDICES, IMAGENET_WNIDS

ROOT = Path(__file__).resolve().parents[1]
WNIDS = [IMAGENET_WNIDS[i] for i in IMAGENET_R_INDICES[:4]]  # real wnids, also in ImageNet-R


def _images(folder, n, label, rng):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):  # class-dependent colour so there is something to learn
        base = np.zeros((40, 40, 3), np.uint8) + np.uint8(60 * label)
        noise = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
        Image.fromarray(base + noise).save(folder / f"{i}.JPEG")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """root/{train,val}/<wnid>, V2 integer folders, ImageNet-R subset, plus a random tiny CLIP."""
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


def args(tree, run_dir, *extra):
    return [
        "--data",
        "imagenet",
        "--data-root",
        str(tree),
        "--model",
        str(tree / "tiny.safetensors"),
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


def test_r_adapter_end_to_end(tree, tmp_path):
    train.main(args(tree, tmp_path, "--epochs", "6", "--lr", "1e-2", "--m", "0.5"))
    run_dir = tmp_path / "r-adapter"
    epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(epochs) == 6 and epochs[-1]["loss"] < epochs[0]["loss"]  # training reduces the loss
    assert all(e["skipped_images"] == 0 and e["samples_per_s"] > 0 for e in epochs)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "method",
        "trainable",
        "imagenet",
        "imagenet-v2",
        "imagenet-r",
        "ood_avg",
        "imagenet_se",
        "imagenet-v2_se",
        "imagenet-r_se",
        "ood_avg_se",
        "skipped",
    ]
    ood = [float(rows[0][k]) for k in ("imagenet-v2", "imagenet-r")]
    assert math.isclose(float(rows[0]["ood_avg"]), sum(ood) / 2)
    assert json.loads((run_dir / "config.json").read_text())["method"] == "r-adapter"
    for name in ("adapters.safetensors", "merged.safetensors", "checkpoint.pt"):
        assert (run_dir / name).exists()

    # evaluate.py: the alpha sweep on the saved adapters, without retraining
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--model",
            str(tree / "tiny.safetensors"),
            "--adapters",
            str(run_dir / "adapters.safetensors"),
            "--data",
            "imagenet",
            "--data-root",
            str(tree),
            "--alpha",
            "0,0.5,1",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    with open(out / "results.csv") as f:
        sweep = list(csv.DictReader(f))
    assert [float(r["alpha"]) for r in sweep] == [0, 0.5, 1]
    assert (out / "alpha_sweep.png").stat().st_size > 1000
    assert sweep[1]["imagenet"] == rows[0]["imagenet"]  # alpha 0.5 = the merged model train.py evaluated

    # the merged export is a plain CLIP: evaluating it zero-shot gives the same numbers
    evaluate.main(
        [
            "--model",
            str(run_dir / "merged.safetensors"),
            "--data",
            "imagenet",
            "--data-root",
            str(tree),
            "--workers",
            "0",
            "--out",
            str(tmp_path / "merged"),
        ]
    )
    with open(tmp_path / "merged" / "results.csv") as f:
        assert next(csv.DictReader(f))["imagenet"] == rows[0]["imagenet"]


def _final_adapters(run_dir):
    with safe_open(str(run_dir / "r-adapter" / "adapters.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _train_cmd(tree, run_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *args(tree, run_dir, "--epochs", "3", "--save-every", "1", "--method", "r-adapter", *extra),
    ]


def test_resume_after_sigkill_reaches_the_same_weights(tree, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    subprocess.run(_train_cmd(tree, straight), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_train_cmd(tree, killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt, deadline = killed / "r-adapter" / "checkpoint.pt", time.time() + 120
    while time.time() < deadline:  # kill mid-epoch 2 (4 steps per epoch, 12 in all)
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 5:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= step < 12, f"killed at step {step}"
    assert not (killed / "r-adapter" / "adapters.safetensors").exists()
    subprocess.run(_train_cmd(tree, killed, "--resume", "latest"), check=True, env=env, capture_output=True)

    a, b = _final_adapters(straight), _final_adapters(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_step_sampler_shards_and_resumes_exactly():
    full = list(data.StepSampler(40, 8, seed=3))
    assert sorted(i for _, i in full) == list(range(40))
    ranks = [data.StepSampler(40, 8, seed=3, rank=r, world=2) for r in range(2)]
    per_step = [[list(s)[k * 4 : (k + 1) * 4] for s in ranks] for k in range(5)]
    assert [x for step in per_step for shard in step for x in shard] == full  # shards = the global batch
    resumed = data.StepSampler(40, 8, seed=3)
    resumed.set_epoch(0, start_step=2)
    assert list(resumed) == full[16:]
    resumed.set_epoch(1)
    assert list(resumed) != full


def test_lr_schedule():
    cfg = train.TrainConfig(lr=1.0, min_lr=0.01, warmup=10)
    lrs = [train.lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_bad_inputs_are_clear_errors(tree, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "imagenet", "--model", str(tree / "tiny.safetensors")])
    assert "needs --data-root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(args(tree, tmp_path / "x", "--method", "magic"))
    assert "--method magic: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="val: evaluation folder not found"):
        train.main([*args(tree, tmp_path / "y"), "--data-root", str(tmp_path)])  # no val/: wrong layout

    # a checkpoint from another architecture
    run_dir = tmp_path / "arch"
    train.main(args(tree, run_dir, "--epochs", "1", "--method", "r-adapter", "--no-sweep"))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_clip(CLIP(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "text_layers": 3})), other)
    with pytest.raises(SystemExit, match="written by a run with --model .*tiny.safetensors, this one has .*other"):
        train.main([*args(tree, run_dir, "--epochs", "2", "--resume", "latest"), "--model", str(other)])


def test_full_ft_and_zero_shot_rows(tree, tmp_path):
    train.main(args(tree, tmp_path / "cmp", "--epochs", "1", "--method", "zero-shot,full-ft"))
    with open(tmp_path / "cmp" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "full-ft", "WiSE-FT (α=0.5)"]
    assert rows[0]["trainable"] == "0" and int(rows[1]["trainable"]) > 1_000_000

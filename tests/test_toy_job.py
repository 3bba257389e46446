"""The default job (`python train.py`) at tiny budgets: pretrain -> cache -> three methods -> table + plot."""
import csv

import torch

import train
from clip_model import load_clip


def test_default_job_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(train, "TOY_PRETRAIN", {**train.TOY_PRETRAIN, "pairs": 256, "steps": 3, "batch_size": 32})
    out = tmp_path / "runs"
    train.main(["--max-steps", "2", "--batch-size", "32", "--run-dir", str(out)])

    cached = train.toy_clip_path()
    assert cached.parent == tmp_path / "cache" and cached.exists()
    model = load_clip(cached)  # the cached toy CLIP is a plain CLIP checkpoint
    assert model.config.image_size == 32

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "full-ft", "WiSE-FT (α=0.5)", "R-Adapter (α=0.5)"]
    assert list(rows[0])[2:] == ["toy-photo", "toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c", "ood_avg", "skipped"]
    with open(out / "alpha_sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert {r["method"] for r in sweep} == {"R-Adapter", "WiSE-FT"} and len(sweep) == 22
    # alpha = 0 is the zero-shot model for both ensembles
    for name in ("R-Adapter", "WiSE-FT"):
        at0 = next(r for r in sweep if r["method"] == name and float(r["alpha"]) == 0)
        assert at0["toy-photo"] == rows[0]["toy-photo"] and at0["ood_avg"] == rows[0]["ood_avg"]
    assert (out / "alpha_sweep.png").stat().st_size > 1000

    # a second run reuses the cached toy CLIP
    stamp = cached.stat().st_mtime_ns
    train.main(["--method", "zero-shot", "--run-dir", str(tmp_path / "again")])
    assert cached.stat().st_mtime_ns == stamp
    assert torch.equal(load_clip(cached).logit_scale, model.logit_scale)

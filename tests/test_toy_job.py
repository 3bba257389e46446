"""The default job (`python train.py`) at tiny budgets: pretrain -> cache -> three methods -> table + plot."""
import csv

import pytest
import torch

import train
from clip_model import PRESETS, load_clip


def test_default_job_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(train, "TOY_PRETRAIN", {**train.TOY_PRETRAIN, "pairs": 256, "steps": 3, "batch_size": 32})
    out = tmp_path / "runs"
    train.main(["--max-steps", "2", "--batch-size", "32", "--run-dir", str(out)])

    cached = train.toy_clip_path()
    assert cached.parent == tmp_path / "cache" and cached.exists()
    model = load_clip(cached)  # the cached toy CLIP is a plain CLIP checkpoint
    assert model.config == PRESETS["toy"]  # the conv-stem preset, read back from the file

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


@pytest.mark.slow
def test_every_method_on_the_toy_world(tmp_path, monkeypatch):
    """Issue #6's comparison at smoke budgets: every method trains on the toy world and lands in one
    table with every split (the full run is the README's `--method` list command)."""
    monkeypatch.setattr(train, "CACHE_DIR", tmp_path / "cache")
    monkeypatch.setattr(train, "TOY_PRETRAIN", {**train.TOY_PRETRAIN, "pairs": 256, "steps": 3, "batch_size": 32})
    out = tmp_path / "runs"
    train.main(["--method", ",".join(train.METHODS), "--max-steps", "2", "--batch-size", "32",
                "--run-dir", str(out)])
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"R-Adapter (α=0.5)", "clipfit", "full-ft", "WiSE-FT (α=1)", "WiSE-FT (α=0.5)", "flyp",
                         "linear-probe", "prolip", "lora (r=8)", "zero-shot"}
    for name, row in rows.items():
        accs = [float(row[k]) for k in ("toy-photo", "toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c")]
        assert all(0 <= a <= 100 for a in accs), name
        assert float(row["ood_avg"]) == pytest.approx(sum(accs[1:]) / 5, abs=0.01), name
    assert int(rows["zero-shot"]["trainable"]) == 0 < int(rows["clipfit"]["trainable"]) < int(rows["full-ft"]["trainable"])

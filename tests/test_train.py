"""train.py and evaluate.py end to end on a tiny ImageNet-layout tree, tiny CLIP, CPU."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import checkpoints
import data
import evaluate
import mpm_nce
import r_adapter
import reparam
import train
from clip_model import CLIP, PRESETS
from clip_weights import load_clip, save_clip

ROOT = Path(__file__).resolve().parents[1]


def test_r_adapter_end_to_end(imagenet_tree, train_args, tmp_path):
    train.main(train_args(tmp_path, "--epochs", "6", "--lr", "1e-2", "--m", "0.5"))
    run_dir = tmp_path / "r-adapter"
    epochs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert len(epochs) == 6 and epochs[-1]["loss"] < epochs[0]["loss"]  # training reduces the loss
    assert all(e["skipped_images"] == 0 and e["samples_per_s"] > 0 for e in epochs)
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == [
        "method",
        "run",
        "alpha",
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
            str(imagenet_tree / "tiny.safetensors"),
            "--adapters",
            str(run_dir / "adapters.safetensors"),
            "--data",
            "imagenet",
            "--data-root",
            str(imagenet_tree),
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
            str(imagenet_tree),
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


def _train_cmd(train_args, run_dir, *extra):
    """train.py in a process of its own, which reports the optimiser steps it took (counted_train.py)."""
    flags = train_args(run_dir, "--epochs", "3", "--save-every", "1", "--method", "r-adapter", "--no-sweep", *extra)
    return [sys.executable, str(ROOT / "tests" / "counted_train.py"), *flags]


def test_resume_after_sigkill_reaches_the_same_weights(train_args, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    out = subprocess.run(_train_cmd(train_args, straight), check=True, env=env, capture_output=True, text=True)
    assert "rank 0: 12 optimizer steps" in out.stdout

    cmd = _train_cmd(train_args, killed)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
    resumed = subprocess.run(
        _train_cmd(train_args, killed, "--resume", "latest"), check=True, env=env, capture_output=True, text=True
    )
    # every draw is a function of (seed, step): a silent restart from step 0 would end with the same weights
    assert f"resumed from {ckpt} at step {step}/12" in resumed.stdout
    assert f"rank 0: {12 - step} optimizer steps" in resumed.stdout

    a, b = _final_adapters(straight), _final_adapters(killed)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_starts_from_the_checkpoint_weights(train_args, tmp_path, optimizer_steps, capsys):
    """Stopped at step 5 of 12 and resumed: the uninterrupted run's adapters bit for bit, in the 7 steps left.
    The same checkpoint with its trainable weights perturbed resumes to other adapters: it is what resumes."""
    common = ("--epochs", "3", "--save-every", "1", "--method", "r-adapter", "--no-sweep")
    train.main(train_args(tmp_path / "straight", *common))
    train.main(train_args(tmp_path / "stopped", *common, "--max-steps", "5"))
    shutil.copytree(tmp_path / "stopped", tmp_path / "perturbed")
    ckpt = tmp_path / "perturbed" / "r-adapter" / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 5 and state["trainable"]
    g = torch.Generator().manual_seed(0)
    state["trainable"] = {n: w + 1e-2 * torch.randn(w.shape, generator=g) for n, w in state["trainable"].items()}
    torch.save(state, ckpt)
    capsys.readouterr()

    for name in ("stopped", "perturbed"):
        optimizer_steps.clear()
        train.main(train_args(tmp_path / name, *common, "--resume", "latest"))
        where = tmp_path / name / "r-adapter" / "checkpoint.pt"
        assert f"resumed from {where} at step 5/12" in capsys.readouterr().out
        assert len(optimizer_steps) == 7, name
    straight, stopped, perturbed = (_final_adapters(tmp_path / d) for d in ("straight", "stopped", "perturbed"))
    assert straight.keys() == stopped.keys() == perturbed.keys()
    assert all(torch.equal(straight[k], stopped[k]) for k in straight)
    assert all(not torch.equal(straight[k], perturbed[k]) for k in straight)


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


def test_bad_inputs_are_clear_errors(imagenet_tree, train_args, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit):
        train.main(["--data", "imagenet", "--model", str(imagenet_tree / "tiny.safetensors")])
    assert "needs --data-root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.main(train_args(tmp_path / "x", "--method", "magic"))
    assert "--method magic: expected one of" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="val: evaluation folder not found"):
        train.main([*train_args(tmp_path / "y"), "--data-root", str(tmp_path)])  # no val/: wrong layout

    # a checkpoint of another --model (another architecture at the same path: test_errors.py)
    run_dir = tmp_path / "arch"
    train.main(train_args(run_dir, "--epochs", "1", "--method", "r-adapter", "--no-sweep"))
    other = tmp_path / "other.safetensors"
    torch.manual_seed(1)
    save_clip(CLIP(PRESETS["tiny"].__class__(**{**PRESETS["tiny"].__dict__, "text_layers": 3})), other)
    with pytest.raises(SystemExit, match="written by a run with --model .*tiny.safetensors, this one has .*other"):
        train.main([*train_args(run_dir, "--epochs", "2", "--resume", "latest"), "--model", str(other)])


def test_full_ft_and_zero_shot_rows(imagenet_tree, train_args, tmp_path):
    train.main(train_args(tmp_path / "cmp", "--epochs", "1", "--method", "zero-shot,full-ft"))
    with open(tmp_path / "cmp" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "full-ft", "WiSE-FT (α=0.5)"]
    image_tower = sum(p.numel() for p in load_clip(imagenet_tree / "tiny.safetensors").visual.parameters())
    head = 4 * 128  # WiSE-FT's head: 4 classes x the tiny CLIP's 128-dim embedding
    assert rows[0]["trainable"] == "0" and int(rows[1]["trainable"]) == image_tower + head


def test_the_table_scores_the_ema_adapters(imagenet_tree, train_args, tmp_path, monkeypatch):
    """A real run with m = 0.5: the saved EMA is W~ <- m W~ + (1 - m) W over the adapters after each optimiser
    step (recorded here by an optimiser hook, apart from AdapterEMA), and the R-Adapter row is scored, and
    merged.safetensors written, with the EMA adapters merged at alpha = 0.5, not the live ones."""
    history, row_features = [], []  # adapters before training and after each step; the row's image features
    probe = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the tiny CLIP's 32 x 32
    real_train, real_score = train.fine_tune, evaluate.score

    def recording_train(cfg, model, method, *rest, **kw):
        params = r_adapter.adapter_parameters(model)
        history.append({n: p.detach().clone() for n, p in params})
        record = lambda optimizer, args, kwargs: history.append({n: p.detach().clone() for n, p in params})
        handle = register_optimizer_step_post_hook(record)
        try:
            return real_train(cfg, model, method, *rest, **kw)
        finally:
            handle.remove()

    def recording_score(model, task, **kw):  # called under the row's weights
        with torch.no_grad():
            row_features.append(model.encode_image(probe))
        return real_score(model, task, **kw)

    monkeypatch.setattr(train, "fine_tune", recording_train)
    monkeypatch.setattr(evaluate, "score", recording_score)
    m = 0.5
    flags = ("--method", "r-adapter", "--epochs", "2", "--lr", "1e-2", "--m", str(m), "--no-sweep")
    train.main(train_args(tmp_path, *flags))
    run_dir = tmp_path / "r-adapter"
    saved = load_file(str(run_dir / "adapters.safetensors"))
    live = {n: w for n, w in saved.items() if not n.startswith("ema.")}
    ema = {n.removeprefix("ema."): w for n, w in saved.items() if n.startswith("ema.")}
    assert len(history) == 1 + 8 and live.keys() == ema.keys() == history[0].keys()
    assert all(torch.equal(live[n], history[-1][n]) for n in live)  # the hook saw what train.py saved

    expected = history[0]
    for after_step in history[1:]:
        expected = {n: m * expected[n] + (1 - m) * w for n, w in after_step.items()}
    for n, w in ema.items():
        torch.testing.assert_close(w, expected[n], rtol=1e-5, atol=1e-7)
        assert (w - history[0][n]).abs().max() > 1e-5, n  # moved from its initial value ...
        assert (w - live[n]).abs().max() > 1e-5, n  # ... and lags the live adapters

    base = load_clip(imagenet_tree / "tiny.safetensors")
    checkpoints.load_adapters(base, run_dir / "adapters.safetensors", use_ema=False)
    saved_ema = checkpoints.load_ema(base, run_dir / "adapters.safetensors")
    with torch.no_grad():
        with reparam.merged(base, 0.5, ema=saved_ema):
            with_ema = base.encode_image(probe)
        with reparam.merged(base, 0.5):
            with_live = base.encode_image(probe)
        exported = load_clip(run_dir / "merged.safetensors").encode_image(probe)
    (row,) = row_features
    assert (with_ema - with_live).abs().max() > 1e-4  # so the comparison below can tell them apart
    torch.testing.assert_close(row, with_ema, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported, with_ema, rtol=1e-5, atol=1e-6)


def _adapters_and_losses(run_dir):
    losses = [json.loads(line)["loss"] for line in (run_dir / "r-adapter" / "log.jsonl").read_text().splitlines()]
    return load_file(str(run_dir / "r-adapter" / "adapters.safetensors")), losses


def test_accumulation_equals_the_whole_batch_for_a_per_sample_loss(train_args, tmp_path):
    """Cross-entropy over class logits is a mean over samples: with SGD, one template (none drawn), no
    adapter dropping and no clipping, 2 micro-batches of 4 take the step that one batch of 8 takes, up to
    fp32 rounding; so do the logged losses."""
    common = ["--method", "r-adapter", "--loss", "ce", "--prompts", "a photo of a {}.", "--p", "0"]
    common += ["--optimizer", "sgd", "--lr", "0.5", "--grad-clip", "0", "--epochs", "2", "--no-sweep"]
    train.main(train_args(tmp_path / "one", *common))
    train.main(train_args(tmp_path / "two", *common, "--accum-steps", "2"))
    one, one_losses = _adapters_and_losses(tmp_path / "one")
    two, two_losses = _adapters_and_losses(tmp_path / "two")
    assert two_losses == pytest.approx(one_losses, rel=1e-5) and len(one_losses) == 2
    W = [n for n in one if n.endswith("W_adp") and not n.startswith("ema.")]  # zero at the start: the update
    moved = max(one[n].abs().max().item() for n in W)
    assert moved > 1e-2
    assert one.keys() == two.keys() and all((one[n] - two[n]).abs().max() <= 1e-3 * moved for n in one)


def test_accumulated_mpm_nce_contrasts_within_each_micro_batch(train_args, tmp_path, monkeypatch):
    """README (Memory): with --accum-steps k the MPM-NCE batch is the micro-batch, batch / k pairs, and a
    step's loss is the mean of its micro-batches' losses."""
    calls, real = [], mpm_nce.mpm_nce_loss

    def recording(f, g, labels, **kw):
        loss = real(f, g, labels, **kw)
        calls.append((len(f), len(g), len(labels), loss.item()))
        return loss

    monkeypatch.setattr(mpm_nce, "mpm_nce_loss", recording)
    train.main(train_args(tmp_path, "--method", "r-adapter", "--epochs", "1", "--accum-steps", "2", "--no-sweep"))
    assert [c[:3] for c in calls] == [(4, 4, 4)] * 8  # 4 steps of 2 micro-batches of 4
    (logged,) = _adapters_and_losses(tmp_path)[1]
    assert logged == pytest.approx(sum(c[3] for c in calls) / 8, rel=1e-6)

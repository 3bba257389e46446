"""What a run reports as it goes (run_log.py): a log.jsonl line every --log-every steps and one per
epoch, a progress bar that does not write a line per step, TensorBoard when it is installed."""

import importlib.util
import json
import re
from types import SimpleNamespace

import pytest
import torch

import train
from run_log import RunLog


def run(tree, tmp_path, *extra):
    """r-adapter on the folder tree: 8 images, batch 2 -> 4 steps per epoch, 2 epochs."""
    argv = ["--data", "folder", "--data-root", str(tree), "--model", str(tree / "tiny.safetensors")]
    argv += ["--method", "r-adapter", "--batch-size", "2", "--epochs", "2", "--warmup", "2", "--workers", "0"]
    train.main([*argv, "--run-dir", str(tmp_path), *extra])
    return [json.loads(line) for line in (tmp_path / "r-adapter" / "log.jsonl").read_text().splitlines()]


def test_a_line_every_log_every_steps_and_one_per_epoch(tree, tmp_path):
    lines = run(tree, tmp_path / "every3", "--log-every", "3")
    assert [(line["kind"], line["step"], line["epoch"]) for line in lines] == [
        ("step", 3, 0),
        ("epoch", 4, 0),
        ("step", 6, 1),
        ("epoch", 8, 1),
    ]
    for line in lines:
        assert set(line) == {"kind", "step", "epoch", "loss", "lr", "samples_per_s", "skipped_images", "skipped_steps"}
        assert line["samples_per_s"] > 0 and line["skipped_images"] == 0
        cfg = train.TrainConfig(lr=5e-4, warmup=2, min_lr=1e-6)
        assert line["lr"] == pytest.approx(train.lr_at(line["step"] - 1, 8, cfg))  # the last step's lr

    lines = run(tree, tmp_path / "every1", "--log-every", "1")  # each step's loss, and each epoch's mean
    steps, epochs = [x for x in lines if x["kind"] == "step"], [x for x in lines if x["kind"] == "epoch"]
    assert [x["step"] for x in steps] == list(range(1, 9)) and len(epochs) == 2
    for e in epochs:
        mean = sum(x["loss"] for x in steps if x["epoch"] == e["epoch"]) / 4
        assert e["loss"] == pytest.approx(mean, rel=1e-6)


def test_the_bar_redraws_at_most_every_few_seconds(tmp_path, capsys):
    """372 steps that each set the bar's loss: a handful of redraws, not one line per step."""
    cfg = SimpleNamespace(log_every=1, report_to=None, run_dir=str(tmp_path), method="r-adapter")
    log = RunLog(cfg, total=372, start=0, device=torch.device("cpu"))
    for step in range(1, 373):
        log.add(torch.tensor(0.5), samples=32, skipped=0)
        log.step(step, epoch=0, lr=1e-3)
    log.close()
    redraws = [s for s in re.split(r"[\r\n]", capsys.readouterr().err) if s.strip()]
    assert 1 <= len(redraws) <= 4, redraws
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 372


def test_report_to_tensorboard_writes_the_scalars(tree, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = run(tree, tmp_path, "--log-every", "2", "--report-to", "tensorboard")
    events = EventAccumulator(str(tmp_path / "r-adapter" / "tensorboard"))
    events.Reload()
    assert {"step/loss", "step/lr", "step/samples_per_s", "epoch/loss"} <= set(events.Tags()["scalars"])
    logged = {x["step"]: x["loss"] for x in lines if x["kind"] == "step"}
    assert {e.step: e.value for e in events.Scalars("step/loss")} == pytest.approx(logged, rel=1e-6)


def test_report_to_tensorboard_without_it_says_what_to_install(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--report-to", "tensorboard"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard)" in err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_peak_memory_is_logged_on_cuda(tmp_path):
    cfg = SimpleNamespace(log_every=1, report_to=None, run_dir=str(tmp_path), method="r-adapter")
    log = RunLog(cfg, total=1, start=0, device=torch.device("cuda"))
    held = torch.empty(2**28, dtype=torch.uint8, device="cuda")  # 256 MiB
    log.add(torch.tensor(0.5, device="cuda"), samples=1, skipped=0)
    log.step(1, epoch=0, lr=1e-3)
    log.close()
    assert json.loads((tmp_path / "log.jsonl").read_text())["peak_memory_gib"] >= 0.25
    del held


def test_the_bar_shows_each_steps_lr_and_the_last_loss_read_with_its_step(tmp_path):
    cfg = SimpleNamespace(log_every=3, report_to=None, run_dir=str(tmp_path), method="r-adapter")
    log = RunLog(cfg, total=7, start=0, device=torch.device("cpu"))
    for step in range(1, 8):
        lr = step * 1e-3
        log.add(torch.tensor(float(step)), samples=2, skipped=0)  # the loss of step s is s
        log.step(step, epoch=0, lr=lr)
        assert f"lr={lr:.2e}" in log.bar.postfix  # every step, not only at a log line
        last = 3 * (step // 3)  # the last step with a log line; its loss: the mean over the 3 steps before
        if last:
            assert f"loss={last - 1:.4f} (step {last})" in log.bar.postfix
        else:
            assert "loss" not in log.bar.postfix
    log.close()


def test_a_second_run_in_the_same_folder_is_refused_in_one_line(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    run(tree, out, "--max-steps", "2", "--log-every", "1")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit) as e:
        run(tree, out, "--max-steps", "2", "--log-every", "1")
    assert e.value.code == (
        f"error: {out} holds a run already: continue it with --resume latest, or start over with --overwrite "
        "(deletes its checkpoints, logs and exports)"
    )
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing touched
    # --overwrite starts over: the old method's folder and exports go, the log holds the new run only
    argv = ["--data", "folder", "--data-root", str(tree), "--model", str(tree / "tiny.safetensors"), "--workers", "0"]
    argv += ["--method", "lora", "--rank", "2", "--batch-size", "2", "--max-steps", "1", "--log-every", "1"]
    train.main([*argv, "--run-dir", str(out), "--overwrite"])
    assert sorted(p.name for p in out.iterdir()) == ["lora", "results.csv", "results.json"]
    assert not json.loads((out / "lora" / "config.json").read_text())["overwrite"]  # a replay deletes nothing
    logged = [json.loads(line) for line in (out / "lora" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in logged] == [1, 1]  # its step line and its epoch line


def test_overwrite_leaves_what_a_run_did_not_write(tree, tmp_path, capsys):
    out = tmp_path / "runs"
    run(tree, out, "--max-steps", "1")
    (out / "notes.txt").write_text("mine")
    run(tree, out, "--max-steps", "1", "--overwrite")
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(SystemExit) as e:
        run(tree, out, "--overwrite", "--resume", "latest")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--overwrite starts over, --resume latest continues: give one of them" in err


def test_a_resumed_log_holds_each_step_once(tree, tmp_path):
    """Lines written after the checkpoint by a run that was then killed (one of them cut short) are dropped
    on --resume latest: the resumed run logs those steps again."""
    out = tmp_path / "runs"
    run(tree, out, "--max-steps", "2", "--log-every", "1")  # a checkpoint at step 2
    log = out / "r-adapter" / "log.jsonl"
    with open(log, "a") as f:
        f.write(json.dumps({"kind": "step", "step": 3, "epoch": 0, "loss": 9.0}) + "\n" + '{"kind": "st')
    lines = run(tree, out, "--log-every", "1", "--resume", "latest")
    assert [x["step"] for x in lines if x["kind"] == "step"] == list(range(1, 9))
    assert all(x["loss"] != 9.0 for x in lines)

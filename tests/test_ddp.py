"""DDP on CPU: `torchrun --nproc-per-node 2` (gloo) trains as one process on the same global batch.

Under DDP each rank holds half of every global batch (StepSampler), MPM-NCE sees the whole batch
through gather_features, and the templates are drawn for the global batch (distributed.shared_randint),
so losses and adapters match a single process within fp32 reduction-order noise. Adapter dropping
is off (--p 0): its masks are drawn per rank, from (seed, step, rank), and cannot match one
process's draw over the global batch (nor should they: they only need to be independent).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

import data
import evaluate
import train
import train_seg
from clip_model import CLIP, PRESETS, image_transform, tokenize
from clip_weights import load_clip, save_clip
from conftest import catches, step_of
from data import retrieval

ROOT = Path(__file__).resolve().parents[1]
LR = 5e-4  # the default, stated for the tolerance below
TORCHRUN = Path(sys.executable).with_name("torchrun")
LAUNCH = [str(TORCHRUN)] if TORCHRUN.exists() else [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def flags(train_args, run_dir, epochs, *extra):
    # batch 8 = 4 per rank, 4 steps per epoch; p = 0: no adapter dropping (module docstring)
    return train_args(
        run_dir, "--epochs", str(epochs), "--method", "r-adapter", "--p", "0", "--save-every", "1", *extra
    )


def torchrun(argv, log, script=ROOT / "tests" / "counted_train.py"):
    """Start script (by default train.py, each rank printing the optimiser steps it took: counted_train.py)
    on 2 ranks; the output goes to the file log (a pipe could fill up and block it)."""
    # '--' ends torchrun's own options: its parser would read train.py's --p as an ambiguous prefix
    cmd = [*LAUNCH, "--standalone", "--nproc-per-node", "2", "--", str(script), *argv]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


def finished(proc, timeout=300):
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, Path(proc.log).read_text()[-3000:]


def losses(run_dir):
    """The epoch losses of log.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "r-adapter" / "log.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line["kind"] == "epoch"]


def adapters(run_dir):  # live adapters and their EMA, as train.py saved them at the end
    return load_file(str(run_dir / "r-adapter" / "adapters.safetensors"))


def assert_same_adapters(a, b):
    """Within 1% of one AdamW step (whose per-weight size is about lr): AdamW divides each gradient by
    its running RMS, so fp32 noise in near-zero gradients moves a few weights by ~1e-3 lr."""
    assert a.keys() == b.keys() and len(a) > 0
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= 1e-2 * LR, worst


def test_two_ranks_train_like_one_process(train_args, tmp_path):
    ddp = torchrun(flags(train_args, tmp_path / "ddp", 2), tmp_path / "ddp.log")
    train.main(flags(train_args, tmp_path / "one", 2))  # meanwhile, the same global batch in this process
    finished(ddp)
    one, two = losses(tmp_path / "one"), losses(tmp_path / "ddp")
    assert len(one) == len(two) == 2
    assert one == pytest.approx(two, rel=1e-5)
    assert_same_adapters(adapters(tmp_path / "one"), adapters(tmp_path / "ddp"))


def _rank_pid(parent, rank):
    """The pid of the worker torchrun started with RANK=rank (its child, found through /proc)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            env = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # the process ended meanwhile
        if f"RANK={rank}".encode() in env:
            return int(stat.parent.name)
    return None


@pytest.fixture(scope="module")
def straight(train_args, tmp_path_factory):
    """A 2-rank run of 12 steps that nothing interrupted."""
    run_dir = tmp_path_factory.mktemp("straight")
    finished(torchrun(flags(train_args, run_dir, 3), run_dir / "log"))
    return run_dir


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)")
def test_sigkill_one_rank_then_resume_both(train_args, tmp_path):
    straight = torchrun(flags(train_args, tmp_path / "straight", 3), tmp_path / "straight.log")
    killed_dir = tmp_path / "killed"
    killed = torchrun(flags(train_args, killed_dir, 3), tmp_path / "killed.log")
    ckpt, deadline = killed_dir / "r-adapter" / "checkpoint.pt", time.time() + 240
    while time.time() < deadline:  # kill rank 0, the checkpoint writer, mid-epoch 2 (12 steps in all)
        if ckpt.exists() and torch.load(ckpt, weights_only=True)["step"] >= 5:
            break
        time.sleep(0.05)
    pid = _rank_pid(killed.pid, 0)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert killed.wait(timeout=120) != 0  # torchrun stops the other rank and fails
    step = torch.load(ckpt, weights_only=True)["step"]
    assert 5 <= step < 12, f"killed at step {step}"
    assert not (killed_dir / "r-adapter" / "adapters.safetensors").exists()
    resumed = torchrun(flags(train_args, killed_dir, 3, "--resume", "latest"), tmp_path / "resumed.log")
    finished(resumed)
    finished(straight)
    out = Path(resumed.log).read_text()  # a silent restart from step 0 would end with the same weights
    assert f"resumed from {ckpt} at step {step}/12" in out
    assert f"rank 0: {12 - step} optimizer steps" in out and f"rank 1: {12 - step} optimizer steps" in out
    assert "rank 0: 12 optimizer steps" in Path(straight.log).read_text()
    a, b = adapters(tmp_path / "straight"), adapters(killed_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same ranks, same order: exact
    assert losses(killed_dir)[-1] == losses(tmp_path / "straight")[-1]  # epoch 3 ran wholly after the resume


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc (Linux)")
@pytest.mark.parametrize("signum, stopped", [(signal.SIGTERM, "preempted"), (signal.SIGINT, "interrupted")])
def test_sigterm_or_ctrl_c_to_torchrun_stops_both_ranks_at_one_step_then_resume(
    train_args, tmp_path, straight, signum, stopped
):
    run_dir, log = tmp_path / "stopped", tmp_path / "stopped.log"
    proc = torchrun(flags(train_args, run_dir, 3, "--save-every", "1000"), log)  # only a stop writes mid-epoch
    deadline = time.time() + 600  # generous: a loaded machine starts Python slowly
    while time.time() < deadline:  # both ranks are in the loop
        pids = [_rank_pid(proc.pid, r) for r in (0, 1)]
        if all(pid and catches(pid, signal.SIGTERM) for pid in pids):
            break
        time.sleep(0.01)
    proc.send_signal(signum)  # as SLURM does, or Ctrl-C in a terminal; torchrun passes it on to both workers
    proc.wait(timeout=120)
    step, out = step_of(run_dir / "r-adapter" / "checkpoint.pt"), log.read_text()
    assert out.count(f"{stopped} at step") == 1, out[-3000:]  # rank 0's line
    assert f"{stopped} at step {step}/12; continue with --resume latest" in out and 1 <= step < 4
    assert proc.returncode != 0 and not (run_dir / "r-adapter" / "adapters.safetensors").exists()
    finished(torchrun(flags(train_args, run_dir, 3, "--resume", "latest"), tmp_path / "resumed.log"))
    assert (
        f"resumed from {run_dir / 'r-adapter' / 'checkpoint.pt'} at step {step}/12"
        in Path(tmp_path / "resumed.log").read_text()
    )
    a, b = adapters(straight), adapters(run_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------ sharded evaluation
def _eval_tree(root):
    """A folder task (no train/) whose val/ holds 7 files, one of them not an image, an OOD set of 2
    images (fewer batches of 3 than ranks), 11 retrieval captions of 5 images, and a tiny CLIP."""
    rng = np.random.default_rng(1)
    for folder, counts in (("val", {"cat": 4, "dog": 2}), ("two", {"cat": 1, "dog": 1})):
        for label, (name, n) in enumerate(counts.items()):
            (root / folder / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (36, 36, 3), dtype=np.uint8) // (1 + label)
                Image.fromarray(pixels).save(root / folder / name / f"{i}.jpg")
    (root / "val" / "dog" / "broken.jpg").write_bytes(b"not a JPEG")
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), root / "tiny.safetensors")


def _scores(root):
    """evaluate.score of the folder task and of a retrieval set, batches of 3."""
    model = load_clip(root / "tiny.safetensors")
    size = model.config.image_size
    task = data.build_task("folder", root, eval_transform=image_transform(size), ood={"two": str(root / "two")})
    images = [(torch.randn(3, size, size, generator=torch.Generator().manual_seed(i)), i) for i in range(5)]
    captions = tokenize([f"picture {i}" for i in range(11)], model.config.context_length)
    test = retrieval.RetrievalSet("r", images, captions, torch.arange(11) % 5)
    found = retrieval.RetrievalData(None, None, None, [test])
    return [evaluate.score(model, t, batch_size=3, workers=0) for t in (task, found)]


def _score_on_rank(rank, init, root, threads):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    scores = _scores(root)
    if rank == 0:
        torch.save(scores, root / "sharded.pt")
    dist.destroy_process_group()


def test_sharded_evaluation_equals_one_process(tmp_path):
    _eval_tree(tmp_path)
    mp.spawn(_score_on_rank, args=(tmp_path / "init", tmp_path, torch.get_num_threads()), nprocs=2)
    (sharded_rows, sharded_recall), (rows, recall) = torch.load(tmp_path / "sharded.pt"), _scores(tmp_path)
    [row], [sharded] = rows, sharded_rows
    val = tmp_path.name  # --data folder names its test set after the root
    assert row["skipped"] == sharded["skipped"] == 1 and len(row["correct"][val]) == 6
    assert {k: v for k, v in sharded.items() if k != "correct"} == {k: v for k, v in row.items() if k != "correct"}
    assert sharded["correct"].keys() == row["correct"].keys() == {val, "two"}
    assert all(torch.equal(sharded["correct"][k], row["correct"][k]) for k in row["correct"])
    assert sharded_recall == recall


def test_segmentation_on_two_ranks_trains_like_one_process(segmentation_root, tmp_path):
    """train_seg.py under torchrun: each rank holds half of every global batch of COCO-Stuff crops (the
    same images and augmentations as one process draws), and the all-reduced gradients leave the CAT-Seg
    head and the tuned W_q, W_v equal to one process's after 3 steps (catseg draws nothing else)."""
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), tmp_path / "tiny.safetensors")
    argv = [
        *("--model", str(tmp_path / "tiny.safetensors"), "--data-root", str(segmentation_root)),
        *("--crop", "32", "--batch-size", "2", "--iterations", "3", "--workers", "0", "--test", "voc-20b"),
        *("--method", "catseg", "--save-every", "3"),
    ]
    ddp = torchrun([*argv, "--run-dir", str(tmp_path / "ddp")], tmp_path / "ddp.log", script=ROOT / "train_seg.py")
    train_seg.main([*argv, "--run-dir", str(tmp_path / "one")])
    finished(ddp)
    for name in ("head.safetensors", "merged.safetensors"):  # rounding apart: up to ~2e-5 after 3 AdamW steps
        one, two = (load_file(str(tmp_path / run / "catseg" / name)) for run in ("one", "ddp"))
        assert one.keys() == two.keys()  # (a rank training on its half alone ends ~1e-3 away)
        assert max((one[k].float() - two[k].float()).abs().max().item() for k in one) < 1e-4, name
    start = load_file(str(tmp_path / "tiny.safetensors"))
    tuned = load_file(str(tmp_path / "one" / "catseg" / "merged.safetensors"))
    assert any(not torch.equal(tuned[k], start[k]) for k in start if k.endswith("attn.in_proj_weight"))

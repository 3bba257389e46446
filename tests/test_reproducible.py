"""A toy table is what any machine prints. The toy jobs fix their intra-op thread count (--threads, 2 in their
recipes; docs/install.md): the order in which CPU kernels sum depends on it, so without it a table would
depend on the machine's core count. And a method's new weights start from --seed, not from whatever state
the process's generator is in. A short toy job started at two thread counts ends with the same weights and
the same table, bit for bit."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cli
import train
import train_seg
from clip_weights import load_clip

ROOT = Path(__file__).resolve().parents[1]
JOB = ["--split", "base", "--method", "r-adapter", "--max-steps", "3"]  # the toy base-to-new job, shortened


def outputs(run_dir):
    """{file: bytes} of what a run exported, and its table."""
    files = [*Path(run_dir).glob("*/*.safetensors"), Path(run_dir) / "results.json"]
    return {p.relative_to(run_dir): p.read_bytes() for p in files}


def test_the_toy_recipes_fix_two_threads_and_others_keep_torchs():
    assert {cfg.threads for cfg in train.parse_args([])} == {2}
    assert {cfg.threads for cfg in train.parse_args(["--split", "base"])} == {2}
    assert {cfg.threads for cfg in train_seg.parse_args(["--data", "toy-seg"])[0]} == {2}
    assert train.parse_args(["--data", "imagenet", "--data-root", "x"])[0].threads is None
    assert train.parse_args(["--threads", "5"])[0].threads == 5


def test_launch_runs_on_the_configured_threads_and_restores_them():
    seen, before = [], torch.get_num_threads()
    cli.launch(lambda cfgs, *_: seen.append(torch.get_num_threads()), [train.TrainConfig(threads=3)])
    cli.launch(lambda cfgs, *_: seen.append(torch.get_num_threads()), [train.TrainConfig()])
    assert seen == [3, before] and torch.get_num_threads() == before


def test_a_short_toy_job_ends_the_same_on_1_and_3_threads(tmp_path):
    """torch.set_num_threads(n) before the job: what OMP_NUM_THREADS=n (or n cores) gives a new process."""
    before = torch.get_num_threads()
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            train.main([*JOB, "--run-dir", str(tmp_path / f"threads{n}")])
    finally:
        torch.set_num_threads(before)
    one, three = outputs(tmp_path / "threads1"), outputs(tmp_path / "threads3")
    assert len(one) == 3 and one == three


@pytest.mark.slow
def test_a_short_toy_job_ends_the_same_at_OMP_NUM_THREADS_1_and_3(tmp_path):
    """As above, in new processes, the thread count set by the environment."""
    for n in (1, 3):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(n)}
        cmd = [sys.executable, str(ROOT / "train.py"), *JOB, "--run-dir", str(tmp_path / f"threads{n}")]
        subprocess.run(cmd, env=env, check=True, capture_output=True)
    one, three = outputs(tmp_path / "threads1"), outputs(tmp_path / "threads3")
    assert len(one) == 3 and one == three
    assert json.loads(one[Path("results.json")])[0]["run"] == "r-adapter"


def test_a_methods_new_weights_start_from_the_seed(tree):
    """Low-rank adapters (and LoRA, CoCoOp's meta-net) draw their initial weights: from --seed, whatever
    the process drew before."""
    argv = ["--data", "folder", "--data-root", str(tree), "--model", str(tree / "tiny.safetensors")]
    argv += ["--method", "r-adapter", "--rank", "2"]
    drawn = []
    for seed, before in ((0, 1), (0, 5), (1, 1)):
        cfg = train.parse_args([*argv, "--seed", str(seed)])[0]
        torch.rand(before)  # another history of the process's generator
        model = load_clip(cfg.model)
        train.setup(cfg, model, train.build_data(cfg, model)[0])
        drawn.append(torch.cat([p.detach().flatten() for n, p in model.named_parameters() if n.endswith(".A")]))
    assert drawn[0].abs().sum() > 0 and torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])

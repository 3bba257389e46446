"""Faults a cluster run meets (faults.py): preemption signals, Ctrl-C, failed writes, non-finite losses.

Each test checks the guarantee: what is on disk afterwards, what the run says (one line), its exit
code, and that a resumed run ends bit-identical to one that was never interrupted.
"""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import loop
import mpm_nce
import train
from conftest import catches, step_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def flags(train_args, run_dir, *extra):
    # batch 8: 4 steps per epoch, 12 in all; only epoch ends (and a stop) write a checkpoint
    return train_args(run_dir, "--epochs", "3", "--method", "r-adapter", "--save-every", "1000", *extra)


def leftovers(run_dir):
    return sorted(p.name for p in Path(run_dir).rglob("*.tmp"))


def exits(main, argv, capsys):
    """(exit code, stdout, stderr) of a main() that ended with SystemExit."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code, (out, err) = e.value.code, capsys.readouterr()
    if isinstance(code, str):  # sys.exit(message): exit status 1, the message on stderr
        code, err = 1, err + "\n" + code
    assert not err or err.endswith("\n") or isinstance(e.value.code, str)  # the progress bar ended its line
    assert "Traceback" not in out + err
    return code, out, err


def signal_at_loss_call(monkeypatch, n, signum):
    """The n-th loss computation (1-based) sends this process `signum` (inside an optimiser step)."""
    calls, real = [0], mpm_nce.mpm_nce_loss

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signum)
        return real(*a, **k)

    monkeypatch.setattr(mpm_nce, "mpm_nce_loss", loss)


@pytest.fixture
def handlers():
    """This process's SIGTERM, SIGUSR1 and SIGINT handlers, put back after the test (a preempted run keeps
    its own)."""
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield before
    for s, handler in before.items():
        signal.signal(s, handler)


# ------------------------------------------------------------------ preemption
@pytest.mark.parametrize(
    "signum, code, stopped",
    [(signal.SIGTERM, 143, "preempted"), (signal.SIGUSR1, 138, "preempted"), (signal.SIGINT, 130, "interrupted")],
)
def test_a_signal_ends_the_step_saves_and_exits_128_plus_it(
    train_args, tmp_path, monkeypatch, capsys, handlers, signum, code, stopped
):
    signal_at_loss_call(monkeypatch, 3, signum)  # during step 2 (0-based), in epoch 0 of 4 steps
    got, out, _ = exits(train.main, flags(train_args, tmp_path), capsys)
    assert got == code
    assert out.splitlines()[-1] == f"{stopped} at step 3/12; continue with --resume latest"
    assert step_of(tmp_path / "r-adapter" / "checkpoint.pt") == 3  # the step finished, then the checkpoint
    assert not (tmp_path / "r-adapter" / "adapters.safetensors").exists()  # stopped before evaluation
    assert all(signal.getsignal(s) == signal.SIG_IGN for s in handlers)  # until exit
    # after a run that was not stopped, the handlers are the ones before it
    monkeypatch.undo()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    train.main(flags(train_args, tmp_path / "whole", "--epochs", "1"))
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_a_second_signal_during_the_save_changes_nothing(train_args, tmp_path, monkeypatch, capsys, handlers):
    signal_at_loss_call(monkeypatch, 2, signal.SIGTERM)
    real = torch.save

    def save_interrupted(obj, f):  # the scheduler (or torchrun) signals again halfway through the write
        f.write(b"PK")
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGUSR1)
        f.seek(0)
        real(obj, f)

    monkeypatch.setattr(torch, "save", save_interrupted)
    code, out, _ = exits(train.main, flags(train_args, tmp_path), capsys)
    assert code == 143 and "preempted at step 2/12" in out  # the first signal names the exit code
    assert step_of(tmp_path / "r-adapter" / "checkpoint.pt") == 2 and leftovers(tmp_path) == []


def test_a_second_ctrl_c_stops_at_once_and_keeps_the_previous_checkpoint(
    train_args, tmp_path, monkeypatch, capsys, handlers
):
    """Ctrl-C in step 3, and again while its checkpoint is written: exit 130 at once, one line, the step-2
    checkpoint intact; --resume latest then ends where a run that was never stopped ends."""
    signal_at_loss_call(monkeypatch, 3, signal.SIGINT)
    real = torch.save

    def save_interrupted(obj, f):
        if obj["step"] == 3:
            f.write(b"PK")
            os.kill(os.getpid(), signal.SIGINT)
        real(obj, f)

    monkeypatch.setattr(torch, "save", save_interrupted)
    run_dir = tmp_path / "stopped"
    code, out, _ = exits(train.main, flags(train_args, run_dir, "--save-every", "1"), capsys)
    assert code == 130 and out.splitlines()[-1] == (
        "stopped at once; continue from the last checkpoint with --resume latest"
    )
    assert step_of(run_dir / "r-adapter" / "checkpoint.pt") == 2 and leftovers(run_dir) == []
    monkeypatch.undo()
    for s, handler in handlers.items():
        signal.signal(s, handler)
    train.main(flags(train_args, run_dir, "--save-every", "1", "--resume", "latest"))
    assert "resumed from" in capsys.readouterr().out
    train.main(flags(train_args, tmp_path / "straight", "--save-every", "1"))
    _assert_identical(_final(tmp_path / "straight"), _final(run_dir))


def test_ctrl_c_outside_the_training_loop_ends_in_one_line(train_args, tmp_path, monkeypatch, capsys, handlers):
    def interrupted(*args, **kwargs):  # e.g. while the model loads or the evaluation runs
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "load_clip", interrupted)
    code, out, _ = exits(train.main, flags(train_args, tmp_path), capsys)
    assert code == 130 and out.splitlines()[-1].startswith("stopped at once;")


def _final(run_dir):
    return load_file(str(Path(run_dir) / "r-adapter" / "adapters.safetensors"))


def _assert_identical(a, b):
    assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="watches the handler through /proc (Linux)")
def test_sigterm_to_a_real_process_then_resume_latest_is_bit_identical(train_args, tmp_path):
    cmd = [sys.executable, str(ROOT / "train.py")]
    subprocess.run([*cmd, *flags(train_args, tmp_path / "straight")], check=True, env=ENV, capture_output=True)
    run_dir = tmp_path / "stopped"
    proc = subprocess.Popen([*cmd, *flags(train_args, run_dir)], env=ENV, stdout=subprocess.PIPE, text=True)
    deadline = time.time() + 600  # generous: a loaded machine starts Python slowly
    while not catches(proc.pid, signal.SIGTERM) and time.time() < deadline:  # the loop has begun
        time.sleep(0.01)
    while proc.poll() is None:  # SIGTERM, then more of them (the save included) until it has stopped
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
    out = proc.stdout.read()
    step = step_of(run_dir / "r-adapter" / "checkpoint.pt")
    assert proc.returncode == 143 and f"preempted at step {step}/12; continue with --resume latest" in out
    assert 1 <= step < 4 and leftovers(run_dir) == []  # mid-epoch 1 (4 steps per epoch)
    resumed = subprocess.run([*cmd, *flags(train_args, run_dir, "--resume", "latest")], env=ENV, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert f"at step {step}/12" in resumed.stdout.decode()
    _assert_identical(_final(tmp_path / "straight"), _final(run_dir))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="watches the handler through /proc (Linux)")
def test_ctrl_c_to_a_real_process_then_resume_latest_is_bit_identical(train_args, tmp_path, capsys):
    """One Ctrl-C (SIGINT, as a terminal sends it): the step ends, a checkpoint, one line, exit 130, no
    traceback; --resume latest (here in this process, on the same --threads) ends bit-identical to a run
    that was never stopped."""
    run_dir, argv = tmp_path / "stopped", ["--threads", "1"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *flags(train_args, run_dir, *argv)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 600  # generous: a loaded machine starts Python slowly
    while not catches(proc.pid, signal.SIGTERM) and time.time() < deadline:  # the loop has begun
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    step = step_of(run_dir / "r-adapter" / "checkpoint.pt")
    assert proc.returncode == 130, err[-2000:]
    assert out.splitlines()[-1] == f"interrupted at step {step}/12; continue with --resume latest"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert 1 <= step < 12 and leftovers(run_dir) == []
    train.main(flags(train_args, run_dir, *argv, "--resume", "latest"))
    assert f"resumed from {run_dir / 'r-adapter' / 'checkpoint.pt'} at step {step}/12" in capsys.readouterr().out
    train.main(flags(train_args, tmp_path / "straight", *argv))
    _assert_identical(_final(tmp_path / "straight"), _final(run_dir))


@pytest.mark.slow
def test_sigkill_during_a_save_leaves_the_previous_checkpoint(train_args, tmp_path):
    """The hardest second signal: SIGKILL halfway through writing the step-6 checkpoint."""
    run_dir, marker = tmp_path / "killed", tmp_path / "writing"
    script = f"""
import os, sys, time, torch, train
real = torch.save
def save(obj, f):
    if obj["step"] == 6:
        f.write(b"PK" * 1000); f.flush(); open({str(marker)!r}, "w").close(); time.sleep(60)
    real(obj, f)
torch.save = save
train.main(sys.argv[1:])
"""
    argv = flags(train_args, run_dir, "--save-every", "1")
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded machine starts Python slowly
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ckpt = run_dir / "r-adapter" / "checkpoint.pt"
    assert step_of(ckpt) == 5 and step_of(ckpt.with_suffix(".prev.pt")) == 5  # linked before the write
    assert (run_dir / "r-adapter" / "checkpoint.pt.tmp").stat().st_size == 2000  # the half-written one
    train.main([*argv, "--resume", "latest"])
    straight = tmp_path / "straight"
    train.main(flags(train_args, straight, "--save-every", "1"))
    _assert_identical(_final(straight), _final(run_dir))
    assert leftovers(run_dir) == []


# -------------------------------------------------------------- failed writes
def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(train_args, tmp_path, monkeypatch, capsys):
    real, writes = torch.save, [0]

    def save(obj, f):
        writes[0] += 1
        if writes[0] == 2:  # the step-8 checkpoint: part of it, then the disk is full
            f.write(b"PK\x03\x04" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(obj, f)

    monkeypatch.setattr(torch, "save", save)
    code, _, err = exits(train.main, flags(train_args, tmp_path), capsys)
    ckpt = tmp_path / "r-adapter" / "checkpoint.pt"
    assert code == 1 and err.strip().splitlines()[-1] == f"error: [Errno 28] No space left on device: '{ckpt}'"
    assert step_of(ckpt) == 4 and leftovers(tmp_path) == []


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_full_disk_during_the_export_names_the_file(train_args, tmp_path, capsys):
    merged = tmp_path / "r-adapter" / "merged.safetensors"
    merged.parent.mkdir(parents=True)
    Path(f"{merged}.tmp").symlink_to("/dev/full")  # the write lands on a device that is always full
    code, _, err = exits(train.main, flags(train_args, tmp_path, "--max-steps", "2"), capsys)
    assert code == 1 and err.strip().splitlines()[-1] == f"error: [Errno 28] No space left on device: '{merged}'"
    assert not merged.exists() and leftovers(tmp_path) == []
    assert step_of(tmp_path / "r-adapter" / "checkpoint.pt") == 2


def _read_only(folder):
    """Make folder read-only for this process, root included (chattr +i); the undo, or None."""
    os.chmod(folder, 0o555)
    if not os.access(folder, os.W_OK):
        return lambda: os.chmod(folder, 0o755)
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
        return lambda: (subprocess.run(["chattr", "-i", str(folder)]), os.chmod(folder, 0o755))
    os.chmod(folder, 0o755)
    return None


def test_a_read_only_run_folder_keeps_the_previous_checkpoint(train_args, tmp_path, monkeypatch, capsys):
    run_dir, undo, real = tmp_path / "r-adapter", [], loop.save_checkpoint

    def save_then_lock(state, path):
        real(state, path)
        if not undo:  # after the step-4 checkpoint the folder turns read-only
            undo.append(_read_only(run_dir))

    monkeypatch.setattr(loop, "save_checkpoint", save_then_lock)
    try:
        code, _, err = exits(train.main, flags(train_args, tmp_path), capsys)
    finally:
        if undo and undo[0]:
            undo[0]()
    if not undo[0]:
        pytest.skip("cannot make a folder read-only here")
    line = err.strip().splitlines()[-1]
    assert code == 1 and line.startswith("error: [Errno ") and f"'{run_dir / 'checkpoint'}" in line
    assert any(why in line for why in ("Permission denied", "Operation not permitted", "Read-only file system"))
    assert step_of(run_dir / "checkpoint.pt") == 4 and leftovers(tmp_path) == []


# --------------------------------------------------------- non-finite losses
def nan_at_loss_call(monkeypatch, n):
    calls, real = [0], mpm_nce.mpm_nce_loss

    def loss(*a, **k):
        calls[0] += 1
        return real(*a, **k) * (float("nan") if calls[0] == n else 1.0)

    monkeypatch.setattr(mpm_nce, "mpm_nce_loss", loss)


def test_a_nan_loss_names_its_step_and_the_last_good_checkpoint(train_args, tmp_path, monkeypatch, capsys):
    nan_at_loss_call(monkeypatch, 6)  # step 5, in epoch 1; seen at the look of step 8 (the epoch end)
    code, _, err = exits(train.main, flags(train_args, tmp_path, "--log-every", "100"), capsys)
    ckpt = tmp_path / "r-adapter" / "checkpoint.pt"
    assert code == 1 and err.strip().splitlines()[-1] == (
        f"error: non-finite loss at step 5/12; last good checkpoint: {ckpt} (step 4)"
    )
    state = torch.load(ckpt, weights_only=True)
    assert state["step"] == 4 and all(v.isfinite().all() for v in state["trainable"].values())


def test_fp16_steps_the_scaler_skips_are_counted_not_fatal(train_args, tmp_path, monkeypatch):
    nan_at_loss_call(monkeypatch, 6)
    train.main(flags(train_args, tmp_path, "--precision", "fp16", "--log-every", "1"))
    lines = [json.loads(line) for line in (tmp_path / "r-adapter" / "log.jsonl").read_text().splitlines()]
    assert [e["skipped_steps"] for e in lines if e["kind"] == "epoch"] == [0, 1, 0]
    assert all(v.isfinite().all() for v in _final(tmp_path).values())

"""What a training run leaves in its folder and reports as it goes: the progress bar, log.jsonl and, if
asked, TensorBoard; one run per folder.

Every --log-every steps log.jsonl gets one line (kind "step": the step, epoch, learning rate, and
the mean loss, samples/s and images skipped since the previous line; steps an fp16 GradScaler skipped
in the epoch so far; peak CUDA memory), and at each
epoch's end one line of the same fields over the whole epoch (kind "epoch"). With --report-to
tensorboard the same scalars go to <run dir>/tensorboard through torch.utils.tensorboard, as
open_clip reports them. The loss is summed on its device and read once per line, so logging adds
no host sync to a step. The bar redraws at most every 5 s, with the lr of the step it shows and the
loss of the last line (with its step), so a run logged to a file writes one line per 5 s, not one per step.

One run per folder, as open_clip refuses to reuse an experiment's folder: a command whose --run-dir
holds a checkpoint, an export or a results table of an earlier run stops with one line naming the
folder (exit 1), unless it continues that run (--resume) or starts over (--overwrite deletes what a run
writes there first). A resumed log.jsonl keeps its lines up to the checkpoint's step, so a step is
logged once, and no export or table of the earlier run is left beside the new one.
"""

import json
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm


class Window:
    """Sums over a span of steps: the loss stays a tensor on its device until `read`."""

    def __init__(self, device):
        self.loss, self.steps, self.samples, self.skipped = torch.zeros((), device=device), 0, 0, 0
        self.start = time.perf_counter()

    def read(self):
        seconds = time.perf_counter() - self.start
        loss = self.loss.item() / max(1, self.steps)
        return dict(loss=loss, samples_per_s=self.samples / max(seconds, 1e-9), skipped_images=self.skipped)


class RunLog:
    """The run's reports on its first process (`enabled`); the others only count. log.jsonl keeps the
    lines of the steps up to `start` (a resumed run's checkpoint) and drops those after it."""

    def __init__(self, cfg, total, start, device, enabled=True):
        self.every, self.device, self.enabled = cfg.log_every, device, enabled
        self.file = None
        if enabled:
            path = Path(cfg.run_dir) / "log.jsonl"
            kept = logged_up_to(path, start)
            self.file = open(path, "w")
            self.file.writelines(kept)
            self.file.flush()
        self.writer = None
        if enabled and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))
        self.bar = tqdm(total=total, initial=start, desc=cfg.method, disable=not enabled, mininterval=5)
        self.window, self.epoch = Window(device), Window(device)
        self.skipped_steps = 0  # steps the GradScaler skipped this epoch (train.py sets it at each look)
        self.shown = {}  # the bar's fields after the lr: the last line's loss (with its step) and samples/s

    def add(self, loss, samples, skipped):
        """One micro-batch: its loss (a 0-dim tensor, left on its device), images trained on (all
        processes), and images skipped as unreadable."""
        for w in (self.window, self.epoch):
            w.loss += loss.detach()
            w.samples, w.skipped = w.samples + samples, w.skipped + skipped

    def step(self, step, epoch, lr):
        """After optimiser step `step` (counted from 1) at learning rate lr."""
        self.window.steps, self.epoch.steps = self.window.steps + 1, self.epoch.steps + 1
        if step % self.every == 0:
            self.write("step", step, epoch, lr, self.window)
            self.window = Window(self.device)
        if self.enabled:  # the lr of every step; the loss read at the last line
            self.bar.set_postfix(lr=f"{lr:.2e}", **self.shown, skipped=self.skipped_steps, refresh=False)
        self.bar.update()

    def end_epoch(self, step, epoch, lr):
        self.write("epoch", step, epoch, lr, self.epoch)
        self.window, self.epoch = Window(self.device), Window(self.device)

    def write(self, kind, step, epoch, lr, window):
        if not self.enabled:
            return
        line = dict(kind=kind, step=step, epoch=epoch, lr=lr, **window.read(), skipped_steps=self.skipped_steps)
        if self.device.type == "cuda":
            line["peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.file.write(json.dumps(line) + "\n")
        self.file.flush()
        self.shown = dict(loss=f"{line['loss']:.4f} (step {step})", samples_s=f"{line['samples_per_s']:.0f}")
        self.bar.set_postfix(lr=f"{lr:.2e}", **self.shown, skipped=self.skipped_steps, refresh=False)
        if self.writer is not None:
            for name, value in line.items():
                if name not in ("kind", "step", "epoch"):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)
            self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # the bar ends its line and the files close, also when the run stops early
        self.close()

    def close(self):
        self.bar.close()
        if self.enabled:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


def logged_up_to(path, step):
    """The lines of log.jsonl at `path` whose step is at most `step` (none if it is absent; a line cut
    short by a killed process is dropped)."""
    if not step or not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            continue
    return kept


# ------------------------------------------------------------ one run per folder
RUN_FILES = {  # what a run leaves once it has reached a checkpoint or a result
    "checkpoint.pt",
    "checkpoint.prev.pt",
    "results.json",
    "merged.safetensors",
    "adapters.safetensors",
    "head.safetensors",
    "prompt_learner.safetensors",
}
TABLES = ("results", "alpha_sweep", "claims", "seeds")  # the names of a command's tables in its folder


def earlier_run(out):
    """A file of an earlier run in folder `out`, in it or in a method's (or a seed's method's) folder; None."""
    for pattern in ("*", "*/*", "*/*/*"):
        for path in sorted(Path(out).glob(pattern)):
            if path.name in RUN_FILES and path.is_file():
                return path
    return None


def claim(out, resume, overwrite):
    """Make folder `out` this command's: refuse one that holds an earlier run unless the command
    resumes it (--resume) or starts over (--overwrite: what a run writes there is deleted first)."""
    out = Path(out)
    found = None if resume else earlier_run(out)
    if found is None:
        return
    if not overwrite:
        raise FileExistsError(
            f"{out} holds a run already: continue it with --resume latest, or start over with --overwrite "
            "(deletes its checkpoints, logs and exports)"
        )
    for path in out.iterdir():
        if path.is_dir() and ((path / "config.json").exists() or any(path.glob("*/config.json"))):
            shutil.rmtree(path)  # a method's folder, or a seed's folder of them
        elif path.is_file() and path.name.split(".")[0] in TABLES:
            path.unlink()
    left = earlier_run(out)
    if left is not None:  # not in a folder of a run's layout: the user's to move
        raise FileExistsError(f"--overwrite: {left} is not in a run's layout; move it out of {out}")

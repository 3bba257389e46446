"""What a training run reports as it goes: the progress bar, log.jsonl and, if asked, TensorBoard.

Every --log-every steps log.jsonl gets one line (kind "step": the step, epoch, learning rate, and
the mean loss, samples/s and images skipped since the previous line; steps an fp16 GradScaler skipped
in the epoch so far; peak CUDA memory), and at each
epoch's end one line of the same fields over the whole epoch (kind "epoch"). With --report-to
tensorboard the same scalars go to <run dir>/tensorboard through torch.utils.tensorboard, as
open_clip reports them. The loss is summed on its device and read once per line, so logging adds
no host sync to a step. The bar redraws at most every 5 s (its loss and lr change with each line),
so a run logged to a file writes one line per 5 s, not one per step.
"""

import json
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
    """The run's reports on its first process (`enabled`); the others only count."""

    def __init__(self, cfg, total, start, device, enabled=True):
        self.every, self.device, self.enabled = cfg.log_every, device, enabled
        self.file = open(Path(cfg.run_dir) / "log.jsonl", "a") if enabled else None
        self.writer = None
        if enabled and cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(cfg.run_dir) / "tensorboard"))
        self.bar = tqdm(total=total, initial=start, desc=cfg.method, disable=not enabled, mininterval=5)
        self.window, self.epoch = Window(device), Window(device)
        self.skipped_steps = 0  # steps the GradScaler skipped this epoch (train.py sets it at each look)

    def add(self, loss, samples, skipped):
        """One micro-batch: its loss (a 0-dim tensor, left on its device), images trained on (all
        processes), and images skipped as unreadable."""
        for w in (self.window, self.epoch):
            w.loss += loss.detach()
            w.samples, w.skipped = w.samples + samples, w.skipped + skipped

    def step(self, step, epoch, lr):
        """After optimiser step `step` (counted from 1) at learning rate lr."""
        self.window.steps, self.epoch.steps = self.window.steps + 1, self.epoch.steps + 1
        self.bar.update()
        if step % self.every == 0:
            self.write("step", step, epoch, lr, self.window)
            self.window = Window(self.device)

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
        self.bar.set_postfix(
            loss=f"{line['loss']:.4f}",
            lr=f"{lr:.2e}",
            samples_s=f"{line['samples_per_s']:.0f}",
            skipped=self.skipped_steps,
            refresh=False,
        )
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

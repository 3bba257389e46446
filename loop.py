"""The training loop's machinery, apart from any method or model (after minGPT's trainer).

train.py writes the paper's optimiser step; `Trainer.run(step)` calls it once per step and does the
rest: the data order (a permutation per (seed, epoch), each sample's augmentation seeded by (seed,
epoch, index), so --resume continues bit-identical), data-parallel processes, torch.compile, mixed
precision with a GradScaler for fp16, gradient accumulation, checkpoints (checkpoints.py) and
--resume, preemption signals and non-finite losses (faults.py), and the run's log (run_log.py).

Inside a step the caller uses four seams, in this order:

    for images, labels in trainer.micro_batches():      # --accum-steps micro-batches of this rank
        with trainer.forward():                          # autocast; DDP syncs the last one only
            loss = ...                                   # the method's loss on the micro-batch
        trainer.backward(loss)                           # scaled for fp16, metered, logged
    trainer.optimizer_step(grad_clip)                    # unscale, clip, step (a GradScaler may skip)
"""

import math
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import data
import faults
from checkpoints import read_checkpoint, restore, save_checkpoint
from clip_model import autocast_dtype
from run_log import RunLog


@dataclass
class LoopConfig:
    """What the loop reads, given by its caller (train.py, train_seg.py)."""

    run_dir: str  # checkpoint.pt, log.jsonl (and tensorboard/) go here
    method: str  # the progress bar's label
    config: dict  # the run's whole config, kept in each checkpoint (--resume checks it)
    batch_size: int  # global: every process and every accumulation step together
    accum_steps: int = 1
    epochs: int = 1  # the run's length, unless `iterations` is given
    iterations: Optional[int] = None  # the run's length in optimiser steps (CAT-Seg counts iterations)
    max_steps: Optional[int] = None  # stop early (smoke tests); the schedule still spans the whole run
    seed: int = 0
    workers: int = 8
    precision: str = "auto"
    compile: bool = False
    save_every: int = 1000
    log_every: int = 50
    resume: Optional[str] = None  # latest | PATH
    report_to: Optional[str] = None


class Trainer:
    """One run of `step` over `dataset`: model's trainable parameters, optimised by `optimizer`."""

    def __init__(self, cfg: LoopConfig, model, optimizer, dataset, device, ddp=(0, 1), ema=None):
        self.cfg, self.model, self.optimizer, self.device, self.ema = cfg, model, optimizer, device, ema
        self.rank, self.world = ddp
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.amp = autocast_dtype(device, cfg.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.amp == torch.float16 else None
        self.sampler = data.StepSampler(len(dataset), cfg.batch_size, cfg.seed, self.rank, self.world)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        if self.steps_per_epoch == 0:
            raise data.DataError(f"--batch-size {cfg.batch_size}: the train set has only {len(dataset)} images")
        micro = cfg.batch_size // self.world // cfg.accum_steps
        kw = dict(num_workers=cfg.workers, collate_fn=data.collate_skip, drop_last=True)
        self.loader = DataLoader(
            data.SeededAugment(dataset, cfg.seed), micro, sampler=self.sampler, pin_memory=device.type == "cuda", **kw
        )
        self.total = cfg.iterations or cfg.epochs * self.steps_per_epoch  # the steps the schedule spans
        self.net = model
        if self.world > 1:
            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            self.net = torch.compile(self.net)
        self.step = 0

    # ------------------------------------------------------ the seams of a step
    def micro_batches(self):
        """This step's --accum-steps micro-batches of this rank: (images, labels) on the device."""
        for k in range(self.cfg.accum_steps):
            images, labels, n_bad = next(self.batches)
            self.last_micro, self.counts = k == self.cfg.accum_steps - 1, (len(labels) * self.world, n_bad)
            yield images.to(self.device, non_blocking=True), labels.to(self.device)

    @contextmanager
    def forward(self):
        """Autocast to the run's precision; under DDP the gradients sync on the last micro-batch only."""
        sync = self.net.no_sync() if self.world > 1 and not self.last_micro else nullcontext()
        with sync, torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            yield

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.meter.add(loss, self.step)
        self.log.add(loss, samples=self.counts[0], skipped=self.counts[1])

    def optimizer_step(self, grad_clip):
        """Clip the gradient norm to grad_clip (0: no clipping), step, zero the gradients. With fp16 the
        GradScaler skips a step whose gradients are not finite (counted in the log)."""
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if grad_clip > 0 or self.scaler:
            norm = torch.nn.utils.clip_grad_norm_(self.params, grad_clip or math.inf)
        if self.scaler:
            self.meter.skip(norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------- the loop
    def run(self, step: Callable[[int], None]):
        """step(s) for s = the first step (0, or the checkpoint's) up to the last; then model.eval()."""
        cfg, run_dir = self.cfg, Path(self.cfg.run_dir)
        ckpt_path = run_dir / "checkpoint.pt"
        good = self.resume(ckpt_path)  # the last good checkpoint, named in a non-finite loss's error
        last = min(self.total, cfg.max_steps or self.total)
        self.meter = faults.LossMeter(self.device, self.total, fatal=self.scaler is None)  # no host sync per step
        self.log = RunLog(cfg, total=last, start=self.step, device=self.device, enabled=self.rank == 0)
        self.model.train()
        with self.log, faults.StopSignal() as stop:  # SIGTERM, SIGUSR1: finish the step, save, exit (faults.py)
            while self.step < last:
                epoch = self.step // self.steps_per_epoch
                self.sampler.set_epoch(epoch, self.step % self.steps_per_epoch)
                self.batches = iter(self.loader)
                self.meter.reset()
                while self.step < last and self.step // self.steps_per_epoch == epoch:
                    step(self.step)
                    self.step += 1
                    signum = stop.agreed()  # one all-reduce per step under torchrun
                    epoch_end = self.step % self.steps_per_epoch == 0 or self.step == last
                    saving = self.step % cfg.save_every == 0 or epoch_end or signum
                    if self.step % cfg.log_every == 0 or saving:  # raises on a non-finite loss: no checkpoint after one
                        self.log.skipped_steps = self.meter.look(last_good=good)[1]
                    self.log.step(self.step, epoch, lr=self.optimizer.param_groups[0]["lr"])
                    if saving:
                        self.save(ckpt_path)
                        good = f"{ckpt_path} (step {self.step})"
                    if signum:
                        stop.stop(signum, self.step, self.total)
                self.log.end_epoch(self.step, epoch, lr=self.optimizer.param_groups[0]["lr"])
        self.model.eval()

    def resume(self, ckpt_path):
        """Load --resume's checkpoint (latest: this run folder's, falling back to the one before it)."""
        resume, self.step = self.cfg.resume, 0
        if resume == "latest" and not (ckpt_path.exists() or ckpt_path.with_suffix(".prev.pt").exists()):
            if self.rank == 0:  # as open_clip's: a method the command had not reached yet starts afresh
                print(f"--resume latest: no checkpoint in {ckpt_path.parent}, starting at step 0")
            return "none written yet"
        if not resume:
            return "none written yet"
        ckpt, path = read_checkpoint(ckpt_path if resume == "latest" else Path(resume), latest=resume == "latest")
        if self.rank == 0 and path != ckpt_path and resume == "latest":  # set the damaged latest aside
            ckpt_path.replace(ckpt_path.with_suffix(".damaged.pt"))
        self.step = restore(ckpt, path, self.cfg.config, self.model, self.ema, self.optimizer, self.scaler)
        if self.rank == 0:
            print(f"resumed from {path} at step {self.step}/{self.total}")
        return f"{path} (step {self.step})"

    def save(self, path):
        if self.rank != 0:
            return
        trainable = {n: p.detach().cpu() for n, p in self.model.named_parameters() if p.requires_grad}
        state = dict(config=self.cfg.config, clip_config=asdict(self.model.config), step=self.step, trainable=trainable)
        state |= dict(optimizer=self.optimizer.state_dict(), ema=self.ema and self.ema.state_dict())
        save_checkpoint({**state, "scaler": self.scaler and self.scaler.state_dict()}, path)


def world():
    """(rank, world size) of this process: (0, 1) outside torch.distributed."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)

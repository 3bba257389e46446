"""What a long run on a shared cluster meets, and how train.py's loop answers it.

Preemption and Ctrl-C. A scheduler signals a job some seconds before it kills it: SLURM sends SIGTERM
(or SIGUSR1 with `--signal=USR1@SECONDS`), and torchrun forwards SIGTERM to its workers; Ctrl-C sends
SIGINT (torchrun forwards it too). StopSignal notes any of them; after every optimiser step the ranks
all-reduce the note (one integer, on the CPU, so the device is not synchronised), and all of them stop
after the same step. The loop writes a checkpoint and raises Preempted; train.py exits with 128 + the
signal's number (143 for SIGTERM, 138 for SIGUSR1, 130 for Ctrl-C), the status a shell (`$?`) and
Kubernetes report for a process that signal ended, so a job script reads the same code whether the run
stopped itself in time or was killed. Further signals change nothing (SLURM's step daemon and torchrun
may each deliver one): noted again while the step and the checkpoint finish, ignored after. A second
Ctrl-C is the exception: it stops at once (KeyboardInterrupt, exit 130). SIGKILL or a second Ctrl-C
during a save: the atomic write (clip_weights.atomic) leaves the previous checkpoint or the new one,
never half of one. Full disks and read-only folders: atomic as well.

Non-finite losses. LossMeter sums the loss on the device and notes the first step whose loss was
not finite, without a host sync; the loop reads it every --log-every steps, at each epoch end and
before every checkpoint, so no checkpoint holds weights that a non-finite loss has reached. With
fp16 + GradScaler a non-finite loss or gradient is the scaler's to handle: it skips the step and
lowers its scale. Those steps are counted, not fatal.

Checkpoints (save_checkpoint, read_checkpoint, restore): written atomically, the one before kept as
<name>.prev.pt, which --resume latest falls back to when the latest is unreadable; a checkpoint of
another method, model, dataset, rank or architecture is refused.
"""

import signal

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
NEVER = torch.iinfo(torch.long).max  # "no non-finite loss yet", as a step


class Preempted(Exception):
    """Stopped by SIGNALS after a checkpoint at `step`; the process exits with `code`."""

    def __init__(self, signum, step, total):
        how = "interrupted" if signum == signal.SIGINT else "preempted"
        super().__init__(f"{how} at step {step}/{total}; continue with --resume latest")
        self.code = 128 + signum


class NonFiniteLoss(FloatingPointError):
    """The loss was inf or NaN (without a GradScaler); the message names the step and the last good checkpoint."""


class StopSignal:
    """`with StopSignal() as stop:` notes SIGTERM, SIGUSR1 and SIGINT inside the block (the previous
    handlers come back after it; after Preempted or a second Ctrl-C they are ignored); stop.agreed() is
    the signal any rank received (0: none), the same on all ranks. A Ctrl-C after a Ctrl-C raises
    KeyboardInterrupt at once."""

    def __init__(self):
        self.signum, self.interrupts, self.group = 0, 0, None
        if dist.is_initialized() and dist.get_backend() != "gloo":  # the note travels on the CPU
            self.group = dist.new_group(backend="gloo")

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.note) for s in SIGNALS}
        return self

    def __exit__(self, kind, *exc):
        stopping = kind is not None and issubclass(kind, (Preempted, KeyboardInterrupt))
        for s, handler in self.previous.items():  # a stopping process ignores them until it has exited
            signal.signal(s, signal.SIG_IGN if stopping else handler)

    def note(self, signum, frame):
        self.interrupts += signum == signal.SIGINT
        if self.interrupts > 1:  # Ctrl-C twice: stop now
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def agreed(self):
        """One all-reduce under torch.distributed: the largest note of any rank."""
        if not dist.is_initialized():
            return self.signum
        note = torch.tensor(self.signum)
        dist.all_reduce(note, op=dist.ReduceOp.MAX, group=self.group)
        return int(note)

    def stop(self, signum, step, total):
        """Raise Preempted on every rank once all are here, after rank 0 wrote the checkpoint: torchrun
        stops every worker as soon as one exits."""
        if dist.is_initialized():
            dist.barrier(group=self.group)
        raise Preempted(signum, step, total)


class LossMeter:
    """Running sums on the device, read with one host sync per look: the loss since reset(), the
    steps the GradScaler skipped since reset(), and the first step with a non-finite loss."""

    def __init__(self, device, total, fatal):
        self.first_nonfinite = torch.tensor(NEVER, device=device)
        self.total, self.fatal = total, fatal  # fatal: no GradScaler skips the steps of a non-finite loss
        self.reset()

    def reset(self):
        self.loss = torch.zeros((), device=self.first_nonfinite.device)
        self.skipped = torch.zeros((), dtype=torch.long, device=self.first_nonfinite.device)

    def add(self, loss, step):
        """A micro-batch's (scaled-down) loss, at optimiser step `step`."""
        loss = loss.detach().float()
        self.loss += loss
        earliest = self.first_nonfinite.clamp(max=step)
        self.first_nonfinite = torch.where(torch.isfinite(loss), self.first_nonfinite, earliest)

    def skip(self, grad_norm):
        """A GradScaler step: the scaler skips it when a gradient holds an inf or NaN, so their norm is not finite."""
        self.skipped += ~torch.isfinite(grad_norm)

    def look(self, last_good):
        """(loss sum, skipped steps), or NonFiniteLoss if fatal; under torch.distributed with the
        earliest non-finite step of any rank, so that all ranks stop at the same look."""
        first = self.first_nonfinite.clone()
        if dist.is_initialized():
            dist.all_reduce(first, op=dist.ReduceOp.MIN)
        first = int(first)  # the host waits here; the reads after it do not
        if first != NEVER and self.fatal:
            raise NonFiniteLoss(f"non-finite loss at step {first}/{self.total}; last good checkpoint: {last_good}")
        return self.loss.item(), int(self.skipped)

"""Fine-tune CLIP with R-Adapter (Kim et al., ECCV 2024), CLIPFit (Li et al., EMNLP 2024) or a baseline.

    python train.py                                   # the offline toy world (README)
    python train.py --data imagenet --data-root DIR --model ViT-B-16:openai
    torchrun --nproc-per-node 8 -- train.py --data imagenet --data-root DIR --model ViT-B-16.pt
    python train.py ... --resume latest | --print-config
    python train.py --config runs/toy/r-adapter/config.json --epochs 4 --run-dir runs/toy-4ep   # one value changed

Per method: setup_method decides what trains, the loss and the evaluation weights; the loop pairs
each image with its class name in a random template (Sec. 3.4) or its caption, steps the optimiser
and the adapters' EMA (Sec. 3.3); every random choice is a function of (seed, step), so --resume
ends bit-identical, also after a preemption signal, which ends the step with a checkpoint (faults.py);
each table row is evaluated under its weights (R-Adapter, LoRA and SSF merged at alpha by reparam.py,
WiSE-FT at alpha, CoOp's and CoCoOp's learned prompts for the evaluation's classes), on every rank's
shard of the sets. Which values a command gets is recipes.py's business.
"""

import dataclasses
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

import baselines
import clipfit
import data
import evaluate
import faults
import prompt_learners
import r_adapter
import recipes
import reparam
import run_log
import ssf
from clip_model import autocast_dtype, count_trainable, image_transform, tokenize
from clip_weights import WeightsError, load_clip, save_clip, save_safetensors
from data import SeededAugment, StepSampler, coop, retrieval, seed_of, shared_randint
from faults import read_checkpoint, restore, save_checkpoint
from mpm_nce import gather_features, infonce_loss, mpm_nce_loss
from run_log import RunLog

# Re-parameterisable methods: each wraps layers by its one rule; reparam.py merges any of them alike,
# evaluated at alpha (recipes.py: 0.5 for R-Adapter, 1 for LoRA and SSF). A fourth one is one line here.
REPARAMETERISABLE = {  # --method: (table name, attach(model, cfg))
    "r-adapter": ("R-Adapter", lambda m, c: r_adapter.add_adapters(m, rank=c.rank, drop_p=c.p, drop_mode=c.drop_mode)),
    "lora": ("LoRA", lambda m, c: baselines.add_lora(m, rank=c.rank)),
    "ssf": ("SSF", lambda m, c: ssf.add_ssf(m)),
}
METHODS = (*REPARAMETERISABLE, "clipfit", "coop", "cocoop", "full-ft", "wise-ft", "flyp", "linear-probe", "prolip")
METHODS += ("zero-shot",)


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = arg("toy", "imagenet | folder | toy | coco | flickr30k | a CoOp dataset (data/coop.py)")
    data_root: Optional[str] = arg(None, "dataset root (layouts: data/imagenet.py, coop.py, retrieval.py)")
    ood: tuple = arg((), "NAME=DIR: an extra or relocated evaluation set (repeatable)")
    shots: Optional[int] = arg(None, "train on K images per class (seeded)")
    split: Optional[str] = arg(None, "base: train on the base classes, report base / new / HM (CoCoOp)")
    strict: bool = arg(False, "an unreadable image is an error (default: skipped and counted)")
    classnames: Optional[str] = arg(None, "--data folder: JSON file {folder: class name}")
    model: str = arg("ViT-B-16:openai", "toy (the shipped toy CLIP), a checkpoint file, or ViT-B-16 | ARCH:TAG")
    method: str = arg("r-adapter", f"comma separated, from: {', '.join(METHODS)}")
    loss: str = arg("mpm-nce", "mpm-nce | infonce | ce (class logits)")
    prompts: str = arg("task", "training prompts: task | imagenet-80 | one template with {}")
    eval_prompts: str = arg("task", "classifier prompts at evaluation: task | imagenet-80 | one template with {}")
    rank: Optional[int] = arg(None, "adapter (and LoRA) rank r; full (default) = d x d adapters")
    p: float = arg(0.2, "adapter drop probability (dynamic ensemble, Sec. 3.3)")
    drop_mode: str = arg("sample", "sample (the paper) | token (the released code's per-position dropping)")
    m: float = arg(0.999, "EMA momentum of the adapters (temporal ensemble, Sec. 3.3)")
    alpha: float = arg(0.5, "re-scaling coefficient at merge (and WiSE-FT's interpolation)")
    tau: Optional[float] = arg(None, "MPM-NCE temperature; default 1 / the frozen logit scale (0.01 for OpenAI)")
    delta: float = arg(0.05, "MPM-NCE margin on negative pairs (Sec. 3.4)")
    epsilon: float = arg(0.02, "MPM-NCE label smoothing (Sec. 3.4)")
    clipfit_lambda: float = arg(clipfit.LAMBDA, "CLIPFit: weight of its text distillation term")
    ctx_init: str = arg(
        "a photo of a", "CoOp, CoCoOp: the words the context starts from, or a number M of random vectors"
    )
    optimizer: str = arg("adamw", "adamw | sgd (momentum 0.9)")
    epochs: int = arg(10, "passes over the training set")
    batch_size: int = arg(512, "global batch (all GPUs, all accumulation steps)")
    accum_steps: int = arg(1, "gradient accumulation steps per optimiser step")
    lr: float = arg(5e-4, "peak learning rate")
    min_lr: float = arg(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = arg(0.0, "decoupled weight decay")
    warmup: int = arg(500, "warm-up steps")
    warmup_epochs: Optional[float] = arg(None, "warm-up length in epochs (replaces --warmup)")
    warmup_lr: Optional[float] = arg(None, "constant learning rate during warm-up (default: linear ramp)")
    grad_clip: float = arg(1.0, "max gradient norm; 0 = no clipping")
    flip: bool = arg(False, "random horizontal flip in training")
    precision: str = arg("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (+ GradScaler) | fp32")
    compile: bool = arg(False, "torch.compile the model")
    grad_checkpointing: bool = arg(False, "recompute each block in backward: far less activation memory")
    workers: int = arg(8, "data loader worker processes")
    threads: Optional[int] = arg(
        None,
        "intra-op CPU threads (default: torch's, one per core); the toy jobs use 2, so their numbers "
        "do not depend on the core count",
    )
    seed: int = arg(0, "seed of every random choice")
    run_dir: Optional[str] = arg(None, "output folder (default runs/<data>); each method in a subfolder")
    overwrite: bool = arg(False, "start over in a --run-dir that holds a run: first delete what a run wrote there")
    save_every: int = arg(1000, "checkpoint every N steps (and at each epoch end)")
    resume: Optional[str] = arg(None, "latest | PATH: continue from a checkpoint")
    sweep: bool = arg(False, "also evaluate alpha = 0, 0.1, ..., 1 and plot ID against OOD")
    max_steps: Optional[int] = arg(None, "stop after N steps (smoke tests); the schedule still spans all epochs")
    seeds: int = arg(1, "run each method with seeds --seed, --seed + 1, ...; one table pools them (SEs add the spread)")
    log_every: int = arg(
        50, "a log.jsonl line (loss, lr, samples/s, ...) every N steps, one per epoch; loss checked finite"
    )
    report_to: Optional[str] = arg(None, "tensorboard: also write log.jsonl's scalars to <run dir>/tensorboard")


def parse_args(argv=None) -> list[TrainConfig]:
    """One fully resolved TrainConfig per method of the command (recipes.py's rule), flags checked.
    --print-config prints them, each value with its source, and exits, as --help does."""
    return recipes.parse(TrainConfig, METHODS, __doc__, argv)


# --------------------------------------------------------------------- schedule
def lr_at(step, total, cfg):
    """Warm-up for cfg.warmup steps (a linear ramp to lr, or a constant warmup_lr), then cosine to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup if cfg.warmup_lr is None else cfg.warmup_lr
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------- methods
@dataclass
class Method:
    """What setup_method decides: the loss of a micro-batch, and how each table row is evaluated."""

    loss: Callable  # (net, images [B,3,H,W], labels [B], tokens [B,L] or None) -> scalar
    rows: list  # [(row name, alpha)] evaluated under weights(alpha)
    weights: Callable = lambda alpha: nullcontext()  # alpha -> context manager: the evaluation weights
    curve: Optional[str] = None  # the name of its alpha sweep, if it has one
    ema: Optional[reparam.EMA] = None
    classifier: Optional[torch.Tensor] = None  # full-ft, linear-probe: the head's W replaces the text classifier
    classifier_for: Optional[Callable] = None  # CoOp, CoCoOp: class names -> the classifier evaluate.py scores
    groups: Optional[list] = None  # optimiser groups [{"params", "lr_scale", "weight_decay"}] (train_seg.py)


def in_random_templates(prompts, labels, ddp=(0, 1)):
    """Each label's class name in a template drawn at random: prompts [T, C, L], labels [B] -> [B, L].
    The draw is made for world_size x B labels at once, as one process would draw it for the global
    batch, and rank ddp_rank takes its slice: ddp = (ddp_rank, world_size)."""
    (ddp_rank, world_size), B = ddp, len(labels)
    picks = shared_randint(len(prompts), B * world_size)[ddp_rank * B : (ddp_rank + 1) * B]  # [B] template indices
    return prompts[picks, labels]


def setup_method(model, cfg, task):
    """Make the method's parameters (and only those) trainable; the only per-method branch."""
    torch.manual_seed(cfg.seed)  # new weights (low-rank adapters, LoRA, CoCoOp's meta-net) start from --seed
    tau = cfg.tau or 1 / model.logit_scale.exp().item()
    L = model.config.context_length
    train_templates = recipes.templates(cfg.prompts, getattr(task, "templates", []))
    names = getattr(task, "classnames", [])
    prompts = None  # [T, C, L] every training template filled with every class name (none for retrieval)
    if names:
        prompts = tokenize([t.format(c) for t in train_templates for c in names], L).view(len(train_templates), -1, L)

    def contrastive(net, images, labels, tokens):  # MPM-NCE (Sec. 3.4) or InfoNCE over the global batch
        if tokens is None:  # each image with its class name in a template drawn for the global batch
            ddp = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
            tokens = in_random_templates(prompts, labels.cpu(), ddp)
        f, g, _ = net(images, tokens.to(images.device))
        f, g, labels = gather_features(f, g, labels)
        if cfg.loss == "infonce":
            return infonce_loss(f, g, tau)
        return mpm_nce_loss(f, g, labels, tau=tau, delta=cfg.delta, epsilon=cfg.epsilon)

    def class_ce(net, images, labels, tokens):  # every class, each in a random template (the same on every rank)
        f, g, _ = net(images, in_random_templates(prompts, torch.arange(prompts.shape[1])).to(images.device))
        return F.cross_entropy((f @ g.T).float() / tau, labels)

    loss = class_ce if cfg.loss == "ce" else contrastive
    plain = [(cfg.method, None)]
    if cfg.method in REPARAMETERISABLE:  # the EMA weights (m > 0) merged at alpha
        name, attach = REPARAMETERISABLE[cfg.method]
        attach(model, cfg)
        ema = reparam.EMA(model, m=cfg.m) if cfg.m > 0 else None
        merged = lambda a: reparam.merged(model, a, ema=ema)
        rows = [(f"{name} (α={cfg.alpha:g})", cfg.alpha)]
        return Method(loss=loss, rows=rows, weights=merged, curve=name, ema=ema)
    if cfg.method == "clipfit":  # text FFN W_2 biases + image LayerNorms; CE + text distillation
        return Method(loss=clipfit.prepare(model, prompts[0], tau, cfg.clipfit_lambda), rows=plain)
    if cfg.method in ("coop", "cocoop"):  # a learned context (CoCoOp: shifted per image) before each class name
        learner = prompt_learners.add_prompt_learner(model, cfg.ctx_init, conditional=cfg.method == "cocoop")
        classifier_for = lambda c: learner.classifier(model, c)
        return Method(loss=learner.loss(model, names, tau), rows=plain, classifier_for=classifier_for)
    head = None  # full-ft, wise-ft and linear-probe: WiSE-FT's head, initialised from the zero-shot classifier
    if names and cfg.method in ("full-ft", "wise-ft", "linear-probe", "prolip"):
        classifier = evaluate.zero_shot_classifier(model, names, recipes.templates(cfg.eval_prompts, task.templates))
        if cfg.method == "prolip":
            lam = baselines.prolip_weight(cfg.shots, len(task.train), len(names))
            return Method(loss=baselines.prolip(model, classifier, tau, lam), rows=plain)
        head = baselines.add_classification_head(model, classifier)
        loss = baselines.head_loss(head)
    if cfg.method == "linear-probe":
        return Method(loss=loss, rows=plain, classifier=head.weight)
    if cfg.method == "flyp":
        baselines.full_finetune(model)
        return Method(loss=loss, rows=plain)
    if cfg.method in ("full-ft", "wise-ft"):  # WiSE-FT's end-to-end fine-tuning (both towers on retrieval)
        if head is None:
            baselines.full_finetune(model)
        else:
            baselines.finetune_image_tower(model)
        zero_shot = baselines.snapshot(model)  # the head too: WiSE-FT interpolates it with the tower
        name = "full-ft" if cfg.method == "full-ft" else "WiSE-FT (α=1)"
        rows = [(name, 1.0), (f"WiSE-FT (α={cfg.alpha:g})", cfg.alpha)]
        weights = lambda a: baselines.wise_ft(model, zero_shot, a)
        classifier = None if head is None else head.weight
        return Method(loss=loss, rows=rows, weights=weights, curve="WiSE-FT", classifier=classifier)
    model.requires_grad_(False)  # zero-shot
    return Method(loss=loss, rows=plain)


# -------------------------------------------------------------------- the loop
def train(cfg, model, method, task, device, ddp_rank=0, world_size=1):
    """Fine-tune the trainable parameters of `model` (set by setup_method) with method.loss."""
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    params = [p for p in model.parameters() if p.requires_grad]
    groups = method.groups or [{"params": params}]
    amp = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if cfg.optimizer == "sgd":  # CLIPFit (CoOp/Dassl)
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)

    sampler = StepSampler(len(task.train), cfg.batch_size, cfg.seed, ddp_rank, world_size)
    micro = cfg.batch_size // world_size // cfg.accum_steps
    kw = dict(num_workers=cfg.workers, collate_fn=data.collate_skip, drop_last=True, pin_memory=device.type == "cuda")
    loader = DataLoader(SeededAugment(task.train, cfg.seed), micro, sampler=sampler, **kw)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise data.DataError(f"--batch-size {cfg.batch_size}: the train set has only {len(task.train)} images")
    total = getattr(cfg, "iterations", None) or cfg.epochs * steps_per_epoch  # train_seg.py counts iterations
    if cfg.warmup_epochs is not None:  # warm-up given in epochs (CLIPFit): in steps for lr_at
        cfg = dataclasses.replace(cfg, warmup=round(cfg.warmup_epochs * steps_per_epoch))
    step = 0
    resume = cfg.resume
    if resume == "latest" and not (ckpt_path.exists() or ckpt_path.with_suffix(".prev.pt").exists()):
        resume = None  # as open_clip's: a method the command had not reached yet starts afresh
        if ddp_rank == 0:
            print(f"--resume latest: no checkpoint in {run_dir}, starting at step 0")
    if resume:
        path = ckpt_path if cfg.resume == "latest" else Path(cfg.resume)
        ckpt, path = read_checkpoint(path, latest=cfg.resume == "latest")
        if ddp_rank == 0 and path != ckpt_path and cfg.resume == "latest":  # set the damaged latest aside
            os.replace(ckpt_path, ckpt_path.with_suffix(".damaged.pt"))
        step = restore(ckpt, path, cfg, model, method, optimizer, scaler)
        if ddp_rank == 0:
            print(f"resumed from {path} at step {step}/{total}")

    captions = isinstance(task, retrieval.RetrievalData)  # a row is a caption; its label is its image id
    net = model
    if world_size > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    def save():
        if ddp_rank == 0:
            trainable = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            state = dict(config=asdict(cfg), clip_config=asdict(model.config), step=step, trainable=trainable)
            state |= dict(optimizer=optimizer.state_dict(), ema=method.ema and method.ema.state_dict())
            save_checkpoint({**state, "scaler": scaler and scaler.state_dict()}, ckpt_path)

    last = min(total, cfg.max_steps or total)
    good = f"{path} (step {step})" if resume else "none written yet"  # the last good checkpoint
    meter = faults.LossMeter(device, total, fatal=scaler is None)  # on the device: no host sync per step
    log = RunLog(cfg, total=last, start=step, device=device, enabled=ddp_rank == 0)
    model.train()
    with log, faults.StopSignal() as stop:  # SIGTERM, SIGUSR1: finish the step, save, exit (faults.py)
        while step < last:
            epoch = step // steps_per_epoch
            sampler.set_epoch(epoch, step % steps_per_epoch)
            batches = iter(loader)
            meter.reset()
            while step < last and step // steps_per_epoch == epoch:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, total, cfg) * group.get("lr_scale", 1.0)
                torch.manual_seed(seed_of(cfg.seed, step, ddp_rank))  # adapter dropping, template choice
                for k in range(cfg.accum_steps):
                    images, labels, n_bad = next(batches)
                    tokens = None
                    if captions:
                        tokens, labels = task.row_tokens[labels], task.row_image_id[labels]
                    images, labels = images.to(device, non_blocking=True), labels.to(device)
                    sync = net.no_sync() if world_size > 1 and k < cfg.accum_steps - 1 else nullcontext()
                    with sync, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                        loss = method.loss(net, images, labels, tokens) / cfg.accum_steps
                    (scaler.scale(loss) if scaler else loss).backward()
                    meter.add(loss, step)
                    log.add(loss, samples=len(labels) * world_size, skipped=n_bad)
                if scaler:
                    scaler.unscale_(optimizer)
                if cfg.grad_clip > 0 or scaler:  # with a scaler, a non-finite norm is a step it skips
                    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or math.inf)
                if scaler:
                    meter.skip(norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if method.ema is not None:
                    method.ema.update(model)
                step += 1
                signum = stop.agreed()  # one all-reduce per step under torchrun
                epoch_end = step % steps_per_epoch == 0 or step == last
                saving = step % cfg.save_every == 0 or epoch_end or signum
                if step % cfg.log_every == 0 or saving:  # raises on a non-finite loss: no checkpoint after one
                    log.skipped_steps = meter.look(last_good=good)[1]
                log.step(step, epoch, lr=optimizer.param_groups[0]["lr"])
                if saving:
                    save()
                    good = f"{ckpt_path} (step {step})"
                if signum:
                    stop.stop(signum, step, total)
            log.end_epoch(step, epoch, lr=optimizer.param_groups[0]["lr"])
    model.eval()


# ------------------------------------------------------------------- the driver
def build_data(cfg, model):
    train_transform = image_transform(model.config.image_size, train=True, flip=cfg.flip)
    ood = dict(o.split("=", 1) for o in cfg.ood)
    kw = dict(context_length=model.config.context_length, shots=cfg.shots, seed=cfg.seed, ood=ood, strict=cfg.strict)
    eval_transform = image_transform(model.config.image_size)
    kw |= dict(classnames=cfg.classnames, flip=cfg.flip)
    task = data.build_task(cfg.data, cfg.data_root, train_transform, eval_transform, **kw)
    if cfg.split:  # train on the base classes; evaluate base and new, each among its own classes
        return coop.base_new(task)
    return task, task


def check_paths(cfg):
    """The input checks that cost nothing, made before any download or data read."""
    data.check_root(cfg.data, cfg.data_root)
    for flag, path in (("--classnames", cfg.classnames), ("--resume", cfg.resume)):
        if path not in (None, "latest") and not Path(path).is_file():
            raise data.DataError(f"{flag} {path}: no such file")


def run(cfgs, device, ddp_rank=0, world_size=1):
    """Train and evaluate each method in turn, once per seed; one table (and alpha sweep) for all of them,
    pooled over the seeds (evaluate.pool_seeds)."""
    for cfg in cfgs:
        check_paths(cfg)
    out = Path(cfgs[0].run_dir or f"runs/{cfgs[0].data}")
    if ddp_rank == 0 or not cfgs[0].overwrite:  # one run per folder (run_log.py)
        run_log.claim(out, resume=cfgs[0].resume, overwrite=cfgs[0].overwrite)
    cfgs = [dataclasses.replace(c, overwrite=False) for c in cfgs]  # a replayed config.json deletes nothing
    seeds = [cfgs[0].seed + s for s in range(cfgs[0].seeds)]
    runs = []
    for seed in seeds:
        seed_dir = out / f"seed{seed}" if len(seeds) > 1 else out
        seeded = [dataclasses.replace(c, seed=seed) for c in cfgs]
        runs.append(run_methods(seeded, seed_dir, device, ddp_rank, world_size))
    if ddp_rank != 0 or not runs[0][0]:
        return [], {}
    rows, curves = evaluate.pool_seeds([r for r, _, _ in runs], [c for _, c, _ in runs])
    evaluate.report(rows, curves, out, cfgs[0], runs[0][2])
    return rows, curves


def run_methods(cfgs, out, device, ddp_rank=0, world_size=1):
    """One seed: each method trained (unless zero-shot), exported and evaluated. Returns its table rows,
    alpha sweeps and the evaluation task."""
    rows, curves = [], {}
    for given in cfgs:
        cfg = dataclasses.replace(given, run_dir=str(out / given.method))
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        model = load_clip(cfg.model, device=device)
        task, eval_task = build_data(cfg, model)
        if task.train is None and cfg.method != "zero-shot":
            raise data.DataError(f"--data-root {cfg.data_root}: no train/ folder, so only --method zero-shot can run")
        method = setup_method(model, cfg, task)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        n_train = count_trainable(model)
        if ddp_rank == 0:
            print(f"{cfg.method}: {n_train:,} trainable parameters")
            (Path(cfg.run_dir) / "config.json").write_text(json.dumps(asdict(given), indent=2))  # for --config
        if cfg.method != "zero-shot":
            train(cfg, model, method, task, device, ddp_rank, world_size)
        prompts = recipes.templates(cfg.eval_prompts, getattr(eval_task, "templates", []))
        classifier = method.classifier if method.classifier_for is None else method.classifier_for(eval_task.classnames)
        kwargs = dict(split=cfg.split, prompts=prompts, classifier=classifier, workers=cfg.workers)
        kwargs["autocast_dtype"] = autocast_dtype(device)
        if method.curve and cfg.sweep:  # every rank scores its shard of each set (evaluate.shard)
            curves[method.curve] = evaluate.sweep(model, eval_task, evaluate.ALPHAS, method.weights, **kwargs)
        first = len(rows)
        for name, alpha in method.rows:
            done = [r for r in curves.get(method.curve, []) if r["alpha"] == alpha]
            with method.weights(alpha):
                scores = done or evaluate.score(model, eval_task, **kwargs)
            for score in scores:
                row = dict(method=name, run=cfg.method, alpha=alpha, trainable=n_train)
                rows.append(row | {k: v for k, v in score.items() if k != "alpha"})
        if ddp_rank == 0:
            print(evaluate.format_table(rows[first:]))
            export(cfg, model, method)
    return rows, curves, eval_task


def export(cfg, model, method):
    """A plain CLIP with the fine-tuned weights (merged.safetensors), the adapters, the prompt learner, and
    the classification head of full-ft and linear-probe (head.safetensors: [C, e], applied to normalised
    image features)."""
    out = Path(cfg.run_dir)
    if cfg.method == "r-adapter":
        r_adapter.save_adapters(model, out / "adapters.safetensors", ema=method.ema)
    if method.classifier_for is not None:  # CLIP itself is unchanged
        tensors = {k: v.cpu().contiguous() for k, v in model.prompt_learner.state_dict().items()}
        metadata = {"prefix": model.prompt_learner.prefix}
        save_safetensors(tensors, out / "prompt_learner.safetensors", metadata=metadata)
        return
    with method.weights(method.rows[0][1]):
        if method.classifier is not None:
            save_safetensors({"weight": method.classifier.detach().cpu().contiguous()}, out / "head.safetensors")
        if cfg.method not in ("zero-shot", "linear-probe"):
            save_clip(model, out / "merged.safetensors")


def one_line(e):
    """The message of e; for an error re-raised from a DataLoader worker, the original error's line."""
    line = str(e).strip().splitlines()[-1]
    return line.removeprefix(f"{type(e).__module__}.{type(e).__name__}: ").removeprefix(f"{type(e).__name__}: ")


def launch(run_fn, cfgs):
    """Start the process (DDP under torchrun, the device, --threads), call run_fn(cfgs, device, ddp_rank,
    world_size), and end a preemption, Ctrl-C, a non-finite loss or bad input with one line and its exit code."""
    ddp_rank, world_size = 0, 1
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # README, "Several GPUs": why 30 minutes is safe
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(minutes=30))
        ddp_rank, world_size = dist.get_rank(), dist.get_world_size()
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    threads = torch.get_num_threads()
    if cfgs[0].threads:  # the intra-op threads fix the order CPU kernels sum in (docs/install.md)
        torch.set_num_threads(cfgs[0].threads)
    try:
        run_fn(cfgs, device, ddp_rank, world_size)
    except faults.Preempted as e:  # every rank, after the checkpoint
        if ddp_rank == 0:
            print(e)
        sys.exit(e.code)
    except KeyboardInterrupt:  # a second Ctrl-C in training, or one outside it: no traceback
        if ddp_rank == 0:
            print("stopped at once; continue from the last checkpoint with --resume latest")
        sys.exit(128 + signal.SIGINT)
    except faults.NonFiniteLoss as e:  # every rank, at the same step
        sys.exit(f"error: {e}" if ddp_rank == 0 else 1)
    except (data.DataError, WeightsError, OSError) as e:  # the user's input, named in the message: no traceback
        sys.exit(f"error: {one_line(e)}")
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process
        if world_size > 1:
            dist.destroy_process_group()


def main(argv=None):
    launch(run, parse_args(argv))


if __name__ == "__main__":
    main()

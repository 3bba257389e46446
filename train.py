"""Fine-tune CLIP with R-Adapter (Kim et al., ECCV 2024), CLIPFit (Li et al., EMNLP 2024) or a baseline.

    python train.py                                   # the offline toy world (README)
    python train.py --data imagenet --data-root DIR --model ViT-B-16:openai
    torchrun --nproc-per-node 8 -- train.py --data imagenet --data-root DIR --model ViT-B-16.pt
    python train.py ... --resume latest | --print-config
    python train.py --config runs/toy/r-adapter/config.json --epochs 4 --run-dir runs/toy-4ep   # one value changed

Per method (methods.py): its setup decides what trains, the loss and the evaluation weights. `fine_tune`
is the paper's training: each step sets the lr, pairs each image with its class name in a random
template (Sec. 3.4) or its caption, takes the loss (MPM-NCE for R-Adapter), steps the optimiser and
then the adapters' EMA (Sec. 3.3); loop.py does the rest (data order, DDP, precision, checkpoints,
--resume, preemption). Each table row is then scored under its weights (R-Adapter: the EMA merged at
alpha), on every rank's shard of the sets. Which values a command gets is recipes.py's business.
"""

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

import cli
import clipfit
import data
import evaluate
import loop
import mpm_nce
import recipes
import report
import run_log
from checkpoints import save_adapters
from clip_model import autocast_dtype, count_trainable, image_transform, tokenize
from clip_weights import load_clip, save_clip, save_safetensors
from data import coop, retrieval, seed_of
from data.templates import templates
from method import Task
from methods import METHODS as SETUPS

METHODS = tuple(SETUPS)  # the --method names


def arg(default, help):
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    data: str = arg("toy", "imagenet | folder | toy | toy-specialised | coco | flickr30k | a CoOp dataset (coop.py)")
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
    optimizer: str = arg(
        "adamw",
        "adamw: AdamW, weight decay decoupled from the gradient step (R-Adapter, WiSE-FT) | sgd: SGD with "
        "momentum 0.9, weight decay added to the gradient as an L2 penalty's (Dassl: CoOp, CoCoOp, CLIPFit)",
    )
    epochs: int = arg(10, "passes over the training set")
    batch_size: int = arg(512, "global batch (all GPUs, all accumulation steps)")
    accum_steps: int = arg(1, "gradient accumulation steps per optimiser step")
    lr: float = arg(5e-4, "peak learning rate")
    min_lr: float = arg(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = arg(0.0, "weight decay: decoupled under adamw, an L2 penalty's gradient under sgd")
    schedule: str = arg(
        "cosine",
        "cosine: warm-up, then cosine to --min-lr, per step (R-Adapter) | dassl: --warmup-epochs at --warmup-lr, "
        "then a cosine over --epochs held for each epoch, never reaching --min-lr (Dassl's, for CoOp, CoCoOp, CLIPFit)",
    )
    warmup: int = arg(500, "warm-up steps")
    warmup_epochs: Optional[float] = arg(None, "warm-up length in epochs (replaces --warmup)")
    warmup_lr: Optional[float] = arg(None, "constant learning rate during warm-up (default: linear ramp)")
    grad_clip: float = arg(1.0, "max gradient norm; 0 = no clipping")
    flip: bool = arg(False, "random horizontal flip in training")
    crop_scale: float = arg(
        0.9,
        "training crop: RandomResizedCrop's smallest share of the image area, scale (s, 1) (R-Adapter 0.9, Dassl 0.08)",
    )
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
    cfgs, _ = cli.parse(
        TrainConfig,
        argv,
        description=__doc__,
        methods=METHODS,
        recipe=recipes.recipe,
        check=cli.check_train,
        header=cli.train_header,
        warn=lambda cfg: data.check_root(cfg.data, cfg.data_root),
    )
    return cfgs


# --------------------------------------------------------------------- schedule
def lr_at(step, total, cfg):
    """The learning rate of a step of `total`. cosine (R-Adapter): warm-up for cfg.warmup steps (a linear ramp
    to lr, or a constant warmup_lr), then cosine to min_lr, per step. dassl (CoOp, CoCoOp, CLIPFit): Dassl's
    ConstantWarmupScheduler over CosineAnnealingLR(T_max=epochs), stepped once per epoch: warmup_lr for the
    first warmup_epochs epochs, then epoch e at the cosine's value for e - warmup_epochs (the cosine starts
    after the warm-up), so the last epoch stays above min_lr."""
    if cfg.schedule == "dassl":
        epoch, warm = step // (total // cfg.epochs), cfg.warmup_epochs or 0
        if epoch < warm:
            return cfg.warmup_lr
        return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * (epoch - warm) / cfg.epochs))
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup if cfg.warmup_lr is None else cfg.warmup_lr
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


# ------------------------------------------------------------- the task's side
def build_data(cfg, model):
    """(the training data, the evaluation data): one task, or with --split base its base and new halves."""
    train_transform = image_transform(model.config.image_size, train=True, flip=cfg.flip, scale=(cfg.crop_scale, 1.0))
    ood = dict(o.split("=", 1) for o in cfg.ood)
    kw = dict(context_length=model.config.context_length, shots=cfg.shots, seed=cfg.seed, ood=ood, strict=cfg.strict)
    eval_transform = image_transform(model.config.image_size)
    kw |= dict(classnames=cfg.classnames, flip=cfg.flip)
    task = data.build_task(cfg.data, cfg.data_root, train_transform, eval_transform, **kw)
    if cfg.split:  # train on the base classes; evaluate base and new, each among its own classes
        return coop.base_new(task)
    return task, task


def task_for(cfg, model, task_data):
    """What a method's setup reads of the training data (method.Task), with the task's loss: --loss over
    each image and its class name in a random training template (or its caption), tau = 1 / the frozen
    logit scale unless --tau."""
    tau = cfg.tau or 1 / model.logit_scale.exp().item()
    names = getattr(task_data, "classnames", [])  # retrieval has none
    train_templates = templates(cfg.prompts, getattr(task_data, "templates", []))
    prompts = None  # [T, C, L]: every training template filled with every class name
    if names:
        L = model.config.context_length
        prompts = tokenize([t.format(c) for t in train_templates for c in names], L).view(len(train_templates), -1, L)
    return Task(
        objective=mpm_nce.objective(cfg.loss, prompts, tau, delta=cfg.delta, epsilon=cfg.epsilon),
        classnames=names,
        prompts=prompts,
        eval_templates=templates(cfg.eval_prompts, getattr(task_data, "templates", [])) if names else [],
        n_train=0 if task_data.train is None else len(task_data.train),
        tau=tau,
    )


def setup(cfg, model, task_data):
    """The method of cfg.method set up on model (methods.py), its new weights (low-rank adapters, LoRA,
    CoCoOp's meta-net, prompt vectors) drawn from --seed."""
    torch.manual_seed(cfg.seed)
    return SETUPS[cfg.method](model, cfg, task_for(cfg, model, task_data))


# ------------------------------------------------------------ the paper's training
def fine_tune(cfg, model, method, train_set, device, ddp=(0, 1), *, groups=None, iterations=None, captions=None):
    """Train the parameters method.setup left trainable (or the optimiser `groups` given) with method.loss,
    for cfg.epochs (or `iterations` steps). captions: retrieval's (tokens [rows, L], image id [rows]) of
    each training row; otherwise each row is an image with its class label."""
    rank, _ = ddp
    groups = groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
    # foreach: the multi-tensor update (CUDA's default), bit-identical to the per-tensor loop and faster on a CPU
    if cfg.optimizer == "sgd":  # the Dassl family: plain SGD with momentum 0.9, L2 weight decay
        optimizer = torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, foreach=True)
    else:  # AdamW, decoupled weight decay
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    shared = {f.name for f in dataclasses.fields(loop.LoopConfig)} - {"config", "epochs", "iterations"}
    length = dict(iterations=iterations) if iterations else dict(epochs=cfg.epochs)
    loop_cfg = loop.LoopConfig(**{k: getattr(cfg, k) for k in shared}, **length, config=asdict(cfg))
    trainer = loop.Trainer(loop_cfg, model, optimizer, train_set, device, ddp, ema=method.ema)
    if cfg.warmup_epochs is not None:  # warm-up given in epochs (CLIPFit): in steps for lr_at
        cfg = dataclasses.replace(cfg, warmup=round(cfg.warmup_epochs * trainer.steps_per_epoch))

    def step(s):  # one optimiser step
        for group in optimizer.param_groups:  # warm-up, then cosine (x each group's scale: train_seg.py)
            group["lr"] = lr_at(s, trainer.total, cfg) * group.get("lr_scale", 1.0)
        torch.manual_seed(seed_of(cfg.seed, s, rank))  # adapter dropping (p), template choice: from (seed, step)
        for images, labels in trainer.micro_batches():  # --accum-steps of them
            tokens = None
            if captions is not None:  # a row is a caption; its label is its image's id (MPM-NCE's positives)
                tokens, labels = captions[0][labels.cpu()], captions[1][labels.cpu()].to(labels.device)
            with trainer.forward():
                loss = method.loss(trainer.net, images, labels, tokens) / cfg.accum_steps  # e.g. MPM-NCE
            trainer.backward(loss)
        trainer.optimizer_step(cfg.grad_clip)  # clip the gradient norm, step the optimiser
        method.after_step()  # R-Adapter: the EMA W~ <- m W~ + (1 - m) W (Sec. 3.3)

    trainer.run(step)


# ------------------------------------------------------------------- the driver
def check_paths(cfg):
    """The input checks that cost nothing, made before any download or data read."""
    data.check_root(cfg.data, cfg.data_root)
    for flag, path in (("--classnames", cfg.classnames), ("--resume", cfg.resume)):
        if path not in (None, "latest") and not Path(path).is_file():
            raise data.DataError(f"{flag} {path}: no such file")


def run(cfgs, device, ddp_rank=0, world_size=1):
    """Train and evaluate each method in turn, once per seed; one table (and alpha sweep) for all of them,
    pooled over the seeds (report.pool_seeds)."""
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
    rows, curves = report.pool_seeds([r for r, _, _ in runs], [c for _, c, _ in runs])
    report.report(rows, curves, out, cfgs[0], runs[0][2])
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
        method = setup(cfg, model, task)
        model.set_grad_checkpointing(cfg.grad_checkpointing)
        n_train = count_trainable(model)
        if ddp_rank == 0:
            print(f"{cfg.method}: {n_train:,} trainable parameters")
            (Path(cfg.run_dir) / "config.json").write_text(json.dumps(asdict(given), indent=2))  # for --config
        if cfg.method != "zero-shot":
            captions = (task.row_tokens, task.row_image_id) if isinstance(task, retrieval.RetrievalData) else None
            fine_tune(cfg, model, method, task.train, device, (ddp_rank, world_size), captions=captions)
        prompts = templates(cfg.eval_prompts, getattr(eval_task, "templates", []))
        classifier = method.classifier if method.classifier_for is None else method.classifier_for(eval_task.classnames)
        kwargs = dict(split=cfg.split, prompts=prompts, classifier=classifier, workers=cfg.workers)
        kwargs["autocast_dtype"] = autocast_dtype(device)
        if method.curve and cfg.sweep:  # every rank scores its shard of each set (distributed.shard)
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
            print(report.format_table(rows[first:]))
            export(cfg, model, method)
    return rows, curves, eval_task


def export(cfg, model, method):
    """A plain CLIP with the fine-tuned weights (merged.safetensors), the adapters, the prompt learner, and
    the classification head of full-ft and linear-probe (head.safetensors: [C, e], applied to normalised
    image features)."""
    out = Path(cfg.run_dir)
    if cfg.method == "r-adapter":
        save_adapters(model, out / "adapters.safetensors", ema=method.ema)
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


def main(argv=None):
    cli.launch(run, parse_args(argv))


if __name__ == "__main__":
    main()

"""Training: R-Adapter fine-tuning of CLIP (Kim et al., ECCV 2024) and its baselines, one loop.

    python train.py                                         # the toy world, offline, CPU (README)
    python train.py --data imagenet --data-root DIR --model ViT-B-16:openai
    torchrun --nproc-per-node 8 train.py --data imagenet --data-root DIR --model ViT-B-16.pt
    python train.py --data imagenet ... --resume latest     # continue an interrupted run exactly
    python train.py --data coco --data-root DIR --model ViT-B-16:openai   # retrieval (retrieval.py)
    python train.py --data dtd --data-root DIR --shots 16 --split base    # base-to-novel (coop.py)

Read top to bottom, one method run is:
  1. base CLIP (load_clip) and task data (data.build_task: train + ID test + OOD sets);
  2. the method decides what trains: `r-adapter` adds adapters to both towers (Sec. 3.3,
     r_adapter.py), `full-ft` trains every weight, `zero-shot` trains nothing;
  3. every step, each image is paired with its class name in a random template (Sec. 3.4),
     image and text features go into MPM-NCE (mpm_nce.py; positives = same class in the
     global batch), AdamW steps with cosine lr and warm-up, then the EMA of the adapters
     (temporal ensemble) is updated;
  4. checkpoints (trainable weights, EMA, optimiser, scaler, step) are written atomically every
     --save-every steps and at each epoch end; --resume continues with the same lr schedule and
     data order (all randomness is a function of (seed, step), not of process history);
  5. at the end the EMA adapters are merged with alpha (re-scaling, Sec. 3.3), the model is
     evaluated on ID + OOD, and exported as a plain CLIP.
`--method a,b,c` runs several methods in turn and prints one table; a `full-ft` run also
yields the WiSE-FT row (zero-shot/fine-tuned weight interpolation at alpha).

Defaults are the paper's ImageNet recipe (PAPER.md 2.7). `--data toy` (the default job) swaps
in the toy world's budgets (TOY_RECIPE) for every flag not given on the command line;
`--data coco | flickr30k` the retrieval recipe (RETRIEVAL_RECIPE: alpha 0.8, epsilon 0): a row is
one caption, its label its image id, and the table reports R@1/5/10 both ways (run_retrieval);
`--sweep` plots rsum over alpha (the COCO 5K rsum against the Flickr30k 1K one when both are there).
`--data <CoOp dataset>` (coop.DATASETS) reads one of the CoOp benchmark's datasets; `--split base`
trains on its base classes and reports base, new and their harmonic mean (CoCoOp's protocol), with
R-Adapter's base-to-novel recipe (BASE_TO_NOVEL_RECIPE) for the flags not given.
"""
import argparse
import dataclasses
import hashlib
import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from tqdm import tqdm

import baselines
import clipfit
import coop
import evaluate
import r_adapter
import retrieval
from clip_model import CACHE_DIR, CLIP, CLIP_MEAN, CLIP_STD, PRESETS, image_transform, load_clip, save_clip, tokenize
from data import build_task, collate_skip
from mpm_nce import gather_features, infonce_loss, mpm_nce_loss

# r-adapter (r_adapter.py), clipfit (clipfit.py), the baselines (baselines.py), zero-shot.
METHODS = ("r-adapter", "clipfit", "full-ft", "wise-ft", "flyp", "linear-probe", "prolip", "lora", "zero-shot")
FULL_FT = ("full-ft", "wise-ft", "flyp")  # every weight trains (the logit scale stays frozen)
CE_ONLY = ("clipfit", "linear-probe", "prolip")  # class-logit cross-entropy is their objective


@dataclass
class TrainConfig:
    # what to run
    data: str = "toy"                 # imagenet | folder | toy | coco | flickr30k (retrieval) | coop.DATASETS
    data_root: Optional[str] = None
    ood: list = field(default_factory=list)  # NAME=DIR extra evaluation folders
    shots: Optional[int] = None       # K-shot subset of train
    split: Optional[str] = None       # base: train on the base classes, report base/new/HM (coop.py)
    strict: bool = False              # unreadable images: error instead of skip
    classnames: Optional[str] = None  # --data folder: JSON {folder: class name}
    model: str = "ViT-B-16:openai"    # checkpoint path or hub name; 'toy' = the cached toy CLIP
    method: str = "r-adapter"         # comma separated, from METHODS
    loss: str = "mpm-nce"             # mpm-nce | infonce | ce
    # R-Adapter (Sec. 3.3)
    rank: Optional[int] = None        # None = full rank d x d; r = low rank B A (also LoRA's rank)
    p: float = 0.2                    # adapter drop probability
    drop_mode: str = "sample"         # sample (paper) | token (released code)
    m: float = 0.999                  # EMA momentum
    alpha: float = 0.5                # re-scaling coefficient at merge
    # MPM-NCE (Sec. 3.4)
    tau: Optional[float] = None       # None = the frozen logit scale's 1/s (0.01 for OpenAI CLIP)
    delta: float = 0.05
    epsilon: float = 0.02
    # CLIPFit (PAPER.md 3)
    clipfit_lambda: float = clipfit.LAMBDA  # weight of the distillation term 1 - mean_c cos(g_c, g_c^0)
    template: Optional[str] = None    # CLIPFit's one prompt; None = 'a photo of a {}.' if listed, else the first
    # optimisation (PAPER.md 2.7)
    optimizer: str = "adamw"          # adamw | sgd (momentum 0.9; CLIPFit)
    epochs: int = 10
    batch_size: int = 512             # global batch
    accum_steps: int = 1
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.0
    warmup: int = 500
    warmup_epochs: Optional[float] = None  # warm-up length in epochs, replaces --warmup (CLIPFit: 1)
    warmup_lr: Optional[float] = None  # constant lr during warm-up (CLIPFit: 1e-5); None = linear ramp to --lr
    grad_clip: float = 1.0            # max gradient norm; 0 = no clipping
    flip: bool = False                # random horizontal flip in training (CLIPFit; not on the toy data)
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    compile: bool = False
    workers: int = 8
    seed: int = 0
    # bookkeeping
    run_dir: Optional[str] = None     # default runs/<data>; each method in its own subfolder
    save_every: int = 1000
    resume: Optional[str] = None      # latest | PATH
    sweep: bool = False               # also sweep alpha 0..1 and plot ID vs OOD
    max_steps: Optional[int] = None   # stop early (smoke tests); the schedule still spans all epochs
    retrain_toy: bool = False         # rebuild the cached toy CLIP
    explicit: Optional[tuple] = None  # not a flag: fields recipes keep (parse_args: those given; None: non-defaults)


# The toy world's budgets, used for flags not given when --data toy (issue: embedded default).
# 180 steps in all, so the EMA momentum is the paper's short-run value (base-to-novel, m 0.9): with
# m 0.999 the EMA would still hold 84% of the zero initialisation at the end.
TOY_RECIPE = dict(model="toy", method="zero-shot,full-ft,r-adapter", epochs=10, batch_size=128, warmup=20,
                  m=0.9, workers=0, save_every=200, sweep=True)


# Retrieval (--data coco | flickr30k, PAPER.md 2.7), for flags not given on the command line.
RETRIEVAL_RECIPE = dict(alpha=0.8, epsilon=0.0)


# Base-to-novel (--split base, PAPER.md 2.7), for flags not given on the command line: R-Adapter's
# released script (docs/RUN.md: --epochs 101 --batch-size 32 --ema 0.9 --mg 0.1 --ls 0). Its lr 5e-4,
# weight decay 0, 500 warm-up steps, drop 0.2 and alpha 0.5 are our defaults already. It also sets
# --adapter 4,4 (adapter rank 4, our --rank 4); not a recipe entry, since --rank cannot be set back
# to full rank (None) on the command line.
BASE_TO_NOVEL_RECIPE = dict(epochs=101, batch_size=32, m=0.9, delta=0.1, epsilon=0.0)


# Each method's own optimisation recipe, used for flags not given on the command line (they
# override TOY_RECIPE's budgets where both name a flag). Methods not listed use the defaults.
METHOD_RECIPES = {
    # CLIPFit's released config (CoOp/Dassl): SGD 0.002 (momentum 0.9, Dassl's weight decay 5e-4),
    # cosine to 0, one warm-up epoch at a constant 1e-5, batch 32, crop + flip, no clipping.
    "clipfit": dict(loss="ce", optimizer="sgd", lr=0.002, weight_decay=5e-4, min_lr=0.0, batch_size=32,
                    warmup_epochs=1, warmup_lr=1e-5, grad_clip=0.0, flip=True),
    # FLYP (Goyal et al. 2023): contrastive full fine-tuning, AdamW lr 1e-5, weight decay 0.1.
    "flyp": dict(loss="infonce", lr=1e-5, weight_decay=0.1),
    # WiSE-FT: full-ft's training, always swept over alpha.
    "wise-ft": dict(sweep=True),
    # ProLIP's release: Adam lr 1e-3, cosine, no warm-up; lambda = 1/N is set in setup_method.
    "prolip": dict(loss="ce", lr=1e-3, weight_decay=0.0, warmup=0, grad_clip=0.0),
    # Zero-shot-initialised linear probe: CE, AdamW lr 1e-3 (our choice).
    "linear-probe": dict(loss="ce", lr=1e-3, weight_decay=0.0),
    # LoRA (our choice, close to CLIP-LoRA's few-shot set-up): rank 8, CE, AdamW 2e-4, batch 32.
    "lora": dict(rank=8, loss="ce", lr=2e-4, weight_decay=0.01, batch_size=32),
}


def method_config(cfg, method):
    """cfg for one method: METHOD_RECIPES[method] fills every field not in cfg.explicit (when
    that is None, as for a TrainConfig built in code: every field still at its default)."""
    given = cfg.explicit
    if given is None:
        given = {f.name for f in dataclasses.fields(cfg) if f.default is dataclasses.MISSING
                 or getattr(cfg, f.name) != f.default}
    recipe = {k: v for k, v in METHOD_RECIPES.get(method, {}).items() if k not in given}
    mcfg = dataclasses.replace(cfg, **recipe, method=method)
    if method in CE_ONLY and mcfg.loss != "ce":
        raise ValueError(f"--method {method} trains with cross-entropy over class logits: drop --loss {mcfg.loss}")
    if method == "lora" and not (isinstance(mcfg.rank, int) and mcfg.rank >= 1):
        raise ValueError(f"--method lora needs --rank r >= 1, got {mcfg.rank}")
    if mcfg.optimizer not in ("adamw", "sgd"):
        raise ValueError(f"--optimizer {mcfg.optimizer!r}: expected adamw or sgd")
    return mcfg


# --------------------------------------------------------------- config/CLI
def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "explicit":
            continue
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS)
        elif f.name == "ood":
            parser.add_argument(flag, action="append", metavar="NAME=DIR", default=argparse.SUPPRESS)
        else:
            kind = {Optional[int]: int, Optional[float]: float, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS)
    given = vars(parser.parse_args(argv))
    data = given.get("data", TrainConfig.data)
    recipe = {"toy": TOY_RECIPE, **dict.fromkeys(retrieval.DATASETS, RETRIEVAL_RECIPE)}.get(data, {})
    if given.get("split") == "base":
        recipe = BASE_TO_NOVEL_RECIPE
    elif "shots" in given and data in coop.BENCHMARK:  # CLIPFit's K-shot lambda (PAPER.md 3)
        recipe = dict(clipfit_lambda=clipfit.few_shot_lambda(data))
    cfg = TrainConfig(**{**recipe, **given}, explicit=tuple(sorted(given)))
    if cfg.split not in (None, "base"):
        parser.error(f"--split {cfg.split!r}: expected base (train on the base classes, report base/new/HM)")
    if cfg.split and cfg.data in ("toy", *retrieval.DATASETS):
        parser.error(f"--split base: --data {cfg.data} is not read from image files with classes "
                     f"(use a CoOp dataset, imagenet or folder)")
    if cfg.ood and (cfg.split or cfg.data in coop.DATASETS):
        parser.error("--ood: base-to-novel and the CoOp datasets evaluate their own test set only")
    for name in cfg.method.split(","):
        if name not in METHODS:
            parser.error(f"--method {name!r}: expected one of {', '.join(METHODS)}")
        if cfg.split and name == "linear-probe":
            parser.error("--split base: --method linear-probe learns rows for the base classes only, "
                         "so it cannot score the new ones")
        try:
            mcfg = method_config(cfg, name)
        except ValueError as e:
            parser.error(str(e))
        if cfg.data in retrieval.DATASETS and mcfg.loss == "ce":
            parser.error(f"--data {cfg.data} is retrieval (captions, no classes): --method {name} with --loss ce "
                         "cannot train on it")
    if cfg.data in retrieval.DATASETS and cfg.shots is not None:
        parser.error(f"--shots: --data {cfg.data} trains on every caption (no classes to draw K shots of)")
    if cfg.data != "toy" and cfg.data_root is None:
        parser.error(f"--data {cfg.data} needs --data-root DIR (see README for the layout)")
    if cfg.batch_size % cfg.accum_steps:
        parser.error(f"--batch-size {cfg.batch_size} must be divisible by --accum-steps {cfg.accum_steps}")
    return cfg


# ---------------------------------------------------------------- schedule
def lr_at(step, total, cfg):
    """Warm-up for cfg.warmup steps (linear ramp to lr, or constant cfg.warmup_lr), then cosine
    from lr down to min_lr (per step)."""
    if step < cfg.warmup:
        warmup_lr = getattr(cfg, "warmup_lr", None)
        return cfg.lr * (step + 1) / cfg.warmup if warmup_lr is None else warmup_lr
    progress = (step - cfg.warmup) / max(1, total - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def seed_of(*parts):
    """A 63-bit seed derived from parts: randomness depends on (seed, step, ...), not history."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# -------------------------------------------------------------------- data
class StepSampler(Sampler):
    """Yields (epoch, index) for this rank's share of each global batch, from `start_step` on.

    The order of epoch e is a permutation seeded by (seed, e), so a resumed run sees exactly the
    samples it would have seen."""

    def __init__(self, n, batch_size, seed, rank=0, world=1):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.steps_per_epoch = n // batch_size
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch, start_step=0):
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed_of(self.seed, self.epoch)))
        share = self.batch_size // self.world
        for step in range(self.start_step, self.steps_per_epoch):
            batch = order[step * self.batch_size:(step + 1) * self.batch_size]
            for i in batch[self.rank * share:(self.rank + 1) * share].tolist():
                yield self.epoch, i

    def __len__(self):
        return (self.steps_per_epoch - self.start_step) * (self.batch_size // self.world)


class SeededAugment(Dataset):
    """Seeds the augmentation of sample i in epoch e with (seed, e, i): identical in any worker."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key
        torch.manual_seed(seed_of(self.seed, epoch, i))
        return self.dataset[i]


def class_text_tokens(task, context_length):
    """[T, C, L] tokens of every template filled with every class name."""
    texts = [t.format(c) for t in task.templates for c in task.classnames]
    return tokenize(texts, context_length).view(len(task.templates), len(task.classnames), -1)


# ----------------------------------------------------------------- methods
@dataclass
class MethodState:
    """What a method carries besides its trainable weights (built by setup_method)."""
    ema: Optional[r_adapter.AdapterEMA] = None  # r-adapter: temporal ensemble of the adapters
    prompts: Optional[torch.Tensor] = None      # clipfit: [C, L] tokens, its one template per class
    classifier: Optional[torch.Tensor] = None   # prolip: frozen zero-shot class embeddings [C, e]
    head: Optional[torch.nn.Parameter] = None   # prolip: visual.head.weight; linear-probe: the probe's W
    anchor: Optional[torch.Tensor] = None       # clipfit: g^0 [C, e]; prolip: W0, the pretrained projection
    reg_weight: float = 0.0                     # clipfit: lambda; prolip: 1/N


def one_template(task, cfg):
    """CLIPFit's single prompt: --template, else 'a photo of a {}.' when the task has it, else its first."""
    return cfg.template or ("a photo of a {}." if "a photo of a {}." in task.templates else task.templates[0])


def setup_method(model, cfg, task):
    """Make the method's parameters trainable (and only those); returns its MethodState."""
    if cfg.method == "r-adapter":
        r_adapter.add_adapters(model, rank=cfg.rank, drop_p=cfg.p, drop_mode=cfg.drop_mode)
        return MethodState(ema=r_adapter.AdapterEMA(model, m=cfg.m))
    if cfg.method == "clipfit":  # text FFN W_2 biases + image LayerNorms (clipfit.py)
        template = one_template(task, cfg)
        prompts = tokenize([template.format(c) for c in task.classnames], model.config.context_length)
        anchor = clipfit.class_embeddings(model, prompts)  # g^0, from the untouched zero-shot model
        clipfit.setup(model)
        return MethodState(prompts=prompts, anchor=anchor, reg_weight=cfg.clipfit_lambda)
    if cfg.method in ("prolip", "linear-probe"):  # on the zero-shot classifier of the evaluation
        classifier = evaluate.zero_shot_classifier(model, task.classnames, task.templates)
        if cfg.method == "linear-probe":
            return MethodState(head=baselines.add_linear_probe(model, classifier).weight)
        anchor = baselines.setup_prolip(model)
        lam = baselines.prolip_weight(cfg.shots, len(task.train), len(task.classnames))
        return MethodState(classifier=classifier, head=model.visual.head.weight, anchor=anchor, reg_weight=lam)
    if cfg.method == "lora":
        baselines.add_lora(model, rank=cfg.rank)
    elif cfg.method in FULL_FT:
        baselines.full_finetune(model)
    else:  # zero-shot
        model.requires_grad_(False)
    return MethodState()


def compute_loss(model, images, labels, templates, cfg, tau, state, tokens=None):
    """Loss of one micro-batch; templates: [T, C, L] class-prompt tokens; state from setup_method;
    tokens: [B, L] each image's own text (retrieval: its caption, labels = image ids), or None.

    Contrastive losses pair each image with `tokens`, else its class name in a random template; --loss ce
    scores the images against all classes, each in one random template. CLIPFit scores them
    against its one template and adds its distillation term; linear-probe and prolip score
    them against a fixed classifier."""
    device = images.device
    if cfg.method == "clipfit":
        f, g, _ = model(images, state.prompts.to(device))  # [B, e], [C, e]
        return clipfit.loss(f, g, state.anchor, labels, tau, state.reg_weight)
    if cfg.method in ("linear-probe", "prolip"):
        # Through the model's (possibly DDP) forward so gradients are synchronised; one dummy prompt.
        f = model(images, templates[0, :1].to(device))[0]  # [B, e]
        if cfg.method == "linear-probe":
            return torch.nn.functional.cross_entropy(f.float() @ state.head.float().T / tau, labels)
        return baselines.prolip_loss(f, state.classifier, labels, tau, state.head, state.anchor, state.reg_weight)
    if cfg.loss == "ce":
        T, C, _ = templates.shape
        f, g, _ = model(images, templates[torch.randint(T, (C,)), torch.arange(C)].to(device))  # [B, e], [C, e]
        return torch.nn.functional.cross_entropy((f @ g.T).float() / tau, labels)
    if tokens is None:
        tokens = templates[torch.randint(len(templates), (len(labels),)), labels.cpu()]  # [B, L]
    f, g, _ = model(images, tokens.to(device))  # [B, e] each, normalised
    f, g, labels = gather_features(f, g, labels)
    if cfg.loss == "infonce":
        return infonce_loss(f, g, tau)
    return mpm_nce_loss(f, g, labels, tau=tau, delta=cfg.delta, epsilon=cfg.epsilon)


# -------------------------------------------------------------- checkpoints
def atomic_save(obj, path):
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def trainable_state(model):
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_checkpoint(path, model, ema, optimizer, scaler):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if ckpt["clip_config"] != asdict(model.config):
        raise ValueError(f"{path}: checkpoint is for CLIP {ckpt['clip_config']}, "
                         f"but --model is {asdict(model.config)}")
    own = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(own) != set(ckpt["trainable"]) or any(own[n].shape != v.shape for n, v in ckpt["trainable"].items()):
        raise ValueError(f"{path}: its trainable tensors do not match this method/architecture "
                         f"(method {ckpt['config']['method']!r}, rank {ckpt['config']['rank']})")
    with torch.no_grad():
        for n, v in ckpt["trainable"].items():
            own[n].copy_(v)
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"]


# --------------------------------------------------------------- one method
def train(cfg: TrainConfig, model: CLIP, task, device, rank=0, world=1):
    """Fine-tune `model` in place with cfg.method; returns the EMA (r-adapter) or None."""
    run_dir = Path(cfg.run_dir)
    ckpt_path = run_dir / "checkpoint.pt"
    state = setup_method(model, cfg, task)
    ema = state.ema
    params = [p for p in model.parameters() if p.requires_grad]
    if rank == 0:
        print(f"{cfg.method}: {sum(p.numel() for p in params):,} trainable parameters")
    if cfg.method == "zero-shot":
        return None
    tau = cfg.tau or 1 / model.logit_scale.exp().item()
    amp = {"auto": torch.bfloat16 if device.type == "cuda" else None, "bf16": torch.bfloat16,
           "fp16": torch.float16, "fp32": None}[cfg.precision]
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    if cfg.optimizer == "sgd":  # CLIPFit (CoOp/Dassl)
        optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    sampler = StepSampler(len(task.train), cfg.batch_size, cfg.seed, rank, world)
    micro = cfg.batch_size // world // cfg.accum_steps
    loader = DataLoader(SeededAugment(task.train, cfg.seed), batch_size=micro, sampler=sampler,
                        num_workers=cfg.workers, collate_fn=collate_skip, drop_last=True,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    steps_per_epoch = sampler.steps_per_epoch
    if steps_per_epoch == 0:
        raise ValueError(f"train set has {len(task.train)} images, fewer than --batch-size {cfg.batch_size}")
    total = cfg.epochs * steps_per_epoch
    if cfg.warmup_epochs is not None:  # warm-up given in epochs (CLIPFit): as steps for lr_at
        cfg = dataclasses.replace(cfg, warmup=round(cfg.warmup_epochs * steps_per_epoch))
    step = 0
    if cfg.resume:
        path = ckpt_path if cfg.resume == "latest" else Path(cfg.resume)
        if not path.exists():
            raise FileNotFoundError(f"--resume {cfg.resume}: no checkpoint at {path}")
        step = load_checkpoint(path, model, ema, optimizer, scaler)
        if rank == 0:
            print(f"resumed from {path} at step {step}/{total}")

    captions = isinstance(task, retrieval.RetrievalData)  # retrieval: rows are captions, not classes
    templates = None if captions else class_text_tokens(task, model.config.context_length)  # [T, C, L]
    net = model
    if world > 1:
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)

    def save():
        if rank == 0:
            atomic_save({"config": asdict(cfg), "clip_config": asdict(model.config), "step": step,
                         "trainable": trainable_state(model), "ema": ema.state_dict() if ema else None,
                         "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict() if scaler else None},
                        ckpt_path)

    last = min(total, cfg.max_steps or total)
    log = open(run_dir / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=last, initial=step, desc=cfg.method, disable=rank != 0, mininterval=5, dynamic_ncols=True)
    model.train()
    while step < last:
        epoch = step // steps_per_epoch
        sampler.set_epoch(epoch, step % steps_per_epoch)
        batches, seen, loss_sum, n_steps, skipped, t0 = iter(loader), 0, 0.0, 0, 0, time.perf_counter()
        while step < last and step // steps_per_epoch == epoch:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, cfg)
            torch.manual_seed(seed_of(cfg.seed, step, rank))  # adapter dropping, template choice
            step_loss = 0.0
            for k in range(cfg.accum_steps):
                images, labels, n_bad = next(batches)
                skipped += n_bad
                tokens = None
                if captions:  # labels are caption rows: the text is the caption, the label its image id
                    tokens, labels = task.row_tokens[labels], task.row_image_id[labels]
                images, labels = images.to(device, non_blocking=True), labels.to(device)
                sync = net.no_sync() if world > 1 and k < cfg.accum_steps - 1 else nullcontext()
                with sync, torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    loss = compute_loss(net, images, labels, templates, cfg, tau, state, tokens) / cfg.accum_steps
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopped. The last good "
                                             f"checkpoint is {ckpt_path} (--resume latest, maybe with a lower --lr)")
                (scaler.scale(loss) if scaler else loss).backward()
                step_loss += loss.item()
                seen += len(labels) * world
            if scaler:
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model)
            step += 1
            loss_sum, n_steps = loss_sum + step_loss, n_steps + 1
            rate = seen / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_at(step - 1, total, cfg):.2e}", samples_s=f"{rate:.0f}")
            bar.update()
            if step % cfg.save_every == 0 or step % steps_per_epoch == 0 or step == last:
                save()
        if log:
            log.write(json.dumps({"epoch": epoch, "step": step, "loss": loss_sum / max(1, n_steps),
                                  "lr": lr_at(step - 1, total, cfg), "samples_per_s": rate,
                                  "skipped_images": skipped}) + "\n")
            log.flush()
    bar.close()
    model.eval()
    return ema


# ------------------------------------------------------------------ driver
# The toy CLIP's pretraining (contrastive, on toy_world.WebCorpus): seeded, cached once.
TOY_PRETRAIN = dict(pairs=40000, steps=800, batch_size=256, lr=1e-3, warmup=60, weight_decay=0.1, seed=0)


def toy_clip_path():
    """Cache file named by a digest of everything that shapes the toy CLIP (so edits invalidate it)."""
    recipe = repr((sorted(TOY_PRETRAIN.items()), asdict(PRESETS["toy"]), toy_world_version()))
    return CACHE_DIR / f"toy-clip-{hashlib.sha256(recipe.encode()).hexdigest()[:10]}.safetensors"


def toy_world_version():
    """A digest of toy_world.py's source: a changed world means a new toy CLIP."""
    import toy_world
    return hashlib.sha256(Path(toy_world.__file__).read_bytes()).hexdigest()[:10]


def pretrain_toy_clip(path, device):
    """CLIP pretraining in miniature: the toy preset, InfoNCE with the learned logit scale
    (clamped at 100, as CLIP does), AdamW with warm-up + cosine, on web image-caption pairs.
    As in CLIP and open_clip, gains, biases, the class token and the logit scale get no weight decay."""
    import toy_world
    p = TOY_PRETRAIN
    torch.manual_seed(p["seed"])
    model = CLIP(PRESETS["toy"]).to(device).train()
    web = toy_world.WebCorpus(p["pairs"], seed=p["seed"])
    images = ((web.images.float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None])
              / torch.tensor(CLIP_STD)[:, None, None])  # [n, 3, 32, 32], normalised like every CLIP input
    tokens = tokenize(web.captions, model.config.context_length)  # [n, L]
    no_decay = {n for n, q in model.named_parameters() if q.ndim < 2 or n == "visual.cls_token"}
    groups = [[q for n, q in model.named_parameters() if (n in no_decay) == skip] for skip in (False, True)]
    optimizer = torch.optim.AdamW([{"params": groups[0], "weight_decay": p["weight_decay"]},
                                   {"params": groups[1], "weight_decay": 0.0}], lr=p["lr"])
    schedule = argparse.Namespace(lr=p["lr"], min_lr=0.0, warmup=p["warmup"])
    order = torch.randperm(len(images))
    for step in tqdm(range(p["steps"]), desc="pretraining the toy CLIP", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, p["steps"], schedule)
        idx = order[torch.arange(step * p["batch_size"], (step + 1) * p["batch_size"]) % len(order)]
        f, g, s = model(images[idx].to(device), tokens[idx].to(device))
        loss = infonce_loss(f, g, tau=1 / s)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    path.parent.mkdir(parents=True, exist_ok=True)
    save_clip(model, path)
    print(f"cached the toy CLIP at {path} (final InfoNCE {loss.item():.3f}, logit scale {s.item():.1f})")


def build_model(cfg, device):
    """The base CLIP: a public checkpoint, or for --model toy the cached toy CLIP."""
    if cfg.model == "toy":
        path = toy_clip_path()
        if not path.exists():
            pretrain_toy_clip(path, device)
        return load_clip(path, device=device)
    return load_clip(cfg.model, device=device)


def build_data(cfg, model):
    size = model.config.image_size
    train_transform = image_transform(size, train=True)
    if cfg.flip:  # (the toy world's images are generated as tensors: no train transform there)
        train_transform = transforms.Compose([transforms.RandomHorizontalFlip(), train_transform])
    ood = dict(o.split("=", 1) for o in cfg.ood)
    if cfg.data in retrieval.DATASETS:
        return retrieval.build_retrieval(cfg.data, cfg.data_root, train_transform, image_transform(size),
                                         model.config.context_length, ood=ood, strict=cfg.strict)
    if cfg.data in coop.DATASETS:
        return coop.build_coop(cfg.data, cfg.data_root, train_transform, image_transform(size),
                               shots=cfg.shots, seed=cfg.seed, strict=cfg.strict)
    return build_task(cfg.data, cfg.data_root, train_transform, image_transform(size),
                      shots=cfg.shots, seed=cfg.seed, ood=ood, strict=cfg.strict, classnames=cfg.classnames)


def method_setup(cfg, method, device):
    """One method's config (its recipe, its run directory under the run's) and a fresh base CLIP."""
    mcfg = dataclasses.replace(method_config(cfg, method), run_dir=str(Path(out_dir(cfg)) / method))
    Path(mcfg.run_dir).mkdir(parents=True, exist_ok=True)
    return mcfg, build_model(mcfg, device)


def fit(mcfg, model, task, device, rank, world):
    """Record the method's resolved config and train it; returns (adapter EMA or None, trainable count)."""
    if rank == 0:
        (Path(mcfg.run_dir) / "config.json").write_text(json.dumps(asdict(mcfg), indent=2))
    ema = train(mcfg, model, task, device, rank, world)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad) if mcfg.method != "zero-shot" else 0
    return ema, n_train


def run(cfg: TrainConfig, device, rank=0, world=1):
    """Train and evaluate each method of cfg.method; returns the table rows (and sweeps). With
    --split base a method trains on the base classes and is scored by coop.evaluate_base_new."""
    rows, curves, zero_shot_state = [], {}, None
    if cfg.model == "toy" and cfg.retrain_toy and rank == 0:
        pretrain_toy_clip(toy_clip_path(), device)
    eval_kwargs = dict(workers=cfg.workers, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    for method in cfg.method.split(","):
        mcfg, model = method_setup(cfg, method, device)
        task = eval_task = build_data(mcfg, model)
        if mcfg.split:  # train on the base classes; evaluate base and new, each among its own classes
            task, eval_task = coop.base_new(task)
        score = coop.evaluate_base_new if mcfg.split else evaluate.evaluate_task
        if task.train is None and method != "zero-shot":
            raise ValueError(f"--data-root {cfg.data_root}: no train/ folder, so only --method zero-shot can run")
        if zero_shot_state is None:
            zero_shot_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema, n_train = fit(mcfg, model, task, device, rank, world)
        if rank != 0:
            continue
        out = Path(mcfg.run_dir)
        if method == "r-adapter":
            r_adapter.save_adapters(model, out / "adapters.safetensors", ema=ema)
            with r_adapter.merged(model, mcfg.alpha, ema=ema):
                rows.append({"method": f"R-Adapter (α={mcfg.alpha:g})", "trainable": n_train,
                             **score(model, eval_task, **eval_kwargs)})
                save_clip(model, out / "merged.safetensors")
            if mcfg.sweep:
                curves["R-Adapter"] = evaluate.sweep(model, eval_task, alpha_grid(),
                                                     lambda a: r_adapter.merged(model, a, ema=ema), **eval_kwargs)
        elif method == "lora":  # folded into the weights: a plain CLIP is evaluated and exported
            with baselines.lora_merged(model):
                rows.append({"method": f"lora (r={mcfg.rank})", "trainable": n_train,
                             **score(model, eval_task, **eval_kwargs)})
                save_clip(model, out / "merged.safetensors")
        elif method == "linear-probe":  # the probe's W replaces the text classifier
            probe = model.linear_probe.weight.detach()
            save_file({"weight": probe.cpu().contiguous()}, str(out / "linear_probe.safetensors"))
            rows.append({"method": method, "trainable": n_train,
                         **score(model, eval_task, classifier=probe, **eval_kwargs)})
        else:
            rows.append({"method": "WiSE-FT (α=1)" if method == "wise-ft" else method, "trainable": n_train,
                         **score(model, eval_task, **eval_kwargs)})
            if method != "zero-shot":  # full-ft, wise-ft, flyp, clipfit, prolip: a plain CLIP
                save_clip(model, out / "merged.safetensors")
        if method in ("full-ft", "wise-ft"):
            finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
            with evaluate.interpolated(model, zero_shot_state, finetuned, mcfg.alpha):
                rows.append({"method": f"WiSE-FT (α={mcfg.alpha:g})", "trainable": n_train,
                             **score(model, eval_task, **eval_kwargs)})
            if mcfg.sweep:
                curves["WiSE-FT"] = evaluate.sweep(model, eval_task, alpha_grid(),
                                                   lambda a: evaluate.interpolated(model, zero_shot_state,
                                                                                   finetuned, a), **eval_kwargs)
        print(evaluate.format_table(rows[-1:]))
    if rank == 0 and rows:
        report(rows, curves, Path(out_dir(cfg)), partial(evaluate.plot_sweep, id_name=eval_task.test.name))
    return rows, curves


def run_retrieval(cfg: TrainConfig, device, rank=0, world=1):
    """run() for --data coco | flickr30k: train each method on captions, then R@1/5/10 both ways on
    every test set (COCO 5K, Flickr30k 1K; PAPER.md 2.7), one row per method and test set. With
    --sweep, r-adapter and WiSE-FT are also scored at every alpha (evaluate.retrieval_sweep)."""
    rows, curves, zero_shot_state = [], {}, None
    eval_kwargs = dict(workers=cfg.workers, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    for method in cfg.method.split(","):
        mcfg, model = method_setup(cfg, method, device)
        task = build_data(mcfg, model)
        if zero_shot_state is None:
            zero_shot_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        ema, n_train = fit(mcfg, model, task, device, rank, world)
        if rank != 0:
            continue
        out, first = Path(mcfg.run_dir), len(rows)

        def evaluate_as(name):  # one row per test set
            rows.extend({"method": name, "trainable": n_train, "test": t.name,
                         **retrieval.evaluate_retrieval(model, t, **eval_kwargs)} for t in task.tests)

        if method == "r-adapter":
            r_adapter.save_adapters(model, out / "adapters.safetensors", ema=ema)
            with r_adapter.merged(model, mcfg.alpha, ema=ema):
                evaluate_as(f"R-Adapter (α={mcfg.alpha:g})")
                save_clip(model, out / "merged.safetensors")
            if mcfg.sweep:
                curves["R-Adapter"] = evaluate.retrieval_sweep(
                    model, task.tests, alpha_grid(), lambda a: r_adapter.merged(model, a, ema=ema), **eval_kwargs)
        elif method == "lora":  # (with --loss mpm-nce or infonce)
            with baselines.lora_merged(model):
                evaluate_as(f"lora (r={mcfg.rank})")
                save_clip(model, out / "merged.safetensors")
        else:  # zero-shot, full-ft, wise-ft, flyp
            evaluate_as("WiSE-FT (α=1)" if method == "wise-ft" else method)
            if method != "zero-shot":
                save_clip(model, out / "merged.safetensors")
        if method in ("full-ft", "wise-ft"):
            finetuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
            with evaluate.interpolated(model, zero_shot_state, finetuned, mcfg.alpha):
                evaluate_as(f"WiSE-FT (α={mcfg.alpha:g})")
            if mcfg.sweep:
                curves["WiSE-FT"] = evaluate.retrieval_sweep(
                    model, task.tests, alpha_grid(),
                    lambda a: evaluate.interpolated(model, zero_shot_state, finetuned, a), **eval_kwargs)
        print(evaluate.format_table(rows[first:]))
    if rank == 0 and rows:
        report(rows, curves, Path(out_dir(cfg)), evaluate.plot_retrieval_sweep)
    return rows, curves


def out_dir(cfg):
    """runs/<data>/ holds the table and plot; each method trains in runs/<data>/<method>/."""
    return cfg.run_dir or f"runs/{cfg.data}"


def alpha_grid():
    return [round(0.1 * i, 1) for i in range(11)]


def report(rows, curves, out, plot):
    """The table (results.csv/.json); with sweeps also alpha_sweep.csv/.json and plot(curves, PNG path)."""
    out.mkdir(parents=True, exist_ok=True)
    print("\n" + evaluate.format_table(rows))
    evaluate.write_results(rows, out / "results")
    print(f"wrote {out / 'results.csv'}")
    if curves:
        plot(curves, out / "alpha_sweep.png")
        evaluate.write_results([{"method": m, **r} for m, rs in curves.items() for r in rs], out / "alpha_sweep")
        print(f"wrote {out / 'alpha_sweep.png'}")


def main(argv=None):
    cfg = parse_args(argv)
    rank, world = 0, 1
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if cfg.batch_size % (world * cfg.accum_steps):
            raise ValueError(f"--batch-size {cfg.batch_size} must divide by world size x accum steps")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    try:
        (run_retrieval if cfg.data in retrieval.DATASETS else run)(cfg, device, rank, world)
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()

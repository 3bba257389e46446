"""Every training recipe: what a command resolves to, and where each value comes from.

TrainConfig's defaults (train.py) are R-Adapter's ImageNet recipe (paper Sec. 4.1 and its released
ImageNet script). A command's --data, --shots and --split pick a setting; then every field that is
not given on the command line resolves by one rule, later entries winning:

    TrainConfig default < SETTINGS[setting]['*'] < METHODS[method] < SETTINGS[setting][method]
                        < DATASETS[(data, method)] < the flags given

"R-Adapter release" is github.com/tjddus9597/R-Adapter-ECCV2024 (its run scripts); "CLIPFit
release" is github.com/minglllli/CLIPFit (configs/trainers/ClipFit and scripts). Prompts name a
template set: 'task' (the dataset's own: 80 OpenAI templates for ImageNet, CoOp's one per CoOp
dataset), 'imagenet-80' (the 80 OpenAI ImageNet templates), or one literal template with '{}'.
"""

import argparse
import os
from dataclasses import asdict

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from data import coop, imagenet, toy_world

IMAGENET_80 = "imagenet-80"
RETRIEVAL = ("coco", "flickr30k")

# Each method's own optimisation recipe (flags not given).
METHODS = {
    # CLIPFit release (CoOp/Dassl trainer config): SGD lr 0.002 with momentum 0.9 and Dassl's weight
    # decay 5e-4, cosine to 0, one warm-up epoch at a constant 1e-5, batch 32, random crop + flip, no
    # clipping; CE over one hand-written template, which it also evaluates with.
    "clipfit": dict(
        loss="ce",
        optimizer="sgd",
        lr=0.002,
        weight_decay=5e-4,
        min_lr=0.0,
        batch_size=32,
        warmup_epochs=1,
        warmup_lr=1e-5,
        grad_clip=0.0,
        flip=True,
    ),
    # FLYP (Goyal et al., CVPR 2023), its ImageNet recipe: contrastive full fine-tuning, AdamW lr 1e-5, wd 0.1.
    "flyp": dict(loss="infonce", lr=1e-5, weight_decay=0.1),
    # WiSE-FT (Wortsman et al., CVPR 2022): full-ft's training, always swept over alpha.
    "wise-ft": dict(sweep=True),
    # ProLIP (Fahes et al., 2024) release: Adam lr 1e-3, cosine, no warm-up, no clipping, CE.
    "prolip": dict(loss="ce", lr=1e-3, weight_decay=0.0, warmup=0, grad_clip=0.0),
    # Zero-shot-initialised linear probe: CE, AdamW lr 1e-3 (our choice; no paper recipe).
    "linear-probe": dict(loss="ce", lr=1e-3, weight_decay=0.0),
    # LoRA (Hu et al., ICLR 2022), close to CLIP-LoRA's few-shot set-up (our choice): rank 8, CE, AdamW 2e-4.
    "lora": dict(rank=8, loss="ce", lr=2e-4, weight_decay=0.01, batch_size=32),
}

# The toy world's budget, the same for every method: 2 epochs of 12,000 images at batch 128 (186
# steps). With m = 0.999 the EMA would still hold 83% of its zero initialisation after 186 steps, so
# the toy uses the paper's short-run momentum (its base-to-novel value, 0.9).
TOY_BUDGET = dict(epochs=2, batch_size=128, warmup=20, m=0.9)

SETTINGS = {
    "full": {},  # the paper's ImageNet recipe: TrainConfig's defaults
    "few-shot": {  # --shots K
        # R-Adapter release, ImageNet 16-shot script: 50 epochs, batch 256, no warm-up, one prompt.
        # (The paper's few-shot text uses low-rank adapters; the script trains full rank: --rank r.)
        "r-adapter": dict(epochs=50, batch_size=256, warmup=0, prompts="a photo of a {}"),
        # CLIPFit release, few-shot configs: 100 epochs (ImageNet, Food-101: 10, below); CLIPFit paper,
        # few-shot: lambda 2 (8 for DTD and SUN397, below).
        "clipfit": dict(epochs=100, clipfit_lambda=2.0),
    },
    "base-to-novel": {  # --split base
        # R-Adapter release, base-to-novel script: 101 epochs, batch 32, EMA 0.9, margin 0.1, no label
        # smoothing, a random one of the 80 ImageNet templates in training and their ensemble at test.
        "*": dict(
            epochs=101, batch_size=32, m=0.9, delta=0.1, epsilon=0.0, prompts=IMAGENET_80, eval_prompts=IMAGENET_80
        ),
        "r-adapter": dict(rank=4),  # same script: --adapter 4,4 (low rank 4 in both towers; --rank full)
        # CLIPFit release, base-to-new configs: 100 epochs (ImageNet, Food-101: 10), its own prompt.
        "clipfit": dict(epochs=100, prompts="task", eval_prompts="task"),
    },
    # R-Adapter paper Sec. 4 (alpha 0.8 for retrieval) and release, COCO script: no label smoothing,
    # no gradient clipping.
    "retrieval": {"*": dict(alpha=0.8, epsilon=0.0, grad_clip=0.0)},
    # The offline default job: the shipped toy CLIP, three methods, the alpha sweep.
    "toy": {
        "*": dict(model="toy", method="zero-shot,full-ft,r-adapter", workers=0, save_every=200, sweep=True),
        **dict.fromkeys(("r-adapter", "full-ft", *METHODS), TOY_BUDGET),
    },
}

# Per-dataset exceptions of one method.
DATASETS = {
    ("imagenet", "clipfit"): dict(epochs=10, prompts="a photo of a {}.", eval_prompts="a photo of a {}."),
    ("food101", "clipfit"): dict(epochs=10),  # CLIPFit release: 10 epochs for Food-101 too
    # CLIPFit release: its DTD prompt (CoOp's is '{} texture.'); CLIPFit paper: lambda 8 on DTD and SUN397.
    ("dtd", "clipfit"): dict(
        prompts="a photo of a {}, a type of texture.",
        eval_prompts="a photo of a {}, a type of texture.",
        clipfit_lambda=8.0,
    ),
    ("sun397", "clipfit"): dict(clipfit_lambda=8.0),
}


def rank(text):
    """--rank: an integer r, or full (d x d adapters)."""
    return None if text == "full" else int(text)


def setting(data, split=None, shots=None):
    if data == "toy":
        return "toy"
    if data in RETRIEVAL:
        return "retrieval"
    if split == "base":
        return "base-to-novel"
    return "few-shot" if shots else "full"


def recipe(data, split=None, shots=None, method=None):
    """The values a command's setting, method and dataset set (without method: the setting's '*')."""
    rules = SETTINGS[setting(data, split, shots)]
    out = dict(rules.get("*", {}))
    if method is not None:
        out |= METHODS.get(method, {}) | rules.get(method, {}) | DATASETS.get((data, method), {})
    return out


# ---------------------------------------------------------------- checks
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage of forty flags
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


RANGES = {  # flag: (check, what it must be)
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "epochs": (lambda v: v >= 1, ">= 1"),
    "accum_steps": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v > 0, "> 0"),
    "warmup": (lambda v: v >= 0, ">= 0"),
    "p": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "m": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "shots": (lambda v: v is None or v >= 1, ">= 1"),
    "tau": (lambda v: v is None or v > 0, "> 0"),
    "epsilon": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "delta": (lambda v: v >= 0, ">= 0"),
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "save_every": (lambda v: v >= 1, ">= 1"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "rank": (lambda v: v is None or v >= 1, ">= 1 or full"),
    "workers": (lambda v: v >= 0, ">= 0"),
    "min_lr": (lambda v: v >= 0, ">= 0"),
    "max_steps": (lambda v: v is None or v >= 1, ">= 1"),
}
CHOICES = {
    "loss": ("mpm-nce", "infonce", "ce"),
    "drop_mode": ("sample", "token"),
    "optimizer": ("adamw", "sgd"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "split": (None, "base"),
}


def check(cfg):
    """What is wrong with a resolved config, as one line naming the flag, or None."""
    for name, (ok, want) in RANGES.items():
        if not ok(getattr(cfg, name)):
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {want}"
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of {', '.join(map(str, choices))}"
    if cfg.min_lr > cfg.lr:
        return f"--min-lr {cfg.min_lr}: expected <= --lr {cfg.lr}"
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    if cfg.batch_size % (world * cfg.accum_steps):
        return f"--batch-size {cfg.batch_size}: expected a multiple of --accum-steps {cfg.accum_steps} x {world} GPUs"
    if cfg.data != "toy" and cfg.data_root is None:
        return f"--data {cfg.data} needs --data-root DIR"
    retrieval_task = cfg.data in RETRIEVAL
    if cfg.split and (cfg.data == "toy" or retrieval_task):
        return f"--split base: --data {cfg.data} has no image folders with classes (use a CoOp dataset or imagenet)"
    if cfg.ood and (cfg.split or cfg.data in coop.DATASETS):
        return "--ood: base-to-novel and the CoOp datasets evaluate their own test set only"
    if cfg.split and cfg.method == "linear-probe":
        return "--split base: --method linear-probe learns rows for the base classes only, so it cannot score new ones"
    if cfg.method in ("clipfit", "linear-probe", "prolip") and cfg.loss != "ce":
        return f"--method {cfg.method} trains with cross-entropy over class logits: drop --loss {cfg.loss}"
    if retrieval_task and cfg.loss == "ce":
        return f"--data {cfg.data} is retrieval (captions, no classes): --method {cfg.method} needs another --loss"
    if cfg.method == "lora" and cfg.rank is None:
        return "--method lora needs --rank r >= 1"
    for name in ("prompts", "eval_prompts"):
        value = getattr(cfg, name)
        if value not in ("task", IMAGENET_80) and "{}" not in value:
            return f"--{name.replace('_', '-')} {value!r}: expected task, imagenet-80 or a template with {{}}"
    return None


def templates(name, task_templates):
    """A prompt set (TrainConfig.prompts) as a list of templates."""
    if name == "task":
        return list(task_templates)
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] if name == IMAGENET_80 else [name]


def describe(cfg):
    """--print-config: every field, and the prompt sets as the number of templates they hold."""
    own = {
        "toy": len(toy_world.TEMPLATES),
        "folder": len(imagenet.FOLDER_TEMPLATES),
        "imagenet": 80,
        **dict.fromkeys(coop.DATASETS, 1),
        **dict.fromkeys(RETRIEVAL, 0),
    }[cfg.data]
    count = {
        name: own if getattr(cfg, name) == "task" else len(templates(getattr(cfg, name), []))
        for name in ("prompts", "eval_prompts")
    }
    return {**asdict(cfg), "train_templates": count["prompts"], "eval_templates": count["eval_prompts"]}

"""Every training recipe: what a command resolves to, and where each value comes from.

TrainConfig's defaults (train.py) are R-Adapter's ImageNet recipe (paper Sec. 4.1 and its released
ImageNet script). A command's --data, --shots and --split pick a setting; then every field
resolves by one rule, later entries winning (`layers`; --print-config names each value's source):

    TrainConfig default < SETTINGS[setting]['*'] < METHODS[method] < SETTINGS[setting]['all']
        < SETTINGS[setting][method] < DATASETS[(data, method)] < --config FILE < the flags given

('*' holds a setting's values under each method's own recipe, 'all' those over it.)

"R-Adapter release" is github.com/tjddus9597/R-Adapter-ECCV2024 (its run scripts); "CLIPFit
release" is github.com/minglllli/CLIPFit (configs/trainers/ClipFit and scripts). Prompts name a
template set: 'task' (the dataset's own: 80 OpenAI templates for ImageNet, CoOp's one per CoOp
dataset), 'imagenet-80' (the 80 OpenAI ImageNet templates), or one literal template with '{}'.
"""

import argparse
import dataclasses
import importlib.util
import json
import os
import shlex
import sys
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

from data import DataError, check_root, coop, imagenet, names, toy_world

IMAGENET_80 = "imagenet-80"
RETRIEVAL = ("coco", "flickr30k")

WISE_FT = dict(loss="ce", lr=3e-5, weight_decay=0.1, min_lr=0.0)
# Dassl's trainer (CoOp, CoCoOp and CLIPFit are built on it): SGD lr 0.002 with momentum 0.9 and weight
# decay 5e-4, cosine to 0, one warm-up epoch at a constant 1e-5, batch 32, random crop + flip, no
# clipping, CE.
DASSL = dict(
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
)
COOP = {**DASSL, "epochs": 200, "ctx_init": "a photo of a"}

# Each method's own optimisation recipe (flags not given).
METHODS = {
    # CLIPFit release (its Dassl trainer config): DASSL; CE over one hand-written template, which it also
    # evaluates with.
    "clipfit": DASSL,
    # FLYP (Goyal et al., CVPR 2023), its ImageNet recipe: contrastive full fine-tuning, AdamW lr 1e-5, wd 0.1.
    "flyp": dict(loss="infonce", lr=1e-5, weight_decay=0.1),
    # WiSE-FT release (mlfoundations/wise-ft, src/models/finetune.py and its ImageNet command), the R-Adapter
    # paper's FT row: image tower + zero-shot head, CE, AdamW lr 3e-5, wd 0.1, batch 512, 10 epochs, 500
    # warm-up steps, cosine to 0, gradient clipping 1.0 (TrainConfig's batch, epochs, warm-up and clipping).
    "full-ft": WISE_FT,
    # WiSE-FT: the same training, always swept over alpha.
    "wise-ft": {**WISE_FT, "sweep": True},
    # ProLIP (Fahes et al., 2024) release: Adam lr 1e-3, cosine, no warm-up, no clipping, CE.
    "prolip": dict(loss="ce", lr=1e-3, weight_decay=0.0, warmup=0, grad_clip=0.0),
    # Zero-shot-initialised linear probe: CE, AdamW lr 1e-3 (our choice; no paper recipe).
    "linear-probe": dict(loss="ce", lr=1e-3, weight_decay=0.0),
    # LoRA (Hu et al., ICLR 2022), close to CLIP-LoRA's few-shot set-up (our choice): rank 8, CE, AdamW 2e-4;
    # no EMA, evaluated as trained (alpha 1: the merged update unscaled).
    "lora": dict(rank=8, loss="ce", lr=2e-4, weight_decay=0.01, batch_size=32, m=0.0, alpha=1.0),
    # CoOp release (KaiyangZhou/CoOp, configs/trainers/CoOp/vit_b16_ctxv1.yaml; Dassl's SGD defaults as for
    # CLIPFit): context from "a photo of a", SGD lr 0.002, batch 32, 200 epochs, cosine, 1 constant warm-up
    # epoch at 1e-5, random crop + flip, CE. (Its few-shot tables: 16 random vectors, --ctx-init 16.)
    "coop": COOP,
    # CoCoOp as CLIPFit's release ships it (configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml, the
    # one CoOp's repository has too): 4 context tokens from "a photo of a", SGD lr 0.002, batch 1, 10
    # epochs, cosine, 1 constant warm-up epoch at 1e-5, random crop + flip, CE.
    "cocoop": {**COOP, "batch_size": 1, "epochs": 10},
    # SSF release (dongzelian/SSF, train_scripts/vit/imagenet_1k/train_ssf.sh): AdamW lr 1e-3, batch 256
    # (32 x 8 GPUs), 30 epochs, 5 linear warm-up epochs, cosine to 1e-8, no clipping, model EMA 0.99992,
    # timm's default flip; its weight decay 0.05 skips 1-D tensors (timm's optimiser factory), i.e. every
    # gamma and beta: 0 here. CE over the class prompts (the release trains a linear head; its drop path
    # 0.1 and colour jitter are not here); evaluated as trained (alpha 1).
    "ssf": dict(
        loss="ce",
        lr=1e-3,
        weight_decay=0.0,
        min_lr=1e-8,
        batch_size=256,
        epochs=30,
        warmup_epochs=5,
        grad_clip=0.0,
        m=0.99992,
        alpha=1.0,
        flip=True,
    ),
}

# The toy world's budget, the same for every method: 2 epochs of 12,000 images at batch 128 (186
# steps). With m = 0.999 the EMA would still hold 83% of its zero initialisation after 186 steps, so
# the toy uses the paper's short-run momentum (its base-to-novel value, 0.9).
TOY_BUDGET = dict(epochs=2, batch_size=128, warmup=20, m=0.9)
TOY_LR = {"full-ft": 1e-3, "wise-ft": 1e-3, "r-adapter": 1e-2}  # docs/toy_lr_selection.csv, selected rows
# The toy base-to-novel job (--data toy --split base): CoCoOp's protocol, 16 shots of the 6 base classes
# (96 images), and one budget over each method's own recipe: 100 epochs at batch 32 (300 steps; the
# base-to-novel runs of R-Adapter and CLIPFit are 101 and 100 epochs at batch 32, CoCoOp's batch is 1).
TOY_B2N_BUDGET = {**TOY_BUDGET, "epochs": 100, "batch_size": 32}
TOY_B2N_LR = {"coop": 1e-3, "cocoop": 3e-3, "clipfit": 1e-2, "r-adapter": 1e-4}  # docs/toy_b2n_lr_selection.csv
# Both toy jobs: the shipped toy CLIP, in process, on 2 intra-op threads (the order CPU kernels sum in
# depends on the thread count, so a fixed one makes the tables the same on any number of cores).
TOY_JOB = dict(model="toy", workers=0, save_every=200, threads=2)

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
    "retrieval": {
        "*": dict(alpha=0.8, epsilon=0.0, grad_clip=0.0),
        # No classes for WiSE-FT's head: full fine-tuning of both towers with FLYP's contrastive recipe
        # (the R-Adapter paper does not give its retrieval FT recipe).
        **dict.fromkeys(("full-ft", "wise-ft"), dict(loss="infonce", lr=1e-5, weight_decay=0.1, min_lr=1e-6)),
    },
    # The offline default job: the shipped toy CLIP, three methods, the alpha sweep. The learning rates
    # are the toy's lr rule (data/toy.py select_lr): each method's argmax of photo validation accuracy
    # over one grid, committed as docs/toy_lr_selection.csv; methods not in that table keep their own.
    "toy": {
        "*": {**TOY_JOB, "method": "zero-shot,full-ft,r-adapter", "sweep": True},
        "all": TOY_BUDGET,
        **{method: {"lr": lr} for method, lr in TOY_LR.items()},
    },
    # The toy base-to-novel job (above): five methods; its lrs are the toy lr rule on base-class validation
    # images, committed as docs/toy_b2n_lr_selection.csv. R-Adapter keeps its base-to-novel rank and
    # loss, CLIPFit its one template (the toy's first); the others use the toy's templates.
    "toy-base-to-novel": {
        "*": {**TOY_JOB, "method": "zero-shot,coop,cocoop,clipfit,r-adapter", "shots": 16, "run_dir": "runs/toy-b2n"},
        "all": TOY_B2N_BUDGET,
        "r-adapter": dict(rank=4, delta=0.1, epsilon=0.0, lr=TOY_B2N_LR["r-adapter"]),
        "clipfit": dict(prompts=toy_world.TEMPLATES[0], eval_prompts=toy_world.TEMPLATES[0], lr=TOY_B2N_LR["clipfit"]),
        **{method: {"lr": TOY_B2N_LR[method]} for method in ("coop", "cocoop")},
    },
}

# Per-dataset exceptions of one method.
DATASETS = {
    ("imagenet", "clipfit"): dict(epochs=10, prompts="a photo of a {}.", eval_prompts="a photo of a {}."),
    ("imagenet", "coop"): dict(epochs=50),  # CoOp release: *_ep50 configs for ImageNet in every setting
    ("food101", "clipfit"): dict(epochs=10),  # CLIPFit release: 10 epochs for Food-101 too
    # CLIPFit release: its DTD prompt (CoOp's is '{} texture.'); CLIPFit paper: lambda 8 on DTD and SUN397.
    ("dtd", "clipfit"): dict(
        prompts="a photo of a {}, a type of texture.",
        eval_prompts="a photo of a {}, a type of texture.",
        clipfit_lambda=8.0,
    ),
    ("sun397", "clipfit"): dict(clipfit_lambda=8.0),
}


# Where each entry above comes from (the README's recipe table is `python recipes.py`).
SOURCES = {
    ("method", "clipfit"): "CLIPFit release",
    ("method", "flyp"): "FLYP paper",
    ("method", "full-ft"): "WiSE-FT release",
    ("method", "wise-ft"): "WiSE-FT release",
    ("method", "coop"): "CoOp release",
    ("method", "cocoop"): "CLIPFit release (CoCoOp config)",
    ("method", "ssf"): "SSF release",
    ("retrieval", "full-ft"): "FLYP paper (no retrieval FT recipe is published)",
    ("retrieval", "wise-ft"): "FLYP paper (no retrieval FT recipe is published)",
    ("toy", "full-ft"): "toy lr rule: docs/toy_lr_selection.csv",
    ("toy", "wise-ft"): "toy lr rule: docs/toy_lr_selection.csv (full-ft's)",
    ("toy", "r-adapter"): "toy lr rule: docs/toy_lr_selection.csv",
    ("toy-base-to-novel", "*"): "this repository",
    ("toy-base-to-novel", "all"): "this repository",
    ("toy-base-to-novel", "r-adapter"): "R-Adapter release (rank, loss); toy lr rule: docs/toy_b2n_lr_selection.csv",
    ("toy-base-to-novel", "clipfit"): "CLIPFit release (one template); toy lr rule: docs/toy_b2n_lr_selection.csv",
    **dict.fromkeys(
        [("toy-base-to-novel", m) for m in ("coop", "cocoop")], "toy lr rule: docs/toy_b2n_lr_selection.csv"
    ),
    ("imagenet", "coop"): "CoOp release",
    ("method", "prolip"): "ProLIP release",
    ("method", "linear-probe"): "our choice",
    ("method", "lora"): "our choice, after CLIP-LoRA",
    ("few-shot", "r-adapter"): "R-Adapter release",
    ("few-shot", "clipfit"): "CLIPFit release, paper",
    ("base-to-novel", "*"): "R-Adapter release",
    ("base-to-novel", "r-adapter"): "R-Adapter release",
    ("base-to-novel", "clipfit"): "CLIPFit release",
    ("retrieval", "*"): "R-Adapter paper, release",
    ("toy", "*"): "this repository",
    ("toy", "all"): "this repository",
    ("imagenet", "clipfit"): "CLIPFit release",
    ("food101", "clipfit"): "CLIPFit release",
    ("dtd", "clipfit"): "CLIPFit release, paper",
    ("sun397", "clipfit"): "CLIPFit paper",
}


class ConfigError(ValueError):
    """A --config file that is not a run's config.json; the message names it."""


def rank(text):
    """--rank: an integer r, or full (d x d adapters)."""
    return None if text == "full" else int(text)


def setting(data, split=None, shots=None):
    if data == "toy":
        return "toy-base-to-novel" if split == "base" else "toy"
    if data in RETRIEVAL:
        return "retrieval"
    if split == "base":
        return "base-to-novel"
    return "few-shot" if shots else "full"


def layers(data, split=None, shots=None, method=None):
    """[(source, values)] that a command's setting, method and dataset set, in the order they apply
    (without method: the setting's '*' only)."""
    name = setting(data, split, shots)
    rules = SETTINGS[name]
    out = [(f"setting {name}", rules.get("*", {}))]
    if method is not None:
        out += [
            (f"method {method}", METHODS.get(method, {})),
            (f"setting {name}, every method", rules.get("all", {})),
            (f"setting {name}, method {method}", rules.get(method, {})),
            (f"dataset {data}, method {method}", DATASETS.get((data, method), {})),
        ]
    return [(source, values) for source, values in out if values]


def recipe(data, split=None, shots=None, method=None):
    """The values a command's setting, method and dataset set, later layers winning."""
    return {k: v for _, values in layers(data, split, shots, method) for k, v in values.items()}


def resolve(chosen, defaults):
    """One ({field: value}, {field: source}) per method of a command: `chosen` = [(source, {field:
    value})] of --config FILE and the flags, applied over `defaults` and the command's `layers`."""
    given = {k: v for _, values in chosen for k, v in values.items()}
    where = dict(data=given.get("data", defaults["data"]), split=given.get("split"), shots=given.get("shots"))
    out = []
    for method in {**defaults, **recipe(**where), **given}["method"].split(","):
        applied = [("default", defaults), *layers(**where, method=method), *chosen]
        values = {k: v for _, layer in applied for k, v in layer.items()}
        sources = {k: source for source, layer in applied for k in layer}  # the last layer that set k
        out.append(({**values, "method": method, "ood": tuple(values["ood"])}, sources))
    return out


def read_config(path, types):
    """--config FILE: a run's config.json as {field: value}, each value checked against types[field]."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not JSON ({e})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected a run's config.json, one object of fields")
    for name, value in values.items():
        if name not in types:
            raise ConfigError(f"--config {path}: unknown field {name!r}")
        kinds = typing.get_args(types[name]) or (types[name],)  # Optional[int] -> (int, NoneType)
        kinds += (int,) if float in kinds else (list,) if tuple in kinds else ()  # JSON's 1 and [..]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            raise ConfigError(f"--config {path}: {name} = {json.dumps(value)} is not of type {types[name]}")
    return values


# ---------------------------------------------------------------- checks
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag, not the usage of forty flags
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


def at_least(parser, *checks):
    """parser.error for the first (flag, value, least) with value < least; a value of None was not given."""
    for flag, value, least in checks:
        if value is not None and value < least:
            parser.error(f"{flag} {value}: expected >= {least}")


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
    "seeds": (lambda v: v >= 1, ">= 1"),
    "threads": (lambda v: v is None or v >= 1, ">= 1"),
}
CHOICES = {
    "loss": ("mpm-nce", "infonce", "ce"),
    "drop_mode": ("sample", "token"),
    "optimizer": ("adamw", "sgd"),
    "precision": ("auto", "bf16", "fp16", "fp32"),
    "split": (None, "base"),
    "report_to": (None, "tensorboard"),
}


def check(cfg):
    """What is wrong with a resolved config, as one line naming the flag, or None."""
    if cfg.data not in names():
        return f"--data {cfg.data}: expected one of {', '.join(names())}"
    for name, (ok, want) in RANGES.items():
        if not ok(getattr(cfg, name)):
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected {want}"
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            return f"--{name.replace('_', '-')} {getattr(cfg, name)}: expected one of {', '.join(map(str, choices))}"
    if cfg.overwrite and cfg.resume:
        return f"--overwrite starts over, --resume {cfg.resume} continues: give one of them"
    if cfg.min_lr > cfg.lr:
        return f"--min-lr {cfg.min_lr}: expected <= --lr {cfg.lr}"
    world = int(os.environ.get("WORLD_SIZE", 1))  # torchrun's number of processes
    if cfg.batch_size % (world * cfg.accum_steps):
        return f"--batch-size {cfg.batch_size}: expected a multiple of --accum-steps {cfg.accum_steps} x {world} GPUs"
    if cfg.report_to == "tensorboard" and importlib.util.find_spec("tensorboard") is None:
        return "--report-to tensorboard: the tensorboard package is not installed (pip install tensorboard)"
    if cfg.data != "toy" and cfg.data_root is None:
        return f"--data {cfg.data} needs --data-root DIR"
    retrieval_task = cfg.data in RETRIEVAL
    if cfg.split and retrieval_task:
        return f"--split base: --data {cfg.data} has captions, not classes (use a CoOp dataset, imagenet or toy)"
    if cfg.ood and (cfg.split or cfg.data in coop.DATASETS):
        return "--ood: base-to-novel and the CoOp datasets evaluate their own test set only"
    if cfg.split and cfg.method in ("linear-probe", "full-ft", "wise-ft"):
        return (
            f"--split base: --method {cfg.method} learns head rows for the base classes only: it cannot score new ones"
        )
    ce_only = ("clipfit", "coop", "cocoop", "linear-probe", "prolip")
    ce_only += () if retrieval_task else ("full-ft", "wise-ft")
    if cfg.method in ce_only and cfg.loss != "ce":
        return f"--method {cfg.method} trains with cross-entropy over class logits: drop --loss {cfg.loss}"
    if retrieval_task and cfg.loss == "ce":
        return f"--data {cfg.data} is retrieval (captions, no classes): --method {cfg.method} needs another --loss"
    if cfg.method == "lora" and cfg.rank is None:
        return "--method lora needs --rank r >= 1"
    if not cfg.ctx_init.strip() or (cfg.ctx_init.isdigit() and int(cfg.ctx_init) < 1):
        return f"--ctx-init {cfg.ctx_init!r}: expected words or a number M >= 1 of context vectors"
    for name in ("prompts", "eval_prompts"):
        value = getattr(cfg, name)
        if value not in ("task", IMAGENET_80) and "{}" not in value:
            return f"--{name.replace('_', '-')} {value!r}: expected task, imagenet-80 or a template with {{}}"
    return None


def parse(config_class, methods, description, argv=None):
    """train.py's command line: one flag per field of config_class (its help in the field's metadata),
    --config FILE and --print-config; returns one checked config_class per method of the command."""
    doc = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(description=description, formatter_class=doc, allow_abbrev=False)
    fields = dataclasses.fields(config_class)
    for f in fields:
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS, help=f.metadata["help"])
        if f.type is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name == "ood":
            parser.add_argument(flag, action="append", metavar="NAME=DIR", **kw)
        else:
            kind = {Optional[int]: int, Optional[float]: float, Optional[str]: str}.get(f.type, f.type)
            parser.add_argument(flag, type=rank if f.name == "rank" else kind, **kw)
    parser.add_argument("--config", metavar="FILE", help="replay a run's config.json; the flags given override it")
    parser.add_argument("--print-config", action="store_true", help="print each method's config, each value's source")
    flags = vars(parser.parse_args(argv))
    config, print_config = flags.pop("config", None), flags.pop("print_config")
    try:
        chosen = [(f"config {config}", read_config(config, {f.name: f.type for f in fields}))] if config else []
    except ConfigError as e:
        parser.exit(1, f"error: {e}\n")
    resolved = resolve([*chosen, ("flag", flags)], defaults={f.name: f.default for f in fields})
    cfgs = [config_class(**values) for values, _ in resolved]
    for cfg in cfgs:
        problem = (
            check(cfg) if cfg.method in methods else f"--method {cfg.method}: expected one of {', '.join(methods)}"
        )
        if problem:
            parser.error(problem)
    if print_config:
        print("\n\n".join(describe(cfg, sources) for cfg, (_, sources) in zip(cfgs, resolved)))
        try:
            check_root(cfgs[0].data, cfgs[0].data_root)
        except DataError as e:  # the config is still worth seeing
            print(f"warning: {e}", file=sys.stderr)
        parser.exit(0)
    return cfgs


def templates(name, task_templates):
    """A prompt set (TrainConfig.prompts) as a list of templates."""
    if name == "task":
        return list(task_templates)
    return [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] if name == IMAGENET_80 else [name]


def describe(cfg, sources):
    """--print-config: each field's value and where it came from (`layers`, 'config FILE', 'flag'
    or 'default'), and how many templates the prompt sets hold."""
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
    values = {name: json.dumps(value) for name, value in asdict(cfg).items()}
    width, value_width = max(map(len, values)), max(map(len, values.values()))
    lines = [f"# {cfg.method}: {count['prompts']} training templates, {count['eval_prompts']} evaluation templates"]
    for name, value in values.items():
        lines.append(f"{name:<{width}}  {value:<{value_width}}  {sources.get(name, 'default')}")
    return "\n".join(lines)


def as_flags(values):
    """{field: value} as the flags that give it: --batch-size 256 --no-flip --prompts 'a photo of a {}'."""
    out = []
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


def table():
    """The README's recipe table: every entry above as the flags it amounts to, with its source."""
    where = {
        "few-shot": "`--shots K`",
        "base-to-novel": "`--split base`",
        "retrieval": "`--data coco`, `flickr30k`",
        "toy": "`--data toy`",
        "toy-base-to-novel": "`--data toy --split base`",
    }
    who = {"*": "all, under their own recipe", "all": "all, over their own recipe"}
    entries = [(("method", m), "any", m, values) for m, values in METHODS.items()]
    entries += [((s, m), where[s], who.get(m, m), v) for s, rules in SETTINGS.items() for m, v in rules.items()]
    entries += [((d, m), f"`--data {d}`", m, values) for (d, m), values in DATASETS.items()]
    lines = ["| setting | method | differs from the defaults by | source |", "|---|---|---|---|"]
    lines += [f"| {s} | {m} | `{as_flags(values)}` | {SOURCES[key]} |" for key, s, m, values in entries]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())

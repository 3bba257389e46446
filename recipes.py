"""Every training recipe: the values a train.py command runs with, each with its source.

A command's --data, --shots and --split pick its setting (`setting`). Every field then resolves by one
rule, later entries winning (cli.resolve; --print-config names each value's source):

    TrainConfig's default (train.py) < RECIPES[setting, method] < DATASETS[data, method]
        < --config FILE < the flags given

A recipe is flat: each value it sets, on its own line with its source (CoOp's few-shot epochs: one
line per number of shots, `pick`). Blocks shared by several recipes (Dassl's trainer, a setting's
values, the toy budget) are spread into them, a later key winning as in any dict. The toy jobs also
name their methods (METHOD_LISTS), used when no --method is given. TrainConfig's defaults are
R-Adapter's ImageNet recipe (paper Sec. 4.1, docs/RUN.md of its release). Releases: "R-Adapter"
github.com/tjddus9597/R-Adapter-ECCV2024, "CLIPFit" github.com/minglllli/CLIPFit, "CoOp"
github.com/KaiyangZhou/CoOp (CoOp's and CoCoOp's), "Dassl" github.com/KaiyangZhou/Dassl.pytorch,
"WiSE-FT" github.com/mlfoundations/wise-ft, "SSF" github.com/dongzelian/SSF. `python recipes.py`
prints the table of docs/recipes.md.
"""

import csv
import shlex
import tempfile
from pathlib import Path

from data import retrieval, toy, toy_world
from data.templates import IMAGENET_80

RUN_MD = "R-Adapter release, docs/RUN.md"
COOP_CFG = "CoOp release, configs/trainers/CoOp/vit_b16_ctxv1.yaml"
COCOOP_CFG = "CoOp release, configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml"
CLIPFIT_CFG = "CLIPFit release, configs/trainers/ClipFit/vit_b16_ep100_ctxv1.yaml"


def dassl(config):
    """Dassl's trainer as a release's config file sets it (CoOp, CoCoOp and CLIPFit are built on Dassl)."""
    return {
        "loss": ("ce", f"{config.split(',')[0]}, its trainer: cross-entropy over the class logits"),
        "optimizer": ("sgd", f"{config}: OPTIM.NAME (Dassl: momentum 0.9)"),
        "lr": (0.002, f"{config}: OPTIM.LR"),
        "weight_decay": (5e-4, "Dassl, dassl/config/defaults.py: OPTIM.WEIGHT_DECAY"),
        "min_lr": (0.0, "Dassl, dassl/optim/lr_scheduler.py: CosineAnnealingLR, eta_min 0"),
        "batch_size": (32, f"{config}: DATALOADER.TRAIN_X.BATCH_SIZE"),
        "schedule": ("dassl", f"{config}: OPTIM.LR_SCHEDULER cosine, stepped per epoch after the warm-up epochs"),
        "warmup_epochs": (1, f"{config}: OPTIM.WARMUP_EPOCH"),
        "warmup_lr": (1e-5, f"{config}: OPTIM.WARMUP_CONS_LR (WARMUP_TYPE constant)"),
        "grad_clip": (0.0, "Dassl, dassl/engine/trainer.py: no gradient clipping"),
        "flip": (True, f"{config}: INPUT.TRANSFORMS random_flip"),
        "crop_scale": (0.08, f"{config}: INPUT.TRANSFORMS random_resized_crop, Dassl's INPUT.RRCROP_SCALE (0.08, 1)"),
    }


def seeds(source):
    """Seeds 1, 2 and 3, pooled into one table: the few-shot and base-to-new settings as the released scripts
    run them."""
    return {"seed": (1, source), "seeds": (3, source)}


COOP_SEEDS = "CoOp release, scripts/coop/main.sh: for SEED in 1 2 3"
COCOOP_SEEDS = "CoOp release, scripts/cocoop/base2new_train.sh: SEED 1, 2 and 3 (COCOOP.md)"
CLIPFIT_SEEDS = "CLIPFit release, scripts/ClipFit/main.sh: for SEED in 1 2 3"
CLIPFIT_B2N_SEEDS = "CLIPFit release, scripts/ClipFit/base2new_train.sh: for SEED in 1 2 3"
COOP_FEW_SHOT = "CoOp release, COOP.md and scripts/coop/main.sh"
COOP_TRAINERS = "CoOp release, configs/trainers/CoOp"
# CoOp's few-shot tables (CoOp paper Fig. 3): 16 random context vectors, epochs by the number of shots.
COOP_FEW_SHOT_RECIPE = {
    **dassl(f"{COOP_TRAINERS}/vit_b16.yaml"),
    "ctx_init": ("16", f"{COOP_FEW_SHOT}: NCTX 16, random (configs/trainers/CoOp/vit_b16*.yaml set no CTX_INIT)"),
    "epochs": {  # by --shots (`pick`), as COOP.md picks the config
        1: (50, f"{COOP_TRAINERS}/vit_b16_ep50.yaml: OPTIM.MAX_EPOCH (1 shot: COOP.md)"),
        2: (100, f"{COOP_TRAINERS}/vit_b16_ep100.yaml: OPTIM.MAX_EPOCH (2 and 4 shots: COOP.md)"),
        4: (100, f"{COOP_TRAINERS}/vit_b16_ep100.yaml: OPTIM.MAX_EPOCH (2 and 4 shots: COOP.md)"),
        8: (200, f"{COOP_TRAINERS}/vit_b16.yaml: OPTIM.MAX_EPOCH (8 and 16 shots: COOP.md)"),
        16: (200, f"{COOP_TRAINERS}/vit_b16.yaml: OPTIM.MAX_EPOCH (8 and 16 shots: COOP.md)"),
    },
}

WISE_FT_RELEASE = "WiSE-FT release, its ImageNet command"
WISE_FT = {  # the R-Adapter paper's FT row; TrainConfig's batch, epochs, warm-up and clipping are WiSE-FT's too
    "loss": ("ce", "WiSE-FT release, src/models/finetune.py: CE over the zero-shot head"),
    "lr": (3e-5, WISE_FT_RELEASE),
    "weight_decay": (0.1, WISE_FT_RELEASE),
    "min_lr": (0.0, "WiSE-FT release: cosine to 0"),
}
SSF_SH = "SSF release, train_scripts/vit/imagenet_1k/train_ssf.sh"

# Each method's own recipe (TrainConfig's defaults where it sets nothing), in every setting RECIPES does
# not change it in.
OWN = {
    "r-adapter": {},  # TrainConfig's defaults: R-Adapter's ImageNet recipe
    "zero-shot": {},  # nothing trains
    # CLIPFit: Dassl's trainer; CE over one hand-written template, which it also evaluates with.
    "clipfit": dassl(CLIPFIT_CFG),
    "flyp": {  # FLYP (Goyal et al., CVPR 2023), its ImageNet recipe: contrastive full fine-tuning
        "loss": ("infonce", "FLYP paper: contrastive loss over image-caption pairs"),
        "lr": (1e-5, "FLYP paper, ImageNet"),
        "weight_decay": (0.1, "FLYP paper, ImageNet"),
    },
    "full-ft": WISE_FT,  # WiSE-FT's end-to-end fine-tuning: image tower + zero-shot head
    "wise-ft": {**WISE_FT, "sweep": (True, "WiSE-FT paper: the same training, always swept over alpha")},
    "prolip": {  # ProLIP (Fahes et al., 2024)
        "loss": ("ce", "ProLIP release"),
        "lr": (1e-3, "ProLIP release: Adam"),
        "weight_decay": (0.0, "ProLIP release"),
        "warmup": (0, "ProLIP release: no warm-up"),
        "grad_clip": (0.0, "ProLIP release: no clipping"),
    },
    "linear-probe": {  # zero-shot-initialised head; no paper recipe
        "loss": ("ce", "our choice"),
        "lr": (1e-3, "our choice"),
        "weight_decay": (0.0, "our choice"),
    },
    "lora": {  # LoRA (Hu et al., ICLR 2022), close to CLIP-LoRA's few-shot set-up; evaluated as trained
        "rank": (8, "our choice, after CLIP-LoRA"),
        "loss": ("ce", "our choice, after CLIP-LoRA"),
        "lr": (2e-4, "our choice, after CLIP-LoRA"),
        "weight_decay": (0.01, "our choice, after CLIP-LoRA"),
        "batch_size": (32, "our choice, after CLIP-LoRA"),
        "m": (0.0, "LoRA paper: no EMA"),
        "alpha": (1.0, "LoRA paper: the merged update unscaled"),
    },
    "coop": {  # CoOp's ctxv1 config (its few-shot tables: 16 random vectors, --ctx-init 16)
        **dassl(COOP_CFG),
        "epochs": (200, f"{COOP_CFG}: OPTIM.MAX_EPOCH"),
        "ctx_init": ("a photo of a", f"{COOP_CFG}: TRAINER.COOP.CTX_INIT"),
    },
    "cocoop": {  # also shipped by the CLIPFit release
        **dassl(COCOOP_CFG),
        "epochs": (10, f"{COCOOP_CFG}: OPTIM.MAX_EPOCH"),
        "batch_size": (1, f"{COCOOP_CFG}: DATALOADER.TRAIN_X.BATCH_SIZE"),
        "ctx_init": ("a photo of a", f"{COCOOP_CFG}: TRAINER.COCOOP.CTX_INIT"),
    },
    # SSF: its weight decay 0.05 skips 1-D tensors (timm's optimiser factory), i.e. every gamma and beta: 0
    # here. CE over the class prompts (the release trains a linear head; its drop path 0.1 and colour jitter
    # are not here); evaluated as trained (alpha 1).
    "ssf": {
        "loss": ("ce", "our choice: CE over the class prompts"),
        "lr": (1e-3, f"{SSF_SH}: AdamW"),
        "weight_decay": (0.0, f"{SSF_SH}: 0.05 on no SSF tensor (1-D tensors skipped)"),
        "min_lr": (1e-8, SSF_SH),
        "batch_size": (256, f"{SSF_SH}: 32 x 8 GPUs"),
        "epochs": (30, SSF_SH),
        "warmup_epochs": (5, f"{SSF_SH}: linear warm-up"),
        "grad_clip": (0.0, f"{SSF_SH}: no clipping"),
        "m": (0.99992, f"{SSF_SH}: model EMA"),
        "alpha": (1.0, "SSF paper: evaluated as trained"),
        "flip": (True, f"{SSF_SH}: timm's default flip"),
    },
}

# --split base: R-Adapter's base-to-novel command, under each method's own recipe.
B2N = {
    "epochs": (101, f"{RUN_MD}: base-to-novel command"),
    "batch_size": (32, f"{RUN_MD}: base-to-novel command"),
    "m": (0.9, f"{RUN_MD}: base-to-novel command, --ema"),
    "delta": (0.1, f"{RUN_MD}: base-to-novel command, --mg"),
    "epsilon": (0.0, f"{RUN_MD}: base-to-novel command, --ls"),
    "prompts": (IMAGENET_80, f"{RUN_MD}: base-to-novel command, a random OpenAI template per image"),
    "eval_prompts": (IMAGENET_80, f"{RUN_MD}: base-to-novel command, the OpenAI template ensemble"),
}
# --split base: CoCoOp's protocol as the released scripts run it, for every method.
B2N_PROTOCOL = {
    "shots": (16, "CoOp release, scripts/cocoop/base2new_train.sh: SHOTS=16 (R-Adapter's command: --k=16)"),
    **seeds(COCOOP_SEEDS),
}
# --data coco | flickr30k: R-Adapter paper Sec. 4 (alpha 0.8 for retrieval) and its COCO command.
RETRIEVAL = {
    "alpha": (0.8, "R-Adapter paper, Sec. 4: retrieval"),
    "epsilon": (0.0, f"{RUN_MD}: COCO command, --ls"),
    "grad_clip": (0.0, f"{RUN_MD}: COCO command (no --grad-clip-norm)"),
}
# No classes for WiSE-FT's head on retrieval: both towers with FLYP's contrastive recipe (no retrieval
# FT recipe is published).
FLYP_RETRIEVAL = {
    "loss": ("infonce", "FLYP paper (no retrieval FT recipe is published)"),
    "lr": (1e-5, "FLYP paper (no retrieval FT recipe is published)"),
    "weight_decay": (0.1, "FLYP paper (no retrieval FT recipe is published)"),
    "min_lr": (1e-6, "FLYP paper (no retrieval FT recipe is published)"),
}

# The offline toy jobs: the shipped toy CLIP, in process, under each method's own recipe.
TOY = "toy job (this repository)"
TOY_JOB = {
    "model": ("toy", f"{TOY}: the shipped toy CLIP"),
    "workers": (0, f"{TOY}: in process"),
    "save_every": (200, TOY),
    # the order CPU kernels sum in depends on the thread count: a fixed one gives the same table on any machine
    "threads": (2, f"{TOY}: 2 intra-op threads on any number of cores"),
}
# The toy world's budget, the same for every method, over its own recipe: 2 epochs of 12,000 images at
# batch 128 (186 steps). With m = 0.999 the EMA would still hold 83% of its zero initialisation after
# 186 steps, so the toy uses the paper's short-run momentum (its base-to-novel value, 0.9).
TOY_BUDGET = {
    "epochs": (2, f"{TOY}: budget"),
    "batch_size": (128, f"{TOY}: budget"),
    "warmup": (20, f"{TOY}: budget"),
    "m": (0.9, f"{TOY}: budget (the paper's short-run EMA)"),
}
# Learning rates: the toy lr rule (lr_rule), each method's argmax of photo validation accuracy over
# LR_GRID; methods not in the table keep their own.
TOY_LR = {"full-ft": 1e-3, "wise-ft": 1e-3, "r-adapter": 1e-2}  # docs/toy_lr_selection.csv (wise-ft: full-ft's)
TOY_LR_SOURCE = "toy lr rule: docs/toy_lr_selection.csv"
# The toy base-to-novel job (--data toy-specialised --split base): CoCoOp's protocol, 16 shots of the 6 base classes
# (96 images), and one budget over each method's own recipe: 100 epochs at batch 32 (300 steps; the
# base-to-novel runs of R-Adapter and CLIPFit are 101 and 100 epochs at batch 32, CoCoOp's batch is 1).
TOY_B2N = "toy base-to-novel job (this repository)"
TOY_B2N_JOB = {**TOY_JOB, "shots": (16, f"{TOY_B2N}: CoCoOp's 16 shots"), "run_dir": ("runs/toy-b2n", TOY_B2N)}
TOY_B2N_BUDGET = {**TOY_BUDGET, "epochs": (100, f"{TOY_B2N}: budget"), "batch_size": (32, f"{TOY_B2N}: budget")}
TOY_B2N_LR = {"coop": 1e-2, "cocoop": 1e-2, "clipfit": 1e-2, "r-adapter": 3e-3}  # docs/toy_b2n_lr_selection.csv
TOY_B2N_LR_SOURCE = "toy lr rule: docs/toy_b2n_lr_selection.csv"
TOY_TEMPLATE = toy_world.TEMPLATES[0]  # CLIPFit's one template, in the toy world

LR_GRID = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)  # every toy lr table's grid


def lr_rule(methods, score, metric, out, grid=LR_GRID):
    """The toy learning-rate rule: each method trained at every lr of `grid` and scored on a validation split
    (never on test, OOD, new or unseen classes) by score(method, lr, run_dir) -> (value, SE), fixed before any
    test number is looked at. Writes method, lr, the value (column `metric`), its SE and the selected flag
    (each method's argmax) to the CSV `out`; its callers: toy_experiments.py and train_seg.py --select-lr."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for lr in grid:
                value, se = score(method, lr, Path(tmp) / f"{method}-{lr:g}")
                print(f"{method} lr {lr:g}: {metric} {value:.2f} ± {se:.2f}")
                rows.append({"method": method, "lr": lr, metric: round(value, 2), "val_se": round(se, 2)})
    for method in methods:
        best = max((r for r in rows if r["method"] == method), key=lambda r: r[metric])
        for r in rows:
            if r["method"] == method:
                r["selected"] = int(r is best)
    with open(out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


def selected_lrs(path):
    """{method: lr} of an lr table's argmax rows."""
    with open(path) as f:
        return {r["method"]: float(r["lr"]) for r in csv.DictReader(f) if r["selected"] == "1"}


METHOD_LISTS = {  # setting: its methods when no --method is given
    "toy": ("zero-shot,full-ft,r-adapter", f"{TOY}: the rows of R-Adapter's Table 1"),
    "toy-base-to-novel": ("zero-shot,coop,cocoop,clipfit,r-adapter", f"{TOY_B2N}: the rows of CLIPFit's Table 1"),
}

RECIPES = {
    # --data imagenet | folder | a CoOp dataset: each method's own recipe
    **{("full", method): recipe for method, recipe in OWN.items()},
    # --shots K: each method's own recipe, seeds 1, 2, 3
    **{("few-shot", method): {**recipe, **seeds(COOP_SEEDS)} for method, recipe in OWN.items()},
    # (The paper's few-shot text uses low-rank adapters; the script trains full rank: --rank r.)
    ("few-shot", "r-adapter"): {
        "epochs": (50, f"{RUN_MD}: few-shot command"),
        "batch_size": (256, f"{RUN_MD}: few-shot command"),
        "warmup": (0, f"{RUN_MD}: few-shot command, --warmup_length"),
        "prompts": ("a photo of a {}", "R-Adapter release: few-shot training prompt"),
        **seeds(COOP_SEEDS),
    },
    ("few-shot", "clipfit"): {
        **OWN["clipfit"],
        "epochs": (100, "CLIPFit release, scripts/ClipFit/main.sh: CFG vit_b16_ep100_ctxv1 (ImageNet, Food-101: 10)"),
        "clipfit_lambda": (2.0, "CLIPFit paper: few-shot lambda (DTD, SUN397: 8, DATASETS)"),
        **seeds(CLIPFIT_SEEDS),
    },
    ("few-shot", "coop"): {**COOP_FEW_SHOT_RECIPE, **seeds(COOP_SEEDS)},
    # --split base: R-Adapter's command under each method's own recipe, 16 shots, seeds 1, 2, 3
    **{("base-to-novel", method): {**B2N, **B2N_PROTOCOL, **recipe} for method, recipe in OWN.items()},
    ("base-to-novel", "r-adapter"): {
        **B2N,
        **B2N_PROTOCOL,
        "rank": (4, f"{RUN_MD}: base-to-novel command, --adapter 4,4"),
    },
    ("base-to-novel", "clipfit"): {
        **B2N,
        **B2N_PROTOCOL,
        **OWN["clipfit"],
        "epochs": (100, f"{CLIPFIT_CFG}: OPTIM.MAX_EPOCH, base-to-new (ImageNet, Food-101: vit_b16_ep10_ctxv1.yaml)"),
        "prompts": ("task", "CLIPFit release: its own prompt"),
        "eval_prompts": ("task", "CLIPFit release: its own prompt"),
        "shots": (16, "CLIPFit release, scripts/ClipFit/base2new_train.sh: SHOTS=16"),
        **seeds(CLIPFIT_B2N_SEEDS),
    },
    # --data coco | flickr30k
    **{("retrieval", method): {**RETRIEVAL, **recipe} for method, recipe in OWN.items()},
    ("retrieval", "full-ft"): {**RETRIEVAL, **WISE_FT, **FLYP_RETRIEVAL},
    ("retrieval", "wise-ft"): {**RETRIEVAL, **OWN["wise-ft"], **FLYP_RETRIEVAL},
    # --data toy: the offline default job, with the alpha sweep
    **{
        ("toy", method): {**TOY_JOB, "sweep": (True, f"{TOY}: the alpha sweep"), **recipe, **TOY_BUDGET}
        for method, recipe in OWN.items()
    },
    **{
        ("toy", method): {
            **TOY_JOB,
            "sweep": (True, f"{TOY}: the alpha sweep"),
            **OWN[method],
            **TOY_BUDGET,
            "lr": (lr, TOY_LR_SOURCE if method != "wise-ft" else f"{TOY_LR_SOURCE} (full-ft's)"),
        }
        for method, lr in TOY_LR.items()
    },
    # --data toy-specialised --split base. R-Adapter keeps its base-to-novel rank and loss, CLIPFit its one
    # template (the toy's first); the others use the toy's templates.
    **{("toy-base-to-novel", method): {**TOY_B2N_JOB, **recipe, **TOY_B2N_BUDGET} for method, recipe in OWN.items()},
    ("toy-base-to-novel", "r-adapter"): {
        **TOY_B2N_JOB,
        **TOY_B2N_BUDGET,
        "rank": (4, f"{RUN_MD}: base-to-novel command, --adapter 4,4"),
        "delta": (0.1, f"{RUN_MD}: base-to-novel command, --mg"),
        "epsilon": (0.0, f"{RUN_MD}: base-to-novel command, --ls"),
        "lr": (TOY_B2N_LR["r-adapter"], TOY_B2N_LR_SOURCE),
    },
    ("toy-base-to-novel", "clipfit"): {
        **TOY_B2N_JOB,
        **OWN["clipfit"],
        **TOY_B2N_BUDGET,
        "prompts": (TOY_TEMPLATE, "CLIPFit release: one template (the toy's first)"),
        "eval_prompts": (TOY_TEMPLATE, "CLIPFit release: one template (the toy's first)"),
        "lr": (TOY_B2N_LR["clipfit"], TOY_B2N_LR_SOURCE),
    },
    **{
        ("toy-base-to-novel", method): {**TOY_B2N_JOB, **OWN[method], **TOY_B2N_BUDGET, "lr": (lr, TOY_B2N_LR_SOURCE)}
        for method, lr in TOY_B2N_LR.items()
        if method in ("coop", "cocoop")
    },
}

# Per-dataset exceptions of one method, over its recipe in any setting (--data names the dataset).
DATASETS = {
    ("imagenet", "clipfit"): {
        "epochs": (10, "CLIPFit release: ImageNet configs (vit_b16_ep10)"),
        "prompts": ("a photo of a {}.", "CLIPFit release: its ImageNet prompt"),
        "eval_prompts": ("a photo of a {}.", "CLIPFit release: its ImageNet prompt"),
    },
    ("imagenet", "coop"): {"epochs": (50, "CoOp release, COOP.md: *_ep50 configs for ImageNet in every setting")},
    ("food101", "clipfit"): {"epochs": (10, "CLIPFit release: 10 epochs for Food-101")},
    ("dtd", "clipfit"): {  # CoOp's DTD prompt is '{} texture.'
        "prompts": ("a photo of a {}, a type of texture.", "CLIPFit release: its DTD prompt"),
        "eval_prompts": ("a photo of a {}, a type of texture.", "CLIPFit release: its DTD prompt"),
        "clipfit_lambda": (8.0, "CLIPFit paper: lambda 8 on DTD"),
    },
    ("sun397", "clipfit"): {"clipfit_lambda": (8.0, "CLIPFit paper: lambda 8 on SUN397")},
}


def setting(data, split=None, shots=None):
    """The setting a command's --data, --split and --shots pick."""
    if data in toy.NAMES:
        return "toy-base-to-novel" if split == "base" else "toy"
    if data in retrieval.DATASETS:
        return "retrieval"
    if split == "base":
        return "base-to-novel"
    return "few-shot" if shots else "full"


def pick(entry, shots):
    """A recipe's (value, source), or of {K: (value, source)} given by the number of shots, the entry of the
    largest K not above --shots."""
    if isinstance(entry, tuple):
        return entry
    return entry[max((k for k in entry if k <= (shots or 0)), default=min(entry))]


def recipe(command, method=None):
    """{field: (value, source)} of `method` in a command ({field: value}: its data, split and shots pick the
    setting): RECIPES[setting, method] with DATASETS[data, method] over it. Without a method: the setting's
    own method list ({'method': ...}), if it has one."""
    data, shots = command["data"], command.get("shots")
    name = setting(data, command.get("split"), shots)
    if method is None:
        return {"method": METHOD_LISTS[name]} if name in METHOD_LISTS else {}
    flat = {**RECIPES.get((name, method), {}), **DATASETS.get((data, method), {})}
    return {k: pick(entry, shots) for k, entry in flat.items()}


def values(data, method, split=None, shots=None):
    """The recipe's values alone: {field: value}."""
    return {k: v for k, (v, _) in recipe(dict(data=data, split=split, shots=shots), method).items()}


# ------------------------------------------------------------- the table
WHERE = {
    "full": "`--data imagenet`, `folder`, a CoOp dataset",
    "few-shot": "`--shots K`",
    "base-to-novel": "`--split base`",
    "retrieval": "`--data coco`, `flickr30k`",
    "toy": "`--data toy`",
    "toy-base-to-novel": "`--data toy-specialised --split base`",
}


def as_flags(recipe):
    """{field: (value, source)} as the flags that give it: --batch-size 256 --no-flip --prompts 'a photo of a {}'."""
    out = []
    for name, entry in recipe.items():
        flag, value = "--" + name.replace("_", "-"), entry[0] if isinstance(entry, tuple) else None
        if value is None:  # by the number of shots
            out.append(f"{flag} " + ", ".join(f"{v} ({k} shots)" for k, (v, _) in entry.items()))
        elif isinstance(value, bool):
            out.append(flag if value else "--no-" + flag[2:])
        else:
            out.append(f"{flag} {shlex.quote(str(value))}")
    return " ".join(out)


def table():
    """docs/recipes.md's table: every recipe as the flags it amounts to, and where its values come from
    (--print-config gives each value's own source)."""
    lines = ["| setting | method | runs with (over TrainConfig's defaults) | sources |", "|---|---|---|---|"]
    rows = [(WHERE[s], f"{m}", r) for (s, m), r in RECIPES.items()]
    rows += [(f"`--data {d}`, any setting", f"{m}", r) for (d, m), r in DATASETS.items()]
    for where, method, recipe in rows:
        entries = [e for entry in recipe.values() for e in ([entry] if isinstance(entry, tuple) else entry.values())]
        sources = "; ".join(dict.fromkeys(source.split(",")[0].split(":")[0] for _, source in entries))
        lines.append(f"| {where} | {method} | `{as_flags(recipe)}` | {sources} |" if recipe else "")
    return "\n".join(line for line in lines if line)


if __name__ == "__main__":
    print(table())

"""Open-vocabulary segmentation, R-Adapter's fifth task (Kim et al., ECCV 2024): CAT-Seg (segment.py) on
our CLIP, trained on COCO-Stuff with CLIP fine-tuned by a method, mIoU on the six benchmarks.

    python train_seg.py --data-root DATASETS --model ViT-B-16:openai --method catseg,r-adapter
    python train_seg.py ... --resume latest | --print-config
    python train_seg.py --data toy-seg                # offline: the toy scenes (data/toy_scenes.py) on a CPU
    python train_seg.py --data toy-seg --select-lr    # the toy lr rule -> docs/toy_seg_lr_selection.csv

R-Adapter's paper gives no segmentation recipe; this is CAT-Seg's (--print-config shows each value's
source). What of CLIP trains (the CAT-Seg head always trains):
  frozen     nothing
  catseg     W_q and W_v of every attention block of both towers (CAT-Seg's default; segment.tune_qv)
  full       every weight but the logit scale (baselines.setup_flyp)
  r-adapter  adapters after W_O and W_2 of every block of both towers (r_adapter.py); evaluated with the
             EMA adapters merged at --alpha, so inference costs what plain CAT-Seg costs
  lora       LoRA on qkv and W_O of both towers (lora.py, rank 8), merged for evaluation
CLIP's own weights train at lr x --clip-lr-scale (CAT-Seg: 0.01); the head and the new weights of
r-adapter and lora at lr (R-Adapter trains its adapters at a full learning rate). Norm layers and
embeddings have no weight decay (detectron2's defaults, kept by CAT-Seg). Training is train.py's loop
(checkpoints, --resume latest, DDP); evaluation is CAT-Seg's sliding window and detectron2's mIoU (over the
classes present in the labels; data/segmentation.miou) with a bootstrap SE.
The toy job adds R-Adapter's claim against full fine-tuning, with paired bootstrap SEs; --seeds 3 pools
three seeds into one table, each SE with the seeds' spread added.
"""

import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

import claims
import cli
import data
import plots
import recipes
import report
import run_log
import segment
import train
from checkpoints import save_adapters
from clip_model import autocast_dtype, count_trainable
from clip_weights import load_clip, save_clip, save_safetensors
from data import segmentation, toy_scenes, toy_world
from data import templates as prompt_sets
from method import Task
from methods import SEGMENTATION

METHODS = tuple(SEGMENTATION)
CATSEG = "CAT-Seg release"  # github.com/cvlab-kaist/CAT-Seg
SOURCES = {  # where each recipe value comes from
    "data": f"{CATSEG}, configs/config.yaml DATASETS.TRAIN (COCO-Stuff, 171 classes)",
    "test": f"{CATSEG}, eval.sh (the six benchmarks)",
    "method": f"{CATSEG}, configs/config.yaml CLIP_FINETUNE 'attention' (W_q, W_v)",
    "prompts": f"{CATSEG}, configs/vitb_384.yaml PROMPT_ENSEMBLE_TYPE 'single'",
    "crop": f"{CATSEG}, configs/vitb_384.yaml INPUT.CROP.SIZE",
    "batch_size": f"{CATSEG}, configs/vitb_384.yaml SOLVER.IMS_PER_BATCH",
    "eval_batch": f"{CATSEG}, eval.sh (detectron2's test loader: one image at a time)",
    "iterations": f"{CATSEG}, configs/vitb_384.yaml SOLVER.MAX_ITER",
    "lr": f"{CATSEG}, configs/vitb_384.yaml SOLVER.BASE_LR (AdamW)",
    "clip_lr_scale": f"{CATSEG}, configs/vitb_384.yaml SOLVER.CLIP_MULTIPLIER",
    "weight_decay": f"{CATSEG}, configs/config.yaml SOLVER.WEIGHT_DECAY",
    "warmup": f"{CATSEG}, configs/config.yaml SOLVER.WARMUP_ITERS (WarmupCosineLR: cosine to 0)",
    "min_lr": f"{CATSEG}, configs/config.yaml WarmupCosineLR",
    "grad_clip": f"{CATSEG}, configs/config.yaml SOLVER.CLIP_GRADIENTS (full model, L2)",
    "alpha": "R-Adapter paper, its classification value (no segmentation value published)",
    "m": "R-Adapter paper",
    "p": "R-Adapter paper",
}


# The offline toy job (--data toy-seg): the toy CLIP on the toy scenes at a CPU budget, over CAT-Seg's recipe.
# A test scene is one crop large, so the sliding window scores it whole. m = 0.9 as in the toy classification
# job (recipes.TOY_BUDGET: with 0.999 the EMA would stay near its zero start over a short run). Each method's lr
# is the toy lr rule's (recipes.lr_rule, run by --select-lr): its argmax of photo validation mIoU over
# one grid, committed as docs/toy_seg_lr_selection.csv.
TOY_SEG = dict(
    model="toy",
    method="frozen,catseg,full,r-adapter",
    test=",".join(toy_scenes.TESTS),
    crop=toy_scenes.SIZE,
    eval_size=toy_scenes.SIZE,
    eval_batch=50,  # the scenes share one size: scored 50 at a time
    batch_size=8,
    iterations=675,  # 2.7 passes over the 2,000 training scenes, as CAT-Seg's over COCO-Stuff (tested)
    m=0.9,
    workers=0,
    threads=2,  # as recipes.TOY_JOB: the same table on any number of cores
    save_every=675,
)
TOY_SEG_LR = {"frozen": 3e-3, "catseg": 3e-3, "full": 3e-3, "r-adapter": 3e-3}  # docs/toy_seg_lr_selection.csv
TOY_SEG_LR_TABLE = Path(__file__).resolve().parent / "docs" / "toy_seg_lr_selection.csv"


TOY_SEG_SOURCE = "toy-seg recipe (this repository)"
TOY_SEG_LR_SOURCE = "toy lr rule: docs/toy_seg_lr_selection.csv"
LORA_SOURCE = "LoRA's recipe in classification (recipes.py): rank 8, no EMA, its whole update merged"
LORA = {k: (v, LORA_SOURCE) for k, v in dict(rank=8, m=0.0, alpha=1.0).items()}


def recipe(command, method=None):
    """The method's own recipe (LoRA's) and the toy-seg job's flat recipe {field: (value, source)} (none for
    coco-stuff), with the method's selected lr; without a method, the command's method list."""
    own = LORA if method == "lora" else {}
    if command["data"] != "toy-seg":
        return {} if method is None else own
    toy = {k: (v, TOY_SEG_SOURCE) for k, v in TOY_SEG.items()}
    if method is None:
        return {"method": toy["method"]}
    lr = {"lr": (TOY_SEG_LR[method], TOY_SEG_LR_SOURCE)} if method in TOY_SEG_LR else {}
    return {k: v for k, v in toy.items() if k != "method"} | own | lr


arg = train.arg  # a field with its --help text


@dataclass
class SegConfig:
    data: str = arg("coco-stuff", "coco-stuff (COCO-Stuff-171 train2017) | toy-seg (offline toy scenes)")
    data_root: Optional[str] = arg(None, "folder holding the datasets (layouts: data/segmentation.py)")
    test: str = arg(",".join(segmentation.TEST), "comma separated test sets (coco-stuff: its val2017)")
    strict: bool = arg(False, "an unreadable image or label is an error (default: skipped and counted)")
    model: str = arg("ViT-B-16:openai", "CLIP checkpoint file, hub name or toy (the shipped toy CLIP)")
    method: str = arg("catseg", f"comma separated, from: {', '.join(METHODS)}")
    rank: Optional[int] = arg(None, "r-adapter: adapter rank (default: full); lora: its rank (default 8)")
    p: float = arg(0.2, "r-adapter: adapter drop probability")
    drop_mode: str = arg("sample", "r-adapter: sample (the paper) | token (the released code)")
    m: float = arg(0.999, "r-adapter: EMA momentum of the adapters")
    alpha: float = arg(0.5, "r-adapter: re-scaling coefficient at merge")
    prompts: str = arg("A photo of a {} in the scene", "class prompt: a template with {}, or imagenet-80 (ensemble)")
    crop: int = arg(384, "training crop and sliding-window size (px)")
    eval_size: Optional[int] = arg(
        None, "test images are resized to this before the sliding window (default crop x 5/3)"
    )
    eval_batch: int = arg(1, "test images scored at once (> 1: a test set's images share one size, as the toy's)")
    batch_size: int = arg(4, "global batch (all GPUs, all accumulation steps)")
    accum_steps: int = arg(1, "gradient accumulation steps per optimiser step")
    iterations: int = arg(80_000, "optimiser steps")
    lr: float = arg(2e-4, "peak learning rate (AdamW) of the head and of new weights")
    clip_lr_scale: float = arg(0.01, "learning rate multiplier of CLIP's own weights")
    min_lr: float = arg(0.0, "learning rate at the end of the cosine")
    weight_decay: float = arg(1e-4, "AdamW's decoupled weight decay (none on norm layers and embeddings)")
    warmup: int = arg(0, "warm-up steps")
    grad_clip: float = arg(0.01, "max L2 norm of all gradients together; 0 = no clipping")
    precision: str = arg("auto", "auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp16 (+ GradScaler) | fp32")
    compile: bool = arg(False, "torch.compile the model")
    grad_checkpointing: bool = arg(False, "recompute each CLIP block in backward: far less activation memory")
    workers: int = arg(8, "data loader worker processes")
    threads: Optional[int] = arg(None, "intra-op CPU threads (default: torch's); the toy job uses 2 (any core count)")
    seed: int = arg(0, "seed of every random choice")
    seeds: int = arg(1, "train each method at seeds --seed, --seed + 1, ...; the table pools them (SEs add the spread)")
    run_dir: Optional[str] = arg(None, "output folder (default runs/seg-<data>); each method in a subfolder")
    overwrite: bool = arg(False, "start over in a --run-dir that holds a run: first delete what a run wrote there")
    save_every: int = arg(1000, "checkpoint every N steps")
    log_every: int = arg(50, "a log.jsonl line (loss, lr, samples/s) every N steps and per epoch; loss checked finite")
    report_to: Optional[str] = arg(None, "tensorboard: also write log.jsonl's scalars to <run dir>/tensorboard")
    resume: Optional[str] = arg(None, "latest | PATH: continue from a checkpoint")
    max_steps: Optional[int] = arg(None, "stop after N steps (smoke tests); the schedule still spans --iterations")
    optimizer: str = arg("adamw", "adamw (CAT-Seg's) | sgd (momentum 0.9)")
    schedule: str = arg("cosine", "cosine: warm-up, then cosine to --min-lr, per step (CAT-Seg's WarmupCosineLR)")
    warmup_epochs: Optional[float] = arg(None, "warm-up length in epochs (replaces --warmup)")
    warmup_lr: Optional[float] = arg(None, "constant learning rate during warm-up (default: linear ramp)")


def check(cfg):
    """What is wrong with a config, as one line naming the flag, or None (cli.py's range and choice checks,
    then segmentation's own)."""
    problem = cli.check_fields(cfg)
    if problem:
        return problem
    if cfg.data not in ("coco-stuff", "toy-seg"):
        return f"--data {cfg.data}: expected coco-stuff or toy-seg"
    if cfg.data_root is None and cfg.data == "coco-stuff":
        return "--data-root DIR: the folder holding the datasets is needed"
    known = toy_scenes.TESTS if cfg.data == "toy-seg" else [*segmentation.TEST, "coco-stuff"]
    tests = [t for t in cfg.test.split(",") if t not in known]
    if tests:
        return f"--test {tests[0]}: expected some of {', '.join(known)}"
    if cfg.prompts != prompt_sets.IMAGENET_80 and "{}" not in cfg.prompts:
        return f"--prompts {cfg.prompts!r}: expected imagenet-80 or a template with {{}}"
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.batch_size % (world * cfg.accum_steps):
        return f"--batch-size {cfg.batch_size}: expected a multiple of --accum-steps {cfg.accum_steps} x {world} GPUs"
    return None


def parse_args(argv=None):
    """One SegConfig per method of the command (defaults < the toy recipe < --config < flags), flags
    checked, and whether --select-lr was given. --print-config prints them, each value with its source,
    and exits."""
    cfgs, switches = cli.parse(
        SegConfig,
        argv,
        description=__doc__,
        methods=METHODS,
        recipe=recipe,
        check=check,
        default_sources={f.name: SOURCES.get(f.name, "this repository") for f in dataclasses.fields(SegConfig)},
        switches={"--select-lr": f"toy-seg: the lr rule for the methods -> {TOY_SEG_LR_TABLE.name}"},
    )
    if switches["--select-lr"] and cfgs[0].data != "toy-seg":
        cli.refuse("--select-lr: the lr rule is the toy's (--data toy-seg)")
    return cfgs, switches["--select-lr"]


# ---------------------------------------------------------------------- methods
def optimizer_groups(model, cfg):
    """CLIP's own weights at lr x clip_lr_scale, the rest (head, adapters, LoRA) at lr; no weight decay on
    norm layers and embeddings."""
    groups = {}
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            new = ".adapter." in f"{module_name}.{name}" or name.startswith("lora_")
            scale = cfg.clip_lr_scale if module_name.startswith("clip.") and not new else 1.0
            decay = not isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.Embedding))
            groups.setdefault((scale, decay), []).append(p)
    return [
        {"params": ps, "lr_scale": scale, **({} if decay else {"weight_decay": 0.0})}
        for (scale, decay), ps in groups.items()
    ]


# ------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_sets(model, test_sets, templates, cfg, device, keep=0):
    """{column: mIoU, column_se: bootstrap SE, 'skipped': unreadable files, 'unknown_pixels': ..., 'counts':
    {set: per-image counts}, 'predictions': {set: the [H, W] class maps of its first `keep` images}} by
    sliding window; a set's columns are its own name (all its classes) unless it names class subsets (the
    toy's seen and unseen)."""
    model.eval()
    amp = autocast_dtype(device, cfg.precision)
    L, scores, per_image, skipped, unknown, kept = model.config.context_length, {}, {}, 0, 0, {}
    for test_set in test_sets:
        tokens = segment.class_tokens(test_set.names, templates, L).to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            text = torch.cat([model.embed_text(t) for t in tokens.split(64)])  # [C, P, e], 64 classes at a time
        loader = DataLoader(test_set, cfg.eval_batch, num_workers=cfg.workers, collate_fn=data.collate_skip)
        counts = []
        for images, labels, n_bad in tqdm(loader, desc=test_set.name, leave=False, disable=None):
            skipped += n_bad
            if len(images) == 0:
                continue
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                size = cfg.eval_size or cfg.crop * 5 // 3
                probs = segment.sliding_window(model, images.to(device), text, cfg.crop, size=size)  # [B, C, H, W]
            for pred, label in zip(probs.argmax(1).cpu(), labels):
                if test_set.prompt_class is not None:  # VOC-20b: a background name's pixels are background
                    pred = test_set.prompt_class[pred]
                counts.append(segmentation.iou_counts(pred, label, test_set.classes))
                if len(counts) <= keep:
                    kept.setdefault(test_set.name, []).append(pred)
                unknown += (label >= test_set.classes).sum().item()
        if not counts:
            raise data.DataError(f"test set {test_set.name!r} has no readable images")
        per_image[test_set.name] = counts = torch.stack(counts)
        for column, classes in test_set.columns.items():
            scores[column] = segmentation.miou(counts.sum(0), classes).item()
            scores[f"{column}_se"] = claims.bootstrap_se(counts, classes, miou=segmentation.miou)
    return {**scores, "skipped": skipped, "unknown_pixels": unknown, "counts": per_image, "predictions": kept}


def pool_seeds(runs, test_sets):
    """evaluate_sets' scores of one row from S seeds as one: each mIoU the mean over the seeds, its SE the
    bootstrap's over the images plus the seed-to-seed spread (claims.bootstrap_se), 'counts' [S, N, 3, C] per
    set, the first seed's predictions. One seed passes through unchanged."""
    if len(runs) == 1:
        return runs[0]
    counts = {name: torch.stack([r["counts"][name] for r in runs]) for name in runs[0]["counts"]}
    scores = {}
    for test_set in test_sets:
        for column, classes in test_set.columns.items():
            scores[column] = sum(r[column] for r in runs) / len(runs)
            scores[f"{column}_se"] = claims.bootstrap_se(counts[test_set.name], classes, miou=segmentation.miou)
    totals = {k: sum(r[k] for r in runs) for k in ("skipped", "unknown_pixels")}
    return {**scores, **totals, "counts": counts, "predictions": runs[0]["predictions"]}


# ------------------------------------------------------------------- the driver
def datasets(cfg):
    """The training set and the test sets of cfg.data."""
    if cfg.data == "toy-seg":
        train_set = toy_scenes.train_set(segmentation.train_transform(cfg.crop))
        return train_set, toy_scenes.test_sets(cfg.test.split(","), segmentation.eval_transform())
    transform = segmentation.train_transform(cfg.crop)
    train_set = segmentation.build("coco-stuff-train", cfg.data_root, transform, cfg.strict)
    return train_set, segmentation.test_sets(cfg.test.split(","), cfg.data_root, cfg.strict)


def fit(cfg, train_set, device, rank=0, world=1):
    """CAT-Seg on cfg.model with the method's weights trainable, trained on train_set: the segmenter, its
    method.Method, the prompt templates and the number of trainable CLIP parameters."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    clip = load_clip(cfg.model, device=device)
    head = segment.HeadConfig() if clip.config.vision_width >= 768 else segment.SMALL
    head = segment.TOY if cfg.data == "toy-seg" else head
    templates = prompt_sets.templates(cfg.prompts, [])
    torch.manual_seed(cfg.seed)  # the same head for every method
    model = segment.CATSeg(clip, len(templates), head).to(device)
    tokens = segment.class_tokens(train_set.names, templates, clip.config.context_length)

    def objective(net, images, labels, _):  # CAT-Seg's per-class BCE; the text tower runs every step (it may train)
        return segment.bce_loss(net(images, tokens.to(images.device)), labels)

    method = SEGMENTATION[cfg.method](clip, cfg, Task(objective=objective))
    clip.set_grad_checkpointing(cfg.grad_checkpointing)
    n_clip, n_head = count_trainable(clip), count_trainable(model) - count_trainable(clip)
    if rank == 0:
        print(f"{cfg.method}: {n_clip:,} trainable CLIP parameters, {n_head:,} in the CAT-Seg head")
        (Path(cfg.run_dir) / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    groups = optimizer_groups(model, cfg)
    train.fine_tune(cfg, model, method, train_set, device, (rank, world), groups=groups, iterations=cfg.iterations)
    return model, method, templates, n_clip


def run(cfgs, device, rank=0, world=1):
    rows, out = [], Path(cfgs[0].run_dir or f"runs/seg-{cfgs[0].data}")
    if rank == 0 or not cfgs[0].overwrite:  # one run per folder (run_log.py)
        run_log.claim(out, resume=cfgs[0].resume, overwrite=cfgs[0].overwrite)
    cfgs = [dataclasses.replace(c, overwrite=False) for c in cfgs]  # a replayed config.json deletes nothing
    train_set, test_sets = datasets(cfgs[0])  # data, crop and test sets are the command's, not a method's
    seeds = [cfgs[0].seed + s for s in range(cfgs[0].seeds)]
    for cfg in cfgs:
        runs = []  # per seed: [(row name, scores)] of the method's rows
        for seed in seeds:
            run_dir = out / cfg.method / (f"seed{seed}" if len(seeds) > 1 else "")
            cfg = dataclasses.replace(cfg, seed=seed, run_dir=str(run_dir))
            model, method, templates, n_clip = fit(cfg, train_set, device, rank, world)
            if rank != 0:
                continue
            keep = SHOWN if cfg.data == "toy-seg" else 0
            scored = []
            for name, alpha in method.rows:
                with method.weights(alpha):
                    scored.append((name, evaluate_sets(model, test_sets, templates, cfg, device, keep=keep)))
            runs.append(scored)
            export(cfg, model, method)
        for same in zip(*runs):  # one row per method row, pooled over the seeds
            scores = pool_seeds([s for _, s in same], test_sets)
            rows.append({"method": same[0][0], "run": cfg.method, "trainable": n_clip, **scores})
    if rank == 0 and rows:
        print(
            "\n"
            + report.format_table(
                [{k: v for k, v in r.items() if k not in ("unknown_pixels", "counts", "predictions")} for r in rows]
            )
        )
        report.write_results(
            [{k: v for k, v in r.items() if k not in ("counts", "predictions")} for r in rows], out / "results"
        )
        print(f"mIoU (%) ± bootstrap SE over images{' and seeds' * (len(seeds) > 1)}; wrote {out / 'results.csv'}")
        runs, tested = {r["run"] for r in rows}, set(rows[0]["counts"])
        if cfgs[0].data == "toy-seg" and {"full", "r-adapter"} <= runs and set(toy_scenes.TESTS) <= tested:
            checked = claims.toy_seg_claims(
                rows, cfgs[0].alpha, tests=toy_scenes.TESTS, unseen=toy_scenes.UNSEEN, miou=segmentation.miou
            )
            (out / "claims.json").write_text(json.dumps(checked, indent=2))
            print("\nR-Adapter's claim, checked (delta and se in points; 'within noise' when |delta| < 2 se):")
            for c in checked:
                print(f"  {c['verdict']:>12}  {c['delta']:+6.2f} ± {c['se']:.2f}  {c['claim']}")
            if len(seeds) == 1:
                print("  (one seed: each SE counts the test scenes, not the training seed; --seeds 3 adds its spread)")
            print(f"wrote {out / 'claims.json'}")
        if cfgs[0].data == "toy-seg":
            plot_scenes(rows, test_sets, out / "scenes.png")
    return rows


SHOWN = 50  # the first test scenes of each toy set whose predictions are kept for the figure


def plot_scenes(rows, test_sets, path):
    """The toy job's figure: two photo scenes that hold seen and unseen classes, a sketch and a rendition,
    each with its labels and every row's prediction (unlabelled pixels greyed, as the metric ignores them)."""
    picks = []
    for test_set in test_sets:
        unseen = set(toy_scenes.UNSEEN)
        for i in range(min(SHOWN, len(test_set))):
            classes = set(test_set.labels[i].unique().tolist())
            if test_set.style != "photo" or (classes & unseen and classes - unseen - {segmentation.IGNORE}):
                picks.append((test_set, i))
                if test_set.style != "photo" or sum(t is test_set for t, _ in picks) == 2:
                    break
    scenes = [
        dict(
            title=f"{t.name} #{i}",
            image=t.images[i].permute(1, 2, 0).numpy(),  # [H, W, 3] uint8
            label=t.labels[i].numpy(),
            predictions={r["method"]: r["predictions"][t.name][i].numpy() for r in rows},
        )
        for t, i in picks
    ]
    names = [toy_world.CLASSNAMES[c] for c in toy_scenes.SEEN] + [
        f"{toy_world.CLASSNAMES[c]} (unseen)" for c in toy_scenes.UNSEEN
    ]
    plots.plot_segmentations(scenes, names, path)
    print(f"wrote {path}")
    return scenes


def select_lr(cfgs, device, rank=0, world=1):
    """The toy lr rule (recipes.lr_rule) for segmentation: each method of the command at every lr of
    the grid, the rest of its recipe kept, scored by mIoU on the photo validation scenes (seen classes; never
    test, unseen or shifted scenes) at its fully fine-tuned end (R-Adapter merged at alpha = 1)."""
    by_method = {cfg.method: cfg for cfg in cfgs}
    train_set = toy_scenes.train_set(segmentation.train_transform(cfgs[0].crop))
    val = toy_scenes.validation(segmentation.eval_transform())

    def score(method, lr, run_dir):
        cfg = dataclasses.replace(by_method[method], lr=lr, run_dir=str(run_dir))
        model, fitted, templates, _ = fit(cfg, train_set, device)
        with fitted.weights(1.0):
            scores = evaluate_sets(model, [val], templates, cfg, device)
        return scores[val.name], scores[f"{val.name}_se"]

    recipes.lr_rule(list(by_method), score, "val_miou", TOY_SEG_LR_TABLE, grid=recipes.LR_GRID)


def export(cfg, model, method):
    """Under the evaluation weights (EMA adapters merged at alpha, LoRA merged): merged.safetensors, a plain
    CLIP (OpenAI's names; open_clip loads it), and head.safetensors, the CAT-Seg head; r-adapter also
    writes adapters.safetensors."""
    out = Path(cfg.run_dir)
    if method.ema is not None:
        save_adapters(model.clip, out / "adapters.safetensors", ema=method.ema)
    with method.weights(method.rows[0][1]):
        save_clip(model.clip, out / "merged.safetensors")
        head = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    save_safetensors(head, out / "head.safetensors")


def main(argv=None):
    cfgs, select = parse_args(argv)
    cli.launch(select_lr if select else run, cfgs)


if __name__ == "__main__":
    main()

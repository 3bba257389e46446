"""The toy CLIP's experiments: the learning-rate rule and the analogy check (docs/toy.md); toy_clip.py
pretrains the toy CLIP itself.

The lr rule: each method trained at every lr of one grid and scored on photo validation images at its
fully fine-tuned end; the argmax is its toy lr. With --split base the runs are those of the base-to-new
job, `train.py --data toy-specialised --split base` (16 shots of the 6 base classes), scored on its base
classes' validation images.

    python toy_experiments.py --select-lr full-ft,full-ft-blocks,r-adapter            # docs/toy_lr_selection.csv
    python toy_experiments.py --select-lr coop,cocoop,clipfit,r-adapter --split base  # docs/toy_b2n_lr_selection.csv
    python toy_experiments.py --check   # the analogies: CLIP on ImageNet, 16 shots that teach, patch tokens
"""

import argparse
import dataclasses
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import claims
import evaluate
import recipes
import segment
import train
import train_seg
from clip_weights import load_toy_clip
from data import segmentation, toy_scenes, toy_world
from data.templates import templates
from data.toy import task, validation
from toy_clip import zero_shot_photo

# ------------------------------------------ the analogy with CLIP on ImageNet, and the lr rule
DOCS = Path(__file__).resolve().parent / "docs"
LR_TABLES = {None: DOCS / "toy_lr_selection.csv", "base": DOCS / "toy_b2n_lr_selection.csv"}  # by --split
DATA = {None: "toy", "base": "toy-specialised"}  # by --split: the default job's task, the base-to-new job's
BLOCKS_ONLY = "full-ft-blocks"  # full-ft with everything before the first image block frozen (--check)


def freeze_before_blocks(model):
    """Freeze what the image tower computes before its first block: the patch embedding, the class
    token, the position embedding and ln_pre (CLIP ViT-B/16: 0.7% of the tower)."""
    visual = model.visual
    for module in (visual.patch_embed, visual.norm_pre):
        module.requires_grad_(False)
    visual.cls_token.requires_grad_(False)
    visual.pos_embed.requires_grad_(False)


def fine_tune(method, lr, run_dir, seed=0, split=None):
    """One run of `method` (or BLOCKS_ONLY) on the toy task (split='base': the base-to-new job's base
    classes) with its toy recipe at learning rate `lr`. Returns the fine-tuned model, its method.Method
    and config."""
    argv = ["--data", DATA[split], "--method", "full-ft" if method == BLOCKS_ONLY else method, "--lr", str(lr)]
    cfg = train.parse_args(argv + (["--split", split] if split else []))[0]
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir), seed=seed, sweep=False)
    model = load_toy_clip()
    data = train.build_data(cfg, model)[0]
    fitted = train.setup(cfg, model, data)
    if method == BLOCKS_ONLY:
        freeze_before_blocks(model)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    train.fine_tune(cfg, model, fitted, data.train, torch.device("cpu"))
    return model, fitted, cfg


def top1(model, fitted, cfg, task):
    """Top-1 (%) and its SE on task.test, among task.classnames, at the method's fully fine-tuned end:
    merged at alpha = 1 for R-Adapter and WiSE-FT, the plain model for the rest."""
    task = dataclasses.replace(task, train=None, ood=[])
    with fitted.weights(1.0 if fitted.curve else None):
        classifier = fitted.classifier if fitted.classifier_for is None else fitted.classifier_for(task.classnames)
        row = evaluate.evaluate_task(
            model, task, classifier=classifier, prompts=templates(cfg.eval_prompts, task.templates), workers=0
        )
    return row[task.test.name], row[f"{task.test.name}_se"]


def select_lr(methods, split=None, grid=recipes.LR_GRID):
    """The lr rule (recipes.lr_rule) on the toy task: each method at every lr of the grid, scored by top-1 on
    the photo validation split (split='base': the base-to-new job's base-class images among the base classes),
    written to LR_TABLES[split]."""

    def score(method, lr, run_dir):
        return top1(*fine_tune(method, lr, run_dir, split=split), validation(split, DATA[split]))

    recipes.lr_rule(methods, score, "val_top1", LR_TABLES[split], grid)


def selected_lrs(split=None):
    """{method: lr} of the toy task's lr table (split='base': the base-to-new one)."""
    return recipes.selected_lrs(LR_TABLES[split])


@torch.no_grad()
def features(model, dataset, batch_size=1000):
    """[n, width] image features and [n] labels of a ToySplit: the class token after the final norm, before
    the projection to the embedding space, where CLIP's linear probes read (Radford et al. 2021, A.3)."""
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    visual = model.visual
    pooled = [visual.forward_head(visual.forward_features(b), pre_logits=True) for b in x.split(batch_size)]
    return torch.cat(pooled), torch.tensor(dataset.labels)


def logistic_regression(x, y, lam, n_classes):
    """Multinomial logistic regression by L-BFGS: mean CE + lam / 2 ||W||^2 (bias unpenalised), as
    the CLIP paper's linear probes (Radford et al. 2021, Sec. 3.2, A.3; sklearn's C = 1 / (lam n)).
    x [n, d], y [n] -> W [C, d], b [C]."""
    W = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([W, b], max_iter=1000, tolerance_grad=1e-6, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ W.T + b, y) + lam / 2 * W.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return W.detach(), b.detach()


def accuracy(W, b, x, y):
    """Top-1 (%) of the linear classifier (W, b) on features x [n, d] with labels y [n]."""
    return 100 * (x @ W.T + b).argmax(1).eq(y).float().mean().item()


def linear_probe_gap(model):
    """(zero-shot, linear probe) top-1 (%) on toy-photo test: the probe fitted on frozen features of the
    photo training images, its L2 strength chosen on the photo validation split."""
    data = task()
    (x, y), (xv, yv), (xt, yt) = (
        features(model, s) for s in (data.train, validation().test.dataset, data.test.dataset)
    )
    mean, std = x.mean(0), x.std(0)  # standardised features: one lambda grid fits every model
    x, xv, xt = ((z - mean) / std for z in (x, xv, xt))
    C = len(toy_world.CLASSNAMES)
    fits = [logistic_regression(x, y, lam, C) for lam in (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)]
    W, b = max(fits, key=lambda fit: accuracy(*fit, xv, yv))
    return zero_shot_photo(model, data.test.dataset), accuracy(W, b, xt, yt)


# ------------------------------------------------- the few-shot analogy: CLIPFit's base-to-new table
FEW_SHOTS = (1, 4, 16, 64)  # linear probes on frozen features, k images of each base class


def few_shot_probes(model, name=DATA["base"]):
    """{k: top-1 (%)} of k-shot linear probes on the base classes of --data `name` (default: the base-to-new
    job's; the first k training images of each; frozen features standardised by the mean and spread of every
    training image, one standardisation for every k), its L2 strength picked on the base-class validation
    images and scored on the base-class test images: how much k images can teach a readout."""
    data, val = task(name=name), validation("base", name).test.dataset
    (x, y), (xv, yv), (xt, yt) = (features(model, s) for s in (data.train, val.dataset, data.test.dataset))
    base = torch.arange(len(toy_world.CLASSNAMES) // 2)
    (xv, yv), (xt, yt) = ((z[torch.isin(t, base)], t[torch.isin(t, base)]) for z, t in ((xv, yv), (xt, yt)))
    mean, std = x.mean(0), x.std(0)
    x, xv, xt = ((z - mean) / std for z in (x, xv, xt))
    probes = {}
    for k in FEW_SHOTS:
        shots = torch.cat([torch.nonzero(y == c)[:k, 0] for c in base])  # [6k]
        fits = [logistic_regression(x[shots], y[shots], lam, len(base)) for lam in (1e-3, 1e-2, 1e-1, 1.0, 10.0)]
        probes[k] = accuracy(*max(fits, key=lambda fit: accuracy(*fit, xv, yv)), xt, yt)
    return probes


def few_shot_gain(out):
    """CoOp against zero-shot on the toy base-to-new job (train.py --data toy-specialised --split base, CoOp at its
    selected lr): (base gain, new-class change), each (delta, paired SE) in points."""
    cfgs = train.parse_args(["--data", DATA["base"], "--split", "base", "--method", "zero-shot,coop"])
    rows = train.run_methods(cfgs, Path(out), torch.device("cpu"))[0]
    zero_shot, coop = (next(r for r in rows if r["run"] == m) for m in ("zero-shot", "coop"))
    return tuple(claims.paired([(1, coop), (-1, zero_shot)], [split]) for split in ("base", "new"))


# ---------------------------------------- the segmentation analogy: CAT-Seg's open-vocabulary protocol
@torch.no_grad()
def nearest_prompt_counts(clip, test_set, templates, last_block="values"):
    """[n, 3, C] IoU counts of the training-free segmenter: each pixel labelled by the class of highest cost
    (segment.cost_volume, averaged over the templates, upsampled bilinearly from the patch grid), through the
    dense features CAT-Seg's head reads (clip_model.encode_dense; last_block="attention": the plain block)."""
    tokens = segment.class_tokens(test_set.names, templates, clip.config.context_length)  # [C, P, L]
    text = clip.encode_text(tokens.flatten(0, 1)).view(*tokens.shape[:2], -1)  # [C*P, e] -> [C, P, e]
    counts = []
    for image, label in test_set:
        tokens, _ = clip.encode_dense(image[None], last_block=last_block)  # [1, 1 + h*w, e]
        h, w = (n // clip.config.patch_size for n in image.shape[-2:])
        dense = tokens[:, 1:].transpose(1, 2).unflatten(2, (h, w))  # [1, e, h*w] -> [1, e, h, w]
        cost = segment.cost_volume(dense, text).mean(2)  # [1, C, P, h, w] -> [1, C, h, w]
        cost = F.interpolate(cost, size=label.shape, mode="bilinear", align_corners=False)
        counts.append(segmentation.iou_counts(cost[0].argmax(0), label, test_set.classes))
    return torch.stack(counts)


class Quadrants:
    """The scenes of `scenes` cut into their four 32 px cells, each alone ([3, 32, 32] image, [32, 32] label):
    every object in a 4 x 4 token grid, as in pretraining, without the rest of its scene."""

    def __init__(self, scenes):
        self.scenes, self.names, self.classes = scenes, scenes.names, scenes.classes

    def __iter__(self):
        half = toy_scenes.SIZE // 2
        for image, label in self.scenes:  # [3, 64, 64], [64, 64]
            for top in (0, half):
                for left in (0, half):
                    yield image[:, top : top + half, left : left + half], label[top : top + half, left : left + half]


def chance_counts(counts):
    """The expected IoU counts [n, 3, C] of a prediction drawn uniformly among the C prompted classes at every
    pixel, for the labels of counts [n, 3, C]: intersection label / C, predicted area (labelled pixels) / C."""
    label = counts[:, 2].double()
    C = counts.shape[-1]
    return torch.stack([label / C, label.sum(-1, keepdim=True).expand_as(label) / C, label], dim=1)


def segmentation_scores(counts, columns):
    """{column: (mIoU, chance mIoU, paired SE of the difference)} of counts [n, 3, C] (photo test scenes)."""
    chance = chance_counts(counts)
    return {
        column: (
            segmentation.miou(counts.sum(0), classes).item(),
            segmentation.miou(chance.sum(0), classes).item(),
            claims.bootstrap_se(counts, classes, baseline=chance, miou=segmentation.miou),
        )
        for column, classes in columns.items()
    }


def trained_catseg_counts(out):
    """[n, 3, C] IoU counts on the photo test scenes of the toy segmentation job's `catseg` row (train_seg.py
    --data toy-seg --method catseg, at its selected lr)."""
    cfg = train_seg.parse_args(["--data", "toy-seg", "--method", "catseg", "--test", "toy-photo"])[0][0]
    cfg = dataclasses.replace(cfg, run_dir=str(out))
    train_set, test_sets = train_seg.datasets(cfg)
    model, fitted, templates, _ = train_seg.fit(cfg, train_set, torch.device("cpu"))
    with fitted.weights(fitted.rows[0][1]):
        return train_seg.evaluate_sets(model, test_sets, templates, cfg, torch.device("cpu"))["counts"]["toy-photo"]


def check():
    """The properties that make the toy jobs stand for their real experiments (docs/toy.md, "What the toy
    stands for"): CLIP on ImageNet (the default job), 16 shots that teach (base-to-new) and patch tokens that
    know their class (segmentation)."""
    model = load_toy_clip()
    zero_shot, probe = linear_probe_gap(model)
    print(f"strong features, imperfect alignment: zero-shot {zero_shot:.1f}, linear probe {probe:.1f} on toy-photo")
    print(f"  probe - zero-shot = {probe - zero_shot:+.1f} points (CLIP ViT-B/16 on ImageNet: 80.2 - 68.3 = +11.9)")
    lrs = selected_lrs()
    gains = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in ("full-ft", BLOCKS_ONLY):
            fitted = fine_tune(method, lrs[method], Path(tmp) / method)
            gains[method] = top1(*fitted, task())[0] - zero_shot
            print(f"  {method} at its selected lr {lrs[method]:g}: ID gain {gains[method]:+.1f} points")
    share = 100 * gains[BLOCKS_ONLY] / gains["full-ft"]
    print(f"the gain lives in the blocks: full-ft with everything before the first block frozen reaches {share:.0f}%")
    print("  of full-ft's ID gain (CLIP ViT-B/16: the patch embedding is 0.7% of the image tower)")

    print("\n16 shots that teach: k-shot linear probes on frozen features, base classes, test images:")
    for name in ("toy", DATA["base"]):
        probes = few_shot_probes(model, name)
        print(f"  {name}: " + ", ".join(f"{k} shot{'s' * (k > 1)} {acc:.1f}" for k, acc in probes.items()))
    with tempfile.TemporaryDirectory() as tmp:
        (base, base_se), (new, new_se) = few_shot_gain(tmp)
    print(
        f"  CoOp at 16 shots, its selected lr {selected_lrs('base')['coop']:g}, against zero-shot: base {base:+.1f} ± "
        f"{base_se:.1f}, new {new:+.1f} ± {new_se:.1f} points"
    )
    print("  (CoCoOp's Table 1, ViT-B/16, mean of 11 datasets: base +13.4, new -11.0)")

    print("\npatch tokens that know their class: mIoU (%) on the photo test scenes against chance (uniform over the")
    print("  12 prompted classes), ± the paired bootstrap SE of the difference")
    scenes = toy_scenes.test_sets(["toy-photo"], segmentation.eval_transform())[0]
    found = {
        "training-free (nearest prompt)": nearest_prompt_counts(model, scenes, toy_world.TEMPLATES),
        "... each 32 px quadrant alone": nearest_prompt_counts(model, Quadrants(scenes), toy_world.TEMPLATES),
    }
    with tempfile.TemporaryDirectory() as tmp:
        found[f"catseg at its selected lr {train_seg.TOY_SEG_LR['catseg']:g}"] = trained_catseg_counts(tmp)
    for name, counts in found.items():
        scores = segmentation_scores(counts, scenes.columns)
        print(
            f"  {name}: "
            + ", ".join(
                f"{column} {m:.1f} (chance {c:.1f}, {m / c:.1f}x; {m - c:+.1f} ± {se:.1f})"
                for column, (m, c, se) in scores.items()
            )
        )
    print("  (CLIP ViT-B/16 through CAT-Seg's dense last block labels patches by their class without training;")
    print("   CAT-Seg's trained head: 31.8 mIoU on ADE20K-150 and 57.5 on Pascal Context-59, Table 1)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--select-lr",
        metavar="METHODS",
        help=f"the lr rule for these comma-separated methods ({BLOCKS_ONLY} too), written to "
        f"docs/{LR_TABLES[None].name}",
    )
    parser.add_argument(
        "--split",
        choices=["base"],
        help=f"--select-lr on the base-to-new task, written to docs/{LR_TABLES['base'].name}",
    )
    parser.add_argument("--check", action="store_true", help="print the toy CLIP's analogy measurements")
    args = parser.parse_args(argv)
    if args.split and not args.select_lr:
        parser.error("--split: it picks the task of --select-lr METHODS, which is not given")
    if not (args.check or args.select_lr):
        parser.error("give --check or --select-lr METHODS (the toy CLIP itself is rebuilt by toy_clip.py)")
    torch.set_num_threads(recipes.TOY_JOB["threads"][0])  # the toy jobs' intra-op threads: the same numbers anywhere
    if args.check:
        return check()
    return select_lr(args.select_lr.split(","), args.split)


if __name__ == "__main__":
    main()

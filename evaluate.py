r"""Evaluation protocol: top-1 accuracy with its standard error, base/new/HM, retrieval recall, alpha sweeps.

Protocol (R-Adapter Sec. 4.1, inherited from WiSE-FT): images are scored against the zero-shot
classifier of the (adapted) text encoder (zero_shot.py: CLIP's prompt ensemble). Accuracy is top-1 on
the ID test set and on every OOD set found; a set with a class subset (ImageNet-R/A) or class groups
(ObjectNet) projects the logits first, and "OOD avg" is the plain mean over the OOD sets. Every
accuracy carries its standard error.
Base-to-novel (CoCoOp) scores base and new each among its own classes and reports their harmonic
mean (its SE by the delta method, claims.hm_terms); retrieval reports R@1/5/10 both ways (Sec. 4).
Re-scaling alpha (Sec. 3.3) only enters at merge time, so a sweep over alpha needs no retraining:
merge, evaluate, unmerge for each value.
Under torchrun every rank scores its shard of each set and the parts are gathered in dataset order,
so every rank holds the numbers one process computes (distributed.py). Tables, result files, pooled
seeds, claims and plots: report.py.

    python evaluate.py --model ViT-B-16:openai --data imagenet --data-root DIR             # zero-shot
    python evaluate.py --model ViT-B-16.pt --adapters runs/imagenet/r-adapter/adapters.safetensors \
        --data imagenet --data-root DIR --alpha 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1   # sweep + PNG
    python evaluate.py --model ViT-B-16.pt --finetuned runs/imagenet/full-ft/merged.safetensors --alpha 0.5
    python evaluate.py --model ViT-B-16:openai --prompt-learner output/.../prompt_learner/model.pth.tar-10 \
        --data dtd --data-root DIR --split base                           # a released CoOp / CoCoOp checkpoint
    python evaluate.py --model ViT-B-16.pt --images photos/ --classes cat,dog,car       # top-k per image
    python evaluate.py --model toy --images photo.png --classes circle,square           # the shipped toy CLIP
"""

import argparse
import math
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from tqdm import tqdm

import baselines
import checkpoints
import claims
import cli
import data
import plots
import prompt_learners
import reparam
import report
from clip_model import autocast_dtype, image_transform
from clip_weights import WeightsError, load_clip
from data import coop, retrieval
from data.templates import templates
from distributed import gather, is_main_process, shard
from zero_shot import zero_shot_classifier

ALPHAS = [round(0.1 * i, 1) for i in range(11)]


@torch.no_grad()
def accuracy(model, classifier, evalset, batch_size=256, workers=4, autocast_dtype=None):
    """Per-image top-1 correctness on one EvalSet, in the order of its images ([n] bool, unreadable
    images left out), and the number of images skipped as unreadable. classifier: [C, embed], or a
    function of the normalised image features [B, embed] -> [B, C] (CoCoOp's per-image classifier).
    Under torch.distributed each rank scores its shard() and every rank returns the whole, identical
    to one process's."""
    device = next(model.parameters()).device
    images_of_rank = Subset(evalset.dataset, shard(len(evalset.dataset), batch_size))
    loader = DataLoader(images_of_rank, batch_size=batch_size, num_workers=workers, collate_fn=data.collate_skip)
    correct, bad = [torch.zeros(0, dtype=torch.bool)], 0
    progress = tqdm(loader, desc=evalset.name, leave=False, disable=None if is_main_process() else True)
    for images, labels, n_bad in progress:
        bad += n_bad
        if len(images) == 0:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            f = model.encode_image(images.to(device), normalize=True)
            logits = classifier(f).float() if callable(classifier) else f.float() @ classifier.float().T
        correct.append(evalset.project_logits(logits).argmax(dim=-1).cpu() == labels)
    parts = gather((torch.cat(correct), bad))
    correct, bad = torch.cat([c for c, _ in parts]), sum(b for _, b in parts)
    if len(correct) == 0:
        raise data.DataError(f"evaluation set {evalset.name!r} has no readable images")
    return correct, bad


def standard_error(acc, n):
    """One standard error (points) of a top-1 accuracy `acc` (%) measured on n images: sqrt(p (1-p) / n)."""
    p = acc / 100
    return 100 * math.sqrt(p * (1 - p) / n)


def evaluate_task(model, task, classifier=None, prompts=None, **kwargs):
    """{'<id set>': acc, '<ood set>': acc, ..., 'ood_avg': mean over OOD, then '<set>_se' for each
    (one standard error, points), 'skipped': n unreadable, 'correct': {'<set>': [n] bool per image}}
    (the per-image correctness gives paired SEs of differences, claims.py; tables and files leave it
    out). prompts: the classifier's templates (default: the task's)."""
    model.eval()
    if classifier is None:
        classifier = zero_shot_classifier(model, task.classnames, prompts or task.templates)
    acc, se, correct, skipped = {}, {}, {}, 0
    for evalset in [task.test, *task.ood]:
        correct[evalset.name], bad = accuracy(model, classifier, evalset, **kwargs)
        acc[evalset.name] = 100.0 * int(correct[evalset.name].sum()) / len(correct[evalset.name])
        se[f"{evalset.name}_se"] = standard_error(acc[evalset.name], len(correct[evalset.name]))
        skipped += bad
    ood = [s.name for s in task.ood]
    acc["ood_avg"] = sum(acc[k] for k in ood) / len(ood) if ood else float("nan")
    # the OOD sets are disjoint samples: the SE of their mean is the root sum of squares over k
    se["ood_avg_se"] = math.sqrt(sum(se[f"{k}_se"] ** 2 for k in ood)) / len(ood) if ood else float("nan")
    return {**acc, **se, "skipped": skipped, "correct": correct}


def recall_at_k(image_features, text_features, text_to_image, ks=(1, 5, 10)):
    """Recall@k (%) both ways from [I, D] image and [T, D] text features (normalised) and the [T]
    caption -> image map. Image -> text: a hit if ANY of the image's captions is in its top k; text ->
    image: a hit if the caption's image is in its top k. rsum = the sum of all six."""
    sims = image_features @ text_features.T  # [I, T]
    images = torch.arange(len(image_features), device=sims.device)
    text_to_image = text_to_image.to(sims.device)
    i2t = text_to_image[sims.topk(min(max(ks), sims.shape[1]), dim=1).indices] == images[:, None]  # [I, k]
    t2i = sims.T.topk(min(max(ks), sims.shape[0]), dim=1).indices == text_to_image[:, None]  # [T, k]
    out = {f"i2t_R@{k}": 100 * i2t[:, :k].any(1).float().mean().item() for k in ks}
    out |= {f"t2i_R@{k}": 100 * t2i[:, :k].any(1).float().mean().item() for k in ks}
    out["rsum"] = sum(out.values())
    return out


@torch.no_grad()
def evaluate_retrieval(model, test_set, batch_size=256, workers=4, autocast_dtype=None):
    """recall_at_k of `model` on one retrieval.RetrievalSet: every image and caption encoded once."""
    model.eval()
    device = next(model.parameters()).device
    images = Subset(test_set.images, shard(len(test_set.images), batch_size))
    captions = shard(len(test_set.tokens), batch_size)
    f, g = [torch.zeros(0, model.config.embed_dim)], [torch.zeros(0, model.config.embed_dim)]  # this rank's
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        for x, _ in DataLoader(images, batch_size=batch_size, num_workers=workers):
            f.append(model.encode_image(x.to(device), normalize=True).float().cpu())
        for t in test_set.tokens[captions.start : captions.stop].split(batch_size):
            g.append(model.encode_text(t.to(device), normalize=True).float().cpu())
    f, g = torch.cat(gather(torch.cat(f))).to(device), torch.cat(gather(torch.cat(g))).to(device)  # [I, D], [T, D]
    return recall_at_k(f, g, test_set.text_to_image)


def score(model, task, split=None, prompts=None, classifier=None, **kwargs):
    """The table rows of `model` on a task: [accuracies] for classification, [base, new, hm] for a
    base-to-novel split (coop.base_new's eval task), one row of recalls per retrieval test set."""
    if isinstance(task, retrieval.RetrievalData):
        return [{"test": t.name, **evaluate_retrieval(model, t, **kwargs)} for t in task.tests]
    acc = evaluate_task(model, task, classifier, prompts, **kwargs)
    if split:
        row = {k: acc[k] for k in ("base", "new")} | {"hm": claims.harmonic_mean(acc["base"], acc["new"])}
        row |= {k: acc[k] for k in ("base_se", "new_se")} | {"hm_se": claims.linear(claims.hm_terms(acc))[1]}
        return [row | {k: acc[k] for k in ("skipped", "correct")}]
    return [acc]


def sweep(model, task, alphas, weights, **kwargs):
    """score() at each alpha; weights(alpha) is a context manager that sets the weights."""
    rows = []
    for alpha in alphas:
        with weights(alpha):
            new = [{"alpha": alpha, **s} for s in score(model, task, **kwargs)]
        if is_main_process():
            print(report.format_table(new, header=not rows))
        rows += new
    return rows


@torch.no_grad()
def predict_images(model, paths, classnames, templates, topk=5):
    """Top-k (class, probability) for each image file."""
    from PIL import Image

    device = next(model.parameters()).device
    classifier = zero_shot_classifier(model, classnames, templates)
    transform = image_transform(model.config.image_size)
    scale = model.logit_scale.exp()
    out = {}
    for path in paths:
        image = transform(Image.open(path)).unsqueeze(0).to(device)
        probs = (scale * model.encode_image(image, normalize=True) @ classifier.T).softmax(-1)[0]
        p, i = probs.topk(min(topk, len(classnames)))
        out[str(path)] = [(classnames[j], float(q)) for q, j in zip(p, i)]
    return out


def main(argv=None):
    doc = argparse.RawDescriptionHelpFormatter
    parser = cli.ArgumentParser(description=__doc__, formatter_class=doc, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="the zero-shot CLIP: toy, a file, ViT-B-16 or ARCH:TAG")
    parser.add_argument("--adapters", help="R-Adapter weights saved by train.py (adapters.safetensors)")
    parser.add_argument("--finetuned", help="a fully fine-tuned CLIP export, for WiSE-FT interpolation")
    parser.add_argument(
        "--prompt-learner",
        help="CoOp / CoCoOp context: train.py's prompt_learner.safetensors or a released checkpoint (model.pth.tar-N)",
    )
    parser.add_argument("--alpha", default="0.5", help="re-scaling coefficient(s) in [0, 1], comma separated")
    parser.add_argument("--data", default="imagenet", help=f"one of: {', '.join(data.names())}")
    parser.add_argument("--data-root", help="dataset root (layouts: data/imagenet.py, coop.py, retrieval.py)")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DIR", help="an extra evaluation set")
    parser.add_argument("--split", choices=["base"], help="base: score base and new classes apart (CoCoOp)")
    parser.add_argument("--prompts", default="task", help="classifier prompts: task | imagenet-80 | a template")
    parser.add_argument("--images", help="an image file or a folder: print top-k classes instead")
    parser.add_argument("--classes", help="comma separated class names for --images")
    parser.add_argument("--topk", type=int, default=5, help="classes printed per image")
    parser.add_argument("--out", default="runs/eval", help="output folder for the table and the plot")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    workers = min(4, cores)  # more than the cores this process may use only makes the DataLoader warn
    parser.add_argument("--workers", type=int, default=workers, help=f"data loader worker processes ({workers})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=device, help=f"where the model runs: cpu, cuda, cuda:1, ... ({device})")
    args = parser.parse_args(argv)
    try:
        alphas = [float(a) for a in args.alpha.split(",")]
    except ValueError:
        parser.error(f"--alpha {args.alpha}: expected numbers in [0, 1], comma separated")
    if not all(0 <= a <= 1 for a in alphas):
        parser.error(f"--alpha {args.alpha}: expected values in [0, 1]")
    if sum(bool(a) for a in (args.adapters, args.finetuned, args.prompt_learner)) > 1:
        parser.error("--adapters, --finetuned, --prompt-learner: give one of them")
    if args.images and not args.classes:
        parser.error("--images needs --classes a,b,c")
    if args.classes and not args.images:
        parser.error("--classes needs --images FILE|DIR, the images to classify")
    if args.data not in data.names():
        parser.error(f"--data {args.data}: expected one of {', '.join(data.names())}")
    cli.at_least(parser, ("--workers", args.workers, 0), ("--batch-size", args.batch_size, 1), ("--topk", args.topk, 1))
    try:
        check_paths(args)
        run(args, alphas)
    except (data.DataError, WeightsError, OSError) as e:  # the user's input, named in the message: no traceback
        sys.exit(f"error: {e}")


def check_paths(args):
    """The input checks that cost nothing, made before any download or data read."""
    if args.images and not Path(args.images).exists():
        raise data.DataError(f"--images {args.images}: no such file or folder")
    if args.images and Path(args.images).is_dir() and not image_files(args.images):
        raise data.DataError(f"--images {args.images}: no image in the folder (no {'/'.join(IMG_EXTENSIONS)} files)")
    if not args.images:
        data.check_root(args.data, args.data_root)
    for flag, path in (
        ("--adapters", args.adapters),
        ("--finetuned", args.finetuned),
        ("--prompt-learner", args.prompt_learner),
    ):
        if path and not Path(path).is_file():
            raise data.DataError(f"{flag} {path}: no such file")


def image_files(folder):
    """The image files in `folder` (not its sub-folders), by name."""
    return sorted(
        p for p in Path(folder).iterdir() if p.is_file() and has_file_allowed_extension(p.name, IMG_EXTENSIONS)
    )


def run(args, alphas):
    model = load_clip(args.finetuned or args.model, device=args.device)
    if args.images:
        root = Path(args.images)
        paths = image_files(root) if root.is_dir() else [root]  # an undecodable one: OSError naming it
        for path, top in predict_images(model, paths, args.classes.split(","), ["a photo of a {}."], args.topk).items():
            print(path + ": " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in top))
        return
    size, L = model.config.image_size, model.config.context_length
    ood = dict(o.split("=", 1) for o in args.ood)
    task = data.build_task(args.data, args.data_root, eval_transform=image_transform(size), context_length=L, ood=ood)
    if args.split:
        task = coop.base_new(task)[1]
    kwargs = dict(split=args.split, batch_size=args.batch_size, workers=args.workers)
    kwargs |= dict(prompts=templates(args.prompts, getattr(task, "templates", [])))
    kwargs["autocast_dtype"] = autocast_dtype(args.device)
    if args.adapters:
        checkpoints.load_adapters(model, args.adapters)
        name, rows = "R-Adapter", sweep(model, task, alphas, lambda a: reparam.merged(model, a), **kwargs)
    elif args.prompt_learner:  # the learned prompts of the task's classes (CoCoOp: of each image)
        learner = prompt_learners.load_prompt_learner(model, args.prompt_learner)
        name, classifier = "CoOp" if learner.meta_net is None else "CoCoOp", learner.classifier(model, task.classnames)
        rows = sweep(model, task, [0.0], lambda a: nullcontext(), classifier=classifier, **kwargs)
    elif args.finetuned:
        zero_shot = load_clip(args.model, device=args.device).state_dict()
        name, rows = "WiSE-FT", sweep(model, task, alphas, lambda a: baselines.wise_ft(model, zero_shot, a), **kwargs)
    else:
        name, rows = "zero-shot", sweep(model, task, [0.0], lambda a: nullcontext(), **kwargs)
    out = Path(args.out)
    report.write_results(rows, out / "results")
    if len(alphas) > 1:
        plots.plot({name: rows}, out / "alpha_sweep.png", rows, [s.name for s in getattr(task, "ood", [])])
        print(f"wrote {out / 'alpha_sweep.png'}")
    print(f"wrote {out / 'results.csv'} and .json")


if __name__ == "__main__":
    main()

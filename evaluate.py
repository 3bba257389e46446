"""Evaluation: zero-shot classifiers, the robustness table, and the alpha sweep (also for retrieval).

Protocol (R-Adapter Sec. 4.1, inherited from WiSE-FT; PAPER.md 2.8): the classifier is
built from the (adapted) text encoder, one row per class = the normalised mean of the
normalised embeddings of all templates filled with the class name. Accuracy is top-1 on
the ID test set and on every present OOD set; an OOD set with a class subset (ImageNet-R/A)
or class groups (ObjectNet) projects the task logits first (data.EvalSet.project_logits).
"OOD avg" is the plain mean over the OOD sets.

The re-scaling coefficient alpha (Sec. 3.3, weight-space ensemble) enters only when the
adapters are merged, so `--alpha 0,0.1,...,1` sweeps it without retraining: merge, evaluate,
unmerge for each value. WiSE-FT is swept the same way by interpolating a fully fine-tuned
model with the zero-shot one. `--data coco | flickr30k` (retrieval.py) sweeps image-text retrieval
instead: R@1/5/10 both ways and rsum on every test set the data has (COCO 5K, Flickr30k 1K).

    python evaluate.py --model ViT-B-16:openai --data imagenet --data-root DIR            # zero-shot
    python evaluate.py --model ViT-B-16.pt --adapters runs/imagenet-r-adapter/adapters.safetensors \
        --data imagenet --data-root DIR --alpha 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1  # sweep + PNG
    python evaluate.py --model ViT-B-16.pt --finetuned runs/imagenet-full-ft/merged.safetensors --alpha 0.5
    python evaluate.py --model ViT-B-16.pt --adapters runs/coco/r-adapter/adapters.safetensors \
        --data coco --data-root DIR --alpha 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1  # retrieval sweep
    python evaluate.py --model ViT-B-16.pt --images photos/ --classes cat,dog,car     # top-k per image

Public functions
  zero_shot_classifier(model, classnames, templates)  -> [C, embed] normalised class embeddings
  evaluate_task(model, task, ...)                     -> {set name: top-1 %, ..., 'ood_avg': %}
  sweep(model, task, alphas, apply)                   -> rows (alpha, each set, ood_avg)
  retrieval_sweep(model, tests, alphas, apply)        -> rows (alpha, test, R@1/5/10 both ways, rsum)
  interpolate(model, zero_shot, finetuned, alpha)     WiSE-FT weights, in place
  plot_sweep(curves, path), plot_retrieval_sweep(curves, path), write_results(rows, stem), format_table(rows)
"""
import argparse
import csv
import json
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

import retrieval
from clip_model import image_transform, load_clip, tokenize
from data import build_task, collate_skip


@torch.no_grad()
def zero_shot_classifier(model, classnames, templates, batch_size=1000):
    """[C, embed]: per class, the normalised mean of normalised template embeddings."""
    device = next(model.parameters()).device
    texts = [t.format(c) for c in classnames for t in templates]  # class-major: [C*T]
    tokens = tokenize(texts, model.config.context_length)
    feats = torch.cat([model.encode_text(tokens[i:i + batch_size].to(device), normalize=True)
                       for i in range(0, len(tokens), batch_size)])
    feats = feats.view(len(classnames), len(templates), -1).mean(dim=1)  # [C, embed]
    return torch.nn.functional.normalize(feats, dim=-1)


@torch.no_grad()
def accuracy(model, classifier, evalset, batch_size=256, workers=4, autocast_dtype=None):
    """Top-1 accuracy (%) on one EvalSet, and the number of unreadable images skipped."""
    device = classifier.device
    loader = DataLoader(evalset.dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip)
    correct = total = bad = 0
    for images, labels, n_bad in tqdm(loader, desc=evalset.name, leave=False, disable=None):
        bad += n_bad
        if len(images) == 0:
            continue
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model.encode_image(images.to(device), normalize=True).float() @ classifier.float().T
        pred = evalset.project_logits(logits).argmax(dim=-1).cpu()
        correct += (pred == labels).sum().item()
        total += len(labels)
    if total == 0:
        raise ValueError(f"evaluation set {evalset.name!r} has no readable images")
    return 100.0 * correct / total, bad


def evaluate_task(model, task, classifier=None, batch_size=256, workers=4, autocast_dtype=None):
    """{'<id set>': acc, '<ood set>': acc, ..., 'ood_avg': mean over OOD, 'skipped': n unreadable}."""
    model.eval()
    if classifier is None:
        classifier = zero_shot_classifier(model, task.classnames, task.templates)
    results, skipped = {}, 0
    for evalset in [task.test, *task.ood]:
        results[evalset.name], bad = accuracy(model, classifier, evalset, batch_size, workers, autocast_dtype)
        skipped += bad
    ood = [results[s.name] for s in task.ood]
    results["ood_avg"] = sum(ood) / len(ood) if ood else float("nan")
    results["skipped"] = skipped
    return results


def sweep(model, task, alphas, apply, **eval_kwargs):
    """Evaluate at each alpha; `apply(alpha)` is a context manager that sets the weights."""
    rows = []
    for alpha in alphas:
        with apply(alpha):
            rows.append({"alpha": alpha, **evaluate_task(model, task, **eval_kwargs)})
        print(format_table([rows[-1]], header=len(rows) == 1))
    return rows


def retrieval_sweep(model, tests, alphas, apply, **eval_kwargs):
    """sweep() for retrieval: one row per alpha and test set (retrieval.RetrievalSet)."""
    rows = []
    for alpha in alphas:
        with apply(alpha):
            new = [{"alpha": alpha, "test": t.name, **retrieval.evaluate_retrieval(model, t, **eval_kwargs)}
                   for t in tests]
        print(format_table(new, header=not rows))
        rows += new
    return rows


@torch.no_grad()
def interpolate(model, zero_shot, finetuned, alpha):
    """WiSE-FT: theta = alpha * theta_ft + (1 - alpha) * theta_zs, loaded in place (fp32 math)."""
    model.load_state_dict({k: (alpha * finetuned[k].float() + (1 - alpha) * v.float()).to(v.dtype)
                           for k, v in zero_shot.items()})


@contextmanager
def interpolated(model, zero_shot, finetuned, alpha):
    """WiSE-FT weights at alpha inside the block, the zero-shot weights again after it."""
    interpolate(model, zero_shot, finetuned, alpha)
    try:
        yield
    finally:
        model.load_state_dict(zero_shot)


def format_table(rows, header=True):
    """The paper's layout: one row per method/alpha, ID, each OOD set, OOD avg."""
    keys = [k for k in rows[0] if k != "skipped"]
    widths = [max(9, len(k), *(len(str(r[k])) for r in rows if not isinstance(r[k], float))) for k in keys]

    def cell(v, w):
        return f"{v:>{w}.2f}" if isinstance(v, float) else f"{str(v):>{w}}"

    lines = ["  ".join(f"{k:>{w}}" for k, w in zip(keys, widths))] if header else []
    lines += ["  ".join(cell(r[k], w) for k, w in zip(keys, widths)) for r in rows]
    return "\n".join(lines)


def write_results(rows, stem):
    """rows -> stem.csv and stem.json."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))


def plot_sweep(curves, path, id_name="ID"):
    """ID vs OOD-avg accuracy over alpha, one curve per method (curves: {method: sweep rows})."""
    plot_curves(curves, path, id_name, "ood_avg", f"ID accuracy ({id_name}, %)", "OOD avg accuracy (%)")


def plot_retrieval_sweep(curves, path):
    """curves: {method: retrieval_sweep rows}. The first test set's rsum (the --data set's) against
    the second's over alpha, or rsum against alpha when there is one test set."""
    tests = list(dict.fromkeys(r["test"] for rows in curves.values() for r in rows))
    points = {m: [{"alpha": a, **{r["test"]: r["rsum"] for r in rows if r["alpha"] == a}}
                  for a in dict.fromkeys(r["alpha"] for r in rows)] for m, rows in curves.items()}
    if len(tests) == 2:
        plot_curves(points, path, tests[0], tests[1], f"{tests[0]} rsum", f"{tests[1]} rsum")
    else:
        plot_curves(points, path, "alpha", tests[0], "α", f"{tests[0]} rsum")


def plot_curves(curves, path, x, y, xlabel, ylabel):
    """r[y] against r[x] over alpha, one curve per method (curves: {method: rows with 'alpha', x, y});
    alpha=0 (zero-shot) and alpha=1 (fine-tuned) end points marked."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for name, rows in curves.items():
        line, = ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", ms=3, label=name)
        for r in rows:
            if r["alpha"] in (0, 0.5, 1):
                ax.annotate(f"α={r['alpha']:g}", (r[x], r[y]), fontsize=7,
                            textcoords="offset points", xytext=(4, 4), color=line.get_color())
        ends = [r for r in rows if r["alpha"] in (0, 1)]
        ax.plot([r[x] for r in ends], [r[y] for r in ends], "s", ms=7, mfc="none", color=line.get_color())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title("Re-scaling coefficient α (□: zero-shot α=0, fine-tuned α=1)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="CLIP checkpoint path or hub name (the zero-shot base)")
    parser.add_argument("--adapters", help="R-Adapter weights saved by train.py (adapters.safetensors)")
    parser.add_argument("--finetuned", help="a fully fine-tuned CLIP export, for WiSE-FT interpolation")
    parser.add_argument("--alpha", default="0.5", help="re-scaling coefficient(s), comma separated")
    parser.add_argument("--data", default="imagenet", help="imagenet | folder | toy | coco | flickr30k (retrieval)")
    parser.add_argument("--data-root", help="dataset root (see README for layouts)")
    parser.add_argument("--ood", action="append", default=[], metavar="NAME=DIR",
                        help="extra OOD folder; for retrieval the other test set, e.g. flickr30k=DIR")
    parser.add_argument("--images", help="an image file or a folder: print top-k classes instead")
    parser.add_argument("--classes", help="comma separated class names for --images")
    parser.add_argument("--topk", type=int, default=5)
    parser.add_argument("--out", default="runs/eval", help="output directory for tables and the plot")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    model = load_clip(args.model, device=args.device)
    if args.images:
        if not args.classes:
            parser.error("--images needs --classes a,b,c")
        root = Path(args.images)
        paths = sorted(p for p in root.iterdir() if p.is_file()) if root.is_dir() else [root]
        for path, top in predict_images(model, paths, args.classes.split(","), ["a photo of a {}."],
                                        args.topk).items():
            print(path + ": " + ", ".join(f"{c} {100 * q:.1f}%" for c, q in top))
        return
    alphas = [float(a) for a in args.alpha.split(",")]
    transform, ood = image_transform(model.config.image_size), dict(o.split("=", 1) for o in args.ood)
    if args.data in retrieval.DATASETS:
        tests = retrieval.build_retrieval(args.data, args.data_root, eval_transform=transform,
                                          context_length=model.config.context_length, ood=ood).tests
        run_sweep, plot = partial(retrieval_sweep, model, tests), plot_retrieval_sweep
    else:
        task = build_task(args.data, args.data_root, eval_transform=transform, ood=ood)
        run_sweep, plot = partial(sweep, model, task), partial(plot_sweep, id_name=task.test.name)
    kwargs = dict(batch_size=args.batch_size, workers=args.workers,
                  autocast_dtype=torch.bfloat16 if args.device.startswith("cuda") else None)
    out = Path(args.out)
    if args.adapters:
        import r_adapter
        r_adapter.load_adapters(model, args.adapters)
        rows = run_sweep(alphas, lambda a: r_adapter.merged(model, a), **kwargs)
        name = "R-Adapter"
    elif args.finetuned:
        zs = {k: v.clone() for k, v in model.state_dict().items()}
        ft = load_clip(args.finetuned, device=args.device).state_dict()
        rows = run_sweep(alphas, lambda a: interpolated(model, zs, ft, a), **kwargs)
        name = "WiSE-FT"
    else:
        rows = run_sweep([0.0], lambda a: nullcontext(), **kwargs)
        name = "zero-shot"
    write_results(rows, out / "results")
    if len({r["alpha"] for r in rows}) > 1:
        plot({name: rows}, out / "alpha_sweep.png")
        print(f"wrote {out / 'alpha_sweep.png'}")
    print(f"wrote {out / 'results.csv'} and .json")


if __name__ == "__main__":
    main()

"""Cross-dataset transfer and domain generalisation (CoCoOp, Zhou et al., CVPR 2022, Sec. 4.2-4.3), run
as CLIPFit's release runs them (scripts/ClipFit/xd_train.sh, xd_test.sh; CoOp's scripts/cocoop/xd_*.sh):
train on ImageNet with 16 shots per class, then evaluate the same weights on the other ten CoOp
datasets (each with its own classes and prompt) and on ImageNet-V2, -Sketch, -A and -R; seeds 1..N.

    python transfer.py --data-root ROOT --model ViT-B-16:openai --method zero-shot,coop,cocoop,clipfit

ROOT has CoOp's layout (data/coop.py): ROOT/imagenet/images/{train,val}, the ten dataset folders, and
the four shifts where CoOp's DATASETS.md puts them (SHIFTS); an absent one is skipped with one line.
Every other flag is train.py's, and each method's recipe resolves as for `--data imagenet --shots 16`
(recipes.py), except CoOp's context, which starts from "a photo of a" as in the cross-dataset scripts
(vit_b16_ep50_ctxv1), not from CoOp's few-shot 16 random vectors. Each target is scored with the
prompts that method's recipe gives that dataset.

One table, runs/xd/results.{csv,json}: per method, ImageNet, each target, their mean `xd_avg`, each
shift and their mean `dg_avg`; a cell is the mean over the seeds ± its standard error over the seeds
(one seed: the accuracy's own standard error). runs/xd/seeds.csv has every seed's row, and
runs/xd/seed<N>/<method>/ each run's files, as train.py writes them. One process (no DDP).
"""

import argparse
import dataclasses
import json
import math
import sys
from functools import cache
from pathlib import Path

import torch

import cli
import data
import evaluate
import recipes
import report
import train
from clip_model import autocast_dtype, image_transform
from clip_weights import WeightsError, load_clip
from data import coop
from data.templates import templates

# Where CoOp's DATASETS.md puts each shift under ROOT, by the name data/imagenet.py gives its set.
SHIFTS = {
    "imagenet-v2": "imagenetv2/imagenetv2-matched-frequency-format-val",
    "imagenet-sketch": "imagenet-sketch/images",
    "imagenet-a": "imagenet-adversarial/imagenet-a",
    "imagenet-r": "imagenet-rendition/imagenet-r",
}
OWN_FLAGS = ("--data", "--data-root", "--shots", "--split", "--seed", "--ood", "--run-dir")


def parse_args(argv=None):
    """(CoOp root, seeds, run dir, [[TrainConfig per method] per seed])."""
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--data-root", required=True, help="CoOp's dataset root (layout: data/coop.py)")
    parser.add_argument("--seeds", type=int, default=3, help="train and evaluate with seeds 1..N (the release: 3)")
    parser.add_argument("--run-dir", default="runs/xd", help="output folder")
    ours, rest = parser.parse_known_args(argv)
    fixed = [a.split("=")[0] for a in rest if a.split("=")[0] in OWN_FLAGS]
    if fixed:
        parser.error(f"{fixed[0]}: transfer.py sets it (ImageNet, 16 shots, seeds 1..N, the shifts under --data-root)")
    if ours.seeds < 1:
        parser.error(f"--seeds {ours.seeds}: expected >= 1")
    root = Path(ours.data_root)
    ood = [f"--ood={name}={root / path}" for name, path in SHIFTS.items() if (root / path).is_dir()]
    imagenet = ["--data", "imagenet", "--data-root", str(root / "imagenet" / "images"), "--shots", "16", *ood]
    xd = ["--ctx-init", "a photo of a"]  # scripts/cocoop/xd_train.sh: CoOp from vit_b16_ep50_ctxv1; flags given win
    runs = [train.parse_args([*xd, *rest, *imagenet, "--seed", str(seed)]) for seed in range(1, ours.seeds + 1)]
    if any(cfg.method == "linear-probe" for cfg in runs[0]):
        parser.error("--method linear-probe: its classifier has ImageNet's classes only, so it cannot transfer")
    return root, ours.seeds, Path(ours.run_dir), runs


@cache
def targets(root, image_size):
    """{name: TaskData} of the ten CoOp datasets found under root (read once; test sets are scored)."""
    found = {}
    for name in coop.DATASETS:
        if not (root / coop.DATASETS[name].folder).is_dir():
            print(f"{name}: not found under {root} (skipped)")
            continue
        found[name] = data.build_task(name, str(root), eval_transform=image_transform(image_size))
    return found


def run_method(cfg, device, root):
    """Train on ImageNet 16-shot (train.py's loop), export, and score ImageNet, its shifts and the
    targets under the method's evaluation weights: one row of accuracies and standard errors."""
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.run_dir) / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    model = load_clip(cfg.model, device=device)
    target_tasks = targets(root, model.config.image_size)
    task, eval_task = train.build_data(cfg, model)
    method = train.setup(cfg, model, task)
    if cfg.method != "zero-shot":
        train.fine_tune(cfg, model, method, task.train, device)
    train.export(cfg, model, method)
    name, alpha = method.rows[0]
    row = {"method": name}
    kwargs = dict(workers=cfg.workers, autocast_dtype=autocast_dtype(device))
    with method.weights(alpha):
        for target, t in [("imagenet", eval_task), *target_tasks.items()]:
            prompts = cfg.eval_prompts if target == "imagenet" else target_prompts(target, cfg.method)
            classifier = None if method.classifier_for is None else method.classifier_for(t.classnames)
            acc = evaluate.evaluate_task(model, t, classifier, templates(prompts, t.templates), **kwargs)
            sets = [t.test.name] + [s.name for s in t.ood if s.name in SHIFTS]
            row |= {k: acc[k] for s in sets for k in (s, f"{s}_se")}
    return row


def target_prompts(target, method):
    """The evaluation prompts the recipe gives `method` on `target` (its dataset template by default)."""
    return recipes.values(target, method, shots=16).get("eval_prompts", "task")


def with_means(row, targets_found):
    """Add xd_avg (the targets) and dg_avg (the shifts) with their standard errors, after ImageNet."""
    out = {"method": row["method"], "imagenet": row["imagenet"], "imagenet_se": row["imagenet_se"]}
    for avg, sets in (("xd_avg", targets_found), ("dg_avg", [s for s in SHIFTS if s in row])):
        out |= {k: row[k] for s in sets for k in (s, f"{s}_se")}
        if sets:  # disjoint test sets: the SE of the mean is the root sum of squares over n
            out[avg] = sum(row[s] for s in sets) / len(sets)
            out[f"{avg}_se"] = math.sqrt(sum(row[f"{s}_se"] ** 2 for s in sets)) / len(sets)
    return out


def over_seeds(rows):
    """One row: the mean of each accuracy over the seeds, ± its standard error over them (n >= 2)."""
    keys = [k for k in rows[0] if k != "method" and not k.endswith("_se")]
    out = {"method": rows[0]["method"]}
    for k in keys:
        values = [r[k] for r in rows]
        out[k] = sum(values) / len(values)
        if len(rows) == 1:
            out[f"{k}_se"] = rows[0][f"{k}_se"]
        else:
            var = sum((v - out[k]) ** 2 for v in values) / (len(values) - 1)
            out[f"{k}_se"] = math.sqrt(var / len(values))
    return out


def main(argv=None):
    root, seeds, out, runs = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        per_seed = {}  # method row name -> [row per seed]
        for seed, cfgs in enumerate(runs, 1):
            for cfg in cfgs:
                cfg = dataclasses.replace(cfg, run_dir=str(out / f"seed{seed}" / cfg.method))
                row = run_method(cfg, device, root)
                row = with_means(row, [t for t in coop.DATASETS if t in row])
                per_seed.setdefault(row["method"], []).append({"seed": seed, **row})
    except (data.DataError, WeightsError, OSError) as e:  # the user's input, named in the message: no traceback
        sys.exit(f"error: {e}")
    rows = [over_seeds([{k: v for k, v in r.items() if k != "seed"} for r in rs]) for rs in per_seed.values()]
    print(f"\nCross-dataset transfer and domain generalisation, mean over {seeds} seed(s):")
    print(report.format_table(rows))
    report.write_results(rows, out / "results")
    report.write_results([r for rs in per_seed.values() for r in rs], out / "seeds")
    print(f"wrote {out / 'results.csv'} and {out / 'seeds.csv'}")
    return rows


if __name__ == "__main__":
    main()

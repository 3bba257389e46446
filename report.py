"""Reporting: the results table, its files, seeds pooled, the papers' claims and the alpha-sweep plot.

The table follows R-Adapter's Table 1 layout (WiSE-FT's protocol): one row per method (and alpha), the
ID set, each OOD set and OOD avg, every accuracy with its standard error ('acc±se'); base-to-novel rows
read base, new and HM (CoCoOp), retrieval rows R@1/5/10 both ways and rsum. With several training
seeds (train.py --seeds) each accuracy is the mean over the seeds and its SE adds the seed-to-seed
spread to the image sampling (pool_seeds). report() writes results.csv/.json, the alpha sweeps and
their plot (plots.py), and on the toy jobs the papers' claims checked with paired SEs (claims.py).
The numbers themselves come from evaluate.py's protocol.
"""

import csv
import json
import math
from pathlib import Path

import torch

import claims
import plots
from data import toy


def pool_seeds(runs, sweeps):
    """The table rows and alpha sweeps of several seeds (same methods in the same order) as one table:
    each accuracy the mean over the S seeds, 'correct' the [S, n] per-seed correctness, and each SE
    sqrt(Var_i(mean_s c_i) / n + Var_s(acc_s) / S): image sampling plus the seed-to-seed spread.
    One seed passes through unchanged."""
    if len(runs) == 1:
        return runs[0], sweeps[0]
    rows = [_pool(same) for same in zip(*runs)]
    curves = {name: [_pool(same) for same in zip(*(s[name] for s in sweeps))] for name in sweeps[0]}
    return rows, curves


def _pool(rows):
    out = dict(rows[0])
    if "correct" not in out:  # retrieval: the mean of each recall
        return out | {k: sum(r[k] for r in rows) / len(rows) for k, v in out.items() if isinstance(v, float)}

    def mean_and_se(splits):  # accuracy averaged over splits (independent samples) and seeds
        per_seed, image_var = 0.0, 0.0
        for split in splits:
            c = torch.stack([r["correct"][split] for r in rows]).double()  # [S, n]
            per_seed = per_seed + 100 * c.mean(1) / len(splits)
            image_var += 100**2 * c.mean(0).var() / c.shape[1] / len(splits) ** 2
        return per_seed.mean().item(), math.sqrt(image_var + per_seed.var().item() / len(rows))

    splits = list(out["correct"])
    out["correct"] = {k: torch.stack([r["correct"][k] for r in rows]) for k in splits}
    for split in splits:
        out[split], out[f"{split}_se"] = mean_and_se([split])
    if "ood_avg" in out:  # the splits after the ID set
        out["ood_avg"], out["ood_avg_se"] = mean_and_se(splits[1:])
    if "hm" in out:
        out["hm"], out["hm_se"] = claims.harmonic_mean(out["base"], out["new"]), claims.linear(claims.hm_terms(out))[1]
    return out


def format_table(rows, header=True):
    """The paper's layout: one row per method/alpha, ID, each OOD set, OOD avg; a cell reads
    'acc±se' where the row has the set's standard error."""
    hidden = ("skipped", "correct", "run") + (("alpha",) if "method" in rows[0] else ())  # the name gives α
    keys = [k for k in rows[0] if k not in hidden and not k.endswith("_se")]

    def cell(row, k):
        v, se = row[k], row.get(f"{k}_se")
        if not isinstance(v, float):
            return str(v)
        return f"{v:.2f}" if se is None else f"{v:.2f}±{se:.2f}"

    cells = [[cell(r, k) for k in keys] for r in rows]
    widths = [max(11, len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(f"{k:>{w}}" for k, w in zip(keys, widths))] if header else []
    lines += ["  ".join(f"{c:>{w}}" for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_results(rows, stem):
    """rows -> stem.csv and stem.json (without the per-image correctness)."""
    rows = [{k: v for k, v in r.items() if k != "correct"} for r in rows]
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2))


def report(rows, curves, out, cfg, task):
    """The table (results.csv/.json), the sweeps and their plot (its OOD axis names the task's OOD sets),
    and for the toy jobs the papers' claims (claims.json)."""
    ood = [s.name for s in getattr(task, "ood", [])]
    out.mkdir(parents=True, exist_ok=True)
    print("\n" + format_table(rows))
    write_results(rows, out / "results")
    print(f"wrote {out / 'results.csv'}")
    if curves:
        plots.plot(curves, out / "alpha_sweep.png", rows, ood)
        write_results([{"method": m, **r} for m, rs in curves.items() for r in rs], out / "alpha_sweep")
        print(f"wrote {out / 'alpha_sweep.png'}")
    runs, checked = {r["run"] for r in rows}, None
    if cfg.data == "toy" and not cfg.split and {"zero-shot", "full-ft", "r-adapter"} <= runs:
        checked = claims.paper_claims(rows, curves, task.test.name, ood, cfg.alpha)
    if cfg.data in toy.NAMES and cfg.split and {"zero-shot", "coop", "clipfit"} <= runs:
        checked = claims.base_to_new_claims(rows)
    if checked:
        (out / "claims.json").write_text(json.dumps(checked, indent=2))
        print("\nThe papers' claims, checked (delta and se in points; 'within noise' when |delta| < 2 se):")
        for c in checked:
            print(f"  {c['verdict']:>12}  {c['delta']:+6.2f} ± {c['se']:.2f}  {c['claim']}")
        print(f"wrote {out / 'claims.json'}")

"""The papers' claims, checked on a results table with standard errors (the toy jobs' verdicts).

Kim et al. (ECCV 2024), Sec. 4 and Table 1: full fine-tuning raises ID accuracy and loses robustness
(OOD accuracy, most on the far shifts); R-Adapter raises ID accuracy over zero-shot while keeping more
OOD accuracy than full fine-tuning; and (Fig. 1, Sec. 4.2) its re-scaling curve over alpha lies above
WiSE-FT's. Each claim is a difference in points, `delta`, with its standard error `se`; the verdict
is 'within noise' when |delta| < 2 se, else 'holds' or 'fails' by the sign the paper expects.
The toy base-to-new job (`train.py --data toy-specialised --split base`) checks CLIPFit's (Li et al., EMNLP
2024, Table 1): CLIPFit raises the harmonic mean of base and new accuracy over zero-shot, and its
new-class accuracy is at least CoOp's, whose new-class accuracy falls below zero-shot's (CoCoOp,
Zhou et al., CVPR 2022, Sec. 1).

Paired standard errors. Every row is scored on the same test images, so a difference is computed per
image: on a split of n images, D_i = c_A,i - c_B,i (c = 1 if correct) and se = sqrt(Var(D) / n). A
mean over independent splits (OOD avg, the far shifts) has se = sqrt(sum_k se_k^2) / K. The curve
claim is linear in the correctness too: WiSE-FT interpolated at an ID value is (1 - w) c_j + w c_j+1
per image. With several training seeds (train.py --seeds), c_i is the image's mean correctness over
the seeds, and the seed-to-seed variance of the delta, divided by the number of seeds, is added.
The harmonic mean is not linear in the correctness, but HM = b dHM/db + n dHM/dn exactly (it is
homogeneous of degree 1), so with those derivatives held fixed it is, and its SE is the delta method's.

The toy segmentation job (train_seg.py --data toy-seg) checks the robustness claim on mIoU: unseen classes
and shifted styles, R-Adapter against full fine-tuning. mIoU is not a mean over images, so its paired SE is
the bootstrap's: both rows' mIoU on each resampling of the same images (bootstrap_se); with several
training seeds (train_seg.py --seeds), the seed-mean mIoU on each resampling, plus the seeds' spread.
"""

import math

import numpy as np
import torch

FAR_SHIFTS = ("toy-sketch", "toy-r", "toy-a")  # the toy world's far shifts (ImageNet-Sketch, -R, -A)


def verdict(delta, se, expected):
    """'within noise' when |delta| < 2 se (or delta is 0, which has no sign: two identical rows), else
    whether the sign of delta is the `expected` one (+1 / -1)."""
    if delta == 0 or abs(delta) < 2 * se:
        return "within noise"
    return "holds" if delta * expected > 0 else "fails"


def claim(text, delta, se, expected):
    return {"claim": text, "delta": round(delta, 2), "se": round(se, 2), "verdict": verdict(delta, se, expected)}


def correct(row, split):
    """[S, n] per-seed, per-image correctness (0/1) of a row on a split (S = 1 for a single run)."""
    return np.atleast_2d(np.asarray(row["correct"][split], dtype=np.float64))


def linear(terms):
    """delta (points) and its paired SE of sum_t weight_t * accuracy(row_t on split_t).

    terms: [(weight, row, split)]. Per split the per-image combination D = sum_t weight_t c_t
    ([S, n]) gives its part of the delta per seed, mean_i D[s]; the SE adds the image-sampling
    variance of the seed-mean, Var_i(mean_s D) / n, over the splits (independent samples) and the
    seed-to-seed variance of the whole delta divided by S."""
    per_seed, image_var = 0.0, 0.0
    for split in dict.fromkeys(s for _, _, s in terms):
        D = sum(w * correct(row, split) for w, row, s in terms if s == split)  # [S, n]
        per_seed = per_seed + D.mean(axis=1)  # [S]
        image_var += D.mean(axis=0).var(ddof=1) / D.shape[1]
    seed_var = per_seed.var(ddof=1) / len(per_seed) if len(per_seed) > 1 else 0.0
    return 100 * per_seed.mean(), 100 * float(np.sqrt(image_var + seed_var))


def paired(terms, splits):
    """delta (points) and its paired SE of sum_t weight_t * accuracy(row_t), averaged over `splits`;
    terms: [(weight, row)], a difference A - B is [(1, A), (-1, B)]."""
    return linear([(w / len(splits), row, split) for split in splits for w, row in terms])


def harmonic_mean(base, new):
    """HM = 2 * base * new / (base + new); 0 when both are 0 (CoCoOp's base-to-novel summary)."""
    return 2 * base * new / (base + new) if base + new else 0.0


def hm_terms(row, sign=1):
    """The harmonic mean HM = 2 b n / (b + n) of a row's base and new accuracy as linear() terms.
    HM is homogeneous of degree 1, so HM = b dHM/db + n dHM/dn exactly, with dHM/db = 2 n^2 / (b + n)^2
    and dHM/dn = 2 b^2 / (b + n)^2 at the row's b, n: linear() of these terms is HM itself, and its SE
    the delta method's (the weights held fixed); sign -1 subtracts the row's HM."""
    b, n = row["base"], row["new"]
    scale = sign * 2 / (b + n) ** 2 if b + n else 0.0
    return [(scale * n**2, row, "base"), (scale * b**2, row, "new")]


def curve_gap(curve, reference, id_key, ood_splits):
    """How far `curve` lies above `reference` at matched ID: the mean, over curve's points with
    alpha > 0, of its OOD avg minus the reference's OOD avg at the same ID, the reference linearly
    interpolated along its points sorted by ID (clamped at its ends). Returns (delta, paired se)."""
    ref = sorted(reference, key=lambda r: r[id_key])
    xs = [r[id_key] for r in ref]
    points = [r for r in curve if r["alpha"] > 0]
    terms = []
    for r in points:
        j = int(np.clip(np.searchsorted(xs, r[id_key]) - 1, 0, len(xs) - 2))
        w = float(np.clip((r[id_key] - xs[j]) / (xs[j + 1] - xs[j]), 0, 1)) if xs[j + 1] > xs[j] else 0.0
        terms += [(1, r), (-(1 - w), ref[j]), (-w, ref[j + 1])]
    return paired([(weight / len(points), row) for weight, row in terms], ood_splits)


def find(rows, run, alpha=None):
    """The row of method `run` (its --method) evaluated at `alpha` (None: the plain model)."""
    return next(r for r in rows if r["run"] == run and r.get("alpha") == alpha)


def paper_claims(rows, curves, id_key, ood_splits, alpha=0.5):
    """The R-Adapter paper's claims (Sec. 4, Table 1 and Fig. 1), checked on a table with zero-shot,
    full-ft and R-Adapter rows and the alpha sweeps of R-Adapter and WiSE-FT. delta is in points."""
    zs, ft, ra = find(rows, "zero-shot"), find(rows, "full-ft", 1.0), find(rows, "r-adapter", alpha)
    far = [k for k in FAR_SHIFTS if k in ood_splits]
    out = [
        claim(
            "full fine-tuning raises ID accuracy over zero-shot (full-ft - zero-shot, expected > 0)",
            *paired([(1, ft), (-1, zs)], [id_key]),
            +1,
        ),
        claim(
            "full fine-tuning lowers OOD avg (full-ft - zero-shot, expected < 0)",
            *paired([(1, ft), (-1, zs)], ood_splits),
            -1,
        ),
        claim(
            f"full fine-tuning lowers accuracy on the far shifts, mean of {', '.join(far)} "
            "(full-ft - zero-shot, expected < 0)",
            *paired([(1, ft), (-1, zs)], far),
            -1,
        ),
        claim(
            f"R-Adapter (α={alpha:g}, merged EMA) raises ID accuracy over zero-shot "
            "(R-Adapter - zero-shot, expected > 0)",
            *paired([(1, ra), (-1, zs)], [id_key]),
            +1,
        ),
        claim(
            f"R-Adapter (α={alpha:g}) keeps more OOD accuracy than full fine-tuning "
            "(R-Adapter - full-ft OOD avg, expected > 0)",
            *paired([(1, ra), (-1, ft)], ood_splits),
            +1,
        ),
    ]
    if "R-Adapter" in curves and "WiSE-FT" in curves:
        out.append(
            claim(
                "R-Adapter's α curve lies above WiSE-FT's at matched ID (mean OOD-avg gap over "
                "R-Adapter's α > 0 points, WiSE-FT interpolated at the same ID; expected > 0)",
                *curve_gap(curves["R-Adapter"], curves["WiSE-FT"], id_key, ood_splits),
                +1,
            )
        )
    return out


def base_to_new_claims(rows):
    """CLIPFit's base-to-new claims (Li et al., EMNLP 2024, Table 1) and the trade-off that CoCoOp
    (Zhou et al., CVPR 2022, Sec. 1 and Table 1) reports of CoOp, on a table with zero-shot, CoOp and
    CLIPFit rows; each delta paired over the same base and new test images."""
    zs, coop, fit = find(rows, "zero-shot"), find(rows, "coop"), find(rows, "clipfit")
    return [
        claim(
            "CLIPFit raises the harmonic mean over zero-shot (CLIPFit - zero-shot HM, expected > 0)",
            *linear(hm_terms(fit) + hm_terms(zs, -1)),
            +1,
        ),
        claim(
            "CLIPFit's new-class accuracy is at least CoOp's (CLIPFit - CoOp new, expected >= 0)",
            *paired([(1, fit), (-1, coop)], ["new"]),
            +1,
        ),
        claim(
            "CoOp's new-class accuracy falls below zero-shot's (CoOp - zero-shot new, expected < 0)",
            *paired([(1, coop), (-1, zs)], ["new"]),
            -1,
        ),
    ]


def bootstrap_se(counts, classes=None, samples=1000, seed=0, baseline=None, *, miou):
    """Standard error of miou over images: its spread over `samples` resamplings of the images (with
    replacement). counts: [N, 3, C], one row per image, or [S, N, 3, C] from S training seeds on the same
    images; miou(summed counts [..., 3, C], classes) -> [...] (data/segmentation.miou). With baseline
    (another model's counts on the same images), the paired SE of the difference miou(counts) -
    miou(baseline), both on each resampling. With seeds, the value is the mean over the seeds, and its
    SE adds the seed-to-seed variance over S to the images' (as report.pool_seeds does for accuracy)."""
    counts = counts if counts.dim() == 4 else counts[None]  # [S, N, 3, C]
    baseline = None if baseline is None else baseline if baseline.dim() == 4 else baseline[None]
    n = counts.shape[1]
    picks = torch.randint(n, (samples, n), generator=torch.Generator().manual_seed(seed))
    times = torch.zeros(samples, n, dtype=torch.float64).scatter_add_(
        1, picks, torch.ones(samples, n, dtype=torch.float64)
    )  # [samples, N]: how often each image is drawn
    resampled = lambda c: miou(torch.einsum("tn,snkc->stkc", times, c.double()), classes).mean(0)  # [samples]
    values = resampled(counts) - (0 if baseline is None else resampled(baseline))  # [samples]
    image_se = values[~values.isnan()].std().item()  # a resampling in which no class is present has no mIoU
    per_seed = miou(counts.double().sum(1), classes)  # [S]
    if baseline is not None:
        per_seed = per_seed - miou(baseline.double().sum(1), classes)
    seed_se = (per_seed.var().item() / len(per_seed)) ** 0.5 if len(per_seed) > 1 else 0.0
    return math.hypot(image_se, seed_se)


def toy_seg_claims(rows, alpha=0.5, *, tests, unseen, miou):
    """R-Adapter keeps more than full fine-tuning (Sec. 4), on the toy scenes' table rows (train_seg.run: each
    with its per-image counts): unseen-class mIoU of the photo test scenes, and the mean over the shifted
    styles. tests: the test sets (toy_scenes.TESTS, 'toy-photo' and the shifted styles), unseen: the unseen
    classes (toy_scenes.UNSEEN), miou: data/segmentation.miou. Each delta has the paired bootstrap SE over
    the same images (with seeds, counts [S, N, 3, C]: the seed-to-seed spread of the delta added); a mean
    over the independent sets has sqrt(sum se^2) / K."""
    ra, ft = (next(r for r in rows if r["run"] == m) for m in ("r-adapter", "full"))

    def delta(test_set, column, classes=None):
        se = bootstrap_se(ra["counts"][test_set], classes, baseline=ft["counts"][test_set], miou=miou)
        return ra[column] - ft[column], se

    shifts = [delta(name, name) for name in tests if name != "toy-photo"]
    shifted = sum(d for d, _ in shifts) / len(shifts), math.sqrt(sum(se**2 for _, se in shifts)) / len(shifts)
    names = ", ".join(name for name in tests if name != "toy-photo")
    return [
        claim(
            f"R-Adapter (α={alpha:g}) keeps more unseen-class mIoU than full fine-tuning "
            "(R-Adapter - full on toy-photo's unseen classes, expected > 0)",
            *delta("toy-photo", "unseen", unseen),
            +1,
        ),
        claim(
            f"R-Adapter (α={alpha:g}) keeps more mIoU on the shifted styles than full fine-tuning "
            f"(R-Adapter - full, mean of {names}, expected > 0)",
            *shifted,
            +1,
        ),
    ]

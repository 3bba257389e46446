"""The R-Adapter paper's claims, checked on a results table with standard errors (the toy job's verdict).

Kim et al. (ECCV 2024), Sec. 4 and Table 1: full fine-tuning raises ID accuracy and loses robustness
(OOD accuracy, most on the far shifts); R-Adapter raises ID accuracy over zero-shot while keeping more
OOD accuracy than full fine-tuning; and (Fig. 1, Sec. 4.2) its re-scaling curve over alpha lies above
WiSE-FT's. Each claim is a difference in points, `delta`, with its standard error `se`; the verdict
is 'within noise' when |delta| < 2 se, else 'holds' or 'fails' by the sign the paper expects.

Standard errors: one accuracy on n images has se = sqrt(p (1 - p) / n) (evaluate.standard_error); a
mean over disjoint test sets has the root sum of squares over k. A difference of two models scored
on the same images takes the root sum of squares of theirs, which overstates its SE (the two are
positively correlated), so a claim called 'within noise' may in fact hold.
"""

import math

import numpy as np

FAR_SHIFTS = ("toy-sketch", "toy-r", "toy-a")  # the toy world's far shifts (ImageNet-Sketch, -R, -A)


def verdict(delta, se, expected):
    """'within noise' when |delta| < 2 se, else whether the sign of delta is the `expected` one (+1 / -1)."""
    if abs(delta) < 2 * se:
        return "within noise"
    return "holds" if delta * expected > 0 else "fails"


def claim(text, delta, se, expected):
    return {"claim": text, "delta": round(delta, 2), "se": round(se, 2), "verdict": verdict(delta, se, expected)}


def difference(a, b, key):
    """a[key] - b[key] and its standard error. Both are scored on the same images, so the errors are
    positively correlated and the root sum of squares is an upper bound on the SE of the difference."""
    return a[key] - b[key], math.hypot(a[f"{key}_se"], b[f"{key}_se"])


def far_shift_mean(row):
    """Mean accuracy over FAR_SHIFTS and its SE (disjoint sets: root sum of squares / k)."""
    acc = sum(row[k] for k in FAR_SHIFTS) / len(FAR_SHIFTS)
    return {"far": acc, "far_se": math.sqrt(sum(row[f"{k}_se"] ** 2 for k in FAR_SHIFTS)) / len(FAR_SHIFTS)}


def curve_gap(curve, reference, id_key):
    """How far `curve` lies above `reference` at matched ID: the mean, over curve's points with
    alpha > 0, of its OOD avg minus the reference's OOD avg at the same ID (linear interpolation
    along the reference sorted by ID, clamped at its ends); the SE is the mean of the two points'
    root-sum-of-squares OOD-avg SEs."""
    ref = sorted(reference, key=lambda r: r[id_key])
    xs, ys, ses = [r[id_key] for r in ref], [r["ood_avg"] for r in ref], [r["ood_avg_se"] for r in ref]
    points = [r for r in curve if r["alpha"] > 0]
    gaps = [r["ood_avg"] - float(np.interp(r[id_key], xs, ys)) for r in points]
    se = [math.hypot(r["ood_avg_se"], float(np.interp(r[id_key], xs, ses))) for r in points]
    return sum(gaps) / len(gaps), sum(se) / len(se)


def paper_claims(rows, curves, id_key, alpha=0.5):
    """The R-Adapter paper's claims (Sec. 4, Table 1 and Fig. 1), checked on a table with zero-shot,
    full-ft and R-Adapter rows and the alpha sweeps of R-Adapter and WiSE-FT. delta is in points."""
    by = {r["method"]: r for r in rows}
    zs, ft, ra = by["zero-shot"], by["full-ft"], by[f"R-Adapter (α={alpha:g})"]
    out = [
        claim(
            "full fine-tuning raises ID accuracy over zero-shot (full-ft - zero-shot, expected > 0)",
            *difference(ft, zs, id_key),
            +1,
        ),
        claim(
            "full fine-tuning lowers OOD avg (full-ft - zero-shot, expected < 0)", *difference(ft, zs, "ood_avg"), -1
        ),
        claim(
            f"full fine-tuning lowers accuracy on the far shifts, mean of {', '.join(FAR_SHIFTS)} "
            "(full-ft - zero-shot, expected < 0)",
            *difference(far_shift_mean(ft), far_shift_mean(zs), "far"),
            -1,
        ),
        claim(
            f"R-Adapter (α={alpha:g}, merged EMA) raises ID accuracy over zero-shot "
            "(R-Adapter - zero-shot, expected > 0)",
            *difference(ra, zs, id_key),
            +1,
        ),
        claim(
            f"R-Adapter (α={alpha:g}) keeps more OOD accuracy than full fine-tuning "
            "(R-Adapter - full-ft OOD avg, expected > 0)",
            *difference(ra, ft, "ood_avg"),
            +1,
        ),
    ]
    if "R-Adapter" in curves and "WiSE-FT" in curves:
        out.append(
            claim(
                "R-Adapter's α curve lies above WiSE-FT's at matched ID (mean OOD-avg gap over "
                "R-Adapter's α > 0 points, WiSE-FT interpolated at the same ID; expected > 0)",
                *curve_gap(curves["R-Adapter"], curves["WiSE-FT"], id_key),
                +1,
            )
        )
    return out

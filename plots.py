"""The alpha-sweep plot (R-Adapter Fig. 1 and Sec. 4.2; WiSE-FT Fig. 1): each method's curve over the
re-scaling coefficient alpha, ID accuracy against OOD avg (classification), base against new
(base-to-novel), or one retrieval test set's rsum against another's, with 1-SE bands, the shared
zero-shot point (alpha = 0) marked once, and alpha labels placed so that they do not collide.
"""

import numpy as np


def plot(curves, path, rows, ood=()):
    """The sweeps as curves over alpha: ID vs OOD avg (classification; ood: the names of the sets it
    averages), base vs new (base-to-novel), and for retrieval the first test set's rsum against the
    second's (or against alpha)."""
    keys = [k for k in rows[0] if k not in ("method", "run", "trainable", "alpha")]
    if "rsum" not in keys:
        if "hm" in keys:
            return plot_curves(curves, path, "base", "new", "base classes accuracy (%)", "new classes accuracy (%)")
        ylabel = f"OOD accuracy (%): mean of\n{', '.join(ood)}" if ood else "OOD avg accuracy (%)"
        return plot_curves(curves, path, keys[0], "ood_avg", f"ID accuracy (%): {keys[0]}", ylabel)
    tests = list(dict.fromkeys(r["test"] for rs in curves.values() for r in rs))
    alphas = {m: dict.fromkeys(r["alpha"] for r in rs) for m, rs in curves.items()}
    points = {
        m: [{"alpha": a, **{r["test"]: r["rsum"] for r in rs if r["alpha"] == a}} for a in alphas[m]]
        for m, rs in curves.items()
    }
    if len(tests) == 2:
        plot_curves(points, path, tests[0], tests[1], f"{tests[0]} rsum", f"{tests[1]} rsum")
    else:
        plot_curves(points, path, "alpha", tests[0], "α", f"{tests[0]} rsum")


def plot_curves(curves, path, x, y, xlabel, ylabel):
    """r[y] against r[x] over alpha, one curve per method (curves: {method: rows with 'alpha', x, y}).
    alpha = 0 is the zero-shot model of every curve: one legend entry. Where a row has '<x>_se' and
    '<y>_se', a shaded region covers each point's 1-SE ellipse, so clustered points stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import PathPatch
    from matplotlib.path import Path as Shape

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    labels, zero_shot = [], []
    for name, rows in curves.items():
        (line,) = ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", ms=3, lw=1.2, label=name)
        color = line.get_color()
        if f"{x}_se" in rows[0] and f"{y}_se" in rows[0]:  # one compound path: overlaps are shaded once
            circle = Shape.unit_circle()
            ellipses = [Shape(circle.vertices * se + xy, circle.codes) for xy, se in zip(*along(rows, [x, y], 2))]
            ax.add_patch(PathPatch(Shape.make_compound_path(*ellipses), fc=color, ec="none", alpha=0.15))
        zero_shot += [(r[x], r[y]) for r in rows if r["alpha"] == 0]
        labels += [(f"α={r['alpha']:g}", (r[x], r[y]), color) for r in rows if r["alpha"] in (0.5, 1)]
    if zero_shot:
        ax.plot(*zip(*zero_shot), "k*", ms=12, ls="none", label="zero-shot (α=0 of every curve)", zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    shaded = "; shaded: ±1 SE" if any(f"{y}_se" in rows[0] for rows in curves.values()) else ""
    ax.set_title(f"Re-scaling coefficient α from 0 (zero-shot) to 1 (fine-tuned){shaded}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncols=3, frameon=False)  # off the data
    fig.tight_layout()
    lines = np.concatenate([along(rows, [x, y], 0)[0] for rows in curves.values()])  # [P, 2] on every curve
    place_labels(ax, labels, ax.transData.transform(lines))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def along(rows, keys, n_se, steps=8):
    """Points along a curve, `steps` per segment: rows' keys and, for n_se keys, their '<key>_se'
    interpolated -> ([P, len(keys)] values, [P, n_se] standard errors)."""
    v = np.array([[r[k] for k in keys] + [r[f"{k}_se"] for k in keys[:n_se]] for r in rows])  # [N, K + n_se]
    t = np.linspace(0, 1, steps, endpoint=False)[:, None]
    dense = np.concatenate([a + t * (b - a) for a, b in zip(v[:-1], v[1:])] + [v[-1:]])
    return dense[:, : len(keys)], dense[:, len(keys) :]


def place_labels(ax, labels, points):
    """Each (text, xy, color) at the first nearby offset whose box meets no earlier label, no point of a
    curve (points: display coordinates) and not the legend, with a thin line back to its point."""
    from matplotlib.text import Text

    renderer = ax.figure.canvas.get_renderer()
    offsets = [(8, 8), (8, -16), (-40, 8), (-40, -16), (14, 26), (14, -34), (-46, 26), (-46, -34), (40, 0), (-70, 0)]
    taken = [ax.get_legend().get_window_extent(renderer)]
    for text, xy, color in labels:
        for dx, dy in offsets:
            arrow = dict(arrowstyle="-", color=color, lw=0.6, shrinkA=0, shrinkB=3)
            note = ax.annotate(text, xy, (dx, dy), textcoords="offset points", size=8, color=color, arrowprops=arrow)
            note.update_positions(renderer)
            box = Text.get_window_extent(note, renderer).padded(5)  # the text alone, not its line
            if any(box.overlaps(b) for b in taken) or any(box.contains(*p) for p in points):
                if (dx, dy) != offsets[-1]:
                    note.remove()
                    continue
            taken.append(box)
            break


def plot_segmentations(scenes, classnames, path, ignore=-1):
    """One row per scene: the image, its labels and each method's prediction, coloured by class (the legend
    names them; unlabelled pixels are black in the labels and grey in the predictions). scenes: [{title,
    image [H, W, 3] uint8, label [H, W], predictions {method: [H, W]}}]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    tab10 = [c for i, c in enumerate(plt.get_cmap("tab10").colors) if i != 7]  # no grey: it marks unlabelled
    colours = (tab10 + ["navy", "gold", "lime", "darkred", "teal", "violet"])[: len(classnames)]
    cmap = ListedColormap(["black", "0.85", *colours])  # index 0: unlabelled in labels, 1: in predictions
    methods = list(scenes[0]["predictions"])
    fig, axes = plt.subplots(len(scenes), 2 + len(methods), figsize=(1.9 * (2 + len(methods)), 2.0 * len(scenes)))
    axes = np.atleast_2d(axes)
    for row, scene in zip(axes, scenes):
        unlabelled = scene["label"] == ignore
        panels = [("image", None), ("labels", np.where(unlabelled, 0, scene["label"] + 2))]
        panels += [(m, np.where(unlabelled, 1, p + 2)) for m, p in scene["predictions"].items()]
        for ax, (name, classes) in zip(row, panels):
            ax.imshow(
                scene["image"] if classes is None else classes,
                cmap=cmap,
                vmin=0,
                vmax=len(classnames) + 1,
                interpolation="nearest",
            )
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(name, fontsize=8)
        row[0].set_ylabel(scene["title"], fontsize=8)
    handles = [Patch(color=c, label=n) for c, n in zip(colours, classnames)]
    handles += [Patch(color="black", label="unlabelled"), Patch(color="0.85", label="unlabelled (not scored)")]
    fig.legend(handles=handles, loc="lower center", ncol=7, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_captioned(images, captions, path, columns=4):
    """A grid of images (uint8 [N, H, W, 3]), each under its caption, wrapped to the panel's width."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.3 * columns, 2.7 * rows))
    for ax in np.ravel(axes):
        ax.axis("off")
    for ax, image, caption in zip(np.ravel(axes), images, captions):
        ax.imshow(image, interpolation="nearest")
        ax.set_title(textwrap.fill(caption, 26), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Standard errors (evaluate.py) and the claim verdicts of the default job (claims.py)."""

import math

import pytest
import torch

import claims
import evaluate
from data import EvalSet, TaskData


def test_standard_error_arithmetic():
    assert evaluate.standard_error(50.0, 2500) == pytest.approx(1.0)
    assert evaluate.standard_error(90.0, 900) == pytest.approx(1.0)  # sqrt(0.9 * 0.1 / 900) = 1%
    assert evaluate.standard_error(100.0, 10) == 0.0
    assert evaluate.standard_error(60.0, 2400) < evaluate.standard_error(60.0, 600)


class _Images(torch.utils.data.Dataset):
    def __init__(self, n, label):
        self.n, self.label = n, label

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return torch.full((2,), float(i)), self.label


class _Model(torch.nn.Module):
    """Predicts class 0 for the first `hit` images (by their value), class 1 after."""

    def __init__(self, hit):
        super().__init__()
        self.hit, self.w = hit, torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, x, normalize=False):
        return torch.stack([(x[:, 0] < self.hit).float(), (x[:, 0] >= self.hit).float()], 1)


def test_evaluate_task_reports_se_per_set_and_for_the_ood_mean():
    task = TaskData(
        ["a", "b"],
        ["{}"],
        None,
        EvalSet("id", _Images(40, 0)),
        [EvalSet("o1", _Images(10, 0)), EvalSet("o2", _Images(40, 0))],
    )
    r = evaluate.evaluate_task(_Model(hit=4), task, classifier=torch.eye(2), workers=0)
    assert (r["id"], r["o1"], r["o2"]) == (10.0, 40.0, 10.0)
    assert r["id_se"] == pytest.approx(100 * math.sqrt(0.1 * 0.9 / 40))
    assert r["o1_se"] == pytest.approx(100 * math.sqrt(0.4 * 0.6 / 10))
    assert r["ood_avg"] == 25.0
    assert r["ood_avg_se"] == pytest.approx(math.hypot(r["o1_se"], r["o2_se"]) / 2)


def _row(method, photo, ood, se=0.5, **far):
    row = {"method": method, "toy-photo": photo, "toy-photo_se": se, "ood_avg": ood, "ood_avg_se": se}
    for k in claims.FAR_SHIFTS:
        row[k], row[f"{k}_se"] = far.get(k, ood), se
    return row


@pytest.mark.parametrize(
    "delta, se, expected, verdict",
    [
        (3.0, 1.0, +1, "holds"),
        (-3.0, 1.0, +1, "fails"),
        (1.9, 1.0, +1, "within noise"),
        (-3.0, 1.0, -1, "holds"),
        (3.0, 1.0, -1, "fails"),
        (-1.9, 1.0, -1, "within noise"),
        (2.0, 1.0, +1, "holds"),
    ],
)
def test_verdict_rule(delta, se, expected, verdict):
    assert claims.verdict(delta, se, expected) == verdict


def _curve(points, se=0.5):
    return [{"alpha": a, "toy-photo": x, "ood_avg": y, "ood_avg_se": se} for a, x, y in points]


@pytest.mark.parametrize(
    "ft_ood, ra_ood, verdicts",
    [
        (40.0, 48.0, ["holds", "holds", "holds", "holds", "holds", "holds"]),  # the paper's story
        (55.0, 46.0, ["holds", "fails", "fails", "holds", "fails", "fails"]),  # fine-tuning helps OOD
        (49.5, 50.2, ["holds", "within noise", "within noise", "holds", "within noise", "within noise"]),
    ],
)
def test_paper_claims_on_hand_made_results(ft_ood, ra_ood, verdicts):
    rows = [_row("zero-shot", 50.0, 50.0), _row("full-ft", 65.0, ft_ood), _row("R-Adapter (α=0.5)", 60.0, ra_ood)]
    curves = {
        "WiSE-FT": _curve([(0, 50.0, 50.0), (0.5, 60.0, (50.0 + ft_ood) / 2 + 1), (1, 65.0, ft_ood)]),
        "R-Adapter": _curve([(0, 50.0, 50.0), (0.5, 60.0, ra_ood), (1, 62.0, ra_ood)]),
    }
    checked = claims.paper_claims(rows, curves, "toy-photo")
    assert [c["verdict"] for c in checked] == verdicts
    assert checked[0]["delta"] == 15.0 and checked[0]["se"] == pytest.approx(math.hypot(0.5, 0.5), abs=0.01)
    assert checked[1]["delta"] == pytest.approx(ft_ood - 50.0)
    assert checked[4]["delta"] == pytest.approx(ra_ood - ft_ood)


def drawn_plot(monkeypatch, tmp_path, curves, ood):
    """evaluate.plot's figure, kept after it is saved and closed, and a renderer for it."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kept, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        kept.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    table = [{"method": "zero-shot", "trainable": 0, "toy-photo": 50.0, **dict.fromkeys(ood, 40.0), "ood_avg": 40.0}]
    evaluate.plot(curves, tmp_path / "alpha_sweep.png", table, ood)
    assert (tmp_path / "alpha_sweep.png").stat().st_size > 1000
    return kept[0], FigureCanvasAgg(kept[0]).get_renderer()


def test_alpha_plot_reads_when_points_cluster(monkeypatch, tmp_path):
    """Two curves bunched within a third of one SE: the alpha labels collide neither with each other
    nor with a point, the shared zero-shot point has a legend entry, and the axes name the splits."""
    from matplotlib.text import Text

    def curve(dx, dy):
        return [
            {"alpha": a, "toy-photo": 50 + dx * a, "ood_avg": 40 + dy * a, "toy-photo_se": 0.9, "ood_avg_se": 0.4}
            for a in evaluate.ALPHAS
        ]

    curves = {"WiSE-FT": curve(0.3, 0.1), "R-Adapter": curve(-0.2, 0.2)}
    ood = ["toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c"]
    fig, renderer = drawn_plot(monkeypatch, tmp_path, curves, ood)
    (ax,) = fig.axes
    for t in ax.texts:
        t.update_positions(renderer)
    boxes = [Text.get_window_extent(t, renderer) for t in ax.texts]  # the text, without its leader line
    assert sorted(t.get_text() for t in ax.texts) == ["α=0.5", "α=0.5", "α=1", "α=1"]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    points = ax.transData.transform([(r["toy-photo"], r["ood_avg"]) for rows in curves.values() for r in rows])
    assert not any(box.contains(*p) for box in boxes for p in points)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend == ["WiSE-FT", "R-Adapter", "zero-shot (α=0 of every curve)"]
    assert all(name in ax.get_ylabel() for name in ood) and "toy-photo" in ax.get_xlabel()


def test_help_examples_keep_their_line_continuation():
    assert "adapters.safetensors \\\n        --data imagenet" in evaluate.__doc__

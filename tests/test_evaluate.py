"""Standard errors (evaluate.py) and the claim verdicts of the default job (claims.py)."""

import math

import pytest
import torch

import claims
import evaluate
import plots
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


ID, OOD = "toy-photo", ["toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c"]


def _correct(acc, n=400, seed=0):
    """A [n] 0/1 vector with exactly acc % ones, in a seeded random order."""
    c = torch.zeros(n, dtype=torch.bool)
    c[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round(acc * n / 100)]] = True
    return c


def _row(run, photo, ood, alpha=None, seed=0, **splits):
    correct = {ID: _correct(photo, seed=seed)}
    correct |= {k: _correct(splits.get(k.replace("-", "_"), ood), seed=seed + i + 1) for i, k in enumerate(OOD)}
    return {"run": run, "alpha": alpha, "correct": correct}


def test_paired_se_by_hand():
    """D = c_A - c_B per image: A = [1,1,0,0], B = [1,0,1,0] -> D = [0,1,-1,0], Var(D) = 2/3, se = sqrt(2/3 / 4)."""
    a = {"correct": {"x": torch.tensor([1, 1, 0, 0])}}
    b = {"correct": {"x": torch.tensor([1, 0, 1, 0])}}
    delta, se = claims.paired([(1, a), (-1, b)], ["x"])
    assert delta == 0.0 and se == pytest.approx(100 * math.sqrt(2 / 3 / 4))
    # identical rows: a difference of exactly 0 with SE 0 (unpaired errors would give 2 x 25 points)
    assert claims.paired([(1, a), (-1, a)], ["x"]) == (0.0, 0.0)
    # two independent splits: the mean of the deltas, se = sqrt(se_1^2 + se_2^2) / 2
    a2 = {"correct": {"x": a["correct"]["x"], "y": torch.tensor([1, 1, 1, 0])}}
    b2 = {"correct": {"x": b["correct"]["x"], "y": torch.tensor([0, 0, 1, 0])}}
    delta, se = claims.paired([(1, a2), (-1, b2)], ["x", "y"])
    se_y = 100 * math.sqrt(torch.tensor([1.0, 1, 0, 0]).var().item() / 4)
    assert delta == pytest.approx(25.0) and se == pytest.approx(math.hypot(100 * math.sqrt(2 / 3 / 4), se_y) / 2)


def test_paired_se_adds_the_seed_spread():
    """Two seeds: per-seed deltas 50 and 0 (mean 25); image term from the seed-mean D, seed term Var_s / S."""
    a = {"correct": {"x": torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])}}
    b = {"correct": {"x": torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]])}}
    delta, se = claims.paired([(1, a), (-1, b)], ["x"])
    mean_d = torch.tensor([0.5, 0.5, 0.0, 0.0])  # per image, over the seeds
    image_var = mean_d.var().item() / 4
    seed_var = torch.tensor([0.5, 0.0]).var().item() / 2
    assert delta == pytest.approx(25.0) and se == pytest.approx(100 * math.sqrt(image_var + seed_var))


def test_harmonic_mean_and_its_se_by_hand():
    """Base [1,1,0,0] (50%), new [1,1,1,0] (75%): HM = 2 * 50 * 75 / 125 = 60; dHM/db = 2 * 75^2 / 125^2
    = 0.72, dHM/dn = 2 * 50^2 / 125^2 = 0.32; se = sqrt(0.72^2 Var(c_b) / 4 + 0.32^2 Var(c_n) / 4)."""
    a = {"base": 50.0, "new": 75.0, "correct": {"base": torch.tensor([1, 1, 0, 0]), "new": torch.tensor([1, 1, 1, 0])}}
    hm, se = claims.linear(claims.hm_terms(a))
    var_b, var_n = 1 / 3, 1 / 4  # unbiased sample variances of the two 0/1 vectors
    assert hm == pytest.approx(60.0) and hm == pytest.approx(claims.harmonic_mean(50.0, 75.0))
    assert se == pytest.approx(100 * math.sqrt(0.72**2 * var_b / 4 + 0.32**2 * var_n / 4))
    # B on the same images: base [1,0,0,0] (25%), new as A's: HM 37.5, dHM/db = 2 * 75^2 / 100^2 = 1.125,
    # dHM/dn = 2 * 25^2 / 100^2 = 0.125. The difference is paired per image, split by split.
    b = {"base": 25.0, "new": 75.0, "correct": {"base": torch.tensor([1, 0, 0, 0]), "new": torch.tensor([1, 1, 1, 0])}}
    delta, se = claims.linear(claims.hm_terms(a) + claims.hm_terms(b, -1))
    d_base = 0.72 * torch.tensor([1.0, 1, 0, 0]) - 1.125 * torch.tensor([1.0, 0, 0, 0])
    d_new = (0.32 - 0.125) * torch.tensor([1.0, 1, 1, 0])
    assert delta == pytest.approx(60.0 - 37.5)
    assert se == pytest.approx(100 * math.sqrt(d_base.var().item() / 4 + d_new.var().item() / 4))
    assert claims.linear(claims.hm_terms(a) + claims.hm_terms(a, -1)) == (0.0, 0.0)  # a row against itself


def _b2n_row(run, base, new, seed):
    return {"run": run, "alpha": None, "base": base, "new": new} | {
        "correct": {"base": _correct(base, seed=seed), "new": _correct(new, seed=seed + 1)}
    }


@pytest.mark.parametrize(
    "coop_new, fit, verdicts",
    [
        (60.0, (75.0, 78.0), ["holds", "holds", "holds"]),  # CLIPFit's story
        (90.0, (40.0, 79.0), ["fails", "fails", "fails"]),  # CoOp generalises, CLIPFit loses base accuracy
    ],
)
def test_base_to_new_claims_on_hand_made_results(coop_new, fit, verdicts):
    rows = [
        _b2n_row("zero-shot", 50.0, 80.0, seed=100),
        _b2n_row("coop", 80.0, coop_new, seed=200),
        _b2n_row("clipfit", *fit, seed=300),
    ]
    checked = claims.base_to_new_claims(rows)
    assert [c["verdict"] for c in checked] == verdicts
    hm_zs, hm_fit = 2 * 50 * 80 / 130, 2 * fit[0] * fit[1] / sum(fit)
    assert checked[0]["delta"] == pytest.approx(hm_fit - hm_zs, abs=0.005)
    assert checked[1]["delta"] == pytest.approx(fit[1] - coop_new)
    assert checked[2]["delta"] == pytest.approx(coop_new - 80.0)


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
        (1.97, 1.0, +1, "within noise"),  # between 1.96 and 2 SE: the threshold is 2 SE, not 1.96
        (-1.99, 1.0, -1, "within noise"),
        (3.94, 2.0, +1, "within noise"),
        (-0.197, 0.1, -1, "within noise"),
        (0.0, 0.0, +1, "within noise"),  # identical rows: no sign to hold or fail
    ],
)
def test_verdict_rule(delta, se, expected, verdict):
    assert claims.verdict(delta, se, expected) == verdict
    assert claims.claim("a claim", delta, se, expected)["verdict"] == verdict


def test_curve_gap_on_hand_made_curves_leaves_out_alpha_0():
    """The mean over R-Adapter's alpha > 0 points of its OOD avg minus WiSE-FT's at the same ID, WiSE-FT
    interpolated along ID (given out of order here) and clamped at its ends."""
    wise_ft = _curve("full-ft", [(1, 70.0, 46.0), (0, 50.0, 50.0), (0.5, 60.0, 54.0)], 0)
    r_adapter = _curve(
        "r-adapter",
        [
            (0, 50.0, 47.0),  # gap -3 (WiSE-FT at ID 50: 50), left out: both curves start at zero-shot
            (0.5, 55.0, 55.0),  # gap +3 (WiSE-FT at ID 55: 52)
            (0.8, 65.0, 52.0),  # gap +2 (WiSE-FT at ID 65: 50)
            (1, 75.0, 50.0),  # gap +4 (WiSE-FT clamped at its last point, 46)
        ],
        100,
    )
    delta, _ = claims.curve_gap(r_adapter, wise_ft, ID, OOD)
    assert delta == pytest.approx((3 + 2 + 4) / 3)


def _curve(run, points, seed):
    return [_row(run, x, y, alpha=a, seed=seed + 10 * i) | {"alpha": a, ID: x} for i, (a, x, y) in enumerate(points)]


@pytest.mark.parametrize(
    "ft_ood, ra_ood, verdicts",
    [
        (40.0, 48.0, ["holds", "holds", "holds", "holds", "holds", "holds"]),  # the paper's story
        (55.0, 46.0, ["holds", "fails", "fails", "holds", "fails", "fails"]),  # fine-tuning helps OOD
    ],
)
def test_paper_claims_on_hand_made_results(ft_ood, ra_ood, verdicts):
    rows = [
        _row("zero-shot", 50.0, 50.0, seed=100),
        _row("full-ft", 75.0, ft_ood, alpha=1.0, seed=200),
        _row("r-adapter", 70.0, ra_ood, alpha=0.5, seed=300),
    ]
    curves = {
        "WiSE-FT": _curve("full-ft", [(0, 50.0, 50.0), (0.5, 60.0, (50.0 + ft_ood) / 2), (1, 75.0, ft_ood)], 400),
        "R-Adapter": _curve("r-adapter", [(0, 50.0, 50.0), (0.5, 60.0, ra_ood + 2), (1, 70.0, ra_ood + 2)], 500),
    }
    checked = claims.paper_claims(rows, curves, ID, OOD)
    assert [c["verdict"] for c in checked] == verdicts
    assert checked[0]["delta"] == 25.0
    assert checked[1]["delta"] == pytest.approx(ft_ood - 50.0)
    assert checked[4]["delta"] == pytest.approx(ra_ood - ft_ood)


def test_curve_gap_interpolates_and_leaves_out_alpha_0():
    """R-Adapter points at ID 55 and 80 against WiSE-FT at ID 50, 60, 70: 55 is halfway between 50 and 60
    (WiSE OOD 40 and 30 -> 35), 80 is past the end (clamped at 20). Gaps 45 - 35 and 30 - 20, mean 10;
    the alpha = 0 point (ID 50, OOD 0) would pull the mean down if it were counted."""
    wise = _curve("full-ft", [(0, 50.0, 40.0), (0.5, 60.0, 30.0), (1, 70.0, 20.0)], 0)
    ours = _curve("r-adapter", [(0, 50.0, 0.0), (0.5, 55.0, 45.0), (1, 80.0, 30.0)], 100)
    delta, se = claims.curve_gap(ours, wise, ID, OOD)
    assert delta == pytest.approx(10.0) and 0 < se < 5


def drawn_plot(monkeypatch, tmp_path, curves, ood):
    """plots.plot's figure, kept after it is saved and closed, and a renderer for it."""
    import matplotlib.figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    kept, save = [], matplotlib.figure.Figure.savefig

    def keep(fig, *args, **kwargs):
        kept.append(fig)
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)
    table = [{"method": "zero-shot", "trainable": 0, "toy-photo": 50.0, **dict.fromkeys(ood, 40.0), "ood_avg": 40.0}]
    plots.plot(curves, tmp_path / "alpha_sweep.png", table, ood)
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

"""The default job (`python train.py`) at tiny budgets: shipped toy CLIP -> three methods -> table, plot, claims."""

import csv
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

import toy_clip
import toy_experiments
import train
from clip_model import CLIP, PRESETS, TINY
from clip_weights import TOY_CLIP, WeightsError, load_clip, load_toy_clip
from data import toy


@pytest.fixture
def small_toy(monkeypatch):
    monkeypatch.setitem(toy.SIZES, "train_per_class", 4)  # 48 training images
    monkeypatch.setitem(toy.SIZES, "test_per_class", 3)


def test_default_job_smoke(tmp_path, small_toy):
    out = tmp_path / "runs"
    train.main(["--max-steps", "2", "--batch-size", "16", "--run-dir", str(out)])

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "full-ft", "WiSE-FT (α=0.5)", "R-Adapter (α=0.5)"]
    splits = ["toy-photo", "toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c", "ood_avg"]
    assert list(rows[0])[:4] == ["method", "run", "alpha", "trainable"]
    assert list(rows[0])[4:] == [*splits, *(f"{s}_se" for s in splits), "skipped"]
    for row in rows:  # 36 images per split: se = sqrt(p (1 - p) / 36)
        p = float(row["toy-photo"]) / 100
        assert float(row["toy-photo_se"]) == pytest.approx(100 * (p * (1 - p) / 36) ** 0.5, abs=1e-6)
    with open(out / "alpha_sweep.csv") as f:
        sweep = list(csv.DictReader(f))
    assert {r["method"] for r in sweep} == {"R-Adapter", "WiSE-FT"} and len(sweep) == 22
    for name in ("R-Adapter", "WiSE-FT"):  # alpha = 0 is the zero-shot model for both ensembles
        at0 = next(r for r in sweep if r["method"] == name and float(r["alpha"]) == 0)
        assert at0["toy-photo"] == rows[0]["toy-photo"] and at0["ood_avg"] == rows[0]["ood_avg"]
    assert (out / "alpha_sweep.png").stat().st_size > 1000

    claims = json.loads((out / "claims.json").read_text())
    assert len(claims) == 6
    for c in claims:
        assert set(c) == {"claim", "delta", "se", "verdict"}
        assert c["verdict"] in ("holds", "fails", "within noise")
        assert (c["verdict"] == "within noise") == (abs(c["delta"]) < 2 * c["se"] or c["delta"] == 0)
    by = {r["method"]: r for r in rows}
    first = float(by["full-ft"]["toy-photo"]) - float(by["zero-shot"]["toy-photo"])
    assert claims[0]["delta"] == pytest.approx(first, abs=0.01)


def test_seeds_pool_runs_on_the_same_test_images(tmp_path, small_toy):
    """--seeds 2: each seed trains in its own folder; the table is their mean, and an SE adds the seed
    spread to the image sampling of the seed-mean correctness (report.pool_seeds)."""
    out = tmp_path / "runs"
    argv = ["--max-steps", "2", "--batch-size", "16", "--method", "zero-shot,r-adapter", "--lr", "0.05"]
    train.main([*argv, "--no-sweep", "--seeds", "2", "--run-dir", str(out)])
    per_seed = []
    for seed in (0, 1):
        train.main([*argv, "--no-sweep", "--seed", str(seed), "--run-dir", str(tmp_path / f"alone{seed}")])
        with open(tmp_path / f"alone{seed}" / "results.csv") as f:
            per_seed.append({r["run"]: r for r in csv.DictReader(f)})
    assert (out / "seed0" / "r-adapter" / "checkpoint.pt").exists() and (out / "seed1" / "r-adapter").is_dir()
    with open(out / "results.csv") as f:
        pooled = {r["run"]: r for r in csv.DictReader(f)}
    for run in ("zero-shot", "r-adapter"):
        accs = [float(p[run]["toy-photo"]) for p in per_seed]
        assert float(pooled[run]["toy-photo"]) == pytest.approx(sum(accs) / 2, abs=1e-6)
    zs = float(pooled["zero-shot"]["toy-photo"]) / 100  # no training: both seeds agree, the SE is binomial
    assert float(pooled["zero-shot"]["toy-photo_se"]) == pytest.approx(100 * (zs * (1 - zs) / 35) ** 0.5, rel=1e-6)


def test_base_to_new_job_smoke(tmp_path, small_toy):
    """`python train.py --data toy-specialised --split base` at a tiny budget: five rows of base, new and HM (each
    with its SE), and CLIPFit's claims, each delta the difference of the table's own numbers."""
    out = tmp_path / "runs"
    argv = ["--data", "toy-specialised", "--split", "base", "--shots", "2", "--max-steps", "1", "--batch-size", "6"]
    train.main([*argv, "--run-dir", str(out)])
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == ["zero-shot", "coop", "cocoop", "clipfit", "r-adapter"]
    for row in rows.values():  # 18 base and 18 new test images; HM's SE by the delta method
        b, n = float(row["base"]), float(row["new"])
        assert float(row["hm"]) == pytest.approx(2 * b * n / (b + n))
        for split, x in (("base", b), ("new", n)):
            assert float(row[f"{split}_se"]) == pytest.approx((x * (100 - x) / 18) ** 0.5)
        se_b, se_n = (float(row[f"{k}_se"]) * (18 / 17) ** 0.5 for k in ("base", "new"))  # unbiased variances
        assert float(row["hm_se"]) == pytest.approx(2 * ((n**2 * se_b) ** 2 + (b**2 * se_n) ** 2) ** 0.5 / (b + n) ** 2)
    claims = json.loads((out / "claims.json").read_text())
    assert [c["claim"].split(" (")[0] for c in claims] == [
        "CLIPFit raises the harmonic mean over zero-shot",
        "CLIPFit's new-class accuracy is at least CoOp's",
        "CoOp's new-class accuracy falls below zero-shot's",
    ]
    pairs = [("clipfit", "zero-shot", "hm"), ("clipfit", "coop", "new"), ("coop", "zero-shot", "new")]
    expected = [float(rows[a][k]) - float(rows[b][k]) for a, b, k in pairs]
    assert [c["delta"] for c in claims] == pytest.approx(expected, abs=0.01)


def test_base_to_new_lr_rule_scores_base_class_validation_images(tmp_path, small_toy, monkeypatch):
    """toy_experiments.select_lr with --split base at one epoch: each method at each lr of the grid, scored
    on the 6 base classes' validation images only (18 here), the argmax selected."""
    import recipes

    small = {"epochs": (1, "test"), "batch_size": (6, "test"), "shots": (2, "test")}
    for key in (("toy-base-to-novel", "coop"), ("toy-base-to-novel", "r-adapter")):
        monkeypatch.setitem(recipes.RECIPES, key, {**recipes.RECIPES[key], **small})
    monkeypatch.setitem(toy_experiments.LR_TABLES, "base", tmp_path / "selection.csv")
    toy_experiments.select_lr(["coop", "r-adapter"], split="base", grid=(1e-3, 1e-1))
    with open(tmp_path / "selection.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["lr"])) for r in rows] == [
        (m, lr) for m in ("coop", "r-adapter") for lr in (1e-3, 1e-1)
    ]
    for r in rows:
        p = float(r["val_top1"]) / 100
        assert float(r["val_se"]) == pytest.approx(100 * (p * (1 - p) / 18) ** 0.5, abs=0.01)
    for method in ("coop", "r-adapter"):
        mine = [r for r in rows if r["method"] == method]
        best = max(mine, key=lambda r: float(r["val_top1"]))
        assert [r["selected"] for r in mine] == ["1" if r is best else "0" for r in mine]
    assert toy_experiments.selected_lrs("base") == {r["method"]: float(r["lr"]) for r in rows if r["selected"] == "1"}


def test_shipped_toy_clip_is_checked_like_a_download(tmp_path):
    model = load_toy_clip()  # the digest in clip_weights.py matches the file in assets/
    assert model.config == PRESETS["toy"]
    assert TOY_CLIP.stat().st_size <= 10 * 2**20

    damaged = tmp_path / "toy-clip.safetensors"
    shutil.copy(TOY_CLIP, damaged)
    blob = bytearray(damaged.read_bytes())
    blob[-1] ^= 1  # one bit of one weight
    damaged.write_bytes(bytes(blob))
    assert load_clip(damaged).config == PRESETS["toy"]  # still a loadable CLIP ...
    with pytest.raises(ValueError, match=f"{damaged}: SHA-256 .* expected"):  # ... but not the published one
        load_toy_clip(path=damaged)
    with pytest.raises(WeightsError, match="toy CLIP is missing"):
        load_toy_clip(path=tmp_path / "absent.safetensors")


def test_linear_probe_fits_the_regularised_optimum_on_pre_projection_features():
    """The analogy's probe (Radford et al. 2021, A.3): L-BFGS reaches the minimum of mean CE + lam/2 ||W||^2
    (zero gradient there), and the features are the class token before the projection to the embedding."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g)
    y = (x[:, :3] + 0.7 * torch.randn(400, 3, generator=g)).argmax(1)
    for lam in (1e-3, 1e-1):
        W, b = (t.requires_grad_() for t in toy_experiments.logistic_regression(x, y, lam, 3))
        loss = torch.nn.functional.cross_entropy(x @ W.T + b, y) + lam / 2 * W.pow(2).sum()
        assert max(grad.abs().max().item() for grad in torch.autograd.grad(loss, (W, b))) < 1e-4
    assert toy_experiments.accuracy(*toy_experiments.logistic_regression(x, y, 1e-3, 3), x, y) > 60  # chance: 33

    torch.manual_seed(0)
    model = CLIP(TINY).eval()
    images = torch.randn(5, 3, 32, 32)
    dataset = torch.utils.data.TensorDataset(images, torch.arange(5))  # a ToySplit's interface: items, labels
    dataset.labels = [0, 1, 2, 3, 4]
    pooled, labels = toy_experiments.features(model, dataset, batch_size=2)
    assert pooled.shape == (5, TINY.vision_width) and labels.tolist() == dataset.labels
    torch.testing.assert_close(model.visual.head(pooled), model.encode_image(images).detach())


def test_toy_pretraining_is_deterministic():
    recipe = {**toy_clip.TOY_PRETRAIN, "pairs": 64, "steps": 3, "batch_size": 16, "warmup": 1}
    a, b = (toy_clip.pretrain(recipe, eval_every=0).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = toy_clip.pretrain({**recipe, "seed": 1}, eval_every=0).state_dict()
    assert not torch.equal(a["text.proj.weight"], c["text.proj.weight"])


def test_the_64px_stage_alternates_web_pairs_and_web_scenes_and_is_deterministic(monkeypatch):
    stage = {**toy_clip.TOY_SCENE_STAGE, "scenes": 6, "steps": 4, "batch_size": 8, "scene_batch": 4}
    stage1 = {**toy_clip.TOY_PRETRAIN, "pairs": 16}
    shapes = []
    forward = CLIP.forward
    monkeypatch.setattr(CLIP, "forward", lambda self, x, t: shapes.append(tuple(x.shape)) or forward(self, x, t))
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        start = CLIP(PRESETS["toy"])
        runs.append(toy_clip.pretrain_scenes(start, stage, stage1).state_dict())
    assert shapes[:4] == [(8, 3, 32, 32), (4, 3, 64, 64)] * 2  # even steps: web pairs; odd: web scenes
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    torch.manual_seed(0)
    before = CLIP(PRESETS["toy"]).half().float().state_dict()
    assert not torch.equal(runs[0]["text.proj.weight"], before["text.proj.weight"])


@pytest.mark.slow
def test_every_method_on_the_toy_world(tmp_path, small_toy):
    """Every method trains on the toy world and lands in one table with every split (the full run
    is the README's `--method` list command)."""
    out = tmp_path / "runs"
    train.main(["--method", ",".join(train.METHODS), "--max-steps", "2", "--batch-size", "16", "--run-dir", str(out)])
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {
        "R-Adapter (α=0.5)",
        "clipfit",
        "full-ft",
        "WiSE-FT (α=1)",
        "WiSE-FT (α=0.5)",
        "flyp",
        "linear-probe",
        "prolip",
        "LoRA (α=1)",
        "SSF (α=1)",
        "coop",
        "cocoop",
        "zero-shot",
    }
    for name, row in rows.items():
        accs = [float(row[k]) for k in ("toy-photo", "toy-v2", "toy-sketch", "toy-r", "toy-a", "toy-c")]
        assert all(0 <= a <= 100 for a in accs), name
        assert float(row["ood_avg"]) == pytest.approx(sum(accs[1:]) / 5, abs=0.01), name
    assert (
        int(rows["zero-shot"]["trainable"]) == 0 < int(rows["clipfit"]["trainable"]) < int(rows["full-ft"]["trainable"])
    )


def test_flip_is_honoured_on_the_toy_world(small_toy):
    """--flip (CLIPFit's recipe sets it) mirrors about half the toy training images; without it none."""
    model = SimpleNamespace(config=PRESETS["toy"])
    (fit,) = train.parse_args(["--method", "clipfit"])
    plain, flipped = train.build_data(train.TrainConfig(), model)[0], train.build_data(fit, model)[0]
    x = plain.train[0][0]
    seen = []
    for seed in range(16):
        torch.manual_seed(seed)
        y, z = flipped.train[0][0], plain.train[0][0]
        assert torch.equal(z, x)
        seen.append("same" if torch.equal(y, x) else "mirrored" if torch.equal(y, x.flip(-1)) else "other")
    assert set(seen) == {"same", "mirrored"}


def test_chance_counts_are_the_expected_counts_of_uniform_guesses():
    """The segmentation analogy's chance: a class drawn uniformly among the C prompted ones at every pixel. Its
    counts are the mean of many such draws, and two classes of equal area score IoU 1/3 each (an expected
    intersection of L/2 over a union of L + L - L/2)."""
    from data import segmentation

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(-1, 5, (2, 12, 12), generator=g)  # -1: an unlabelled pixel, as IGNORE
    labels[labels < 0] = segmentation.IGNORE
    counts = torch.stack([segmentation.iou_counts(torch.zeros_like(y), y, 5) for y in labels])
    chance = toy_experiments.chance_counts(counts)
    draws = torch.stack(
        [
            torch.stack([segmentation.iou_counts(torch.randint(5, y.shape, generator=g), y, 5) for y in labels])
            for _ in range(4000)
        ]
    ).double()
    torch.testing.assert_close(draws.mean(0), chance, atol=0.15, rtol=0)
    two = torch.tensor([[[0, 0], [50, 50], [50, 50]]])  # [1, 3, C=2]: 50 labelled pixels of each class
    assert segmentation.miou(toy_experiments.chance_counts(two).sum(0)).item() == pytest.approx(100 / 3)
    scores = toy_experiments.segmentation_scores(two, {"all": None})
    assert scores["all"][:2] == (0.0, pytest.approx(100 / 3))


def test_nearest_prompt_labels_each_patch_by_its_nearest_class(monkeypatch):
    """The training-free segmenter: a patch whose dense feature is class c's prompt embedding is labelled c at
    every one of its pixels; labels that match score 100, labels swapped score 0."""
    from data import segmentation

    torch.manual_seed(0)
    clip = CLIP(TINY).eval()
    templates = ["a photo of the {}.", "a drawing of the {}."]
    names = ["circle", "square"]
    tokens = toy_experiments.segment.class_tokens(names, templates, clip.config.context_length)
    with torch.no_grad():
        text = clip.encode_text(tokens.flatten(0, 1)).view(2, 2, -1).mean(1)  # [C, e]
    grid = torch.zeros(4, 4, dtype=torch.long)
    grid[:, :2] = 1  # [h, w] patches: the left half square, the right half circle
    dense = torch.cat([torch.zeros(1, text.shape[1]), text[grid.flatten()]])[None]  # [1, 1 + h*w, e]
    monkeypatch.setattr(clip, "encode_dense", lambda images, blocks=(), last_block="values": (dense, []))
    label = grid.repeat_interleave(8, 0).repeat_interleave(8, 1)  # [32, 32]: 8 px patches

    class Scenes(list):
        pass

    for truth, expected in ((label, 100.0), (1 - label, 0.0)):
        scenes = Scenes([(torch.zeros(3, 32, 32), truth)])
        scenes.names, scenes.classes = names, 2
        counts = toy_experiments.nearest_prompt_counts(clip, scenes, templates)
        assert segmentation.miou(counts.sum(0)).item() == pytest.approx(expected)


def test_quadrants_are_the_four_cells_of_each_scene_alone():
    """--check's 'each 32 px quadrant alone': four crops per scene that tile it exactly, labels with them."""

    class Scenes(list):
        pass

    image, label = torch.rand(3, 64, 64), torch.randint(0, 3, (64, 64))
    scenes = Scenes([(image, label)])
    scenes.names, scenes.classes = ["circle", "square", "star"], 3
    cells = list(toy_experiments.Quadrants(scenes))
    assert len(cells) == 4 and all(c.shape == (3, 32, 32) and t.shape == (32, 32) for c, t in cells)
    rows = (
        [torch.cat([cells[0][k], cells[1][k]], dim=-1) for k in (0, 1)],
        [torch.cat([cells[2][k], cells[3][k]], dim=-1) for k in (0, 1)],
    )
    assert torch.equal(torch.cat([rows[0][0], rows[1][0]], dim=-2), image)
    assert torch.equal(torch.cat([rows[0][1], rows[1][1]], dim=-2), label)
    quadrants = toy_experiments.Quadrants(scenes)
    assert (quadrants.names, quadrants.classes) == (scenes.names, 3)

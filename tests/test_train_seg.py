"""train_seg.py end to end on a tiny CLIP and generated trees in the real layouts: one training step per
method, what each trains, resume, --print-config, and one-line errors; the toy job (--data toy-seg) at a
tiny budget, its lr rule and the recipe's lrs as the committed table's argmax; evaluation's mIoU rule."""

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

import recipes
import train_seg
from clip_model import CLIP, PRESETS
from clip_weights import load_clip, save_clip
from conftest import write_segmentation_tree
from data import segmentation, toy_scenes
from data.segmentation import LAYOUTS

TINY = PRESETS["tiny"]
QV = 2 * (TINY.vision_layers * TINY.vision_width**2 + TINY.text_layers * TINY.text_width**2)  # W_q, W_v


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_clip(CLIP(TINY), path)
    return path


def command(tiny_path, root, run_dir, *extra):
    return [
        *("--model", str(tiny_path), "--data-root", str(root), "--run-dir", str(run_dir)),
        *("--crop", "32", "--batch-size", "2", "--iterations", "1", "--workers", "0", "--test", "voc-20b"),
        *extra,
    ]


@pytest.mark.parametrize(
    "method, count, changes",
    [
        ("frozen", 0, lambda k: False),
        ("catseg", QV, lambda k: k.endswith("attn.in_proj_weight")),
        ("full", sum(p.numel() for p in CLIP(TINY).parameters()) - 1, lambda k: k != "logit_scale"),
        ("r-adapter", QV + 2 * (TINY.vision_layers + TINY.text_layers), lambda k: "out_proj" in k or "c_proj" in k),
        (
            "lora",
            8 * 6 * (TINY.vision_layers * TINY.vision_width + TINY.text_layers * TINY.text_width),
            lambda k: "attn" in k,
        ),
    ],
)
def test_one_training_step_per_method(tiny_path, segmentation_root, tmp_path, method, count, changes):
    run_dir = tmp_path / "runs"
    train_seg.main(command(tiny_path, segmentation_root, run_dir, "--method", method))
    with open(run_dir / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert int(row["trainable"]) == count and 0 <= float(row["voc-20b"]) <= 100 and row["skipped"] == "0"
    base = load_file(str(tiny_path))
    tuned = load_file(str(run_dir / method / "merged.safetensors"))
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert all(changes(k) for k in changed) and bool(changed) == (method != "frozen"), changed
    if method == "catseg":  # W_k (the middle rows) and the bias never moved
        for k in changed:
            d = base[k].shape[1]
            assert torch.equal(base[k][d : 2 * d], tuned[k][d : 2 * d])
            assert torch.equal(base[k.replace("weight", "bias")], tuned[k.replace("weight", "bias")])
    head = load_file(str(run_dir / method / "head.safetensors"))
    assert head and not any(k.startswith("clip.") for k in head)
    assert (run_dir / method / "adapters.safetensors").exists() == (method == "r-adapter")


def test_resume_ends_where_a_straight_run_ends(tiny_path, segmentation_root, tmp_path):
    args = ("--method", "r-adapter", "--iterations", "2", "--save-every", "1")
    train_seg.main(command(tiny_path, segmentation_root, tmp_path / "straight", *args))
    train_seg.main(command(tiny_path, segmentation_root, tmp_path / "resumed", *args, "--max-steps", "1"))
    train_seg.main(command(tiny_path, segmentation_root, tmp_path / "resumed", *args, "--resume", "latest"))
    a, b = (
        torch.load(tmp_path / r / "r-adapter" / "checkpoint.pt", weights_only=True) for r in ("straight", "resumed")
    )
    assert a["step"] == b["step"] == 2
    for k in a["trainable"]:
        assert torch.equal(a["trainable"][k], b["trainable"][k]), k
    for k in a["ema"]["W_tilde"]:
        assert torch.equal(a["ema"]["W_tilde"][k], b["ema"]["W_tilde"][k]), k


def printed(text):
    """--print-config's tables -> [{field: (value, source)}], one per method."""
    configs = []
    for block in text.strip().split("\n\n"):
        _, *lines = block.splitlines()
        configs.append({})
        for line in lines:
            name, value, source = re.split(r"\s{2,}", line, maxsplit=2)
            configs[-1][name] = (json.loads(value), source)
    return configs


def test_print_config_shows_catsegs_recipe_with_sources(capsys):
    with pytest.raises(SystemExit) as e:
        train_seg.main(["--data-root", "anywhere", "--method", "catseg,r-adapter", "--print-config"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("# catseg\n")  # the table format of train.py --print-config
    configs = printed(out)
    assert [c["method"][0] for c in configs] == ["catseg", "r-adapter"]
    expected = dict(
        data="coco-stuff", crop=384, batch_size=4, iterations=80_000, lr=2e-4, clip_lr_scale=0.01, weight_decay=1e-4,
        warmup=0, min_lr=0.0, grad_clip=0.01, prompts="A photo of a {} in the scene",
        test="ade-847,pc-459,ade-150,pc-59,voc-20,voc-20b",
    )  # fmt: skip
    assert {k: configs[0][k][0] for k in expected} == expected
    assert "configs/vitb_384.yaml SOLVER.MAX_ITER" in configs[0]["iterations"][1]
    assert configs[0]["data_root"][1] == "flag" and configs[1]["method"][1] == "flag"
    assert set(configs[0]) == {f.name for f in dataclasses.fields(train_seg.SegConfig)}


def test_bad_flags_and_bad_trees_are_one_line_errors(tiny_path, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_seg.main(["--data-root", str(tmp_path), "--method", "bogus"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    with pytest.raises(SystemExit) as e:
        train_seg.main(command(tiny_path, tmp_path / "nowhere", tmp_path / "runs"))
    assert e.value.code == "error: " + str(tmp_path / "nowhere/coco-stuff/images/train2017") + ": folder not found " + (
        "(coco-stuff-train; layouts in data/segmentation.py)"
    )
    root = tmp_path / "root"
    write_segmentation_tree(root, ["coco-stuff-train", "voc-20b"], n=2)
    label = root / LAYOUTS["coco-stuff-train"].labels / "coco-stuff-train_0001.png"
    Image.fromarray(np.zeros((5, 6), dtype=np.uint8)).save(label)
    for workers in ("0", "1"):  # in the process, and re-raised from a DataLoader worker
        with pytest.raises(SystemExit) as e:
            train_seg.main(command(tiny_path, root, tmp_path / "runs", "--workers", workers))
        assert e.value.code == f"error: {label}: label is 6x5, image 44x32", workers


def test_exported_clip_loads_as_a_plain_clip(tiny_path, segmentation_root, tmp_path):
    train_seg.main(command(tiny_path, segmentation_root, tmp_path, "--method", "catseg"))
    clip = load_clip(tmp_path / "catseg" / "merged.safetensors")
    assert clip.config == TINY


# ------------------------------------------------------------ the toy job (--data toy-seg)
@pytest.fixture
def small_scenes(monkeypatch):
    for split, n in (("train", 4), ("val", 3), ("test", 3)):
        monkeypatch.setitem(toy_scenes.SIZES, split, n)


@pytest.fixture(scope="module")
def patch4_path(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "patch4.safetensors"
    save_clip(CLIP(dataclasses.replace(TINY, patch_size=4)), path)  # 16 x 16 tokens on a 64 px scene
    return path


@pytest.mark.parametrize("model", ["toy", "patch4"])
def test_toy_seg_job_end_to_end(tmp_path, small_scenes, patch4_path, model):
    """The toy job at a tiny budget, on the shipped toy CLIP and on a CLIP with 4 px patches: one row per
    method with seen, unseen and each shift, and R-Adapter's claim against full fine-tuning."""
    out = tmp_path / "runs"
    argv = ["--data", "toy-seg", "--iterations", "1", "--batch-size", "2", "--run-dir", str(out)]
    if model == "patch4":
        argv += ["--model", str(patch4_path), "--method", "full,r-adapter"]
    train_seg.main(argv)
    with open(out / "results.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert list(rows) == (["frozen", "catseg", "full", "r-adapter"] if model == "toy" else ["full", "r-adapter"])
    columns = ["seen", "unseen", "toy-sketch", "toy-r"]
    assert list(rows["full"]) == ["method", "run", "trainable", *(x for c in columns for x in (c, f"{c}_se"))] + [
        "skipped",
        "unknown_pixels",
    ]
    assert all(0 <= float(r[c]) <= 100 and float(r[f"{c}_se"]) >= 0 for r in rows.values() for c in columns)
    checked = json.loads((out / "claims.json").read_text())
    assert len(checked) == 2 and all(
        (c["verdict"] == "within noise") == (abs(c["delta"]) < 2 * c["se"] or c["delta"] == 0) for c in checked
    )
    unseen = float(rows["r-adapter"]["unseen"]) - float(rows["full"]["unseen"])
    assert checked[0]["delta"] == pytest.approx(unseen, abs=0.01)


def test_toy_seg_seeds_pool_the_runs_each_seed_gives(tmp_path, small_scenes):
    """--seeds 2 trains each method at seeds 0 and 1, each in its own folder as a one-seed command at that
    --seed trains it, and each row's mIoU is the mean of the two runs'; the claims come from the pooled rows."""
    argv = ["--data", "toy-seg", "--method", "full,r-adapter", "--iterations", "2", "--batch-size", "2"]
    train_seg.main([*argv, "--seeds", "2", "--run-dir", str(tmp_path / "pooled")])
    for seed in (0, 1):
        train_seg.main([*argv, "--seed", str(seed), "--run-dir", str(tmp_path / f"seed{seed}")])

    def rows(run_dir):
        with open(run_dir / "results.csv") as f:
            return {r["run"]: r for r in csv.DictReader(f)}

    pooled, one, two = rows(tmp_path / "pooled"), rows(tmp_path / "seed0"), rows(tmp_path / "seed1")
    assert one != two  # the seeds train differently
    for run in ("full", "r-adapter"):
        for column in ("seen", "unseen", "toy-sketch", "toy-r"):
            assert float(pooled[run][column]) == pytest.approx((float(one[run][column]) + float(two[run][column])) / 2)
        for seed in (0, 1):
            alone = (tmp_path / f"seed{seed}" / run / "head.safetensors").read_bytes()
            assert (tmp_path / "pooled" / run / f"seed{seed}" / "head.safetensors").read_bytes() == alone
    unseen = float(pooled["r-adapter"]["unseen"]) - float(pooled["full"]["unseen"])
    assert json.loads((tmp_path / "pooled" / "claims.json").read_text())[0]["delta"] == pytest.approx(unseen, abs=0.01)


def test_a_methods_run_does_not_depend_on_the_methods_before_it(tmp_path, small_scenes):
    """So the toy job's methods can be split across commands (docs/segmentation.md): full fine-tuning after
    frozen and catseg in one command ends with the weights it ends with alone."""
    argv = ["--data", "toy-seg", "--iterations", "2", "--batch-size", "2"]
    train_seg.main([*argv, "--method", "frozen,catseg,full", "--run-dir", str(tmp_path / "all")])
    train_seg.main([*argv, "--method", "full", "--run-dir", str(tmp_path / "alone")])
    for name in ("head.safetensors", "merged.safetensors"):
        assert (tmp_path / "all" / "full" / name).read_bytes() == (tmp_path / "alone" / "full" / name).read_bytes()


def test_toy_seg_select_lr_writes_each_methods_argmax(tmp_path, small_scenes, monkeypatch):
    monkeypatch.setattr(train_seg, "TOY_SEG_LR_TABLE", tmp_path / "table.csv")
    monkeypatch.setattr(recipes, "LR_GRID", (1e-4, 1e-1))
    train_seg.main(
        ["--data", "toy-seg", "--select-lr", "--method", "frozen,r-adapter", "--iterations", "2", "--batch-size", "2"]
    )
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], float(r["lr"])) for r in rows] == [
        (m, lr) for m in ("frozen", "r-adapter") for lr in (1e-4, 1e-1)
    ]
    for method in ("frozen", "r-adapter"):
        mine = [r for r in rows if r["method"] == method]
        assert [r["selected"] for r in mine].count("1") == 1
        assert max(mine, key=lambda r: float(r["val_miou"]))["selected"] == "1"


def test_toy_seg_lrs_are_the_selection_tables_argmax(capsys):
    """The toy recipe's lrs are the argmax rows of the committed table (photo validation mIoU over the grid
    of the lr rule, recipes.lr_rule), and --print-config names the table as their source."""
    table = recipes.selected_lrs(train_seg.TOY_SEG_LR_TABLE)
    cfgs, _ = train_seg.parse_args(["--data", "toy-seg"])
    assert {cfg.method: cfg.lr for cfg in cfgs} == table == train_seg.TOY_SEG_LR
    with open(train_seg.TOY_SEG_LR_TABLE) as f:
        rows = list(csv.DictReader(f))
    for method in table:  # every lr of the grid was tried, and the selected one scored highest
        scores = {float(r["lr"]): float(r["val_miou"]) for r in rows if r["method"] == method}
        assert sorted(scores) == sorted(recipes.LR_GRID) and scores[table[method]] == max(scores.values())
    with pytest.raises(SystemExit):
        train_seg.main(["--data", "toy-seg", "--print-config"])
    shown = printed(capsys.readouterr().out)[0]
    assert shown["lr"][1] == "toy lr rule: docs/toy_seg_lr_selection.csv"
    assert shown["crop"] == (toy_scenes.SIZE, "toy-seg recipe (this repository)")
    (flagged,), _ = train_seg.parse_args(["--data", "toy-seg", "--method", "full", "--lr", "0.5"])
    assert flagged.lr == 0.5


def test_toy_seg_budget_is_catsegs_number_of_passes():
    """The toy job trains as many passes over its 2,000 scenes as CAT-Seg's recipe (80,000 iterations of 4
    images) over COCO-Stuff's 118,287 training images, to the first decimal (2.7)."""
    (real,), _ = train_seg.parse_args(["--data-root", "anywhere", "--method", "catseg"])
    (toy,), _ = train_seg.parse_args(["--data", "toy-seg", "--method", "catseg"])
    passes = real.iterations * real.batch_size / segmentation.COCO_STUFF_TRAIN_IMAGES
    assert round(passes, 1) == 2.7
    assert round(toy.iterations * toy.batch_size / toy_scenes.SIZES["train"], 1) == round(passes, 1)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "toy-seg", "--test", "ade-150"], "--test ade-150: expected some of toy-photo, toy-sketch, toy-r"),
        (["--data-root", "x", "--select-lr"], "--select-lr: the lr rule is the toy's (--data toy-seg)"),
    ],
)
def test_toy_seg_flags_are_checked(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        train_seg.main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# ------------------------------------------------------------ evaluation as released
class Painter(torch.nn.Module):
    """Stands in for CATSeg: at each 4 x 4 block it predicts the class its image's first channel holds there."""

    config = TINY

    def embed_text(self, tokens):  # [C, P, L] -> [C, P, e]
        return torch.zeros(*tokens.shape[:2], 8)

    def forward(self, images, text):
        classes = F.avg_pool2d(images[:, :1], 4).round().long()[:, 0]  # [B, H/4, W/4]
        return 20.0 * F.one_hot(classes, len(text)).permute(0, 3, 1, 2).float() - 10.0


class Painted(torch.utils.data.Dataset):
    """One 32 x 32 image: left half labelled 0 and predicted 0 (top) or 2 (bottom), right half labelled and
    predicted 1. Class 2 is predicted and never labelled."""

    name, names, classes, prompt_class, columns = "painted", ["a", "b", "c"], 3, None, {"painted": None}

    def __len__(self):
        return 1

    def __getitem__(self, i):
        painted = torch.ones(32, 32)
        painted[:16, :16], painted[16:, :16] = 0, 2
        label = torch.ones(32, 32, dtype=torch.long)
        label[:, :16] = 0
        return painted.expand(3, 32, 32), label


def test_evaluation_scores_detectron2s_miou():
    """The confusion matrix: class 0 has 256 of its 512 labelled pixels right and no false positive (IoU 1/2),
    class 1 all 512 (IoU 1), class 2 is predicted on 256 pixels but never labelled: detectron2's mIoU
    (3/4) leaves it out; the union rule would count it as 0 (1/2)."""
    cfg = train_seg.SegConfig(crop=32, eval_size=32, workers=0, precision="fp32")
    scores = train_seg.evaluate_sets(Painter(), [Painted()], ["a {}."], cfg, torch.device("cpu"))
    assert scores["painted"] == pytest.approx(75.0)
    (counts,) = scores["counts"]["painted"]
    assert counts.tolist() == [[256, 512, 0], [256, 512, 256], [512, 512, 0]]


def test_the_toy_figure_shows_seen_and_unseen_classes_and_each_row(tmp_path):
    """plot_scenes: two photo scenes holding a seen and an unseen class, a sketch and a rendition, each with
    its labels and every row's kept prediction, in one PNG."""
    sets = toy_scenes.test_sets(list(toy_scenes.TESTS), segmentation.eval_transform())
    methods = ["frozen", "R-Adapter (α=0.5)"]
    rows = [
        {"method": m, "predictions": {t.name: [t.labels[i].clamp(min=0) for i in range(train_seg.SHOWN)] for t in sets}}
        for m in methods
    ]
    scenes = train_seg.plot_scenes(rows, sets, tmp_path / "scenes.png")
    assert [s["title"].split(" #")[0] for s in scenes] == ["toy-photo", "toy-photo", "toy-sketch", "toy-r"]
    for scene in scenes[:2]:
        classes = set(scene["label"].flatten().tolist()) - {segmentation.IGNORE}
        assert classes & set(toy_scenes.UNSEEN) and classes - set(toy_scenes.UNSEEN)
    assert all(list(s["predictions"]) == methods for s in scenes)
    assert (tmp_path / "scenes.png").stat().st_size > 10_000

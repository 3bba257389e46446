"""coop.py: CoOp layouts, CoCoOp's base/new split, HM, and train.py's --split base end to end (tiny CLIP, CPU)."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import claims
import evaluate
import train
from clip_model import CLIP, PRESETS, image_transform
from clip_weights import save_clip
from data import DataError, EvalSet, coop
from zero_shot import zero_shot_classifier

CLASSES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]  # 5: an odd count, base = 3, new = 2


def _png(path, label, rng):
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.uint8(50 * label) + rng.integers(0, 50, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_dtd(root, n_train=3, n_test=2, classes=CLASSES):
    """ROOT/dtd/images/<class>/*.png + split_zhou_DescribableTextures.json, as CoOp lays it out."""
    rng = np.random.default_rng(0)
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(classes):
        for part, n in (("train", n_train), ("val", 1), ("test", n_test)):
            for i in range(n):
                rel = f"{name}/{part}_{i}.png"
                _png(root / "dtd" / "images" / rel, label, rng)
                split[part].append([rel, label, name])
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text(json.dumps(split))
    return root


def test_split_file_layout_builds_classes_counts_and_k_shots(tmp_path):
    root = make_dtd(tmp_path)
    task = coop.build("dtd", str(root))
    assert task.classnames == CLASSES and task.templates == ["{} texture."]
    assert len(task.train) == 15 and len(task.test.dataset) == 10 and task.ood == []
    path, label = task.test.dataset.samples[-1]
    assert path == str(root / "dtd" / "images" / "bumpy" / "test_1.png") and label == 4

    few = coop.build("dtd", str(root), shots=2, seed=1)
    labels = [y for _, y in few.train.samples]
    assert sorted(labels) == sorted(list(range(5)) * 2)
    assert few.train.samples == coop.build("dtd", str(root), shots=2, seed=1).train.samples  # seeded
    assert {p for p, _ in few.train.samples} <= {p for p, _ in task.train.samples}


def test_underscores_read_as_spaces(tmp_path):
    root = make_dtd(tmp_path, classes=["Apply_Eye_Makeup", "Archery"])
    assert coop.build("dtd", str(root)).classnames == ["Apply Eye Makeup", "Archery"]


def test_base_new_partition_relabels_the_new_half(tmp_path):
    task = coop.build("dtd", str(make_dtd(tmp_path)))
    train_task, eval_task = coop.base_new(task)
    assert train_task.classnames == CLASSES[:3]  # ceil(5 / 2) = 3 base classes, the first labels
    assert sorted({y for _, y in train_task.train.samples}) == [0, 1, 2] and len(train_task.train) == 9

    base, (new,) = eval_task.test, eval_task.ood
    assert eval_task.classnames == CLASSES
    assert base.class_index.tolist() == [0, 1, 2] and new.class_index.tolist() == [3, 4]
    assert all(CLASSES[y] in p for p, y in base.dataset.samples) and len(base.dataset) == 6
    assert all(CLASSES[3 + y] in p for p, y in new.dataset.samples) and len(new.dataset) == 4
    assert sorted({y for _, y in new.dataset.samples}) == [0, 1]

    even = coop.build("dtd", str(make_dtd(tmp_path / "even", classes=CLASSES[:4])))
    assert coop.base_new(even)[0].classnames == CLASSES[:2]


def test_each_half_is_scored_among_its_own_classes(tmp_path):
    """base_new + evaluate.score(split="base") = a classifier over the base (or new) class names only."""
    task = coop.build("dtd", str(make_dtd(tmp_path, n_test=4)), eval_transform=image_transform(32))
    _, eval_task = coop.base_new(task)
    torch.manual_seed(0)
    model = CLIP(PRESETS["tiny"]).eval()
    full = zero_shot_classifier(model, CLASSES, task.templates)
    for evalset, names in ((eval_task.test, CLASSES[:3]), (eval_task.ood[0], CLASSES[3:])):
        own = zero_shot_classifier(model, names, task.templates)
        images = torch.stack([evalset.dataset[i][0] for i in range(len(evalset.dataset))])
        f = model.encode_image(images, normalize=True).detach()
        torch.testing.assert_close(evalset.project_logits(f @ full.T), f @ own.T)

    got = evaluate.score(model, eval_task, split="base", workers=0)[0]
    for name, evalset, names in (("base", eval_task.test, CLASSES[:3]), ("new", eval_task.ood[0], CLASSES[3:])):
        own = zero_shot_classifier(model, names, task.templates)
        correct, _ = evaluate.accuracy(model, own, EvalSet("own", evalset.dataset), workers=0)
        assert got[name] == 100.0 * int(correct.sum()) / len(correct)
    assert got["hm"] == claims.harmonic_mean(got["base"], got["new"])


def test_harmonic_mean():
    assert claims.harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)  # 68.571...
    assert claims.harmonic_mean(80.0, 60.0) == pytest.approx(68.5714286)
    assert claims.harmonic_mean(0.0, 0.0) == 0.0


def test_missing_split_file_or_images_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match=r"dtd/images: image folder not found.*split_zhou_Describable"):
        coop.build("dtd", str(tmp_path))
    root = make_dtd(tmp_path)
    (root / "dtd" / "split_zhou_DescribableTextures.json").unlink()
    with pytest.raises(DataError, match="split_zhou_DescribableTextures.json: split file not found"):
        coop.build("dtd", str(root))
    make_dtd(root)
    (root / "dtd" / "images" / "banded" / "test_0.png").unlink()
    with pytest.raises(DataError, match="1 listed images are missing"):
        coop.build("dtd", str(root))
    (root / "dtd" / "split_zhou_DescribableTextures.json").write_text('{"train": [["a.png", 0]]}')
    with pytest.raises(ValueError, match="not a CoOp split file"):
        coop.build("dtd", str(root))


def test_fgvc_aircraft_text_files(tmp_path):
    folder = tmp_path / "fgvc_aircraft"
    rng = np.random.default_rng(0)
    variants = ["707-320", "Boeing 717", "F/A-18"]  # names with spaces and slashes
    (folder / "images").mkdir(parents=True)
    (folder / "variants.txt").write_text("\n".join(variants) + "\n")
    for part, ids in (("train", ["0001", "0002", "0003"]), ("test", ["1001", "1002"])):
        lines = []
        for i, image_id in enumerate(ids):
            _png(folder / "images" / f"{image_id}.jpg", i, rng)
            lines.append(f"{image_id} {variants[(i + 1) % 3]}")
        (folder / f"images_variant_{part}.txt").write_text("\n".join(lines) + "\n")
    task = coop.build("fgvc_aircraft", str(tmp_path))
    assert task.classnames == variants and task.templates == ["a photo of a {}, a type of aircraft."]
    assert task.train.samples[0] == (str(folder / "images" / "0001.jpg"), 1)  # 'Boeing 717' is line 1
    assert [y for _, y in task.train.samples] == [1, 2, 0] and [y for _, y in task.test.dataset.samples] == [1, 2]

    (folder / "images_variant_test.txt").write_text("1001 Boeing 999\n")
    with pytest.raises(ValueError, match="line 1: variant 'Boeing 999' is not in variants.txt"):
        coop.build("fgvc_aircraft", str(tmp_path))


def test_recipes_for_base_to_novel_and_few_shot():
    (cfg,) = train.parse_args(["--data", "eurosat", "--data-root", "x", "--split", "base", "--batch-size", "8"])
    assert (cfg.m, cfg.delta, cfg.epsilon, cfg.epochs, cfg.rank) == (0.9, 0.1, 0.0, 101, 4)
    assert cfg.batch_size == 8  # a flag given wins over the recipe
    clipfit = ["--method", "clipfit", "--shots", "16"]
    assert train.parse_args(["--data", "eurosat", "--data-root", "x", *clipfit])[0].clipfit_lambda == 2
    assert train.parse_args(["--data", "dtd", "--data-root", "x", *clipfit])[0].clipfit_lambda == 8
    assert train.parse_args(["--data", "eurosat", "--data-root", "x"])[0].m == 0.999  # no recipe without --split


def test_bad_split_flags(capsys):
    for argv, message in (
        (["--split", "new"], "--split new"),
        (["--split", "base", "--method", "linear-probe"], "linear-probe"),
        (["--ood", "a=b"], "--ood"),
    ):
        with pytest.raises(SystemExit):
            train.parse_args(["--data", "dtd", "--data-root", "x", *argv])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train.parse_args(["--data", "coco", "--data-root", "x", "--split", "base"])  # captions, no classes
    assert "--data coco has captions" in capsys.readouterr().err


def test_toy_world_base_to_novel(monkeypatch, tmp_path):
    """--data toy-specialised --split base (the toy base-to-new job): the first 6 of the 12 toy classes
    train; base and new test images are each scored among their own 6 classes."""
    from data import toy

    monkeypatch.setitem(toy.SIZES, "test_per_class", 2)
    assert toy.task(shots=2, name="toy-specialised").ood == []  # a specialised dataset has no shifted sets
    train_task, eval_task = coop.base_new(toy.task(shots=2, name="toy-specialised"))
    assert train_task.classnames == eval_task.classnames[:6] and len(eval_task.classnames) == 12
    assert sorted(set(train_task.train.labels)) == list(range(6)) and len(train_task.train) == 12
    base, (new,) = eval_task.test, eval_task.ood
    assert new.class_index.tolist() == list(range(6, 12)) and len(base.dataset) == len(new.dataset) == 12
    assert coop.base_new(toy.task(shots=2))[1].ood[0].name == "new"  # --data toy's five shifts are dropped
    full = toy.task(shots=2, name="toy-specialised").test.dataset
    image, label = new.dataset[0]
    assert torch.equal(image, full[new.dataset.indices[0]][0]) and label == full.labels[new.dataset.indices[0]] - 6

    out = tmp_path / "runs"
    argv = ["--data", "toy-specialised", "--split", "base", "--shots", "2", "--method", "zero-shot,clipfit"]
    train.main([*argv, "--max-steps", "1", "--batch-size", "6", "--run-dir", str(out)])
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "clipfit"]
    assert all(math.isclose(float(r["hm"]), claims.harmonic_mean(float(r["base"]), float(r["new"]))) for r in rows)


def test_base_to_novel_end_to_end(tmp_path):
    root = make_dtd(tmp_path / "data")
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), tmp_path / "tiny.safetensors")
    out = tmp_path / "runs"
    train.main(
        [
            "--data",
            "dtd",
            "--data-root",
            str(root),
            "--model",
            str(tmp_path / "tiny.safetensors"),
            "--split",
            "base",
            "--shots",
            "2",
            "--rank",
            "4",
            "--method",
            "zero-shot,r-adapter",
            "--epochs",
            "1",
            "--batch-size",
            "3",
            "--warmup",
            "1",
            "--workers",
            "0",
            "--seeds",
            "1",
            "--run-dir",
            str(out),
        ]
    )
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["zero-shot", "R-Adapter (α=0.5)"]
    columns = ["base", "new", "hm", "base_se", "new_se", "hm_se", "skipped"]
    assert list(rows[0]) == ["method", "run", "alpha", "trainable", *columns]
    for r in rows:
        base, new = float(r["base"]), float(r["new"])
        assert math.isclose(float(r["hm"]), claims.harmonic_mean(base, new))
    assert rows[0]["trainable"] == "0" and int(rows[1]["trainable"]) > 0
    config = json.loads((out / "r-adapter" / "config.json").read_text())
    assert (config["split"], config["rank"], config["m"], config["shots"]) == ("base", 4, 0.9, 2)
    log = [json.loads(line) for line in (out / "r-adapter" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 2  # 2 shots x 3 base classes = 6 images, batches of 3


def test_evaluate_reads_every_data_that_train_reads(tmp_path):
    """evaluate.py builds data through data.build_task, as train.py does: a CoOp dataset, whole or split."""
    root = make_dtd(tmp_path / "data")
    torch.manual_seed(0)
    save_clip(CLIP(PRESETS["tiny"]), tmp_path / "tiny.safetensors")
    base = ["--model", str(tmp_path / "tiny.safetensors"), "--data", "dtd", "--data-root", str(root), "--workers", "0"]
    evaluate.main([*base, "--out", str(tmp_path / "all")])
    with open(tmp_path / "all" / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert list(row)[:3] == ["alpha", "dtd", "ood_avg"] and 0 <= float(row["dtd"]) <= 100
    evaluate.main([*base, "--split", "base", "--out", str(tmp_path / "split")])
    with open(tmp_path / "split" / "results.csv") as f:
        row = next(csv.DictReader(f))
    assert math.isclose(float(row["hm"]), claims.harmonic_mean(float(row["base"]), float(row["new"])))

"""data/segmentation.py on generated trees in the real layouts; the released training resize (detectron2's
ResizeShortestEdge with its 1,333 px cap, crop, padding); its mIoU, by detectron2's rule against a
confusion matrix as detectron2's SemSegEvaluator builds it and by the union rule against torchmetrics'
MulticlassJaccardIndex (the test oracles), with its bootstrap standard error."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torchmetrics.classification import MulticlassJaccardIndex
from torchvision import tv_tensors

import data
from claims import bootstrap_se
from clip_model import CLIP_MEAN, CLIP_STD
from conftest import write_segmentation_tree
from data import segmentation
from data.segmentation import IGNORE, LAYOUTS, iou_counts, miou, shortest_edge

CLASSES = {
    "coco-stuff-train": 171,
    "coco-stuff": 171,
    "ade-150": 150,
    "ade-847": 847,
    "pc-59": 59,
    "pc-459": 459,
    "voc-20": 20,
    "voc-20b": 21,
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_reader_on_its_layout(tmp_path, name):
    written = write_segmentation_tree(tmp_path, [name])[name]
    ds = segmentation.build(name, tmp_path, segmentation.eval_transform())
    assert len(ds) == 3 and ds.classes == CLASSES[name]
    assert len(ds.names) == (59 if name == "voc-20b" else CLASSES[name])
    for (_, label), (image, read) in zip(written, ds):
        assert image.shape == (3, *label.shape) and image.dtype == torch.float32
        expected = torch.from_numpy(label.astype(np.int64))
        expected[expected == LAYOUTS[name].ignore] = IGNORE
        assert torch.equal(read, expected)  # labels read exactly, the set's ignore value mapped to IGNORE
        assert (read[:, :3] == IGNORE).all()


def test_voc_20b_prompts_its_background_with_pascal_context_names():
    layout = LAYOUTS["voc-20b"]
    assert (
        layout.names[:20] == LAYOUTS["voc-20"].names and len(set(layout.names[20:]) & set(LAYOUTS["pc-59"].names)) == 39
    )
    assert layout.prompt_class == list(range(20)) + [20] * 39


def test_train_transform_crops_image_and_label_alike(tmp_path):
    write_segmentation_tree(tmp_path, ["coco-stuff-train"])
    ds = segmentation.build("coco-stuff-train", tmp_path, segmentation.train_transform(size=24))
    raw = segmentation.build("coco-stuff-train", tmp_path, segmentation.eval_transform())
    torch.manual_seed(0)
    image, label = ds[0]
    assert image.shape == (3, 24, 24) and label.shape == (24, 24) and label.dtype == torch.long
    assert set(label.unique().tolist()) <= set(raw[0][1].unique().tolist())  # nearest: no new label values


@pytest.mark.parametrize(
    "h, w, size, max_size, expected",
    [
        (480, 640, 384, 1333, (384, 512)),
        (427, 640, 384, 1333, (384, 576)),  # 575.55 rounds to 576
        (640, 427, 384, 1333, (576, 384)),
        (100, 1000, 384, 1333, (133, 1333)),  # 384 x 3840 capped: x 1333 / 3840
        (100, 1000, 384, None, (384, 3840)),
        (500, 375, 640, 2560, (853, 640)),  # the test resize
    ],
)
def test_shortest_edge_is_detectron2s_size_rule(h, w, size, max_size, expected):
    assert shortest_edge(h, w, size, max_size) == expected


def test_training_resize_caps_the_longer_side_and_pads_right_and_bottom():
    """A 20 x 100 image at size 24 with the longer side capped at 60: resized to 12 x 60, a 12 x 24 crop,
    padded at the bottom to 24 x 24 with grey (128) and IGNORE. Uncapped, the crop is a full 24 x 24."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (20, 100, 3), dtype=np.uint8))
    label = tv_tensors.Mask(torch.from_numpy(rng.integers(0, 5, (20, 100))))
    grey = ((128 / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD))[:, None, None]
    torch.manual_seed(0)
    x, y = segmentation.train_transform(size=24, max_size=60)(image, label)
    assert x.shape == (3, 24, 24) and y.shape == (24, 24)
    assert (y[12:] == IGNORE).all() and (y[:12] >= 0).all()
    torch.testing.assert_close(x[:, 12:], grey.expand(3, 12, 24))
    x, y = segmentation.train_transform(size=24, max_size=None)(image, label)
    assert x.shape == (3, 24, 24) and (y >= 0).all()


def test_test_sets_skip_absent_ones_and_refuse_unknown_names(tmp_path, capsys):
    write_segmentation_tree(tmp_path, ["ade-150"])
    found = segmentation.test_sets(["ade-150", "pc-59"], tmp_path)
    assert [s.name for s in found] == ["ade-150"] and "pc-59 not found" in capsys.readouterr().out
    with pytest.raises(data.DataError, match="--test nope"):
        segmentation.test_sets(["nope"], tmp_path)


def test_unreadable_image_is_skipped_and_counted_or_an_error_with_strict(tmp_path):
    written = write_segmentation_tree(tmp_path, ["ade-150"])["ade-150"]
    written[1][0].write_bytes(b"not a jpeg")
    ds = segmentation.build("ade-150", tmp_path, segmentation.eval_transform())
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert ds[1] is None
    assert data.collate_skip([ds[1]])[2] == 1 and data.collate_skip([ds[0]])[2] == 0  # counted per batch
    strict = segmentation.build("ade-150", tmp_path, segmentation.eval_transform(), strict=True)
    with pytest.raises(data.DataError, match="cannot read image"):
        strict[1]


def test_unknown_label_values_are_warned_once_and_kept(tmp_path):
    written = write_segmentation_tree(tmp_path, ["pc-59"])["pc-59"]
    label = written[0][1].copy()
    label[5, 5:9] = 200  # neither a class (0..58) nor the ignore value 255
    path = tmp_path / LAYOUTS["pc-59"].labels / "pc-59_0000.png"
    Image.fromarray(label.astype(np.uint8)).save(path)
    ds = segmentation.build("pc-59", tmp_path, segmentation.eval_transform())
    with pytest.warns(UserWarning, match="label values 200 are neither classes"):
        _, read = ds[0]
    assert (read == 200).sum() == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # once per file


def test_bad_trees_are_one_line_errors(tmp_path):
    with pytest.raises(data.DataError, match="ADEChallengeData2016/images/validation: folder not found"):
        segmentation.build("ade-150", tmp_path, segmentation.eval_transform())
    written = write_segmentation_tree(tmp_path, ["voc-20"])["voc-20"]
    small = np.zeros((10, 12), dtype=np.uint8)
    Image.fromarray(small).save(tmp_path / LAYOUTS["voc-20"].labels / "voc-20_0002.png")
    ds = segmentation.build("voc-20", tmp_path, segmentation.eval_transform())
    with pytest.raises(data.DataError, match=r"voc-20_0002.png: label is 12x10, image 48x34") as e:
        ds[2]
    assert "\n" not in str(e.value)
    written[0][0].unlink()
    with pytest.raises(data.DataError, match="voc-20_0000.jpg: image not found for label"):
        segmentation.build("voc-20", tmp_path, segmentation.eval_transform())


# ---------------------------------------------------------------------- mIoU
def random_maps(rng, n, C, used, size=(6, 7)):
    """n (pred, target) pairs over the first `used` of C classes (the rest absent from both), with IGNORE."""
    pred = torch.from_numpy(rng.integers(0, used, (n, *size)))
    target = torch.from_numpy(rng.integers(0, used, (n, *size)))
    target[torch.from_numpy(rng.random((n, *size)) < 0.2)] = IGNORE
    return pred, target


def detectron2_miou(pred, target, C):
    """mIoU (%) as detectron2's SemSegEvaluator computes it (process, then evaluate, since July 2022): a
    (C + 1) x (C + 1) confusion matrix [prediction, label], the ignored label as column C; IoU over the classes
    with a labelled pixel."""
    gt = target.numpy().copy()
    gt[gt == IGNORE] = C
    conf = np.bincount((C + 1) * pred.numpy().reshape(-1) + gt.reshape(-1), minlength=(C + 1) ** 2)
    return detectron2_evaluate(conf.reshape(C + 1, C + 1))


def detectron2_evaluate(conf):
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt, pos_pred = conf[:-1, :-1].sum(0).astype(float), conf[:-1, :-1].sum(1).astype(float)
    union = pos_gt + pos_pred - tp
    valid = (pos_gt > 0) & (union > 0)
    return 100 * (tp[valid] / union[valid]).sum() / valid.sum()


def test_miou_on_a_class_predicted_but_never_labelled():
    """Class 2 is predicted (3 pixels) and never labelled. detectron2 averages over classes 0 and 1, the
    union rule (torchmetrics) counts class 2 with IoU 0."""
    pred = torch.tensor([[0, 0, 2, 2], [1, 1, 1, 2]])
    target = torch.tensor([[0, 0, 0, 0], [1, 1, IGNORE, 1]])
    conf = np.array(  # [prediction, label]; the last column holds the ignored pixel, the last row is unused
        [[2, 0, 0, 0], [0, 2, 0, 1], [2, 1, 0, 0], [0, 0, 0, 0]]
    )
    counts = iou_counts(pred, target, 3)
    assert miou(counts).item() == pytest.approx(detectron2_evaluate(conf)) == pytest.approx(100 * (2 / 4 + 2 / 3) / 2)
    oracle = MulticlassJaccardIndex(num_classes=3, average="macro", ignore_index=IGNORE)
    union = oracle(pred, target).item() * 100
    assert miou(counts, rule="union").item() == pytest.approx(union, abs=1e-4)
    assert union == pytest.approx(100 * (2 / 4 + 2 / 3 + 0) / 3, abs=1e-4)
    with pytest.raises(ValueError, match="mIoU rule 'both'"):
        miou(counts, rule="both")


@settings(max_examples=30, deadline=None)
@given(st.integers(2, 12), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_miou_is_detectron2s_and_the_union_rule_torchmetrics(C, n, seed):
    rng = np.random.default_rng(seed)
    pred, target = random_maps(rng, n, C, used=int(rng.integers(1, C + 1)))
    target[target == C - 1] = IGNORE  # the last class may be predicted, never labelled
    counts = torch.stack([iou_counts(p, t, C) for p, t in zip(pred, target)]).sum(0)
    if counts[2].sum() > 0:
        assert miou(counts).item() == pytest.approx(detectron2_miou(pred, target, C), abs=1e-9)
    oracle = MulticlassJaccardIndex(num_classes=C, average="macro", ignore_index=IGNORE)
    oracle.update(pred, target)
    torch.testing.assert_close(miou(counts, rule="union").float() / 100, oracle.compute(), rtol=1e-6, atol=1e-6)
    per_class = MulticlassJaccardIndex(num_classes=C, average="none", ignore_index=IGNORE)(pred, target)
    labelled, union = counts[2] > 0, (counts[1] + counts[2]) > 0
    seen = [c for c in range(C) if c % 2 == 0]  # a seen / unseen split: the mean over the seen classes kept
    for rule, kept in (("labels", labelled), ("union", union)):
        expected = per_class[kept & (torch.arange(C) % 2 == 0)].mean()
        if not torch.isnan(expected):
            torch.testing.assert_close(miou(counts, seen, rule).float() / 100, expected, rtol=1e-6, atol=1e-6)


def test_labels_that_are_no_class_are_left_out():
    pred, target = torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 9, -1]])
    counts = iou_counts(pred, target, 3)
    assert counts.tolist() == [[1, 1, 0], [1, 1, 0], [1, 1, 0]]  # class 2 was predicted on unlabelled pixels only
    assert miou(counts).item() == 100.0


def test_bootstrap_se_is_the_spread_over_resampled_images():
    rng = np.random.default_rng(0)
    pred, target = random_maps(rng, 20, 5, used=5)
    counts = torch.stack([iou_counts(p, t, 5) for p, t in zip(pred, target)])
    picks = torch.randint(20, (200, 20), generator=torch.Generator().manual_seed(3))
    naive = torch.stack([miou(counts[p].sum(0)) for p in picks]).std()
    torch.testing.assert_close(torch.tensor(bootstrap_se(counts, samples=200, seed=3, miou=miou)), naive.float())
    same = counts[:1].expand(20, -1, -1)
    assert bootstrap_se(same, miou=miou) < 1e-9 < bootstrap_se(counts, miou=miou) < 10


def test_paired_bootstrap_se_resamples_both_models_on_the_same_images():
    rng = np.random.default_rng(1)
    pred, target = random_maps(rng, 20, 5, used=5)
    other = pred.clone()
    other[:, :2] = (other[:, :2] + 1) % 5  # a second model: the same maps but for two rows
    a, b = (torch.stack([iou_counts(p, t, 5) for p, t in zip(x, target)]) for x in (pred, other))
    picks = torch.randint(20, (200, 20), generator=torch.Generator().manual_seed(3))
    naive = torch.stack([miou(a[p].sum(0), [0, 1]) - miou(b[p].sum(0), [0, 1]) for p in picks]).std()
    paired = bootstrap_se(a, [0, 1], samples=200, seed=3, baseline=b, miou=miou)
    torch.testing.assert_close(torch.tensor(paired), naive.float())
    assert bootstrap_se(a, baseline=a, miou=miou) == 0 < paired  # a model against itself: no spread


def test_bootstrap_se_skips_resamplings_without_any_class():
    """An image with no labelled pixel and no prediction leaves mIoU undefined on the resamplings that draw
    only it; the SE is the spread over the others, not NaN."""
    counts = torch.zeros(2, 3, 4)
    counts[0, :, 1] = torch.tensor([3.0, 4.0, 5.0])  # class 1: intersection 3, prediction 4, label 5
    se = bootstrap_se(counts, samples=200, miou=miou)
    assert math.isfinite(se) and se == 0.0  # every defined resampling has the same mIoU, 50%


def test_bootstrap_se_over_seeds_adds_their_spread_to_the_images():
    """Counts of S seeds on the same images: on each resampling the seeds' mean mIoU, and the variance of the
    seeds' mIoU over S added, as report.pool_seeds adds it to accuracy."""
    rng = np.random.default_rng(2)
    _, target = random_maps(rng, 20, 5, used=5)
    seeds = [random_maps(np.random.default_rng(10 + s), 20, 5, used=5)[0] for s in range(3)]
    counts = torch.stack([torch.stack([iou_counts(p, t, 5) for p, t in zip(pred, target)]) for pred in seeds])
    picks = torch.randint(20, (200, 20), generator=torch.Generator().manual_seed(3))
    image = torch.stack([torch.stack([miou(c[p].sum(0)) for c in counts]).mean() for p in picks]).std()
    per_seed = torch.stack([miou(c.sum(0)) for c in counts])
    expected = (image**2 + per_seed.var() / 3).sqrt()
    torch.testing.assert_close(torch.tensor(bootstrap_se(counts, samples=200, seed=3, miou=miou)), expected.float())
    one = counts[0]  # S copies of one seed: no seed spread, the single seed's SE
    assert bootstrap_se(one.expand(3, -1, -1, -1), miou=miou) == pytest.approx(bootstrap_se(one, miou=miou))
    paired = bootstrap_se(counts, baseline=counts[:, torch.arange(20).roll(1)], miou=miou)
    assert paired > bootstrap_se(counts, baseline=counts, miou=miou) == 0

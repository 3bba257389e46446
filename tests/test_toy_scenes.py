"""data/toy_scenes.py: the label map is the topmost shape's own mask at every pixel, the rendered strokes
sit on the labelled shapes, scenes are deterministic per (seed, split, style, index), and the seen /
unseen split holds in every set; the web scenes' captions name their visible shapes. CPU, a few seconds."""

import re

import numpy as np
import pytest
import torch

from data import toy_scenes as ts
from data import toy_world as tw
from data.segmentation import IGNORE, eval_transform

ALL = ts.SEEN + ts.UNSEEN


def scenes(style, n=12, split="test"):
    return [ts.render_scene(style, ALL, ts.scene_rng(0, split, style, i)) for i in range(n)]


def own_mask(obj, grid, size=ts.SIZE):
    """Where one shape covers more than half of a pixel (its signed distance < 0), rasterised at `grid`
    and enlarged to `size` by nearest neighbour (pixel art draws on a coarser grid)."""
    idx = np.arange(size) * grid // size
    return (obj.sdf(grid) < 0)[idx][:, idx]


@pytest.mark.parametrize("style", ["photo", "sketch", "rendition"])
def test_labels_are_the_topmost_shapes_own_mask(style):
    variants = set()
    for image, label, attrs in scenes(style, n=30):
        variants.add(attrs["variant"])
        assert image.shape == (ts.SIZE, ts.SIZE, 3) and image.dtype == np.uint8 and label.shape == (ts.SIZE, ts.SIZE)
        masks = [own_mask(obj, attrs["grid"]) for obj in attrs["shapes"]]
        assert 2 <= len(masks) <= 4 and len({obj.label for obj in attrs["shapes"]}) == len(masks)
        for k, (obj, mask) in enumerate(zip(attrs["shapes"], masks)):
            on_top = mask & ~np.any(masks[k + 1 :], axis=0) if k + 1 < len(masks) else mask
            assert on_top.sum() > 0, "a shape is hidden entirely"
            assert (label[on_top] == obj.label).all()
        assert (label[~np.any(masks, axis=0)] == IGNORE).all()
    if style == "rendition":
        assert variants == set(ts.RENDITIONS)


def test_cartoons_fill_each_labelled_shape_with_one_colour_inside_a_black_outline():
    """Where the label says a shape is (away from its edge and from the shapes over it), a cartoon shows one
    flat colour; along the label's boundary it shows the black outline."""
    checked = 0
    for i in range(200):
        image, label, attrs = ts.render_scene("rendition", ALL, ts.scene_rng(0, "test", "rendition", i))
        if attrs["variant"] != "cartoon":
            continue
        sdfs = [obj.sdf(ts.SIZE) for obj in attrs["shapes"]]
        for k, (obj, sdf) in enumerate(zip(attrs["shapes"], sdfs)):
            clear = np.all([s > 4 for s in sdfs[k + 1 :]], axis=0) if k + 1 < len(sdfs) else np.ones_like(sdf, bool)
            inside, edge = (sdf < -3) & clear, (np.abs(sdf) < 0.3) & clear
            if inside.sum() >= 4:
                assert (label[inside] == obj.label).all()
                assert np.ptp(image[inside].astype(int), axis=0).max() <= 1  # one colour (up to rounding)
                checked += 1
            if edge.any():
                assert image[edge].max() < 60  # black strokes
    assert checked >= 10


def test_scenes_are_deterministic_per_seed_split_style_and_index():
    a = ts.render_scene("photo", ts.SEEN, ts.scene_rng(0, "train", "photo", 7))
    b = ts.render_scene("photo", ts.SEEN, ts.scene_rng(0, "train", "photo", 7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    for other in (ts.scene_rng(1, "train", "photo", 7), ts.scene_rng(0, "val", "photo", 7)):
        c = ts.render_scene("photo", ts.SEEN, other)
        assert not np.array_equal(a[0], c[0])
    ts._CACHE.clear()
    one = ts.ToyScenes("x", "sketch", "test", eval_transform(), n=3)
    ts._CACHE.clear()
    more = ts.ToyScenes("x", "sketch", "test", eval_transform(), n=5)
    assert torch.equal(one.images, more.images[:3]) and torch.equal(one.labels, more.labels[:3])


def test_seen_and_unseen_classes():
    assert ts.SEEN == tuple(range(8)) and ts.UNSEEN == (8, 9, 10, 11) and sorted(ALL) == list(range(len(tw.CLASSNAMES)))
    for split in ("train", "val"):  # seen classes only, prompted with the seen names (label = index)
        s = ts.ToyScenes("x", "photo", split, eval_transform(), n=40)
        assert s.names == tw.CLASSNAMES[:8] and s.classes == 8
        assert set(s.labels.unique().tolist()) == {IGNORE, *ts.SEEN}
    for name, style in ts.TESTS.items():  # every class, every name
        s = ts.ToyScenes(name, style, "test", eval_transform(), n=40)
        assert s.names == tw.CLASSNAMES and set(s.labels.unique().tolist()) == {IGNORE, *ALL}
    photo = ts.ToyScenes("toy-photo", "photo", "test", eval_transform(), n=4)
    assert photo.columns == {"seen": ts.SEEN, "unseen": ts.UNSEEN}
    assert ts.ToyScenes("toy-r", "rendition", "test", eval_transform(), n=4).columns == {"toy-r": None}
    image, label = photo[0]
    assert image.shape == (3, ts.SIZE, ts.SIZE) and image.dtype == torch.float32 and label.dtype == torch.int64


def test_web_scene_captions_name_every_visible_shape_and_no_other():
    """The 64 px pretraining stage's web scenes: each caption names the classes left visible in its scene's
    label map (drawn again from scene i's generator), once each, in every web style."""
    web = ts.WebScenes(40)
    assert web.images.shape == (40, 3, ts.SIZE, ts.SIZE) and web.images.dtype == torch.uint8
    styles = set()
    for i, caption in enumerate(web.captions):
        rng = np.random.default_rng(np.random.SeedSequence([*ts.WEB_SEED, i]))
        style = list(ts.WEB_STYLES)[int(rng.choice(len(ts.WEB_STYLES), p=list(ts.WEB_STYLES.values())))]
        image, label, _ = ts.render_scene(style, ALL, rng)
        assert np.array_equal(web.images[i].permute(1, 2, 0).numpy(), image)
        named = [c for c, n in enumerate(tw.CLASSNAMES) for _ in re.finditer(rf"\b{tw._article(n)} {n}\b", caption)]
        assert sorted(named) == sorted(set(np.unique(label).tolist()) - {IGNORE}), caption
        styles.add(style)
    assert styles == set(ts.WEB_STYLES)

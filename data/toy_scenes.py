"""Toy scenes: the toy world's open-vocabulary segmentation task (train_seg.py --data toy-seg).

Each scene is a 64 px image holding 2-4 shapes of distinct toy_world classes, one in each of some cells
of a 2 x 2 grid, jittered so that neighbours may overlap; each shape is as large in its 32 px cell as
one toy_world object is in its 32 px image. Its label map gives every pixel the class of the topmost
shape covering it (coverage > 1/2: signed distance < 0); the background is unlabelled (IGNORE), as in
Pascal VOC-20 of CAT-Seg's protocol. Shapes, colours, textures, backgrounds and the styles' strokes are
toy_world's pieces (signed-distance templates, `_background`, `_texture_mask`, ...):

    photo       shaded, textured shapes with drop shadows on toy_world's photo backgrounds, pixel noise
    sketch      pencil outlines (wobbly, broken) with hatching or stippling on paper, stray strokes
    rendition   one of: cartoon, pixel art, neon, mosaic, inverted photo

Open vocabulary: the classes split into SEEN (the first 8 of toy_world.CLASSNAMES, as CoCoOp's base
classes are the first part of the class list) and UNSEEN (the last 4). Training and validation scenes
hold seen classes only and are prompted with the 8 seen names (so a training label is a class index
alike); test scenes draw from all 12 classes, are prompted with all 12 names, and the photo test set
reports mIoU over the seen and over the unseen classes; sketch and rendition report all 12.

Scene i of a split is drawn from its own generator seeded with (seed, split, style, i), as toy_world's
samples are: scenes never depend on generation order, and train, val and test never share a seed.
"""

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors

from data import toy_world as tw
from data.segmentation import IGNORE

SIZE = 64  # px: 8 x 8 tokens of 8 px, 16 x 16 of 4 px
SEEN = tuple(range(8))
UNSEEN = tuple(range(8, len(tw.CLASSNAMES)))
SIZES = dict(train=2000, val=200, test=300)  # scenes per style and split (read at call time: tests shrink them)
TESTS = {"toy-photo": "photo", "toy-sketch": "sketch", "toy-r": "rendition"}  # test set: style
RENDITIONS = ("cartoon", "pixel", "neon", "mosaic", "inverted")
_SCENES = 5  # seed component that keeps scenes apart from toy_world's single-object samples
_CACHE = {}


def scene_rng(seed, split, style, index):
    return np.random.default_rng(
        np.random.SeedSequence([int(seed), _SCENES, tw._DOMAIN[split], tw._STYLE_CODE[style], int(index)])
    )


# ------------------------------------------------------------------ geometry
def layout(rng, classes, wobble=False):
    """2-4 shapes of distinct classes drawn from `classes`, in random cells of a 2 x 2 grid, in drawing
    order (toy_world._Obj: centre in [-1, 1] scene coordinates, scale as a fraction of the half width)."""
    k = int(rng.integers(2, 5))
    labels = rng.choice(np.asarray(classes), size=k, replace=False)
    cells = rng.permutation(4)[:k]
    objs = []
    for label, cell in zip(labels, cells):
        lo, hi = tw.SIZES[tw._pick(rng, ("small", "medium", "large"), (0.2, 0.4, 0.4))]
        s = tw._u(rng, lo, hi) / 2  # a cell is half the scene
        cx, cy = (cell % 2 - 0.5) + tw._u(rng, -0.15, 0.15), (cell // 2 - 0.5) + tw._u(rng, -0.15, 0.15)
        w = (tw._u(rng, 0.02, 0.05), tw._u(rng, 4, 8), tw._u(rng, 0, 6.3), tw._u(rng, 0, 6.3)) if wobble else None
        objs.append(tw._Obj(label, cx, cy, s, tw._angle(rng, int(label)), tuple(tw._u(rng, 0.9, 1.1, 2)), w))
    return objs


def label_map(objs, masks):
    """[H, W] int64: the class of the topmost shape whose mask covers each pixel, IGNORE elsewhere."""
    label = np.full(masks[0].shape, IGNORE, np.int64)
    for obj, mask in zip(objs, masks):  # later shapes are drawn over earlier ones
        label[mask] = obj.label
    return label


# -------------------------------------------------------------------- styles
def _photo(objs, rng, pix, H):
    cfg = tw._PHOTO_LIKE["photo"]
    cols = [tw._jitter(rng, tw._pick(rng, tw._COLOUR_NAMES)) for _ in objs]
    bg = tw._pick(rng, tw.BACKGROUNDS, cfg["bg"])
    img = tw._background(rng, pix, H, bg, np.mean(cols, 0), min_dist=0.35, natural=bg == "noise")
    light = tw._u(rng, *cfg["light"])
    for obj, col in zip(objs, cols):
        sdf = obj.sdf(H)
        sh = int(rng.integers(1, 3))  # soft drop shadow, 1-2 px down-right
        shadow = np.zeros((H, H), np.float32)
        shadow[sh:, sh:] = tw._cover(sdf[:-sh, :-sh], soft=1.8)
        img = img * (1 - 0.45 * shadow)[..., None]
        fill = np.broadcast_to(col, (H, H, 3))
        texture = tw._texture_mask(obj, H, tw._pick(rng, tw.TEXTURES, cfg["tex"]), rng)
        if texture is not None:
            fill = tw._over(fill, tw._second_colour(col), 0.7 * texture)
        u, v = obj.local(H)
        shade = 1.0 + 0.32 * np.clip(u * np.cos(light) + v * np.sin(light), -1.2, 1.2)
        img = tw._over(img, np.clip(fill * shade[..., None], 0, 1), tw._cover(sdf))
    img = img + pix.normal(0, 0.02, img.shape).astype(np.float32)
    return img, [obj.sdf(H) < 0 for obj in objs]


def _sketch(objs, rng, pix, H):
    paper = np.array([1.0, tw._u(rng, 0.97, 1.0), tw._u(rng, 0.9, 1.0)], np.float32) * tw._u(rng, 0.88, 1.0)
    img = np.broadcast_to(paper, (H, H, 3)) + pix.normal(0, 0.015, (H, H, 1)).astype(np.float32)
    ink = np.full(3, tw._u(rng, 0.1, 0.55), np.float32)
    if rng.random() < 0.3:  # blue ballpoint instead of pencil
        ink = ink * np.array([0.6, 0.7, 1.6], np.float32)
    X, Y = tw._grid(H)
    for _ in range(int(rng.integers(1, 4))):  # stray pencil strokes
        p, q = tw._u(rng, -1, 1, 2), tw._u(rng, -1, 1, 2)
        e = q - p
        t = np.clip(((X - p[0]) * e[0] + (Y - p[1]) * e[1]) / max(float(e @ e), 1e-3), 0, 1)
        d = np.sqrt((X - p[0] - t * e[0]) ** 2 + (Y - p[1] - t * e[1]) ** 2) * (H / 2)
        img = tw._over(img, ink, 0.5 * tw._band(d, 0.7))
    for obj in objs:
        sdf = obj.sdf(H)
        img = tw._over(img, paper, tw._cover(sdf))  # a shape on top hides the lines under it
        texture = tw._pick(rng, ("outline", "hatched", "stippled"), (0.6, 0.25, 0.15))
        if texture != "outline":
            mask = tw._texture_mask(obj, H, "striped" if texture == "hatched" else "dotted", rng)
            img = tw._over(img, ink, 0.45 * mask * tw._cover(sdf))
        stroke = tw._band(sdf, tw._u(rng, 0.8, 1.6))
        if rng.random() < 0.8:  # broken strokes: gaps along the outline
            stroke = stroke * (tw._smooth_noise(rng, H, L=7) > tw._u(rng, 0.15, 0.35))
        img = tw._over(img, ink, stroke)
    return img, [obj.sdf(H) < 0 for obj in objs]


def _rendition(objs, rng, pix, H):
    variant = tw._pick(rng, RENDITIONS)
    if variant == "inverted":
        img, masks = _photo(objs, rng, pix, H)
        return 1.0 - np.clip(img, 0, 1), masks, variant, H
    cols = [tw._jitter(rng, tw._pick(rng, tw._VIVID), 0.1) for _ in objs]
    mean, grid = np.mean(cols, 0), H
    masks = [obj.sdf(H) < 0 for obj in objs]
    if variant == "cartoon":  # flat colours with black outlines on a pastel background
        img = tw._background(rng, pix, H, tw._pick(rng, ("plain", "gradient")), mean, 0.5) * 0.5 + 0.5
        width = tw._u(rng, 1.8, 2.6)
        for obj, col in zip(objs, cols):
            sdf = obj.sdf(H)
            img = tw._over(tw._over(img, col, tw._cover(sdf)), np.zeros(3, np.float32), tw._band(sdf, width))
    elif variant == "pixel":  # drawn on a coarse grid with hard edges, 4 grey levels per channel, enlarged
        grid = L = int(rng.choice([H // 2, (3 * H) // 8]))
        small = tw._background(rng, pix, L, tw._pick(rng, ("plain", "striped")), mean, 0.5)
        idx = (np.arange(H) * L) // H
        masks = [(obj.sdf(L) < 0)[idx][:, idx] for obj in objs]
        for obj, col in zip(objs, cols):
            small = tw._over(small, col, (obj.sdf(L) < 0).astype(np.float32))
        img = (np.round(small * 3) / 3)[idx][:, idx]
    elif variant == "neon":  # glowing outlines on a dark background
        img = tw._background(rng, pix, H, "noise", mean, 0.0) * tw._u(rng, 0.05, 0.15)
        for obj, col in zip(objs, cols):
            sdf = obj.sdf(H)
            img = img * (1 - tw._cover(sdf))[..., None]  # a shape on top hides the glow under it
            img = img + col * (0.9 * np.exp(-np.abs(sdf) / tw._u(rng, 1.2, 2.2)))[..., None]
            img = tw._over(img, 0.5 * col + 0.5, tw._band(sdf, 1.0))
    else:  # mosaic: tiles of jittered colour with dark grout
        img = tw._background(rng, pix, H, "plain", mean, 0.6) * 0.7
        tile = int(rng.integers(2, 4))
        idx, grout = np.arange(H) // tile, (np.arange(H) % tile) == 0
        dark = np.where(grout[:, None] | grout[None, :], np.float32(0.6), np.float32(1.0))[..., None]
        for obj, col in zip(objs, cols):
            n = -(-H // tile)
            tiles = np.clip(col + tw._u(pix, -0.25, 0.25, (n, n, 3)), 0, 1).astype(np.float32)
            img = tw._over(img, tiles[idx][:, idx] * dark, tw._cover(obj.sdf(H)))
    return img, masks, variant, grid


def render_scene(style, classes, rng, size=SIZE):
    """One scene of `style` with shapes of `classes`: (uint8 image [H, W, 3], int64 label [H, W], attrs),
    attrs = {'style', 'variant', 'shapes': [toy_world._Obj in drawing order], 'grid': the resolution the
    shapes were rasterised at (pixel art: a coarser one, enlarged to H)}."""
    pix = np.random.default_rng(int(rng.integers(2**63)))  # draws whose amount depends on the size
    objs = layout(rng, classes, wobble=style == "sketch")
    variant, grid = style, size
    if style == "photo":
        img, masks = _photo(objs, rng, pix, size)
    elif style == "sketch":
        img, masks = _sketch(objs, rng, pix, size)
    elif style == "rendition":
        img, masks, variant, grid = _rendition(objs, rng, pix, size)
    else:
        raise ValueError(f"style must be one of {', '.join(TESTS.values())}, got {style!r}")
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return image, label_map(objs, masks), dict(style=style, variant=variant, shapes=objs, grid=grid)


# ------------------------------------------------------------------ datasets
class ToyScenes(Dataset):
    """A split of scenes in one style, as data/segmentation.py's sets: (image [3, H, W], label [H, W] long)
    through transform(image, Mask(label)); `names` are the prompted class names (label = index),
    `columns` the mIoU columns it reports ({column: class indices, or None for all})."""

    def __init__(self, name, style, split, transform, n=None, seed=0):
        classes = SEEN if split in ("train", "val") else SEEN + UNSEEN
        self.name, self.style, self.split, self.transform = name, style, split, transform
        self.names, self.classes, self.prompt_class = [tw.CLASSNAMES[c] for c in classes], len(classes), None
        self.columns = {"seen": SEEN, "unseen": UNSEEN} if split == "test" and style == "photo" else {name: None}
        n = SIZES[split] if n is None else n
        key = (style, split, n, seed)
        if key not in _CACHE:
            scenes = [render_scene(style, classes, scene_rng(seed, split, style, i))[:2] for i in range(n)]
            _CACHE[key] = (
                torch.from_numpy(np.stack([s[0] for s in scenes])).permute(0, 3, 1, 2).contiguous(),
                torch.from_numpy(np.stack([s[1] for s in scenes])),
            )
        self.images, self.labels = _CACHE[key]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image, label = self.transform(tv_tensors.Image(self.images[i]), tv_tensors.Mask(self.labels[i]))
        return image.as_subclass(torch.Tensor), label.as_subclass(torch.Tensor)


def train_set(transform):
    return ToyScenes("toy-photo-train", "photo", "train", transform)


def validation(transform):
    """The photo validation split (seen classes, disjoint from train and test) that learning rates are chosen on."""
    return ToyScenes("toy-photo-val", "photo", "val", transform)


def test_sets(names, transform):
    return [ToyScenes(name, TESTS[name], "test", transform) for name in names]


# ------------------------------------------------------------------ web scenes (the toy CLIP's 64 px stage)
WEB_STYLES = {"photo": 0.6, "sketch": 0.2, "rendition": 0.2}
WEB_SEED = (7, 99)  # entropy of the web scenes' own streams, apart from every split's (seed, _SCENES, ...)


def scene_caption(shapes, variant, rng):
    """'a picture of a star, a ring and an arrow.': every visible shape named, in drawing order, after one
    of toy_world's style phrases (70% of captions)."""
    names = [f"{tw._article(tw.CLASSNAMES[c])} {tw.CLASSNAMES[c]}" for c in shapes]
    body = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    phrases = tw._STYLE_PHRASES.get(variant, tw._STYLE_PHRASES["photo"])
    return (tw._pick(rng, phrases) + " " + body if rng.random() < 0.7 else body) + "."


class WebScenes:
    """n web scenes (64 px, 2-4 shapes of all 12 classes, styles drawn by WEB_STYLES) with captions that
    name every shape left visible: uint8 `images` [n, 3, 64, 64] and `captions`, the toy's stand-in for
    web images holding several objects. Scene i is drawn from its own generator."""

    def __init__(self, n):
        images, self.captions = [], []
        styles, probs = list(WEB_STYLES), list(WEB_STYLES.values())
        for i in range(int(n)):
            rng = np.random.default_rng(np.random.SeedSequence([*WEB_SEED, i]))
            style = styles[int(rng.choice(len(styles), p=probs))]
            image, label, attrs = render_scene(style, range(len(tw.CLASSNAMES)), rng)
            visible = [obj.label for obj in attrs["shapes"] if (label == obj.label).any()]
            images.append(image)
            self.captions.append(scene_caption(visible, attrs["variant"], rng))
        self.images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()  # [n, 3, H, W]

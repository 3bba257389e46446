"""A procedurally generated world of coloured shapes that stands in for CLIP's web data and ImageNet.

Twelve shape classes (CLASSNAMES) with a colour, size, position, fill texture, background and
clutter, described by captions ("a photo of a small red striped triangle on a striped
background."). A toy CLIP is pretrained on a web corpus (WebCorpus) that mixes every rendering
style, fine-tuned on the `photo` split and evaluated on `photo` and five shifted styles, each in
the role of one of the paper's test sets:

    photo        ImageNet (ID)     shaded objects with shadows on natural-looking textured backgrounds
    v2           ImageNet-V2       the same renderer, resampled attributes (smaller, off-centre, clutter)
    sketch       ImageNet-Sketch   pencil outlines on paper, broken strokes, stray lines
    rendition    ImageNet-R        cartoons, pixel art, inverted photos, neon signs, mosaics
    adversarial  ImageNet-A        small occluded low-contrast objects among vivid distractors
    corrupt      ImageNet-C        photo plus noise, blur, contrast, pixelation, fog or speckle (severity 1-5)

The web mixture (WEB_MIX) holds the downstream photo look at 30%, as photos like ImageNet's are
common in CLIP's web data, beside flat clip art, drawings, renditions, corrupted and cluttered
photos: every test style is seen on the web, and what fine-tuning on photo has to gain is how the
features are read out for the twelve class names, not new low-level features. Web photos show a class
mostly in its usual colour (WEB_COLOUR_BIAS, as stop signs are red) and downstream photos do not, so
zero-shot prompts carry a colour cue that misleads them where the features are not. Sample i of a split
is drawn from its own generator seeded with (seed, train/test/web, style, i): pixels and captions
never depend on generation order, and train, val and test never share a seed. Shapes are
signed-distance templates sampled on a grid (anti-aliased fills, outlines and glows); rendering is
single-threaded numpy, about 1 ms an image.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASSNAMES",
    "TEMPLATES",
    "STYLES",
    "VOCAB",
    "COLOURS",
    "SIZES",
    "TEXTURES",
    "BACKGROUNDS",
    "WEB_MIX",
    "WEB_HYPERNYM",
    "SPECIALISED_COLOUR",
    "render",
    "render_float",
    "caption",
    "ToySplit",
    "WebCorpus",
    "clear_cache",
]

# --------------------------------------------------------------------------- #
# vocabulary of the world
# --------------------------------------------------------------------------- #
CLASSNAMES: list[str] = [
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "ring",
    "heart",
    "diamond",
    "arrow",
    "crescent",
    "hexagon",
    "bolt",
]
STYLES = ("photo", "v2", "sketch", "rendition", "adversarial", "corrupt")
_WEB_ONLY_STYLES = ("web_photo", "web_corrupt")

TEMPLATES: list[str] = [
    "a photo of the {}.",
    "a picture of the {}.",
    "a drawing of the {}.",
    "a sketch of the {}.",
    "a cartoon of the {}.",
    "a blurry photo of the {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
]

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.10, 0.10),
    "green": (0.10, 0.62, 0.15),
    "blue": (0.12, 0.25, 0.85),
    "yellow": (0.95, 0.85, 0.10),
    "orange": (0.95, 0.50, 0.05),
    "purple": (0.52, 0.15, 0.70),
    "pink": (0.96, 0.50, 0.72),
    "cyan": (0.10, 0.80, 0.85),
    "white": (0.96, 0.96, 0.96),
    "black": (0.07, 0.07, 0.07),
    "brown": (0.50, 0.30, 0.12),
    "gray": (0.50, 0.50, 0.50),
}
_COLOUR_NAMES = list(COLOURS)
_COLOUR_ARR = np.array([COLOURS[c] for c in _COLOUR_NAMES], dtype=np.float32)
_VIVID = [c for c in _COLOUR_NAMES if c not in ("white", "black", "gray", "brown")]

# object scale (template units -> fraction of the half image width)
SIZES: dict[str, tuple[float, float]] = {"small": (0.32, 0.40), "medium": (0.45, 0.54), "large": (0.58, 0.70)}
TEXTURES = ("solid", "striped", "dotted", "checked")
BACKGROUNDS = ("plain", "striped", "noise", "gradient")
_BG_WORD = {"plain": "plain", "striped": "striped", "noise": "textured", "gradient": "gradient"}
_RENDITIONS = ("cartoon", "pixel", "inverted", "neon", "mosaic")
_CORRUPTIONS = ("noise", "blur", "contrast", "pixelate", "fog", "impulse")

# --------------------------------------------------------------------------- #
# shape templates: signed distance fields in "unit" coordinates (y points down)
# --------------------------------------------------------------------------- #
_T = 128  # template resolution
_EXT = 1.5  # template covers [-_EXT, _EXT]^2


def _poly_sdf(P: np.ndarray, verts: list[tuple[float, float]]) -> np.ndarray:
    """Exact signed distance of points P [N,2] to a simple polygon (negative inside)."""
    V = np.asarray(verts, dtype=np.float64)
    A, B = V, np.roll(V, -1, axis=0)
    px, py = P[:, None, 0], P[:, None, 1]
    ex, ey = (B - A)[None, :, 0], (B - A)[None, :, 1]
    wx, wy = px - A[None, :, 0], py - A[None, :, 1]
    t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
    d = np.sqrt(((wx - t * ex) ** 2 + (wy - t * ey) ** 2).min(axis=1))
    ay, by = A[None, :, 1], B[None, :, 1]
    cond = (ay > py) != (by > py)
    xint = A[None, :, 0] + (py - ay) * ex / np.where(ey == 0, 1e-12, ey)
    inside = (cond & (px < xint)).sum(axis=1) % 2 == 1
    return np.where(inside, -d, d)


def _circle_sdf(P, cx, cy, r):
    return np.hypot(P[:, 0] - cx, P[:, 1] - cy) - r


def _regular(n, r, start_deg=-90.0, inner=None):
    pts = []
    for k in range(n):
        a = math.radians(start_deg + 360.0 * k / n)
        pts.append((r * math.cos(a), r * math.sin(a)))
        if inner is not None:
            a2 = math.radians(start_deg + 360.0 * (k + 0.5) / n)
            pts.append((inner * math.cos(a2), inner * math.sin(a2)))
    return pts


def _shape_sdf(name: str, P: np.ndarray) -> np.ndarray:
    if name == "circle":
        return _circle_sdf(P, 0, 0, 0.85)
    if name == "square":
        return _poly_sdf(P, [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)])
    if name == "triangle":
        return _poly_sdf(P, [(x, y + 0.18) for x, y in _regular(3, 1.02)])
    if name == "star":
        return _poly_sdf(P, [(x, y + 0.06) for x, y in _regular(5, 1.0, inner=0.42)])
    if name == "cross":
        a, w = 0.9, 0.28
        return _poly_sdf(
            P,
            [
                (-w, -a),
                (w, -a),
                (w, -w),
                (a, -w),
                (a, w),
                (w, w),
                (w, a),
                (-w, a),
                (-w, w),
                (-a, w),
                (-a, -w),
                (-w, -w),
            ],
        )
    if name == "ring":
        return np.maximum(_circle_sdf(P, 0, 0, 0.9), -_circle_sdf(P, 0, 0, 0.5))
    if name == "heart":
        t = np.linspace(0, 2 * np.pi, 96, endpoint=False)
        x = 16 * np.sin(t) ** 3 / 17.0
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) / 17.0
        return _poly_sdf(P, list(zip(x * 1.0, y * 1.0 + 0.05)))
    if name == "diamond":
        return _poly_sdf(P, [(0, -1.0), (0.64, 0), (0, 1.0), (-0.64, 0)])
    if name == "arrow":
        return _poly_sdf(
            P, [(-0.92, -0.22), (0.12, -0.22), (0.12, -0.62), (0.92, 0), (0.12, 0.62), (0.12, 0.22), (-0.92, 0.22)]
        )
    if name == "crescent":
        return np.maximum(_circle_sdf(P, -0.05, 0, 0.88), -_circle_sdf(P, 0.4, -0.18, 0.72))
    if name == "hexagon":
        return _poly_sdf(P, _regular(6, 0.9, start_deg=0.0))
    if name == "bolt":
        return _poly_sdf(P, [(0.22, -1.0), (-0.55, 0.12), (-0.06, 0.12), (-0.24, 1.0), (0.58, -0.18), (0.08, -0.18)])
    raise KeyError(name)


@functools.cache
def _templates() -> np.ndarray:
    """SDF templates, float32 [n_classes, _T, _T] (unit coordinates)."""
    g = np.linspace(-_EXT, _EXT, _T)
    yy, xx = np.meshgrid(g, g, indexing="ij")
    P = np.stack([xx.ravel(), yy.ravel()], axis=1)
    return np.stack([_shape_sdf(n, P).reshape(_T, _T) for n in CLASSNAMES]).astype(np.float32)


@functools.cache
def _flat_templates() -> np.ndarray:
    return np.ascontiguousarray(_templates().reshape(len(CLASSNAMES), -1))


@functools.cache
def _grid(H: int):
    c = (np.arange(H, dtype=np.float32) + 0.5) / H * 2.0 - 1.0
    Y, X = np.meshgrid(c, c, indexing="ij")
    return X, Y


@functools.cache
def _upsample_matrix(L: int, H: int) -> np.ndarray:
    """Bilinear interpolation matrix [H, L] (align-corners style)."""
    pos = np.linspace(0, L - 1, H)
    i0 = np.clip(np.floor(pos).astype(int), 0, L - 2)
    f = pos - i0
    M = np.zeros((H, L), dtype=np.float32)
    M[np.arange(H), i0] = 1 - f
    M[np.arange(H), i0 + 1] += f
    return M


def _smooth_noise(rng, H, L=5) -> np.ndarray:
    """Smooth random field in [0, 1], [H, H]."""
    M = _upsample_matrix(L, H)
    f = M @ rng.random((L, L), dtype=np.float32) @ M.T
    M2 = _upsample_matrix(2 * L + 1, H)
    f = f + 0.5 * (M2 @ rng.random((2 * L + 1, 2 * L + 1), dtype=np.float32) @ M2.T)
    f -= f.min()
    return f / max(float(f.max()), 1e-6)


# --------------------------------------------------------------------------- #
# geometry of one object
# --------------------------------------------------------------------------- #
class _Obj:
    """Placement of one shape; gives its signed distance field (in pixels)."""

    def __init__(self, label, cx, cy, scale, angle, aspect=(1.0, 1.0), wobble=None):
        # plain Python floats keep every array float32 (numpy scalars would promote)
        self.label, self.cx, self.cy = int(label), float(cx), float(cy)
        self.scale, self.angle = float(scale), float(angle)
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.wobble = None if wobble is None else tuple(float(w) for w in wobble)

    def local(self, H, shift=(0.0, 0.0)):
        X, Y = _grid(H)
        dx = X - self.cx - shift[0] * 2.0 / H
        dy = Y - self.cy - shift[1] * 2.0 / H
        c, s = math.cos(self.angle), math.sin(self.angle)
        u = (c * dx + s * dy) / (self.scale * self.aspect[0])
        v = (-s * dx + c * dy) / (self.scale * self.aspect[1])
        if self.wobble is not None:
            a, f, p1, p2 = self.wobble
            u, v = u + a * np.sin(f * v + p1), v + a * np.sin(f * u + p2)
        return u, v

    def sdf(self, H, shift=(0.0, 0.0)):
        u, v = self.local(H, shift)
        k = (_T - 1) / (2 * _EXT)
        gx = u * k
        gx += _EXT * k
        gy = v * k
        gy += _EXT * k
        cx = np.clip(gx, 0, _T - 1.001)
        cy = np.clip(gy, 0, _T - 1.001)
        fx, fy = np.floor(cx), np.floor(cy)
        i = fy.astype(np.int32) * _T + fx.astype(np.int32)
        fx = cx - fx  # (float32 - int would give float64)
        fy = cy - fy
        t = _flat_templates()[self.label]
        a, b, c, d = t.take(i), t.take(i + 1), t.take(i + _T), t.take(i + _T + 1)
        top = a + (b - a) * fx
        r = top + (c + (d - c) * fx - top) * fy
        gx -= cx  # distance beyond the template's extent
        gy -= cy
        r += np.sqrt(gx * gx + gy * gy) * (1.0 / k)
        r *= self.scale * min(self.aspect) * H / 2.0
        return r


def _cover(sdf_px, soft=1.0):
    return np.clip(0.5 - sdf_px / soft, 0.0, 1.0)


def _band(sdf_px, width):
    return np.clip(width / 2.0 + 0.5 - np.abs(sdf_px), 0.0, 1.0)


def _texture_mask(obj: _Obj, H, texture, rng) -> np.ndarray | None:
    if texture == "solid":
        return None
    u, v = obj.local(H)
    p = _u(rng, 0.38, 0.55)
    if texture == "striped":
        a = _u(rng, 0, np.pi)
        return (np.sin((u * math.cos(a) + v * math.sin(a)) * (2 * np.pi / p)) > 0).astype(np.float32)
    if texture == "dotted":
        fu, fv = (u / p) % 1.0 - 0.5, (v / p) % 1.0 - 0.5
        return (fu * fu + fv * fv < 0.09).astype(np.float32)
    if texture == "checked":
        return ((np.floor(u / p) + np.floor(v / p)) % 2).astype(np.float32)
    raise KeyError(texture)


def _second_colour(col):
    lum = float(col @ np.array([0.3, 0.59, 0.11], dtype=np.float32))
    return col * 0.4 if lum > 0.45 else col * 0.4 + 0.6


def _jitter(rng, name, amount=0.06):
    return np.clip(np.asarray(COLOURS[name], np.float32) + _u(rng, -amount, amount, 3).astype(np.float32), 0, 1)


def _u(rng, lo, hi, size=None):
    """Uniform draw as a Python float (or float32 array): numpy float64 scalars would
    silently promote the float32 image arrays."""
    if size is None:
        return float(rng.uniform(lo, hi))
    return rng.uniform(lo, hi, size).astype(np.float32)


def _pick(rng, options, probs=None):
    if probs is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(probs, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _contrasting_colour(rng, col, min_dist, palette=None):
    """A background colour at least ``min_dist`` (RGB Euclidean) from ``col``."""
    best, bd = None, -1.0
    for _ in range(12):
        if palette is None:
            c = rng.random(3).astype(np.float32) * 0.85 + 0.05
        else:
            c = _jitter(rng, _pick(rng, palette), 0.1)
        d = float(np.sqrt(((c - col) ** 2).sum()))
        if d >= min_dist:
            return c
        if d > bd:
            best, bd = c, d
    return best


def _background(rng, pix, H, kind, obj_col, min_dist=0.5, natural=False) -> np.ndarray:
    pal = ["green", "brown", "blue", "gray", "white", "yellow"] if natural else None
    c1 = _contrasting_colour(rng, obj_col, min_dist, pal)
    X, Y = _grid(H)
    if kind == "plain":
        img = np.broadcast_to(c1, (H, H, 3)).copy()
    else:
        c2 = _contrasting_colour(rng, obj_col, min_dist, pal)
        if kind == "gradient":
            a = _u(rng, 0, 2 * np.pi)
            t = np.clip((X * math.cos(a) + Y * math.sin(a)) * 0.5 + 0.5, 0, 1)
        elif kind == "striped":
            a = _u(rng, 0, np.pi)
            period = _u(rng, 0.25, 0.5)
            t = np.clip(np.sin((X * math.cos(a) + Y * math.sin(a)) * (2 * np.pi / period)) * 2.0 + 0.5, 0, 1)
        elif kind == "noise":
            t = _smooth_noise(rng, H, L=int(rng.integers(3, 7)))
        else:
            raise KeyError(kind)
        img = c1 * (1 - t[..., None]) + c2 * t[..., None]
        if kind == "noise":
            img = img + pix.normal(0, 0.035, (H, H, 1)).astype(np.float32)
    return img.astype(np.float32)


def _over(img, colour, alpha):
    """Alpha-composite ``colour`` ([3] or [H,W,3]) over ``img`` with coverage ``alpha``."""
    out = colour - img
    out *= alpha[..., None]
    out += img
    return out


def _place(rng, size, spread, scale_mult=1.0):
    """Scale and centre of an object; ``spread`` None = uniform over the frame."""
    lo, hi = SIZES[size]
    s = float(_u(rng, lo, hi)) * scale_mult
    lim = max(1.0 - 0.85 * s, 0.0)
    if spread is not None:
        cx, cy = np.clip(rng.normal(0, spread, 2), -lim, lim)
    else:
        cx, cy = _u(rng, -lim, lim, 2)
    return s, float(cx), float(cy)


def _position_word(cx, cy):
    v = "top" if cy < -0.25 else "bottom" if cy > 0.25 else ""
    h = "left" if cx < -0.25 else "right" if cx > 0.25 else ""
    return (v + " " + h).strip() or "center"


def _angle(rng, label, spread=20.0):
    a = math.radians(_u(rng, -spread, spread))
    if CLASSNAMES[label] == "arrow":
        a += math.pi * int(rng.integers(2))  # arrows point right or left
    return a


def _distractor_objs(rng, label, n, s_lo, s_hi):
    out = []
    for _ in range(n):
        lab = int(rng.integers(len(CLASSNAMES) - 1))
        lab = lab + (lab >= label)  # always another class
        s = float(_u(rng, s_lo, s_hi))
        lim = max(1.0 - 0.6 * s, 0.0)
        cx, cy = _u(rng, -lim, lim, 2)
        out.append(_Obj(lab, float(cx), float(cy), s, _angle(rng, lab, 30)))
    return out


# --------------------------------------------------------------------------- #
# attribute distributions per style
# --------------------------------------------------------------------------- #
_PHOTO_LIKE = {
    # size: P(small, medium, large); spread: std of the centre offset; bg: P(plain,
    # striped, noise, gradient); tex: P(solid, striped, dotted, checked); clutter:
    # P(0, 1, 2, ... distractors); colour: palette weights (None = uniform); light:
    # range of the light direction; shade / shadow: probability of shading / shadow.
    "photo": dict(
        size=(0.15, 0.45, 0.40),
        spread=0.13,
        bg=(0.05, 0.05, 0.55, 0.35),
        tex=(0.60, 0.14, 0.13, 0.13),
        clutter=(0.50, 0.35, 0.15),
        colour=None,
        light=(-2.6, -0.6),
        shade=1.0,
        shadow=1.0,
    ),
    "v2": dict(
        size=(0.30, 0.45, 0.25),
        spread=0.30,
        bg=(0.10, 0.10, 0.45, 0.35),
        tex=(0.50, 0.17, 0.17, 0.16),
        clutter=(0.35, 0.35, 0.20, 0.10),
        colour=(2, 1, 2, 1, 1, 2, 1, 2, 1, 1, 2, 1),
        light=(-1.6, 0.4),
        shade=1.0,
        shadow=1.0,
    ),
    "web_photo": dict(
        size=(0.20, 0.40, 0.40),
        spread=0.13,
        bg=(0.50, 0.30, 0.00, 0.20),
        tex=(0.40, 0.20, 0.20, 0.20),
        clutter=(0.75, 0.20, 0.05),
        colour=None,
        light=(-np.pi, np.pi),
        shade=0.2,
        shadow=0.1,
    ),
}


def _photo_like(style, label, rng, pix, H, attrs):
    cfg = _PHOTO_LIKE[style]
    size = _pick(rng, ("small", "medium", "large"), cfg["size"])
    s, cx, cy = _place(rng, size, cfg["spread"])
    cname = attrs["colour"] or _pick(rng, _COLOUR_NAMES, cfg["colour"])
    col = _jitter(rng, cname)
    tex = _pick(rng, TEXTURES, cfg["tex"])
    bg = _pick(rng, BACKGROUNDS, cfg["bg"])
    n_clutter = int(rng.choice(len(cfg["clutter"]), p=np.asarray(cfg["clutter"]) / sum(cfg["clutter"])))
    obj = _Obj(label, cx, cy, s, _angle(rng, label), tuple(_u(rng, 0.9, 1.1, 2)))
    img = _background(rng, pix, H, bg, col, natural=(style != "web_photo" and bg == "noise"))
    for d in _distractor_objs(rng, label, n_clutter, 0.3 * s + 0.05, 0.45 * s + 0.07):
        dc = _jitter(rng, _pick(rng, _COLOUR_NAMES))
        img = _over(img, dc, _cover(d.sdf(H)))
    shaded = rng.random() < cfg["shade"]
    sdf = obj.sdf(H)
    if rng.random() < cfg["shadow"]:  # soft drop shadow, 1-2 px down-right
        sh = int(rng.integers(1, 3))
        shadow = np.zeros((H, H), np.float32)
        shadow[sh:, sh:] = _cover(sdf[:-sh, :-sh], soft=1.8)
        img = img * (1 - 0.45 * shadow)[..., None]
    fill = np.broadcast_to(col, (H, H, 3))
    tm = _texture_mask(obj, H, tex, rng)
    if tm is not None:
        fill = _over(fill, _second_colour(col), 0.7 * tm)
    if shaded:
        la = _u(rng, *cfg["light"])
        u, v = obj.local(H)
        light = 1.0 + 0.32 * np.clip(u * math.cos(la) + v * math.sin(la), -1.2, 1.2)
        fill = np.clip(fill * light[..., None], 0, 1)
    img = _over(img, fill, _cover(sdf))
    if style != "web_photo":
        img = img + pix.normal(0, 0.02, img.shape).astype(np.float32)
    attrs.update(
        colour=cname, size=size, position=_position_word(cx, cy), texture=tex, background=bg, clutter=n_clutter
    )
    return img


def _sketch(label, rng, pix, H, attrs):
    size = _pick(rng, ("small", "medium", "large"), (0.2, 0.45, 0.35))
    s, cx, cy = _place(rng, size, 0.13)
    wob = (_u(rng, 0.02, 0.05), _u(rng, 4, 8), _u(rng, 0, 6.3), _u(rng, 0, 6.3))
    obj = _Obj(label, cx, cy, s, _angle(rng, label), tuple(_u(rng, 0.88, 1.12, 2)), wob)
    paper = _u(rng, 0.88, 1.0)
    tint = np.array([1.0, _u(rng, 0.97, 1.0), _u(rng, 0.9, 1.0)], np.float32)
    img = np.full((H, H, 3), paper, np.float32) * tint
    img = img + pix.normal(0, 0.015, (H, H, 1)).astype(np.float32)
    ink = np.full(3, _u(rng, 0.1, 0.55), np.float32)
    if rng.random() < 0.3:  # blue ballpoint instead of pencil
        ink = ink * np.array([0.6, 0.7, 1.6], np.float32)
    n_clutter = int(rng.choice(4, p=[0.4, 0.3, 0.2, 0.1]))
    for d in _distractor_objs(rng, label, n_clutter, 0.3 * s + 0.05, 0.45 * s + 0.07):
        img = _over(img, ink, 0.6 * _band(d.sdf(H), 0.8))
    X, Y = _grid(H)
    for _ in range(int(rng.integers(1, 4))):  # stray pencil strokes
        p, q = _u(rng, -1, 1, 2), _u(rng, -1, 1, 2)
        e = q - p
        t = np.clip(((X - p[0]) * e[0] + (Y - p[1]) * e[1]) / max(float(e @ e), 1e-3), 0, 1)
        d = np.sqrt((X - p[0] - t * e[0]) ** 2 + (Y - p[1] - t * e[1]) ** 2) * (H / 2)
        img = _over(img, ink, 0.5 * _band(d, 0.7))
    sdf = obj.sdf(H)
    tex = _pick(rng, ("outline", "hatched", "stippled"), (0.6, 0.25, 0.15))
    if tex != "outline":
        tm = _texture_mask(obj, H, "striped" if tex == "hatched" else "dotted", rng)
        img = _over(img, ink, 0.45 * tm * _cover(sdf))
    stroke = _band(sdf, _u(rng, 0.8, 1.6))
    if rng.random() < 0.8:  # broken strokes: gaps along the outline
        stroke = stroke * (_smooth_noise(rng, H, L=7) > _u(rng, 0.15, 0.35))
    img = _over(img, ink, stroke)
    attrs.update(
        colour=None, size=size, position=_position_word(cx, cy), texture=tex, background="paper", clutter=n_clutter
    )
    return img


def _nearest_colour_name(col) -> str:
    return _COLOUR_NAMES[int(np.argmin(((_COLOUR_ARR - col) ** 2).sum(1)))]


def _rendition(label, rng, pix, H, attrs):
    variant = _pick(rng, _RENDITIONS)
    size = _pick(rng, ("small", "medium", "large"), (0.2, 0.4, 0.4))
    if variant == "inverted":
        img = 1.0 - np.clip(_photo_like("web_photo", label, rng, pix, H, attrs), 0, 1)
        attrs.update(colour=_nearest_colour_name(1.0 - _jitter(rng, attrs["colour"], 0.0)))
        return img, variant
    s, cx, cy = _place(rng, size, 0.13)
    cname = _pick(rng, _VIVID)
    col = _jitter(rng, cname, 0.1)
    tex, bg = "solid", "plain"
    if variant == "cartoon":
        wob = (_u(rng, 0.01, 0.04), _u(rng, 3, 6), _u(rng, 0, 6.3), _u(rng, 0, 6.3))
        obj = _Obj(label, cx, cy, s, _angle(rng, label), tuple(_u(rng, 0.85, 1.15, 2)), wob)
        bg = _pick(rng, ("plain", "gradient"))
        img = _background(rng, pix, H, bg, col, 0.5) * 0.5 + 0.5  # pastel
        sdf = obj.sdf(H)
        img = _over(img, col, _cover(sdf))
        img = _over(img, np.zeros(3, np.float32), _band(sdf, _u(rng, 1.8, 2.6)))
    elif variant == "pixel":
        L = int(rng.choice([H // 2, (3 * H) // 8]))
        obj = _Obj(label, cx, cy, s, _angle(rng, label, 10))
        bg = _pick(rng, ("plain", "striped"))
        small = _background(rng, pix, L, bg, col, 0.5)
        small = _over(small, col, (obj.sdf(L) < 0).astype(np.float32))
        small = np.round(small * 3) / 3  # 4-level palette
        idx = (np.arange(H) * L) // H
        img = small[idx][:, idx]
    elif variant == "neon":
        obj = _Obj(label, cx, cy, s, _angle(rng, label))
        img = _background(rng, pix, H, "noise", col, 0.0) * _u(rng, 0.05, 0.15)
        bg = "dark"
        d = np.abs(obj.sdf(H))
        img = img + col * (0.9 * np.exp(-d / _u(rng, 1.2, 2.2)))[..., None]
        img = _over(img, 0.5 * col + 0.5, _band(obj.sdf(H), 1.0))
    elif variant == "mosaic":
        obj = _Obj(label, cx, cy, s, _angle(rng, label))
        bg = "plain"
        img = _background(rng, pix, H, "plain", col, 0.6) * 0.7
        tile = int(rng.integers(2, 4))
        nt = -(-H // tile)
        tiles = np.clip(col + _u(pix, -0.25, 0.25, (nt, nt, 3)), 0, 1).astype(np.float32)
        idx = np.arange(H) // tile
        fill = tiles[idx][:, idx]
        grout = (np.arange(H) % tile) == 0
        fill = fill * np.where(grout[:, None] | grout[None, :], np.float32(0.6), np.float32(1.0))[..., None]
        img = _over(img, fill, _cover(obj.sdf(H)))
        tex = "tiled"
    else:
        raise KeyError(variant)
    attrs.update(colour=cname, size=size, position=_position_word(cx, cy), texture=tex, background=bg, clutter=0)
    return img, variant


def _adversarial(label, rng, pix, H, attrs):
    size = _pick(rng, ("small", "medium"), (0.4, 0.6))
    s, cx, cy = _place(rng, size, None)
    cname = _pick(rng, _COLOUR_NAMES)
    col = _jitter(rng, cname)
    tex = _pick(rng, TEXTURES, (0.4, 0.2, 0.2, 0.2))
    bg = _pick(rng, ("noise", "striped", "gradient"), (0.6, 0.1, 0.3))
    obj = _Obj(label, cx, cy, s, _angle(rng, label, 25), tuple(_u(rng, 0.85, 1.15, 2)))
    img = _background(rng, pix, H, bg, col, min_dist=0.35, natural=(bg == "noise"))
    n_d = int(rng.integers(2, 4))
    ds = _distractor_objs(rng, label, n_d, 0.3 * s, 0.55 * s)
    n_front = int(rng.integers(0, 2))  # some distractors overlap the target
    for d in ds[n_front:]:
        img = _over(img, _jitter(rng, _pick(rng, _VIVID)), _cover(d.sdf(H)))
    sdf = obj.sdf(H)
    fill = np.broadcast_to(col, (H, H, 3))
    tm = _texture_mask(obj, H, tex, rng)
    if tm is not None:
        fill = _over(fill, _second_colour(col), 0.7 * tm)
    img = _over(img, fill, _cover(sdf))
    for d in ds[:n_front]:
        img = _over(img, _jitter(rng, _pick(rng, _VIVID)), _cover(d.sdf(H)))
    occluded = bool(rng.random() < 0.4)
    if occluded:  # a bar across part of the object
        X, Y = _grid(H)
        a = _u(rng, 0, np.pi)
        off = _u(rng, -0.5, 0.5) * s
        w = _u(rng, 0.15, 0.3) * s
        dist = np.abs((X - cx) * math.cos(a) + (Y - cy) * math.sin(a) - off)
        img = _over(img, _contrasting_colour(rng, col, 0.3), np.clip((w - dist) * H / 2 + 0.5, 0, 1))
    img = img + pix.normal(0, 0.03, img.shape).astype(np.float32)
    attrs.update(
        colour=cname,
        size=size,
        position=_position_word(cx, cy),
        texture=tex,
        background=bg,
        clutter=n_d,
        occluded=occluded,
    )
    return img


def _blur(img, sigma):
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    H = img.shape[0]
    p = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="reflect")
    img = sum(k[i] * p[i : i + H] for i in range(2 * r + 1))
    p = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="reflect")
    return sum(k[i] * p[:, i : i + H] for i in range(2 * r + 1))


def _corrupt(img, rng, pix, kind, sev):
    H = img.shape[0]
    img = np.clip(img, 0, 1)
    i = sev - 1
    if kind == "noise":
        return img + pix.normal(0, (0.05, 0.08, 0.11, 0.15, 0.2)[i], img.shape).astype(np.float32)
    if kind == "blur":
        return _blur(img, (0.6, 0.85, 1.1, 1.4, 1.8)[i])
    if kind == "contrast":
        f = (0.55, 0.42, 0.32, 0.24, 0.17)[i]
        m = img.mean(axis=(0, 1), keepdims=True)
        return (img - m) * f + m
    if kind == "pixelate":
        L = max(4, int(round(H * (0.6, 0.5, 0.42, 0.35, 0.28)[i])))
        idx_d = ((np.arange(L) + 0.5) * H / L).astype(int)
        idx_u = (np.arange(H) * L) // H
        return img[idx_d][:, idx_d][idx_u][:, idx_u]
    if kind == "fog":
        a = (0.3, 0.4, 0.5, 0.6, 0.7)[i]
        fog = 0.55 + 0.4 * _smooth_noise(rng, H, L=3)
        return img * (1 - a) + a * fog[..., None]
    if kind == "impulse":
        p = (0.02, 0.04, 0.07, 0.1, 0.14)[i]
        m = pix.random((H, H, 1)) < p
        salt = (pix.random((H, H, 1)) < 0.5).astype(np.float32)
        return np.where(m, salt, img)
    raise KeyError(kind)


# --------------------------------------------------------------------------- #
# public: one sample and its caption
# --------------------------------------------------------------------------- #
def render(style: str, label: int, rng: np.random.Generator, image_size: int = 32, colour: str | None = None):
    """Draw one sample of class ``label`` in ``style`` using ``rng``: ``(uint8 [H, W, 3], attrs)``;
    ``colour`` (a COLOURS name) fixes the object's colour in the photo-like styles."""
    img, attrs = render_float(style, label, rng, image_size, colour)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), attrs


def render_float(style: str, label: int, rng: np.random.Generator, image_size: int = 32, colour: str | None = None):
    """``render`` before quantisation: ``img`` float32 ``[H, W, 3]`` in [0, 1]; ``attrs`` a dict with keys
    ``label, shape, style, variant, colour (None for sketches), size, position,
    texture, background, clutter (number of distractor shapes), occluded``.
    ``style`` is one of ``STYLES`` or a web-only style (``'web_photo'``,
    ``'web_corrupt'``).
    """
    label = int(label)
    if not 0 <= label < len(CLASSNAMES):
        raise ValueError(f"label {label} out of range")
    H = int(image_size)
    # ``pix`` draws everything whose amount depends on the image size (pixel noise,
    # mosaic tiles), so that the scene and caption drawn from ``rng`` do not.
    pix = np.random.default_rng(int(rng.integers(2**63)))
    attrs: dict[str, Any] = dict(
        label=label, shape=CLASSNAMES[label], style=style, variant=style, occluded=False, colour=colour
    )
    if style in ("photo", "v2", "web_photo"):
        img = _photo_like(style, label, rng, pix, H, attrs)
    elif style in ("corrupt", "web_corrupt"):
        img = _photo_like("photo" if style == "corrupt" else "web_photo", label, rng, pix, H, attrs)
        kind, sev = _pick(rng, _CORRUPTIONS), int(rng.integers(1, 6))
        img = _corrupt(img, rng, pix, kind, sev)
        attrs.update(variant=kind, severity=sev)
    elif style == "sketch":
        img = _sketch(label, rng, pix, H, attrs)
    elif style == "rendition":
        img, variant = _rendition(label, rng, pix, H, attrs)
        attrs.update(variant=variant)
    elif style == "adversarial":
        img = _adversarial(label, rng, pix, H, attrs)
    else:
        raise ValueError(f"unknown style {style!r}")
    return img, attrs


_STYLE_PHRASES = {
    "photo": ["a photo of", "a picture of", "an image of", "a photo of"],
    "v2": ["a photo of", "a picture of", "an image of", "a snapshot of"],
    "web_photo": ["a photo of", "a picture of", "an image of", "a clip art of"],
    "adversarial": ["a photo of", "a cluttered photo of", "a picture of", "a hard photo of"],
    "sketch": [
        "a sketch of",
        "a drawing of",
        "a pencil sketch of",
        "a black and white drawing of",
        "a line drawing of",
    ],
    "cartoon": ["a cartoon of", "a cartoon drawing of"],
    "pixel": ["pixel art of", "a pixel art drawing of"],
    "inverted": ["an inverted photo of", "a negative image of"],
    "neon": ["a neon sign of", "a glowing neon drawing of"],
    "mosaic": ["a mosaic of", "a tile mosaic of"],
    "noise": ["a noisy photo of", "a grainy photo of"],
    "blur": ["a blurry photo of", "an out of focus photo of"],
    "contrast": ["a low contrast photo of", "a faded photo of"],
    "pixelate": ["a pixelated photo of", "a low resolution photo of"],
    "fog": ["a foggy photo of", "a hazy photo of"],
    "impulse": ["a speckled photo of", "a dotted noisy photo of"],
}
_NUMBERS = ["no", "one", "two", "three", "four", "five", "six"]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(attrs: dict, rng: np.random.Generator, shape_word: str | None = None) -> str:
    """A varied natural-language description of a sample from its ``attrs``.

    Always names the shape (``shape_word`` overrides it; ``WebCorpus`` uses this for
    its noisy captions), mentions most other attributes with some probability and
    the rendering style often (always for non-photo styles' first phrase choice).
    """
    shape = shape_word or attrs["shape"]
    variant = attrs.get("variant", attrs.get("style", "photo"))
    photoish = variant in ("photo", "v2", "web_photo", "adversarial")
    # noun phrase
    adj = []
    if rng.random() < 0.6:
        adj.append(attrs["size"])
    if attrs.get("colour") and rng.random() < 0.75:
        adj.append(attrs["colour"])
    tex = attrs.get("texture", "solid")
    if tex not in ("solid", "outline") and rng.random() < 0.6:
        adj.append(tex)
    noun = " ".join(adj + [shape])
    det = "the" if rng.random() < 0.15 else _article(noun)
    np_ = f"{det} {noun}"
    # style prefix
    p_style = 0.55 if photoish else 0.85
    phrases = _STYLE_PHRASES.get(variant, _STYLE_PHRASES["photo"])
    words = [_pick(rng, phrases) + " " + np_] if rng.random() < p_style else [np_]
    # clauses
    bg = attrs.get("background")
    if bg and rng.random() < 0.6:
        if bg == "paper":
            words.append(_pick(rng, ["on white paper", "on a white background"]))
        elif bg == "dark":
            words.append("on a dark background")
        else:
            words.append(f"on a {_BG_WORD[bg]} background")
    if rng.random() < 0.35:
        pos = attrs["position"]
        prep = {"left": "on", "right": "on", "top": "at", "bottom": "at"}.get(pos, "in")
        words.append(f"{prep} the {pos}")
    n = int(attrs.get("clutter", 0))
    if n > 0 and rng.random() < 0.5:
        other = "other shape" if n == 1 else "other shapes"
        words.append(_pick(rng, [f"with {_NUMBERS[min(n, 6)]} {other}", "among other shapes", "in a cluttered scene"]))
    if attrs.get("occluded") and rng.random() < 0.6:
        words.append(_pick(rng, ["partly hidden", "partially occluded"]))
    return " ".join(words) + "."


# Web alt-text does not always name its object: this share of web captions calls the shape only
# by a word that names no class.
WEB_HYPERNYM = 0.08
HYPERNYMS = ("shape", "object", "thing", "symbol", "figure")

# Web photos show a class mostly in its usual colour (stop signs are red, school buses yellow): this
# share of the web's photo-like samples draw their object in USUAL_COLOUR; the rest, and every
# downstream photo, draw the colour uniformly. The class prompt's embedding so carries a colour that a
# downstream photo does not: zero-shot is misled where features are not.
WEB_COLOUR_BIAS = 0.7
USUAL_COLOUR = dict(
    zip(
        CLASSNAMES,
        ("orange", "blue", "green", "yellow", "white", "gray", "red", "cyan", "black", "purple", "brown", "pink"),
    )
)
_PHOTO_LIKE_WEB = ("photo", "web_photo", "web_corrupt")

# A specialised downstream dataset (data/toy.py, --data toy-specialised) has a look of its own: this share
# of its photos draw their object in SPECIALISED_COLOUR, a colour that its class never has on the web (no
# class keeps its USUAL_COLOUR), as EuroSAT's forests, DTD's textures and Flowers' petals look a way that
# web captions of their names do not describe. The features see the colour, the class prompts do not.
SPECIALISED_BIAS = WEB_COLOUR_BIAS
SPECIALISED_COLOUR = dict(
    zip(
        CLASSNAMES,
        ("blue", "white", "red", "brown", "cyan", "orange", "gray", "green", "purple", "pink", "yellow", "black"),
    )
)


def _build_vocab() -> list[str]:
    words: set[str] = set(CLASSNAMES) | set(COLOURS) | set(SIZES) | set(TEXTURES)
    words |= {"outline", "hatched", "stippled", "tiled", *HYPERNYMS}
    words |= set(_BG_WORD.values()) | set(_NUMBERS)
    for phrases in _STYLE_PHRASES.values():
        for p in phrases:
            words |= set(p.split())
    for t in TEMPLATES:
        words |= set(t.replace("{}", " ").replace(".", " ").split())
    words |= set(
        "a an the on in at with among other shapes shape background white paper dark "
        "center top bottom left right cluttered scene partly hidden partially "
        "occluded".split()
    )
    return sorted(words)


VOCAB: list[str] = _build_vocab()


# --------------------------------------------------------------------------- #
# datasets
# --------------------------------------------------------------------------- #
_DOMAIN = {"train": 1, "test": 2, "web": 3, "val": 4}
_STYLE_CODE = {s: i for i, s in enumerate(STYLES + _WEB_ONLY_STYLES)}
_CACHE: dict[tuple, tuple] = {}

WEB_MIX: dict[str, float] = {
    "web_photo": 0.25,
    "photo": 0.30,
    "sketch": 0.08,
    "rendition": 0.17,
    "web_corrupt": 0.12,
    "adversarial": 0.08,
}


def _sample_rng(seed, domain, style_code, index):
    return np.random.default_rng(np.random.SeedSequence([int(seed), domain, style_code, int(index)]))


def clear_cache() -> None:
    _CACHE.clear()


def _to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous()


class ToySplit(Dataset):
    """Labelled split of one style: ``n_per_class * len(CLASSNAMES)`` balanced samples; ``specialised``: the
    photos of the specialised dataset (``SPECIALISED_COLOUR``).

    ``ds[i] -> (image float [3, H, W] in [0, 1], then ``transform``; int label)``.
    """

    def __init__(
        self,
        style: str,
        n_per_class: int,
        seed: int = 0,
        split: str = "train",
        image_size: int = 32,
        transform=None,
        specialised: bool = False,
    ):
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {style!r}")
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        if specialised and style != "photo":
            raise ValueError(f"the specialised dataset is photos, got style {style!r}")
        self.style, self.split, self.seed = style, split, int(seed)
        self.image_size, self.transform = int(image_size), transform
        n = int(n_per_class) * len(CLASSNAMES)
        key = ("split", style, n, self.seed, split, self.image_size, specialised)
        if key not in _CACHE:
            imgs, labels, caps, attrs = [], [], [], []
            for i in range(n):
                rng = _sample_rng(self.seed, _DOMAIN[split], _STYLE_CODE[style], i)
                lab = i % len(CLASSNAMES)
                own = specialised and rng.random() < SPECIALISED_BIAS
                img, a = render(style, lab, rng, self.image_size, SPECIALISED_COLOUR[CLASSNAMES[lab]] if own else None)
                imgs.append(img)
                labels.append(lab)
                caps.append(caption(a, rng))
                attrs.append(a)
            images = _to_tensor(imgs) if n else torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
            _CACHE[key] = (images, labels, caps, attrs)
        self.images, labels, caps, attrs = _CACHE[key]
        self.labels, self.captions, self.attrs = list(labels), list(caps), list(attrs)
        self.classnames = list(CLASSNAMES)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[i]


class WebCorpus(Dataset):
    """Image-caption pretraining pairs mixing all styles (see ``WEB_MIX``).

    ``ds[i] -> (image float [3, H, W] in [0, 1], then ``transform``; caption str)``.
    """

    def __init__(self, n: int, seed: int = 0, image_size: int = 32, transform=None):
        self.seed, self.image_size, self.transform = int(seed), int(image_size), transform
        n = int(n)
        key = ("web", n, self.seed, self.image_size)
        if key not in _CACHE:
            srcs, probs = list(WEB_MIX), np.array(list(WEB_MIX.values()))
            imgs, labels, caps, sources = [], [], [], []
            for i in range(n):
                rng = _sample_rng(self.seed, _DOMAIN["web"], 0, i)
                lab = int(rng.integers(len(CLASSNAMES)))
                src = srcs[int(rng.choice(len(srcs), p=probs / probs.sum()))]
                usual = src in _PHOTO_LIKE_WEB and rng.random() < WEB_COLOUR_BIAS
                img, a = render(src, lab, rng, self.image_size, USUAL_COLOUR[CLASSNAMES[lab]] if usual else None)
                named = _pick(rng, (True, False), (1 - WEB_HYPERNYM, WEB_HYPERNYM))
                word = None if named else _pick(rng, HYPERNYMS)
                imgs.append(img)
                labels.append(lab)
                caps.append(caption(a, rng, shape_word=word))
                sources.append(src)
            images = _to_tensor(imgs) if n else torch.zeros(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
            _CACHE[key] = (images, labels, caps, sources)
        self.images, labels, caps, sources = _CACHE[key]
        self.labels, self.captions, self.sources = list(labels), list(caps), list(sources)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i):
        x = self.images[i].float().div_(255.0)
        if self.transform is not None:
            x = self.transform(x)
        return x, self.captions[i]

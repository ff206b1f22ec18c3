"""Procedural drawing of the built-in stand-in images (pixels only, no files).

Every renderer takes its own ``numpy.random.Generator`` and returns uint8 pixels (and, for
the dense sets, the exact objects or label map it painted); the format modules
(:mod:`.imagenet`, :mod:`.inat`, :mod:`.places`, :mod:`.coco`, :mod:`.ade20k`) decide
which class each image shows and where it is written.  What each stand-in depicts is
described in :mod:`mixmim.data.builtin`.
"""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

Float = np.ndarray  # HxWx3 float image in [0, 1]
Polygon = np.ndarray  # (N, 2) array of (x, y) vertices in pixel coordinates


# --------------------------------------------------------------------------------------
# Raster primitives
# --------------------------------------------------------------------------------------


def pixel_centres(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) coordinates of pixel centres; pixel (i, j) covers [j, j+1) x [i, i+1)."""
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    return xs + 0.5, ys + 0.5


def polygon_mask(poly: Polygon, h: int, w: int) -> np.ndarray:
    """Boolean mask of pixels whose centre lies inside ``poly`` (even-odd rule).

    Implemented here rather than with a drawing library so the mask follows the exact
    continuous polygon stored in the annotations.
    """
    xs, ys = pixel_centres(h, w)
    inside = np.zeros((h, w), dtype=bool)
    x1, y1 = poly[:, 0], poly[:, 1]
    x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
    for ax, ay, bx, by in zip(x1, y1, x2, y2):
        if ay == by:
            continue
        crosses = (ay > ys) != (by > ys)
        x_at = ax + (ys - ay) * (bx - ax) / (by - ay)
        inside ^= crosses & (xs < x_at)
    return inside


def polygon_area(poly: Polygon) -> float:
    """Shoelace area of a simple polygon."""
    x, y = poly[:, 0], poly[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2.0)


def _upsample(coarse: np.ndarray, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw, C) grid to (h, w, C)."""
    gh, gw = coarse.shape[:2]
    ys = np.linspace(0.0, gh - 1.0, h)
    xs = np.linspace(0.0, gw - 1.0, w)
    y0 = np.clip(np.floor(ys).astype(int), 0, gh - 2)
    x0 = np.clip(np.floor(xs).astype(int), 0, gw - 2)
    fy = (ys - y0)[:, None, None]
    fx = (xs - x0)[None, :, None]
    top = coarse[y0][:, x0] * (1 - fx) + coarse[y0][:, x0 + 1] * fx
    bottom = coarse[y0 + 1][:, x0] * (1 - fx) + coarse[y0 + 1][:, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def smooth_noise(rng: np.random.Generator, h: int, w: int, cells: int, channels: int = 1) -> np.ndarray:
    """Low-frequency noise in [0, 1] of shape (h, w, channels); ``cells`` sets the blob size."""
    coarse = rng.random((cells + 1, cells + 1, channels))
    return _upsample(coarse, h, w)


def hsv(h: float, s: float, v: float) -> np.ndarray:
    """RGB triple in [0, 1] from HSV (hue wraps around)."""
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0)))


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """Binary erosion with a 4-neighbourhood, ``steps`` times (used for outline fills)."""
    out = mask.copy()
    for _ in range(steps):
        p = np.pad(out, 1, constant_values=False)
        out = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


def paint(img: Float, mask: np.ndarray, layer: Float | np.ndarray) -> None:
    """Copy ``layer`` (full image or a single RGB colour) into ``img`` where ``mask``."""
    img[mask] = layer[mask] if layer.ndim == 3 else layer


def textured_background(rng: np.random.Generator, h: int, w: int, saturation: float = 0.35) -> Float:
    """Random low-saturation backdrop: a base colour, colour blotches and optional stripes.

    It is the nuisance every image shares, so models must look past it.
    """
    base = hsv(rng.random(), rng.uniform(0.0, saturation), rng.uniform(0.25, 0.85))
    blotch = smooth_noise(rng, h, w, int(rng.integers(2, 6)), 3) - 0.5
    img = base + rng.uniform(0.15, 0.35) * blotch
    if rng.random() < 0.4:
        xs, ys = pixel_centres(h, w)
        angle = rng.uniform(0, np.pi)
        period = rng.uniform(0.1, 0.3) * w
        stripes = np.sin(2 * np.pi * (xs * np.cos(angle) + ys * np.sin(angle)) / period)
        img = img + 0.06 * stripes[..., None]
    return img


def rotate_hue(img: Float, angle: float) -> Float:
    """Rotate every colour about the grey axis by ``angle`` radians (a hue shift that keeps
    brightness and saturation); grey pixels stay grey."""
    c, s = np.cos(angle), np.sin(angle)
    k = (1.0 - c) / 3.0
    r = np.sqrt(1.0 / 3.0) * s
    rot = np.array([[c + k, k - r, k + r], [k + r, c + k, k - r], [k - r, k + r, c + k]])
    return img @ rot.T


def finish(img: Float, rng: np.random.Generator, noise: float = 0.03) -> np.ndarray:
    """Add pixel noise and quantise to uint8 (sensor-like nuisance, never label-bearing)."""
    noisy = img + rng.normal(0.0, noise, img.shape)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Shapes: unit polygons (max radius <= 1), composed by union ("+") and difference ("-")
# --------------------------------------------------------------------------------------


def regular_polygon(n: int, radius: float = 1.0, phase: float = 0.0) -> Polygon:
    """Regular n-gon centred on the origin."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def star_polygon(points: int = 5, inner: float = 0.45) -> Polygon:
    """Star with ``points`` tips on the unit circle."""
    t = np.pi * np.arange(2 * points) / points - np.pi / 2
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _normalise(poly: Polygon) -> Polygon:
    """Scale a polygon so its farthest vertex is at radius 1."""
    return poly / np.max(np.hypot(poly[:, 0], poly[:, 1]))


def _cross() -> Polygon:
    a = 0.3
    pts = [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    return _normalise(np.array(pts, dtype=float))


def _bar() -> Polygon:
    return _normalise(np.array([(-1, -0.3), (1, -0.3), (1, 0.3), (-1, 0.3)], dtype=float))


def _ell() -> Polygon:
    pts = [(-1, -1), (-0.3, -1), (-0.3, 0.4), (1, 0.4), (1, 1), (-1, 1)]
    return _normalise(np.array(pts, dtype=float))


def _semicircle() -> Polygon:
    t = np.linspace(0, np.pi, 25)
    return _normalise(np.stack([np.cos(t), 0.45 - np.sin(t)], axis=1))


ShapeParts = tuple[tuple[Polygon, bool], ...]  # (polygon, is_additive)

SHAPES: dict[str, ShapeParts] = {
    "circle": ((regular_polygon(48), True),),
    "square": ((regular_polygon(4, phase=np.pi / 4), True),),
    "triangle": ((regular_polygon(3, phase=-np.pi / 2), True),),
    "star": ((star_polygon(), True),),
    "cross": ((_cross(), True),),
    "ring": ((regular_polygon(48), True), (regular_polygon(48, 0.55), False)),
    "crescent": ((regular_polygon(48), True), (regular_polygon(48, 0.85) + [0.5, 0.0], False)),
    "bar": ((_bar(), True),),
    "ell": ((_ell(), True),),
    "semicircle": ((_semicircle(), True),),
}
SHAPE_NAMES: tuple[str, ...] = tuple(SHAPES)
FILL_STYLES: tuple[str, ...] = ("solid", "striped", "outline")


def place_polygon(poly: Polygon, angle: float, scale: float, cx: float, cy: float) -> Polygon:
    """Rotate, scale and translate a unit polygon into pixel coordinates."""
    c, s = np.cos(angle), np.sin(angle)
    rot = poly @ np.array([[c, s], [-s, c]])
    return rot * scale + np.array([cx, cy])


def shape_mask(parts: ShapeParts, angle: float, scale: float, cx: float, cy: float, h: int, w: int) -> np.ndarray:
    """Rasterise a composed shape (unions minus holes) at the given pose."""
    mask = np.zeros((h, w), dtype=bool)
    for poly, additive in parts:
        m = polygon_mask(place_polygon(poly, angle, scale, cx, cy), h, w)
        mask = (mask | m) if additive else (mask & ~m)
    return mask


# --------------------------------------------------------------------------------------
# Classification renderers
# --------------------------------------------------------------------------------------


def shape_class(label: int) -> tuple[str, str]:
    """(shape, fill style) of an ImageNet stand-in class; styles extend past ten classes."""
    shape = SHAPE_NAMES[label % len(SHAPE_NAMES)]
    style = FILL_STYLES[label // len(SHAPE_NAMES)]
    return shape, style


def max_classes(dataset: str) -> int:
    """Largest ``num_classes`` a classification stand-in can express distinctly."""
    limits = {
        "imagenet": len(SHAPE_NAMES) * len(FILL_STYLES),
        "inat2018": len(TEXTURES) * 2,
        "inat2019": len(TEXTURES) * 2,
        "places365": SCENE_COMBOS,
        "places205": SCENE_COMBOS,
    }
    return limits[dataset]


def render_shape_image(rng: np.random.Generator, label: int, num_classes: int, size: int) -> np.ndarray:
    """ImageNet stand-in image: one shape of the class on a textured background."""
    shape, style = shape_class(label)
    img = textured_background(rng, size, size)
    radius = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(radius, size - radius, 2)
    mask = shape_mask(SHAPES[shape], rng.uniform(0, 2 * np.pi), radius, cx, cy, size, size)
    if style == "striped":
        xs, ys = pixel_centres(size, size)
        angle, period = rng.uniform(0, np.pi), rng.uniform(0.12, 0.2) * size
        mask &= np.mod((xs * np.cos(angle) + ys * np.sin(angle)) / period, 1.0) < 0.55
    elif style == "outline":
        mask &= ~erode(mask, max(1, round(size / 20)))
    # Hue window two class-widths wide: colour hints at the class, shape decides it.
    hue = (label + rng.uniform(-1.0, 1.0)) / num_classes
    colour = hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 1.0))
    shading = 1.0 + 0.25 * (smooth_noise(rng, size, size, 3) - 0.5)
    paint(img, mask, colour * shading)
    return finish(img, rng)


TexturePattern = Callable[[np.ndarray, np.ndarray, np.random.Generator], np.ndarray]


def _rotated(angle: float) -> TexturePattern:
    """Stripes at a fixed orientation (the orientation is what defines the class)."""

    def pattern(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        a = angle + rng.uniform(-0.12, 0.12)
        return np.mod(u * np.cos(a) + v * np.sin(a), 1.0) < 0.5

    return pattern


def _checker(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (np.floor(u) + np.floor(v)) % 2 == 0


def _dots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.hypot(np.mod(u, 1.0) - 0.5, np.mod(v, 1.0) - 0.5) < 0.28


def _rings(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cu, cv = u.mean() + rng.normal(0, 1.5), v.mean() + rng.normal(0, 1.5)
    return np.mod(np.hypot(u - cu, v - cv), 1.0) < 0.5


def _spokes(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cu, cv = u.mean() + rng.normal(0, 1.0), v.mean() + rng.normal(0, 1.0)
    return np.mod(np.arctan2(v - cv, u - cu) * 12 / (2 * np.pi) + rng.random(), 1.0) < 0.5


def _zigzag(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    tri = np.abs(np.mod(u, 1.0) - 0.5)
    return np.mod(v + tri, 1.0) < 0.5


def _hatch(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (np.mod(u, 1.0) < 0.22) | (np.mod(v, 1.0) < 0.22)


def _waves(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.mod(v + 0.35 * np.sin(2 * np.pi * u / 2.0), 1.0) < 0.5


def _spots(u: np.ndarray, v: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = u.shape
    cells = max(2, int(round((u.max() - u.min()) * 1.5)))
    return smooth_noise(rng, h, w, cells)[..., 0] > 0.6


TEXTURES: dict[str, TexturePattern] = {
    "stripes_0": _rotated(0.0),
    "stripes_90": _rotated(np.pi / 2),
    "stripes_45": _rotated(np.pi / 4),
    "stripes_135": _rotated(3 * np.pi / 4),
    "checker": _checker,
    "dots": _dots,
    "rings": _rings,
    "spokes": _spokes,
    "zigzag": _zigzag,
    "spots": _spots,
    "hatch": _hatch,
    "waves": _waves,
}
TEXTURE_NAMES: tuple[str, ...] = tuple(TEXTURES)


def texture_class(label: int) -> tuple[str, str]:
    """(texture, scale) of an iNaturalist stand-in class; past twelve, a fine scale too."""
    return TEXTURE_NAMES[label % len(TEXTURE_NAMES)], ("coarse", "fine")[label // len(TEXTURE_NAMES)]


UNLABELED_TEXTURE_PERIOD = 0.16
"""Coarse-scale texture period (fraction of the image side) of the unlabeled set's textures domain."""

INAT_TEXTURE_PERIOD = 0.3
"""Coarse-scale period of the iNaturalist stand-ins' markings: about 19 px at 64 px, so one period
spans two to three 8-px mixing cells and a masked cell's pattern follows from its neighbours. At the
unlabeled set's 0.16 (10 px) a model pretrained for 500 steps learned these textures as a blur and its
frozen features classified them worse than random ones (linear probe 27 vs 37%, 10 classes)."""


def render_texture_image(rng: np.random.Generator, label: int, size: int,
                         period: float = UNLABELED_TEXTURE_PERIOD, hue_classes: int | None = None) -> np.ndarray:
    """iNaturalist stand-in image: a textured "organism" ellipse on a habitat backdrop.

    ``period`` is the coarse scale's pattern period as a fraction of ``size`` (the fine scale,
    used past twelve classes, is 0.5625 of it). ``hue_classes``: the markings' hue is drawn
    from a window two class-widths wide around ``label / hue_classes`` (as in the ImageNet
    stand-in: colour hints at the species, the texture decides it; real species differ in
    colour too); None draws it uniformly, as the unlabeled set's textures domain does.

    Why the window: with a uniformly random hue, colour is pure nuisance, and a MixMIM
    encoder pretrained for 500 steps (its reconstruction is mostly each cell's colour) fitted
    the 200 training images by colour and generalised worse than random init (finetuned 24
    epochs: 19.0 vs 35.4 top-1, n=500, McNemar p 2e-13; README "Built-in scale")."""
    if not 0.0 < period <= 1.0:
        raise ValueError(f"texture period must be a fraction of the image side in (0, 1], got {period}")
    if hue_classes is not None and not 0 <= label < hue_classes:
        raise ValueError(f"hue_classes={hue_classes} must exceed the label {label}")
    texture, scale = texture_class(label)
    img = textured_background(rng, size, size, saturation=0.5)
    period = size * rng.uniform(0.85, 1.15) * (period if scale == "coarse" else 0.5625 * period)
    xs, ys = pixel_centres(size, size)
    pattern = TEXTURES[texture](xs / period, ys / period, rng)
    hue = rng.random() if hue_classes is None else (label + rng.uniform(-1.0, 1.0)) / hue_classes
    light = hsv(hue, rng.uniform(0.3, 0.9), rng.uniform(0.75, 1.0))
    dark = hsv(hue + rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.9), rng.uniform(0.05, 0.35))
    layer = np.where(pattern[..., None], light, dark)
    cx, cy = rng.uniform(0.35, 0.65, 2) * size
    a, b = rng.uniform(0.32, 0.5, 2) * size
    theta = rng.uniform(0, np.pi)
    dx, dy = xs - cx, ys - cy
    u = (dx * np.cos(theta) + dy * np.sin(theta)) / a
    v = (-dx * np.sin(theta) + dy * np.cos(theta)) / b
    paint(img, u * u + v * v < 1.0, layer)
    return finish(img, rng)


# Scene layouts: horizon x sky x ground x skyline, 3 options each.
HORIZONS = (0.3, 0.5, 0.7)
SKIES = ("day", "sunset", "night")
GROUNDS = ("grass", "sand", "water")
SKYLINES = ("open", "buildings", "trees")
SCENE_COMBOS = len(HORIZONS) * len(SKIES) * len(GROUNDS) * len(SKYLINES)


def scene_class(label: int, stride: int, offset: int) -> tuple[int, int, int, int]:
    """Factor indices (horizon, sky, ground, skyline) of a Places stand-in class.

    A stride coprime with the number of combinations spreads consecutive classes over
    the factors, so classes differ in several visible ways; different strides give the two
    Places stand-ins different tasks.
    """
    combo = (label * stride + offset) % SCENE_COMBOS
    digits = []
    for base in (len(HORIZONS), len(SKIES), len(GROUNDS), len(SKYLINES)):
        digits.append(combo % base)
        combo //= base
    return digits[0], digits[1], digits[2], digits[3]


def _sky_layer(rng: np.random.Generator, kind: str, h: int, w: int) -> Float:
    """Vertical sky gradient with faint clouds, palette chosen by ``kind``."""
    top, bottom = {
        "day": (hsv(0.6 + rng.normal(0, 0.02), 0.75, 0.8), hsv(0.56, 0.35, 1.0)),
        "sunset": (hsv(0.8 + rng.normal(0, 0.03), 0.6, 0.5), hsv(0.07 + rng.normal(0, 0.02), 0.85, 1.0)),
        "night": (hsv(0.65, 0.6, 0.12), hsv(0.65 + rng.normal(0, 0.03), 0.45, 0.35)),
    }[kind]
    t = np.linspace(0.0, 1.0, h)[:, None, None]
    grad = top * (1 - t) + bottom * t
    clouds = np.clip(smooth_noise(rng, h, w, 4) - 0.6, 0, None)
    return np.broadcast_to(grad, (h, w, 3)) + 0.5 * clouds


def _ground_layer(rng: np.random.Generator, kind: str, h: int, w: int) -> Float:
    """Ground texture: noisy grass, smooth dunes or rippled water."""
    xs, ys = pixel_centres(h, w)
    if kind == "grass":
        base = hsv(0.28 + rng.normal(0, 0.02), 0.7, 0.55)
        return base + 0.25 * (rng.random((h, w, 1)) - 0.5) + 0.15 * (smooth_noise(rng, h, w, 4) - 0.5)
    if kind == "sand":
        base = hsv(0.11 + rng.normal(0, 0.01), 0.45, 0.85)
        dunes = np.sin(2 * np.pi * (ys / (0.12 * h) + 0.3 * np.sin(xs / (0.2 * w))))
        return base + 0.08 * dunes[..., None]
    base = hsv(0.58 + rng.normal(0, 0.02), 0.75, 0.5)
    ripples = np.sin(2 * np.pi * (ys / (0.05 * h) + 0.15 * np.sin(xs / (0.1 * w))))
    return base + 0.12 * ripples[..., None]


def _skyline(rng: np.random.Generator, kind: str, horizon: np.ndarray, size: int) -> tuple[np.ndarray, Float]:
    """Mask and layer of the objects standing on the horizon (buildings or trees).

    ``horizon`` is the (size, size) map of the ground line's y at each pixel's column, so
    objects stand on tilted horizons too.
    """
    xs, ys = pixel_centres(size, size)
    mask = np.zeros((size, size), dtype=bool)
    if kind == "buildings":
        colour = hsv(rng.uniform(0, 0.15), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.45))
        for _ in range(int(rng.integers(3, 6))):
            x0 = rng.uniform(-0.1, 0.9) * size
            width = rng.uniform(0.1, 0.25) * size
            top = rng.uniform(0.15, 0.35) * size
            mask |= (xs >= x0) & (xs < x0 + width) & (ys > horizon - top) & (ys < horizon + 1)
        windows = (np.mod(xs, 0.08 * size) < 0.04 * size) & (np.mod(ys, 0.1 * size) < 0.05 * size)
        layer = np.broadcast_to(colour, (size, size, 3)) + 0.35 * windows[..., None] * np.array([1.0, 0.9, 0.4])
        return mask, layer
    colour = hsv(0.3 + rng.normal(0, 0.03), 0.7, rng.uniform(0.2, 0.35))
    for _ in range(int(rng.integers(3, 7))):
        cx = rng.uniform(0, 1) * size
        r = rng.uniform(0.07, 0.14) * size
        cy = horizon[0, min(int(cx), size - 1)] - rng.uniform(0.3, 1.0) * r
        mask |= np.hypot(xs - cx, ys - cy) < r
    layer = colour + 0.2 * (rng.random((size, size, 1)) - 0.5)
    return mask, layer


def render_scene_image(rng: np.random.Generator, label: int, size: int, stride: int, offset: int) -> np.ndarray:
    """Places stand-in image: a landscape whose layout and palettes are the class."""
    h_idx, sky_idx, ground_idx, skyline_idx = scene_class(label, stride, offset)
    xs, ys = pixel_centres(size, size)
    level = (HORIZONS[h_idx] + rng.uniform(-0.06, 0.06)) * size
    horizon = level + rng.uniform(-0.08, 0.08) * (xs - size / 2)
    img = np.array(_sky_layer(rng, SKIES[sky_idx], size, size))
    paint(img, ys >= horizon, _ground_layer(rng, GROUNDS[ground_idx], size, size))
    if SKYLINES[skyline_idx] != "open":
        mask, layer = _skyline(rng, SKYLINES[skyline_idx], horizon, size)
        paint(img, mask, layer)
    img *= rng.uniform(0.85, 1.15)  # global exposure jitter
    return finish(img, rng)


# --------------------------------------------------------------------------------------
# Dense renderers: COCO-style detection, ADE20K-style segmentation
# --------------------------------------------------------------------------------------

# (category id, name, unit polygon, hue of the first release, now unused: objects take any colour);
# ids deliberately non-contiguous like COCO's.
COCO_CATEGORIES: tuple[tuple[int, str, Polygon, float], ...] = (
    (1, "circle", regular_polygon(32), 0.0),
    (2, "square", regular_polygon(4, phase=np.pi / 4), 0.62),
    (3, "triangle", regular_polygon(3, phase=-np.pi / 2), 0.33),
    (5, "star", star_polygon(), 0.15),
    (7, "cross", _cross(), 0.83),
    (9, "bar", _bar(), 0.5),
)


@dataclass(frozen=True)
class DrawnObject:
    """One object drawn into a COCO stand-in image, with its exact outline."""

    category_id: int
    polygon: Polygon  # vertices rounded to 0.01 px, exactly what was rasterised


def render_coco_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[DrawnObject]]:
    """1-4 non-overlapping shapes in random colours on a textured background.

    Overlaps are avoided by rejecting positions whose bounding circles intersect, so every
    annotation polygon is entirely visible and boxes/masks need no occlusion handling.
    """
    img = textured_background(rng, size, size, saturation=0.25)
    placed: list[tuple[float, float, float]] = []
    objects: list[DrawnObject] = []
    for _ in range(int(rng.integers(1, 5))):
        cat_id, _, unit, _hue = COCO_CATEGORIES[int(rng.integers(len(COCO_CATEGORIES)))]
        for _attempt in range(30):
            r = rng.uniform(0.08, 0.22) * size
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            if all(np.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        poly = np.round(place_polygon(unit, rng.uniform(0, 2 * np.pi), r, cx, cy), 2)
        # any hue: the category is the outline, so colour alone cannot detect or classify it
        colour = hsv(rng.random(), rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
        paint(img, polygon_mask(poly, size, size), colour)
        placed.append((cx, cy, r))
        objects.append(DrawnObject(cat_id, poly))
    return finish(img, rng, noise=0.02), objects


ADE_CLASSES: dict[int, str] = {
    0: "other",
    1: "sky",
    2: "building",
    3: "tree",
    4: "grass",
    5: "road",
    6: "water",
    7: "car",
    8: "person",
}
"""Labels of the ADE20K stand-in: 0 is "other" (ignored in training), as in ADE20K."""


def _paint_label(img: Float, labels: np.ndarray, mask: np.ndarray, layer: Float | np.ndarray, cls: int) -> None:
    """Paint image and label map with the same mask, which keeps the labels exact."""
    paint(img, mask, layer)
    labels[mask] = cls


def render_ade_image(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Outdoor scene painted in layers; returns (RGB uint8 image, uint8 label map)."""
    xs, ys = pixel_centres(size, size)
    img = np.zeros((size, size, 3))
    labels = np.zeros((size, size), dtype=np.uint8)
    horizon = rng.uniform(0.3, 0.6) * size

    _paint_label(img, labels, ys < horizon, _sky_layer(rng, "day", size, size), 1)
    _paint_label(img, labels, ys >= horizon, _ground_layer(rng, "grass", size, size), 4)
    if rng.random() < 0.4:
        depth = rng.uniform(0.1, 0.25) * size
        _paint_label(img, labels, (ys >= horizon) & (ys < horizon + depth), _ground_layer(rng, "water", size, size), 6)

    road = np.zeros((size, size), dtype=bool)
    if rng.random() < 0.65:
        vx = rng.uniform(0.3, 0.7) * size
        t = np.clip((ys - horizon) / (size - horizon), 0, 1)
        half = (0.03 + rng.uniform(0.3, 0.45) * t) * size
        road = (ys >= horizon) & (np.abs(xs - vx - rng.uniform(-0.15, 0.15) * size * t) < half)
        grey = rng.uniform(0.25, 0.4)
        layer = grey + 0.05 * (rng.random((size, size, 1)) - 0.5)
        dashes = (np.abs(xs - vx) < 0.01 * size + 0.02 * size * t) & (np.mod(ys, 0.1 * size) < 0.05 * size)
        layer = np.where(dashes[..., None], 0.9, layer) * np.ones(3)
        _paint_label(img, labels, road, layer, 5)

    if rng.random() < 0.7:
        mask, layer = _skyline(rng, "buildings", np.full((size, size), horizon), size)
        _paint_label(img, labels, mask, layer, 2)
    if rng.random() < 0.7:
        mask, layer = _skyline(rng, "trees", np.full((size, size), horizon + 0.05 * size), size)
        _paint_label(img, labels, mask, layer, 3)

    if road.any() and rng.random() < 0.7:
        for _ in range(int(rng.integers(1, 3))):
            rows, cols = np.nonzero(road & (ys > horizon + 0.15 * (size - horizon)))
            if rows.size == 0:
                break
            k = int(rng.integers(rows.size))
            cy, cx = rows[k] + 0.5, cols[k] + 0.5
            scale = 0.05 + 0.12 * (cy - horizon) / (size - horizon)
            w, h = 1.6 * scale * size, 0.7 * scale * size
            body = (np.abs(xs - cx) < w / 2) & (ys > cy - h / 2) & (ys < cy + h / 2)
            cabin = (np.abs(xs - cx) < w / 4) & (ys > cy - h) & (ys <= cy - h / 2)
            colour = hsv(rng.choice([0.0, 0.6, 0.14]), rng.uniform(0.7, 1.0), rng.uniform(0.6, 1.0))
            layer = np.where(cabin[..., None], colour * 0.4, colour)
            _paint_label(img, labels, body | cabin, layer, 7)

    if rng.random() < 0.5:
        for _ in range(int(rng.integers(1, 3))):
            cx = rng.uniform(0.1, 0.9) * size
            feet = rng.uniform(horizon + 0.1 * (size - horizon), size)
            tall = (0.1 + 0.2 * (feet - horizon) / (size - horizon)) * size
            body = np.hypot((xs - cx) / (0.17 * tall), (ys - (feet - 0.4 * tall)) / (0.4 * tall)) < 1
            head = np.hypot(xs - cx, ys - (feet - 0.88 * tall)) < 0.12 * tall
            cloth = hsv(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.3, 0.9))
            layer = np.where(head[..., None], hsv(0.07, 0.45, 0.85), cloth)
            _paint_label(img, labels, body | head, layer, 8)

    if rng.random() < 0.5:  # unlabelled clutter: class 0 ("other")
        r = rng.uniform(0.04, 0.1) * size
        cx, cy = rng.uniform(r, size - r, 2)
        poly = place_polygon(regular_polygon(int(rng.integers(3, 7))), rng.uniform(0, 6.3), r, cx, cy)
        colour = hsv(rng.random(), rng.uniform(0.0, 1.0), rng.uniform(0.2, 1.0))
        _paint_label(img, labels, polygon_mask(poly, size, size), colour, 0)

    # A random hue rotation of the whole scene: sky, grass and water are not told apart by
    # their colour alone but by texture, layout and shape (what a pretrained encoder knows).
    img = rotate_hue(img, rng.uniform(0, 2 * np.pi)) * rng.uniform(0.9, 1.1)
    return finish(img, rng, noise=0.02), labels


UNLABELED_DOMAINS: tuple[str, ...] = ("shapes", "textures", "landscapes", "objects", "streets")
"""Folders of the unlabeled set, one per source domain; image i comes from domain i % 5."""


def render_unlabeled_image(rng: np.random.Generator, domain: str, size: int) -> np.ndarray:
    """One image of ``domain`` with its class (where it has one) drawn at random."""
    if domain == "shapes":
        return render_shape_image(rng, int(rng.integers(len(SHAPE_NAMES))), len(SHAPE_NAMES), size)
    if domain == "textures":
        return render_texture_image(rng, int(rng.integers(max_classes("inat2018"))), size)
    if domain == "landscapes":
        return render_scene_image(rng, int(rng.integers(SCENE_COMBOS)), size, 1, 0)
    if domain == "objects":
        return render_coco_image(rng, size)[0]
    if domain == "streets":
        return render_ade_image(rng, size)[0]
    raise ValueError(f"unknown unlabeled domain {domain!r}; expected one of {UNLABELED_DOMAINS}")

"""Does a generated video follow its wan_mini prompt? Measured on the frames alone.

The object is the only saturated thing in a wan_mini video (data.py), so its pixels are those with HSV
saturation > SAT_MIN and value > VAL_MIN. From them, per video:
- color: the hue of their mean RGB, nearest of the palette's hues (chance 1/6);
- direction: the least-squares slope of their centroid over the frames, larger axis and its sign (chance 1/4);
- shape: area / (max distance from the centroid)^2, pi for a circle, 2 for a square, 1.3 for a triangle
  (rotation and scale invariant; chance 1/3).
A video where no object is found, or whose object does not move, misses that attribute.
"""

from __future__ import annotations

import colorsys
from dataclasses import asdict, dataclass

import numpy as np

from .data import COLORS, DIRECTIONS, SHAPES, parse_prompt

SAT_MIN, VAL_MIN = 0.5, 0.3
MIN_AREA = 0.002  # of the frame: fewer object pixels than this and the frame has no object
MIN_TRAVEL = 0.05  # of the frame side: a centroid that moves less than this is static
# area / r_max^2 cuts between triangle | square | circle; on 64x64 data.py clips they measure 1.27-1.40,
# 1.93-2.09 and 2.75-2.89 (pixels make the circle fall short of pi)
SHAPE_CUTS = (1.68, 2.42)
CHANCE = {"color": 1 / len(COLORS), "direction": 1 / len(DIRECTIONS), "shape": 1 / len(SHAPES)}
_HUES = {name: colorsys.rgb_to_hsv(*rgb)[0] for name, rgb in COLORS.items()}


@dataclass
class Reading:
    """What a video shows (None: not found)."""

    color: str | None
    direction: str | None
    shape: str | None
    object_frames: float  # fraction of frames with an object


def object_mask(video: np.ndarray) -> np.ndarray:
    """bool [F, H, W]: saturated, not dark pixels of a float [F, H, W, 3] video in [0, 1]."""
    mx, mn = video.max(axis=-1), video.min(axis=-1)
    return ((mx - mn) > SAT_MIN * np.maximum(mx, 1e-6)) & (mx > VAL_MIN)


def read_video(video: np.ndarray) -> Reading:
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"expected a float video [frames, H, W, 3], got shape {list(video.shape)}")
    f, h, w, _ = video.shape
    mask = object_mask(video)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    centers, ratios, rgb_sum, count = [], [], np.zeros(3), 0
    for i in range(f):
        m = mask[i]
        if m.sum() < max(3, MIN_AREA * h * w):
            continue
        ys, xs = yy[m], xx[m]
        # keep the blob around the median position: stray saturated pixels elsewhere do not move the centroid
        cy, cx = np.median(ys), np.median(xs)
        d = np.hypot(ys - cy, xs - cx)
        keep = d <= 2.5 * np.sqrt(m.sum() / np.pi) + 2
        if not keep.any():  # scattered pixels with no blob around their median: no object in this frame
            continue
        ys, xs = ys[keep], xs[keep]
        cy, cx = ys.mean(), xs.mean()
        r_max = np.hypot(ys - cy, xs - cx).max() + 0.5  # to the outer edge of the farthest pixel
        centers.append((i, cx, cy))
        ratios.append(len(ys) / r_max ** 2)
        sel = np.zeros_like(m)
        sel[(ys - 0.5).astype(int), (xs - 0.5).astype(int)] = True
        rgb_sum += video[i][sel].sum(axis=0)
        count += int(sel.sum())
    if not centers:
        return Reading(None, None, None, 0.0)
    hue = colorsys.rgb_to_hsv(*(rgb_sum / count))[0]
    color = min(_HUES, key=lambda k: min(abs(hue - _HUES[k]), 1 - abs(hue - _HUES[k])))
    ratio = float(np.median(ratios))
    shape = "triangle" if ratio < SHAPE_CUTS[0] else "square" if ratio < SHAPE_CUTS[1] else "circle"
    direction = None
    if len(centers) >= 3:
        t, cx, cy = (np.array(c, dtype=np.float64) for c in zip(*centers))
        span = f - 1
        dx, dy = np.polyfit(t, cx, 1)[0] * span / w, np.polyfit(t, cy, 1)[0] * span / h
        if max(abs(dx), abs(dy)) >= MIN_TRAVEL:
            direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
    return Reading(color, direction, shape, len(centers) / f)


def score_video(video: np.ndarray, prompt: str) -> dict:
    """{"color": bool, "direction": bool, "shape": bool, "reading": {...}} for a grammar prompt."""
    want = parse_prompt(prompt)
    if want is None:
        raise ValueError(f"{prompt!r} is not a wan_mini grammar prompt (see vqx/testbed/data.py)")
    got = read_video(video)
    hits = {k: getattr(got, k) == want[k] for k in CHANCE}
    return {**hits, "reading": asdict(got)}


def summarize(scores: list[dict]) -> dict:
    """Accuracy per attribute against chance, and their means."""
    if not scores:
        raise ValueError("no scored videos to summarize")
    acc = {k: float(np.mean([s[k] for s in scores])) for k in CHANCE}
    return {"n": len(scores), "accuracy": acc, "chance": dict(CHANCE),
            "mean": float(np.mean(list(acc.values()))), "mean_chance": float(np.mean(list(CHANCE.values())))}

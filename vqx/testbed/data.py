"""Procedural training videos: one saturated shape moving over a dull textured background, with a prompt
from a small grammar that says what it is and what it does.

    "a red circle moves left over a gray striped background"
    "a blue triangle rotates and moves up over a dark dotted background"

Clips are drawn in batches with torch on any device. Their random parameters come from a CPU generator, so
a seed gives the same clips on CPU and GPU (up to float rounding). Videos are float [B, 3, F, H, W] in
[-1, 1]; the object is the only saturated thing in a frame, which is what score.py relies on.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass

import torch

# Object colors: saturated, hues at least ~25 degrees apart.
COLORS = {
    "red": (0.90, 0.12, 0.10),
    "orange": (0.95, 0.55, 0.08),
    "yellow": (0.93, 0.88, 0.12),
    "green": (0.12, 0.75, 0.20),
    "blue": (0.15, 0.35, 0.95),
    "purple": (0.62, 0.18, 0.88),
}
SHAPES = ("circle", "square", "triangle")
MOTIONS = ("moves", "bounces", "rotates", "grows", "shrinks")
MOTION_PHRASES = {"moves": "moves", "bounces": "bounces", "rotates": "rotates and moves",
                  "grows": "grows and moves", "shrinks": "shrinks and moves"}
DIRECTIONS = ("left", "right", "up", "down")
# Background tones: saturation <= 0.3 even after jitter, so no background pixel looks like an object.
TONES = {"gray": (0.50, 0.50, 0.50), "brown": (0.44, 0.38, 0.32), "dark": (0.20, 0.20, 0.22)}
PATTERNS = ("striped", "checkered", "dotted", "gradient")

ATTRIBUTES = {"color": tuple(COLORS), "shape": SHAPES, "motion": MOTIONS, "direction": DIRECTIONS,
              "tone": tuple(TONES), "pattern": PATTERNS}
NUM_PROMPTS = math.prod(len(v) for v in ATTRIBUTES.values())

_PROMPT_RE = re.compile(
    rf"^an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ({'|'.join(MOTION_PHRASES.values())}) ({'|'.join(DIRECTIONS)}) "
    rf"over a ({'|'.join(TONES)}) ({'|'.join(PATTERNS)}) background$")
VOCABULARY = tuple(dict.fromkeys(
    ["a", "an", *COLORS, *SHAPES, *" ".join(MOTION_PHRASES.values()).split(), *DIRECTIONS, "over", *TONES, *PATTERNS,
     "background"]))

# Shape geometry in units of the object's radius: circle radius 1, square half-side 0.85, equilateral
# triangle (apex up) with circumradius 1.35 -- similar areas, very different area / max-radius^2.
SQUARE_HALF = 0.85
TRIANGLE_R = 1.35
GROW = (0.7, 1.35)  # scale at the first and last frame of "grows" ("shrinks" runs it backwards)


def prompt_text(color: str, shape: str, motion: str, direction: str, tone: str, pattern: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} {MOTION_PHRASES[motion]} {direction} over a {tone} {pattern} background"


def parse_prompt(text: str) -> dict[str, str] | None:
    """The attributes of a grammar prompt, or None if ``text`` is not one."""
    m = _PROMPT_RE.match(" ".join(text.lower().split()))
    if m is None:
        return None
    color, shape, phrase, direction, tone, pattern = m.groups()
    motion = next(k for k, v in MOTION_PHRASES.items() if v == phrase)
    return dict(color=color, shape=shape, motion=motion, direction=direction, tone=tone, pattern=pattern)


def all_prompts() -> list[str]:
    """Every grammar prompt, in the order of `prompt_index`."""
    return [prompt_text(*combo) for combo in itertools.product(*ATTRIBUTES.values())]


def prompt_index(labels: torch.Tensor) -> torch.Tensor:
    """Index into `all_prompts` of each row of ``labels`` [B, 6] (mixed radix, last attribute fastest)."""
    index = torch.zeros(labels.shape[0], dtype=torch.long, device=labels.device)
    for col, values in enumerate(ATTRIBUTES.values()):
        index = index * len(values) + labels[:, col]
    return index


def build_tokenizer():
    """The tiny model's word-level tokenizer plus every word of the grammar (no prompt hits <unk>)."""
    from ..models.wan.tiny import build_tokenizer as tiny_tokenizer

    return tiny_tokenizer(VOCABULARY)


@dataclass
class Clips:
    """Parameters of a batch of clips (CPU tensors): ``labels`` [B, 6] indexes ATTRIBUTES in order;
    the rest are per-clip continuous values in units of the frame size."""

    labels: torch.Tensor
    params: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return self.labels.shape[0]

    def prompts(self) -> list[str]:
        names = [ATTRIBUTES[k] for k in ATTRIBUTES]
        return [prompt_text(*(n[i] for n, i in zip(names, row))) for row in self.labels.tolist()]

    def attribute(self, name: str) -> list[str]:
        col = list(ATTRIBUTES).index(name)
        return [ATTRIBUTES[name][i] for i in self.labels[:, col].tolist()]


def random_labels(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.stack([torch.randint(len(v), (n,), generator=generator) for v in ATTRIBUTES.values()], dim=1)


def labels_of(prompts: list[str]) -> torch.Tensor:
    rows = []
    for p in prompts:
        attrs = parse_prompt(p)
        if attrs is None:
            raise ValueError(f"{p!r} is not a wan_mini grammar prompt")
        rows.append([ATTRIBUTES[k].index(attrs[k]) for k in ATTRIBUTES])
    return torch.tensor(rows, dtype=torch.long)


def sample_clips(n: int, generator: torch.Generator, labels: torch.Tensor | None = None) -> Clips:
    """``n`` random clips; ``labels`` fixes their attributes (e.g. from prompts), else they are random too."""
    labels = random_labels(n, generator) if labels is None else labels.long()
    if labels.shape != (n, len(ATTRIBUTES)):
        raise ValueError(f"labels must be [{n}, {len(ATTRIBUTES)}], got {list(labels.shape)}")

    def u(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, *shape, generator=generator)

    motion = labels[:, 2]
    radius = u(0.12, 0.16)
    grows, shrinks = motion == MOTIONS.index("grows"), motion == MOTIONS.index("shrinks")
    scale0 = torch.where(grows, GROW[0], torch.where(shrinks, GROW[1], 1.0))
    scale1 = torch.where(grows, GROW[1], torch.where(shrinks, GROW[0], 1.0))
    margin = radius * torch.maximum(scale0, scale1) * 1.2 + 0.01
    travel = torch.minimum(u(0.30, 0.42), 1 - 2 * margin)
    lo, hi = margin + travel / 2, 1 - margin - travel / 2
    mid = lo + u(0, 1) * (hi - lo)
    bounce = motion == MOTIONS.index("bounces")
    hop = torch.where(bounce, u(0.10, 0.16), 0.0)
    across = (margin + hop) + u(0, 1) * (1 - 2 * margin - hop)
    spin = u(0.5, 1.0) * math.pi * torch.where(u(0, 1) < 0.5, -1, 1)
    turn = torch.where(motion == MOTIONS.index("rotates"), spin, 0.0)
    color = torch.tensor(list(COLORS.values()))[labels[:, 0]] + u(-0.04, 0.04, 3)
    color = (color * u(0.85, 1.0, 1)).clamp(0, 1)
    tone = torch.tensor(list(TONES.values()))[labels[:, 4]] * u(0.85, 1.15, 1)
    params = dict(radius=radius, scale0=scale0, scale1=scale1, travel=travel, mid=mid, hop=hop, across=across,
                  turn=turn, color=color, tone=tone, period=u(0.25, 0.4), angle=u(0, math.pi),
                  phase=u(0, 1, 2), contrast=u(0.3, 0.5), dot=u(0.2, 0.3), slope=u(0, 2 * math.pi))
    return Clips(labels, params)


def render(clips: Clips, size: int = 64, frames: int = 17, device: str | torch.device = "cpu"):
    """(video [B, 3, F, size, size] in [-1, 1], object alpha [B, 1, F, size, size] in [0, 1]) on ``device``."""
    p = {k: v.to(device=device, dtype=torch.float32) for k, v in clips.params.items()}
    labels = clips.labels.to(device)
    n = len(clips)
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)  # [1, 1, H, W]; y grows downwards
    t = torch.linspace(0, 1, frames, device=device).view(1, frames, 1, 1)

    def col(v: torch.Tensor) -> torch.Tensor:  # per-clip value -> [B, 1, 1, 1]
        return v.view(n, 1, 1, 1)

    # Object path: along the motion axis from mid - travel/2 to mid + travel/2 (sign by direction),
    # fixed across it; a bounce hops towards smaller coordinates (up for horizontal motion).
    direction = labels[:, 3]
    sign = torch.where((direction == 0) | (direction == 2), -1.0, 1.0)  # left / up run towards 0
    along = col(p["mid"]) + col(sign * p["travel"]) * (t - 0.5)
    across = col(p["across"]) - col(p["hop"]) * torch.sin(2 * math.pi * t).abs()
    horizontal = col((direction <= 1).float())
    cx = horizontal * along + (1 - horizontal) * across
    cy = horizontal * across + (1 - horizontal) * along
    scale = col(p["scale0"]) + col(p["scale1"] - p["scale0"]) * t
    theta = col(p["turn"]) * t
    r = col(p["radius"]) * scale  # [B, F, 1, 1], in frame units
    dx, dy = x - cx, y - cy
    cos, sin = torch.cos(theta), torch.sin(theta)
    u_, v_ = (cos * dx + sin * dy) / r, (-sin * dx + cos * dy) / r  # object frame, radius 1
    shape = col(labels[:, 1])
    circle = torch.sqrt(u_ ** 2 + v_ ** 2) - 1
    square = torch.maximum(u_.abs(), v_.abs()) - SQUARE_HALF
    # equilateral triangle, apex up: the farthest of its three edge lines (inradius R/2 from the centre)
    tri = torch.maximum(v_, torch.maximum(0.866 * u_ - 0.5 * v_, -0.866 * u_ - 0.5 * v_)) - TRIANGLE_R / 2
    sdf = torch.where(shape == 0, circle, torch.where(shape == 1, square, tri))
    alpha = (0.5 - sdf * r * size).clamp(0, 1)  # one-pixel antialiased edge

    background = _background(p, labels[:, 5], x, y, size)  # [B, 3, 1, H, W]: static
    color = p["color"].view(n, 3, 1, 1, 1)
    a = alpha.unsqueeze(1)
    video = background * (1 - a) + color * a
    return video * 2 - 1, a


def _background(p: dict[str, torch.Tensor], pattern: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                size: int) -> torch.Tensor:
    n = pattern.shape[0]

    def col(v: torch.Tensor) -> torch.Tensor:
        return v.view(n, 1, 1, 1)

    period, ph0, ph1 = col(p["period"]), col(p["phase"][:, 0]), col(p["phase"][:, 1])
    wave = (x * col(torch.cos(p["angle"])) + y * col(torch.sin(p["angle"]))) / period + ph0
    striped = 0.5 + 0.5 * torch.tanh(3 * torch.sin(2 * math.pi * wave))
    sx, sy = torch.sin(2 * math.pi * (x / period + ph0)), torch.sin(2 * math.pi * (y / period + ph1))
    checker = 0.5 + 0.5 * torch.tanh(6 * sx * sy)
    fx, fy = torch.frac(x / period + ph0) - 0.5, torch.frac(y / period + ph1) - 0.5
    dist = torch.sqrt(fx ** 2 + fy ** 2) * period  # to the nearest dot centre, frame units
    dotted = torch.sigmoid((col(p["dot"]) * period - dist) * size * 2)
    gradient = (0.5 + (x - 0.5) * col(torch.cos(p["slope"])) + (y - 0.5) * col(torch.sin(p["slope"]))).clamp(0, 1)
    pat = col(pattern)
    g = torch.where(pat == 0, striped, torch.where(pat == 1, checker, torch.where(pat == 2, dotted, gradient)))
    shade = 1 + col(p["contrast"]) * (g - 0.5)  # [B, 1, H, W]
    return (p["tone"].view(n, 3, 1, 1) * shade).clamp(0, 1).unsqueeze(2)


def eval_prompts(n: int) -> list[str]:
    """The first ``n`` eval prompts: attribute k of prompt i is value (i + k) mod its count, so they cycle through
    every color, shape, motion and direction; distinct up to 60 (the counts' least common multiple)."""
    names = list(ATTRIBUTES.values())
    period = math.lcm(*(len(v) for v in names))
    if not 0 <= n <= period:
        raise ValueError(f"{n} eval prompts: the grammar's cycle has {period} distinct ones")
    return [prompt_text(*(v[(i + k) % len(v)] for k, v in enumerate(names))) for i in range(n)]


def prompt_sets(num_calib: int = 32, num_eval: int = 8, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(calib, eval) samples in the assets/README.md format, no prompt in both. Eval prompts are `eval_prompts`;
    calib prompts are drawn at random."""
    evals = eval_prompts(num_eval)
    g = torch.Generator().manual_seed(seed)
    calib: list[str] = []
    while len(calib) < num_calib:
        cand = sample_clips(1, g).prompts()[0]
        if cand not in evals and cand not in calib:
            calib.append(cand)
    return ([{"prompt": p, "seed": 2000 + i} for i, p in enumerate(calib)],
            [{"prompt": p, "seed": 1000 + i} for i, p in enumerate(evals)])

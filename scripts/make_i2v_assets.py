"""Write the I2V prompt sets: assets/wan_i2v/{calib,eval}/prompts.json and their conditioning images.

The images are drawn procedurally with PIL (skies, sun, hills, houses, water, shapes, ...) from each
sample's seed, so nothing is downloaded and the same Pillow version redraws them pixel for pixel.
Each prompt describes the motion to add to its scene; edit SCENES and rerun to change the sets.

    python scripts/make_i2v_assets.py            # (re)write what changed
    python scripts/make_i2v_assets.py --check    # exit 1 if the files on disk are not what this draws
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
import sys
from pathlib import Path

import PIL
from PIL import Image, ImageDraw, PngImagePlugin

WIDTH, HEIGHT = 832, 480  # Wan2.1 I2V 480p
ROOT = Path(__file__).resolve().parents[1] / "assets" / "wan_i2v"

# (scene kind, prompt) per split; sample i of a split gets seed BASE_SEED[split] + i, which also draws its image.
SCENES = {
    "calib": [
        ("countryside", "A peaceful village on rolling green hills; the camera slowly pans right as clouds drift "
                        "across the sky and the trees sway in a light breeze."),
        ("sunset_sea", "The sun sinks toward the horizon over a calm sea, golden light shimmering on the water "
                       "as a small sailboat drifts slowly to the left."),
        ("night_city", "A city skyline at night under a starry sky, windows flickering on and off as the camera "
                       "gently pushes in toward the tallest tower."),
        ("snowy_mountains", "Snow-capped mountain peaks under a pale winter sky; fresh snow begins to fall and "
                            "the camera slowly rises over the pine trees."),
        ("desert", "Wind sweeps sand across rippled desert dunes under a blazing sun, heat haze shimmering "
                   "above the cacti."),
        ("lake_forest", "A still lake surrounded by dark green forest; a breeze ripples the reflections as a "
                        "pair of birds flies low over the water."),
        ("shapes", "Colorful geometric shapes on a patterned background come to life: the circles bounce, the "
                   "squares rotate slowly and the triangles drift to the right."),
        ("rainy_street", "Rain falls on a grey city street lined with lamp posts, puddles spreading on the road "
                         "as the camera moves slowly forward."),
        ("flower_meadow", "A meadow of red, yellow and purple flowers sways in the wind under a bright blue sky, "
                          "butterflies flitting between the blossoms."),
        ("underwater", "Small fish swim between swaying seaweed as bubbles rise toward the sunlit surface, "
                       "underwater shot."),
        ("countryside", "Time-lapse over a hillside farm: cloud shadows sweep across the fields while the sun "
                        "moves slowly across the sky."),
        ("sunset_sea", "Gentle waves roll toward the viewer across a glowing sunset sea while seagulls glide "
                       "through the orange sky."),
        ("night_city", "The camera pans slowly along the skyline at night as the moon climbs above the rooftops "
                       "and a few windows go dark."),
        ("snowy_mountains", "A blizzard blows across the snowy mountains, clouds racing past the peaks while the "
                            "pine trees bend in the wind."),
        ("shapes", "Cartoon animation: the colored balls roll and bounce across the screen, knocking into the "
                   "squares and sending them spinning."),
        ("underwater", "A drifting underwater camera glides over the sandy seabed as a school of fish turns "
                       "together and shafts of light flicker through the water."),
    ],
    "eval": [
        ("countryside", "Morning in a small hillside village: a slow zoom toward the houses as birds cross the "
                        "sky and the grass ripples in the wind."),
        ("desert", "The camera tracks slowly across the desert dunes at midday, thin streams of sand blowing "
                   "off the crests."),
        ("lake_forest", "Mist rises from the forest lake at dawn and a light rain begins, raindrops dotting the "
                        "mirror-like surface."),
        ("rainy_street", "Heavy rain pours down on the empty street at dusk as the street lamps flicker on one "
                         "after another."),
        ("flower_meadow", "A slow dolly shot through the blooming flower field, petals drifting on the breeze "
                          "toward the distant hills."),
        ("sunset_sea", "Time-lapse of the sun setting into the sea, the sky shifting from orange to deep purple "
                       "as the first stars appear."),
        ("shapes", "Abstract motion graphics: the geometric shapes grow, shrink and swap colors in a smooth, "
                   "rhythmic loop."),
        ("night_city", "Fireworks burst above the city skyline at night, lighting up the buildings in red and "
                       "green flashes."),
    ],
}
BASE_SEED = {"calib": 3000, "eval": 7000}
DESCRIPTION = {
    "calib": "Calibration prompts for Wan2.1 image-to-video; images drawn by scripts/make_i2v_assets.py.",
    "eval": "Evaluation prompts for Wan2.1 image-to-video, disjoint from calibration; images drawn by "
            "scripts/make_i2v_assets.py.",
}


# ---------------------------------------------------------------- drawing helpers

def _mix(a, b, t):
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b))


def _jitter(rng, color, amount=18):
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in color)


def _gradient(draw, top, bottom, y0=0, y1=HEIGHT):
    for y in range(y0, y1):
        draw.line([(0, y), (WIDTH, y)], fill=_mix(top, bottom, (y - y0) / max(1, y1 - y0 - 1)))


def _ridge(rng, base, amp, waves=3):
    """Polygon points of a wavy horizon from the left edge to the right, closed along the bottom."""
    parts = [(rng.uniform(0.5, 1.0) * amp / k, rng.uniform(1.0, 3.0) * k, rng.uniform(0, 2 * math.pi))
             for k in range(1, waves + 1)]
    pts = [(x, base + sum(a * math.sin(f * x / WIDTH * 2 * math.pi + p) for a, f, p in parts))
           for x in range(0, WIDTH + 8, 8)]
    return pts + [(WIDTH, HEIGHT), (0, HEIGHT)]


def _sun(draw, cx, cy, r, core, sky, rings=6):
    for i in range(rings, 0, -1):  # halo fading into the sky
        rr = r + i * r * 0.35
        draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_mix(sky, core, 0.35 / (i + 0.5)))
    draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=core)


def _cloud(draw, rng, cx, cy, size, color):
    for _ in range(rng.randint(4, 7)):
        dx, dy = rng.uniform(-1.4, 1.4) * size, rng.uniform(-0.4, 0.3) * size
        r = rng.uniform(0.45, 0.8) * size
        draw.ellipse([cx + dx - r, cy + dy - r * 0.7, cx + dx + r, cy + dy + r * 0.7], fill=color)


def _house(draw, rng, x, ground, w):
    h = w * rng.uniform(0.6, 0.9)
    wall = _jitter(rng, rng.choice([(235, 225, 200), (200, 90, 70), (240, 240, 235), (190, 170, 130)]))
    roof = _jitter(rng, rng.choice([(160, 40, 30), (70, 60, 60), (120, 70, 40)]))
    draw.rectangle([x, ground - h, x + w, ground], fill=wall, outline=(60, 50, 40))
    draw.polygon([(x - w * 0.1, ground - h), (x + w / 2, ground - h - w * 0.55), (x + w * 1.1, ground - h)],
                 fill=roof, outline=(50, 30, 25))
    draw.rectangle([x + w * 0.4, ground - h * 0.5, x + w * 0.6, ground], fill=(90, 60, 40))
    for wx in (x + w * 0.12, x + w * 0.7):
        draw.rectangle([wx, ground - h * 0.8, wx + w * 0.18, ground - h * 0.55], fill=(150, 200, 230),
                       outline=(60, 50, 40))


def _tree(draw, rng, x, ground, size, leaf):
    draw.rectangle([x - size * 0.08, ground - size * 0.6, x + size * 0.08, ground], fill=(95, 65, 40))
    for _ in range(3):
        dx, dy = rng.uniform(-0.25, 0.25) * size, rng.uniform(-0.15, 0.1) * size
        r = size * rng.uniform(0.3, 0.42)
        c = ground - size * 0.8
        draw.ellipse([x + dx - r, c + dy - r, x + dx + r, c + dy + r], fill=_jitter(rng, leaf, 14))


def _pine(draw, x, ground, size, color, snow=None):
    draw.rectangle([x - size * 0.05, ground - size * 0.2, x + size * 0.05, ground], fill=(80, 55, 35))
    for i in range(3):
        top = ground - size * (1.0 - 0.25 * i)
        half = size * (0.2 + 0.1 * i)
        base = ground - size * (0.45 - 0.15 * i)
        draw.polygon([(x, top), (x - half, base), (x + half, base)], fill=color)
        if snow and i == 0:
            draw.polygon([(x, top), (x - half * 0.35, top + size * 0.1), (x + half * 0.35, top + size * 0.1)],
                         fill=snow)


def _speckle(draw, rng, box, colors, count):
    x0, y0, x1, y1 = box
    for _ in range(count):
        x, y = rng.uniform(x0, x1), rng.uniform(y0, y1)
        draw.line([(x, y), (x + rng.uniform(-2, 2), y - rng.uniform(2, 6))], fill=rng.choice(colors))


def _regular(cx, cy, r, n, angle):
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


# ---------------------------------------------------------------- scenes

def _countryside(img, draw, rng):
    top, bottom = _jitter(rng, (70, 130, 210)), _jitter(rng, (190, 220, 245))
    _gradient(draw, top, bottom)
    cy = rng.uniform(50, 120)
    _sun(draw, rng.uniform(80, WIDTH - 80), cy, 28, (255, 240, 170), _mix(top, bottom, cy / HEIGHT))
    for _ in range(rng.randint(2, 4)):
        _cloud(draw, rng, rng.uniform(0, WIDTH), rng.uniform(40, 160), rng.uniform(25, 45), (250, 250, 252))
    for i, (base, color) in enumerate([(300, (110, 160, 90)), (350, (80, 150, 60)), (410, (60, 130, 45))]):
        draw.polygon(_ridge(rng, base, 30 - i * 6), fill=_jitter(rng, color, 10))
    _speckle(draw, rng, (0, 420, WIDTH, HEIGHT), [(50, 110, 35), (90, 160, 60)], 500)
    for _ in range(rng.randint(2, 4)):
        _house(draw, rng, rng.uniform(40, WIDTH - 140), rng.uniform(370, 410), rng.uniform(60, 100))
    for _ in range(rng.randint(3, 6)):
        _tree(draw, rng, rng.uniform(0, WIDTH), rng.uniform(360, 440), rng.uniform(60, 110), (50, 120, 40))


def _sunset_sea(img, draw, rng):
    horizon = int(rng.uniform(250, 300))
    top, low = _jitter(rng, (70, 40, 110)), _jitter(rng, (250, 150, 70))
    _gradient(draw, top, low, 0, horizon)
    sx = rng.uniform(200, WIDTH - 200)
    _sun(draw, sx, horizon - 10, 45, (255, 220, 120), low)
    for _ in range(rng.randint(2, 4)):
        _cloud(draw, rng, rng.uniform(0, WIDTH), rng.uniform(40, horizon - 90), rng.uniform(20, 40),
               _mix(top, (250, 140, 120), 0.6))
    _gradient(draw, _mix(low, (40, 40, 90), 0.55), (20, 25, 60), horizon, HEIGHT)
    for i in range(60):  # sun glitter on the water
        y = horizon + 4 + i * (HEIGHT - horizon) / 60
        half = 12 + i * 2.2 * rng.uniform(0.6, 1.2)
        x = sx + rng.uniform(-20, 20)
        draw.line([(x - half, y), (x + half, y)], fill=_mix((255, 210, 120), (60, 50, 90), i / 70), width=2)
    bx, by = rng.uniform(60, WIDTH - 160), horizon + rng.uniform(25, 60)
    draw.polygon([(bx, by), (bx + 90, by), (bx + 75, by + 14), (bx + 12, by + 14)], fill=(40, 25, 30))
    draw.polygon([(bx + 45, by - 75), (bx + 45, by - 4), (bx + 85, by - 4)], fill=(240, 230, 215))
    draw.line([(bx + 45, by - 80), (bx + 45, by)], fill=(40, 25, 30), width=3)


def _night_city(img, draw, rng):
    _gradient(draw, (8, 10, 35), _jitter(rng, (40, 45, 90), 10))
    for _ in range(220):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, 300)
        draw.point((x, y), fill=rng.choice([(255, 255, 255), (200, 210, 255), (255, 240, 200)]))
    mx, my = rng.uniform(80, WIDTH - 80), rng.uniform(50, 110)
    draw.ellipse([mx - 26, my - 26, mx + 26, my + 26], fill=(245, 240, 215))
    draw.ellipse([mx - 14, my - 30, mx + 34, my + 18], fill=(18, 20, 48))  # crescent
    x = -10
    while x < WIDTH:
        w, h = rng.uniform(50, 110), rng.uniform(120, 330)
        body = _jitter(rng, (30, 32, 50), 10)
        draw.rectangle([x, HEIGHT - h, x + w, HEIGHT], fill=body, outline=(15, 15, 25))
        for wy in range(int(HEIGHT - h + 12), HEIGHT - 10, 18):
            for wx in range(int(x + 8), int(x + w - 10), 14):
                if rng.random() < 0.45:
                    draw.rectangle([wx, wy, wx + 6, wy + 9], fill=rng.choice([(255, 220, 130), (250, 240, 190),
                                                                               (150, 200, 255)]))
        x += w + rng.uniform(-8, 6)


def _snowy_mountains(img, draw, rng):
    _gradient(draw, _jitter(rng, (150, 175, 205)), (225, 232, 240))
    for layer, (color, base) in enumerate([((120, 130, 155), 330), ((90, 100, 125), 380)]):
        x = rng.uniform(-120, -20)
        while x < WIDTH + 100:
            w, h = rng.uniform(220, 360), rng.uniform(170, 280) - layer * 40
            peak = (x + w / 2, base - h)
            draw.polygon([(x, base), peak, (x + w, base)], fill=_jitter(rng, color, 8))
            cap = 0.3
            draw.polygon([peak, (peak[0] - w / 2 * cap, peak[1] + h * cap), (peak[0] - w * 0.05, peak[1] + h * cap * 0.75),
                          (peak[0] + w * 0.08, peak[1] + h * cap * 1.05), (peak[0] + w / 2 * cap, peak[1] + h * cap)],
                         fill=(245, 247, 252))
            x += w * rng.uniform(0.45, 0.7)
    draw.rectangle([0, 380, WIDTH, HEIGHT], fill=(238, 242, 248))
    for _ in range(rng.randint(10, 16)):
        s = rng.uniform(60, 120)
        _pine(draw, rng.uniform(0, WIDTH), rng.uniform(400, 470), s, _jitter(rng, (30, 75, 50), 10),
              snow=(240, 245, 250))
    for _ in range(150):
        x, y = rng.uniform(0, WIDTH), rng.uniform(0, HEIGHT)
        draw.ellipse([x - 1.5, y - 1.5, x + 1.5, y + 1.5], fill=(255, 255, 255))


def _desert(img, draw, rng):
    top, bottom = _jitter(rng, (80, 150, 220)), (245, 225, 190)
    _gradient(draw, top, bottom)
    cy = rng.uniform(60, 110)
    _sun(draw, rng.uniform(100, WIDTH - 100), cy, 38, (255, 250, 215), _mix(top, bottom, cy / HEIGHT))
    for i, color in enumerate([(225, 175, 110), (210, 150, 85), (190, 125, 65)]):
        base = 280 + i * 60
        pts = _ridge(rng, base, 40 - i * 8, waves=2)
        draw.polygon(pts, fill=_jitter(rng, color, 8))
        shade = _mix(color, (120, 70, 40), 0.35)
        for k in range(6):  # wind ripples
            ys = [(x, y + 14 + k * 12) for x, y in pts[:-2]]
            draw.line(ys, fill=shade, width=1)
    for _ in range(rng.randint(2, 4)):
        x, g, h = rng.uniform(40, WIDTH - 40), rng.uniform(420, 465), rng.uniform(60, 110)
        green = _jitter(rng, (60, 120, 60), 10)
        draw.rounded_rectangle([x - 9, g - h, x + 9, g], radius=9, fill=green)
        for side in (-1, 1):
            ay = g - h * rng.uniform(0.4, 0.7)
            draw.rounded_rectangle([min(x, x + side * 28), ay - 6, max(x, x + side * 28), ay + 6], radius=6, fill=green)
            tx = x + side * 22
            draw.rounded_rectangle([tx - 6, ay - 30, tx + 6, ay + 4], radius=6, fill=green)


def _lake_forest(img, draw, rng):
    shore = int(rng.uniform(250, 290))
    top = _jitter(rng, (120, 170, 210))
    _gradient(draw, top, (215, 225, 225), 0, shore)
    for _ in range(rng.randint(1, 3)):
        _cloud(draw, rng, rng.uniform(0, WIDTH), rng.uniform(40, 130), rng.uniform(25, 40), (245, 245, 245))
    draw.polygon(_ridge(rng, shore - 60, 25), fill=(95, 120, 130))
    trees = [(rng.uniform(-20, WIDTH + 20), rng.uniform(70, 140)) for _ in range(40)]
    for x, s in sorted(trees, key=lambda t: t[1]):
        _pine(draw, x, shore, s, _jitter(rng, (30, 70, 40), 12))
    # the lake mirrors the shore: flip the scene above it, darken it, add ripple lines
    mirror = img.crop((0, shore - (HEIGHT - shore), WIDTH, shore)).transpose(Image.Transpose.FLIP_TOP_BOTTOM)
    mirror = Image.blend(mirror, Image.new("RGB", mirror.size, (20, 40, 60)), 0.45)
    img.paste(mirror, (0, shore))
    for _ in range(90):
        y = rng.uniform(shore + 4, HEIGHT)
        x = rng.uniform(0, WIDTH)
        draw.line([(x, y), (x + rng.uniform(20, 70), y)], fill=(170, 190, 200))
    for _ in range(2):
        bx, by = rng.uniform(150, WIDTH - 150), rng.uniform(120, 200)
        draw.line([(bx - 12, by - 5), (bx, by), (bx + 12, by - 5)], fill=(30, 30, 30), width=2)


def _shapes(img, draw, rng):
    a, b = _jitter(rng, (235, 230, 215)), _jitter(rng, (215, 210, 195))
    tile = rng.choice([24, 32, 40])
    for y in range(0, HEIGHT, tile):
        for x in range(0, WIDTH, tile):
            draw.rectangle([x, y, x + tile - 1, y + tile - 1], fill=a if (x // tile + y // tile) % 2 else b)
    palette = [(220, 50, 50), (40, 110, 220), (250, 200, 30), (40, 170, 90), (150, 60, 190), (250, 130, 30)]
    for _ in range(rng.randint(7, 11)):
        kind, color = rng.choice(["circle", "square", "triangle"]), rng.choice(palette)
        cx, cy, r = rng.uniform(60, WIDTH - 60), rng.uniform(60, HEIGHT - 60), rng.uniform(30, 70)
        draw.ellipse([cx - r + 6, cy - r + 10, cx + r + 6, cy + r + 10], fill=_mix(a, (0, 0, 0), 0.25))  # shadow
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color, outline=(30, 30, 30), width=3)
            draw.ellipse([cx - r * 0.5, cy - r * 0.6, cx - r * 0.1, cy - r * 0.2], fill=_mix(color, (255, 255, 255), 0.6))
        else:
            n = 4 if kind == "square" else 3
            draw.polygon(_regular(cx, cy, r, n, rng.uniform(0, math.pi)), fill=color, outline=(30, 30, 30), width=3)


def _rainy_street(img, draw, rng):
    _gradient(draw, _jitter(rng, (110, 115, 125), 8), (170, 172, 178))
    vp = (WIDTH / 2 + rng.uniform(-80, 80), 230)
    x = 0
    while x < WIDTH:  # buildings on both sides behind the road
        w, h = rng.uniform(70, 130), rng.uniform(80, 200)
        draw.rectangle([x, 230 - h, x + w, 235], fill=_jitter(rng, (90, 92, 100), 12), outline=(60, 60, 66))
        for wy in range(int(245 - h), 220, 22):
            for wx in range(int(x + 10), int(x + w - 14), 20):
                draw.rectangle([wx, wy, wx + 9, wy + 12], fill=(200, 190, 150) if rng.random() < 0.3 else (70, 75, 85))
        x += w
    draw.rectangle([0, 232, WIDTH, HEIGHT], fill=(95, 98, 105))  # pavement
    draw.polygon([vp, (-200, HEIGHT), (WIDTH + 200, HEIGHT)], fill=(55, 58, 64))  # road
    for k in range(8):  # dashed centre line in perspective
        t0, t1 = (k + 0.2) / 8, (k + 0.6) / 8
        p = lambda t: (vp[0] + (WIDTH / 2 - vp[0]) * t, vp[1] + (HEIGHT - vp[1]) * t)
        draw.line([p(t0 ** 1.6), p(t1 ** 1.6)], fill=(220, 215, 180), width=max(1, int(6 * t1)))
    for side in (-1, 1):
        for k in range(4):
            t = 0.25 + k * 0.25
            px = vp[0] + side * (WIDTH * 0.75) * t
            py = vp[1] + (HEIGHT - vp[1]) * t
            h = 220 * t
            draw.line([(px, py), (px, py - h)], fill=(35, 35, 40), width=max(2, int(6 * t)))
            draw.ellipse([px - 9 * t, py - h - 9 * t, px + 9 * t, py - h + 9 * t], fill=(255, 225, 150))
    for _ in range(rng.randint(3, 6)):  # puddles
        px, py = rng.uniform(0, WIDTH), rng.uniform(330, HEIGHT - 10)
        w = rng.uniform(40, 110)
        draw.ellipse([px - w, py - w * 0.12, px + w, py + w * 0.12], fill=(120, 125, 135))
    for _ in range(350):
        x, y = rng.uniform(-40, WIDTH), rng.uniform(-20, HEIGHT)
        draw.line([(x, y), (x + 6, y + 22)], fill=(185, 190, 200))


def _flower_meadow(img, draw, rng):
    _gradient(draw, _jitter(rng, (60, 140, 230)), (180, 215, 245), 0, 300)
    for _ in range(rng.randint(2, 4)):
        _cloud(draw, rng, rng.uniform(0, WIDTH), rng.uniform(40, 150), rng.uniform(25, 45), (255, 255, 255))
    draw.polygon(_ridge(rng, 250, 20), fill=(120, 160, 110))
    draw.polygon(_ridge(rng, 290, 15), fill=(95, 165, 70))
    _speckle(draw, rng, (0, 300, WIDTH, HEIGHT), [(70, 140, 50), (110, 180, 70), (60, 120, 40)], 700)
    for _ in range(260):
        y = rng.uniform(290, HEIGHT)
        depth = (y - 290) / (HEIGHT - 290)
        x, r = rng.uniform(0, WIDTH), 2 + 7 * depth
        color = rng.choice([(230, 40, 50), (250, 210, 40), (150, 70, 190), (250, 250, 250), (245, 120, 170)])
        draw.line([(x, y), (x, y + r * 2.5)], fill=(60, 120, 40), width=max(1, int(r / 3)))
        for k in range(5):
            ang = 2 * math.pi * k / 5
            px, py = x + r * 0.8 * math.cos(ang), y + r * 0.8 * math.sin(ang)
            draw.ellipse([px - r * 0.5, py - r * 0.5, px + r * 0.5, py + r * 0.5], fill=color)
        draw.ellipse([x - r * 0.35, y - r * 0.35, x + r * 0.35, y + r * 0.35], fill=(250, 190, 40))


def _underwater(img, draw, rng):
    _gradient(draw, _jitter(rng, (70, 170, 200)), (10, 40, 90))
    rays = Image.new("RGBA", img.size, (0, 0, 0, 0))
    rd = ImageDraw.Draw(rays)
    for _ in range(5):  # light shafts from the surface
        x = rng.uniform(0, WIDTH)
        rd.polygon([(x - 20, 0), (x + 25, 0), (x + 140, HEIGHT), (x + 40, HEIGHT)], fill=(220, 245, 255, 40))
    img.paste(Image.alpha_composite(img.convert("RGBA"), rays).convert("RGB"))
    draw = ImageDraw.Draw(img)
    draw.polygon(_ridge(rng, 430, 15), fill=(195, 175, 130))
    _speckle(draw, rng, (0, 440, WIDTH, HEIGHT), [(170, 150, 110), (215, 195, 150)], 300)
    for _ in range(rng.randint(6, 10)):  # seaweed
        x, h = rng.uniform(0, WIDTH), rng.uniform(90, 200)
        pts = [(x + 12 * math.sin(k / 3 + x), 445 - h * k / 12) for k in range(13)]
        draw.line(pts, fill=_jitter(rng, (40, 120, 60), 12), width=int(rng.uniform(5, 9)))
    for _ in range(rng.randint(8, 14)):  # fish
        x, y, s = rng.uniform(40, WIDTH - 40), rng.uniform(60, 380), rng.uniform(12, 26)
        d = rng.choice([-1, 1])
        color = rng.choice([(250, 140, 30), (250, 220, 60), (230, 90, 90), (120, 200, 230)])
        draw.polygon([(x - d * s, y), (x - d * s * 1.7, y - s * 0.6), (x - d * s * 1.7, y + s * 0.6)], fill=color)
        draw.ellipse([x - s * 1.1, y - s * 0.55, x + s * 1.1, y + s * 0.55], fill=color)
        draw.ellipse([x + d * s * 0.55 - 2, y - 4, x + d * s * 0.55 + 2, y], fill=(20, 20, 20))
    for _ in range(40):
        x, y, r = rng.uniform(0, WIDTH), rng.uniform(0, 430), rng.uniform(2, 7)
        draw.ellipse([x - r, y - r, x + r, y + r], outline=(220, 240, 255), width=1)


KINDS = {
    "countryside": _countryside, "sunset_sea": _sunset_sea, "night_city": _night_city,
    "snowy_mountains": _snowy_mountains, "desert": _desert, "lake_forest": _lake_forest, "shapes": _shapes,
    "rainy_street": _rainy_street, "flower_meadow": _flower_meadow, "underwater": _underwater,
}


def draw_scene(kind: str, seed: int) -> Image.Image:
    """One 832x480 RGB scene; the same (kind, seed) gives the same pixels under the same Pillow."""
    rng = random.Random(f"{kind}:{seed}")  # str seeds hash with sha512: stable across runs and platforms
    img = Image.new("RGB", (WIDTH, HEIGHT))
    KINDS[kind](img, ImageDraw.Draw(img), rng)
    return img


# ---------------------------------------------------------------- the prompt sets

def build(split: str) -> tuple[dict, list[tuple[str, str, Image.Image]]]:
    """The prompts.json document of `split` and its images as (path relative to the json, note, image)."""
    samples, images = [], []
    for i, (kind, prompt) in enumerate(SCENES[split]):
        seed, rel = BASE_SEED[split] + i, f"images/{split}_{i:03d}.png"
        samples.append({"prompt": prompt, "seed": seed, "image": rel})
        images.append((rel, f"{kind} scene, seed {seed}", draw_scene(kind, seed)))
    return {"version": 1, "task": "i2v", "description": DESCRIPTION[split], "samples": samples}, images


def _png_bytes(img: Image.Image, note: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"vqx scripts/make_i2v_assets.py (Pillow {PIL.__version__})")
    info.add_text("Description", note)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True, pnginfo=info)
    return buf.getvalue()


def _same_pixels(path: Path, img: Image.Image) -> bool:
    try:
        with Image.open(path) as old:
            return old.mode == img.mode and old.size == img.size and old.tobytes() == img.tobytes()
    except (OSError, ValueError):
        return False


def json_text(doc: dict) -> str:
    """A prompts.json document as the script writes it."""
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def sync(root: Path = ROOT, check: bool = False) -> list[Path]:
    """Write the json and images that differ from what is drawn (pixels, not bytes, so rerunning with
    another zlib or Pillow build does not churn the files); returns the paths that differed."""
    changed = []
    for split in SCENES:
        doc, images = build(split)
        folder = root / split
        text = json_text(doc)
        target = folder / "prompts.json"
        if not target.is_file() or target.read_text(encoding="utf-8") != text:
            changed.append(target)
            if not check:
                folder.mkdir(parents=True, exist_ok=True)
                target.write_text(text, encoding="utf-8")
        for rel, note, img in images:
            path = folder / rel
            if _same_pixels(path, img):
                continue
            changed.append(path)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(_png_bytes(img, note))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="folder holding calib/ and eval/ (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if any file differs")
    args = parser.parse_args(argv)
    changed = sync(args.out, check=args.check)
    for path in changed:
        print(("stale: " if args.check else "wrote: ") + str(path))
    if args.check and changed:
        print(f"{len(changed)} file(s) differ -- run python scripts/make_i2v_assets.py", file=sys.stderr)
        return 1
    if not changed:
        print("up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())

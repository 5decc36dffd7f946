"""`vqx score A B`: LPIPS / PSNR / SSIM between two videos, two images, or two folders of them.

Folders are paired by file name. Scores are means over all frames of all pairs, with the conventions of
`eval=video` (see metrics.py). Note that mp4s are lossy (yuv420): scoring a run's mp4s gives numbers close
to, not equal to, its metrics.json, which scores the decoded frames before encoding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError
from . import metrics as M
from .videoio import load_media, media_files

HELP = "score two videos, images or folders of them: prints JSON {lpips, psnr, ssim}"


def add_arguments(parser) -> None:
    parser.add_argument("reference", type=Path, help="video, image or folder (the reference)")
    parser.add_argument("test", type=Path, help="video, image or folder to compare with it (same names in folders)")
    parser.add_argument("--net", choices=M.LPIPS_NETS, default="alex", help="LPIPS backbone (default alex)")
    parser.add_argument("--device", default="cpu", help="torch device for LPIPS/SSIM: cpu (default), cuda, cuda:N, auto")


def pairs(a: Path, b: Path) -> list[tuple[Path, Path]]:
    for p in (a, b):
        if not p.exists():
            raise UserError(f"{p} does not exist")
    if a.is_dir() != b.is_dir():
        raise UserError(f"cannot compare {'folder' if a.is_dir() else 'file'} {a} with {'folder' if b.is_dir() else 'file'} {b}; "
                        "pass two files or two folders")
    if not a.is_dir():
        return [(a, b)]
    fa, fb = media_files(a), media_files(b)
    if not fa:
        raise UserError(f"folder {a} holds no images or videos")
    only_a, only_b = sorted(set(fa) - set(fb)), sorted(set(fb) - set(fa))
    if only_a or only_b:
        name, where, other = (only_a[0], a, b) if only_a else (only_b[0], b, a)
        raise UserError(f"{where / name} has no counterpart in {other} ({len(only_a) + len(only_b)} unpaired files); "
                        "folders are paired by file name")
    return [(fa[n], fb[n]) for n in sorted(fa)]


def score(a: Path, b: Path, net: str = "alex", device: str = "cpu") -> dict:
    per_frame: dict[str, list[np.ndarray]] = {"lpips": [], "psnr": [], "ssim": []}
    items = pairs(a, b)
    for pa, pb in items:
        ra, rb = load_media(pa), load_media(pb)
        if ra.shape != rb.shape:
            raise UserError(f"{pa} is {_describe(ra)} but {pb} is {_describe(rb)}; they must match")
        for k, v in M.frame_metrics(ra, rb, net, device).items():
            per_frame[k].append(v)
    frames = {k: np.concatenate(v) for k, v in per_frame.items()}
    return {**{k: float(v.mean()) for k, v in frames.items()}, "pairs": len(items), "frames": int(len(frames["psnr"])),
            "lpips_net": net}


def _describe(v: np.ndarray) -> str:
    return f"{v.shape[0]} frame(s) of {v.shape[2]}x{v.shape[1]}"


def main(args) -> int:
    from ..runtime import resolve_device

    device = resolve_device(args.device, "--device ")
    print(json.dumps(score(args.reference, args.test, args.net, str(device))))
    return 0

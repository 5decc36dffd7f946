"""The per-frame LPIPS / PSNR figure of an evaluation run."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path


def plot_per_frame(path: str | os.PathLike, videos: list[dict], floor: list[dict], title: str) -> None:
    """One thin line per video, their mean thick, the 16-bit noise floor's mean dashed."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, key, label in ((axes[0], "lpips", "LPIPS (lower is closer)"), (axes[1], "psnr", "PSNR dB (higher is closer)")):
        curves = [v["per_frame"][key] for v in videos]
        for c in curves:
            ax.plot(range(len(c)), c, color="tab:blue", alpha=0.25, linewidth=0.8)
        if curves and len({len(c) for c in curves}) == 1:
            mean = [sum(col) / len(col) for col in zip(*curves)]
            ax.plot(range(len(mean)), mean, color="tab:blue", linewidth=2, label=f"quantized vs 16-bit ({len(curves)} videos)")
        fl = [v["per_frame"][key] for v in floor]
        if fl and len({len(c) for c in fl}) == 1:
            mean = [sum(col) / len(col) for col in zip(*fl)]
            ax.plot(range(len(mean)), mean, color="gray", linestyle="--", linewidth=1.5, label="noise floor (16-bit vs 16-bit)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("frame")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

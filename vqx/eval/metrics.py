"""Per-frame fidelity metrics between two videos: LPIPS, PSNR, SSIM.

Videos are float arrays [frames, H, W, 3] in [0, 1]. Conventions (deepcompressor's, see
docs/anchors.md): PSNR on [0, 1]; LPIPS v0.1 with inputs scaled to [-1, 1]; SSIM with torchmetrics'
defaults (11x11 Gaussian window, sigma 1.5, data range 1).
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
import torch

from ..errors import UserError
from .lpips_weights import features_state_dict

# Identical frames have infinite PSNR; one would make the mean infinite, so each frame's PSNR is capped.
# 100 dB (MSE 1e-10) is far above any real difference (8-bit rounding alone is ~59 dB).
PSNR_CAP_DB = 100.0
LPIPS_MIN_SIDE = 32  # AlexNet's pooling runs out of pixels below this
LPIPS_NETS = ("alex", "vgg")
_PIXELS_PER_BATCH = {"alex": 1 << 23, "vgg": 1 << 21}  # bounds activation memory at 480p/720p


@lru_cache(maxsize=4)
def lpips_model(net: str, device: str) -> torch.nn.Module:
    """LPIPS v0.1 (the package's own linear heads) on an offline ImageNet backbone, frozen, eval mode."""
    import lpips

    if net not in LPIPS_NETS:
        raise UserError(f"LPIPS net {net!r} is not supported; valid: {', '.join(LPIPS_NETS)}")
    feats, source = features_state_dict(net)
    with warnings.catch_warnings():  # torchvision's deprecation notices for lpips' `pretrained=` calls
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips names backbone tensors slice<k>.<features index>.<weight|bias>
    wanted = {key: "features." + key.split(".", 1)[1] for key in model.net.state_dict()}
    missing = [src for src in wanted.values() if src not in feats]
    if missing:
        raise UserError(f"{source} lacks {missing[0]}; it is not a torchvision {net} checkpoint -- delete it and retry")
    model.net.load_state_dict({key: feats[src] for key, src in wanted.items()})
    model.weights_source = source
    return model.eval().requires_grad_(False).to(device)


def _check_pair(ref: np.ndarray, test: np.ndarray) -> None:
    if ref.shape != test.shape:
        raise UserError(f"cannot compare a {_shape(ref)} video with a {_shape(test)} one; both need the same frames and size")
    if ref.ndim != 4 or ref.shape[-1] != 3:
        raise UserError(f"expected videos shaped [frames, H, W, 3], got {ref.shape}")


def _shape(v: np.ndarray) -> str:
    return f"{v.shape[0]}-frame {v.shape[2]}x{v.shape[1]}" if v.ndim == 4 else str(v.shape)


def _nchw(video: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(video, dtype=np.float32)).permute(0, 3, 1, 2).to(device)


def psnr_frames(ref: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR in dB on [0, 1], capped at PSNR_CAP_DB (identical frames score the cap, not inf)."""
    _check_pair(ref, test)
    diff = ref.astype(np.float64) - test.astype(np.float64)
    mse = np.mean(diff * diff, axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(1.0 / mse)
    return np.minimum(psnr, PSNR_CAP_DB)


@torch.no_grad()
def ssim_frames(ref: np.ndarray, test: np.ndarray, device: str = "cpu", chunk: int = 8) -> np.ndarray:
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    _check_pair(ref, test)
    side = min(ref.shape[1:3])
    kernel = min(11, side if side % 2 else side - 1)  # the window must fit in the frame
    out = []
    for i in range(0, len(ref), chunk):
        a, b = _nchw(ref[i:i + chunk], device).double(), _nchw(test[i:i + chunk], device).double()  # fp64: identical frames give 1
        out.append(ssim(b, a, data_range=1.0, kernel_size=kernel, reduction="none").double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def lpips_frames(ref: np.ndarray, test: np.ndarray, net: str = "alex", device: str = "cpu") -> np.ndarray:
    _check_pair(ref, test)
    if min(ref.shape[1:3]) < LPIPS_MIN_SIDE:
        raise UserError(f"LPIPS needs frames of at least {LPIPS_MIN_SIDE}x{LPIPS_MIN_SIDE}, got {ref.shape[2]}x{ref.shape[1]}")
    model = lpips_model(net, device)
    chunk = max(1, _PIXELS_PER_BATCH[net] // (ref.shape[1] * ref.shape[2]))
    out = []
    for i in range(0, len(ref), chunk):
        a = _nchw(ref[i:i + chunk], device) * 2 - 1
        b = _nchw(test[i:i + chunk], device) * 2 - 1
        out.append(model(a, b).reshape(-1).double().cpu())
    return torch.cat(out).numpy()


def frame_metrics(ref: np.ndarray, test: np.ndarray, net: str = "alex", device: str = "cpu") -> dict[str, np.ndarray]:
    """{"lpips", "psnr", "ssim"}: one value per frame."""
    return {"lpips": lpips_frames(ref, test, net, device), "psnr": psnr_frames(ref, test),
            "ssim": ssim_frames(ref, test, device)}


def video_summary(per_frame: dict[str, np.ndarray]) -> dict:
    """A video's score is its frames' mean; the curves are kept for plots."""
    out = {k: float(np.mean(v)) for k, v in per_frame.items()}
    out["per_frame"] = {k: [float(x) for x in v] for k, v in per_frame.items()}
    return out


def aggregate(videos: list[dict], keys=("lpips", "psnr", "ssim")) -> dict:
    """Mean and (population) std over videos, and the mean per-frame curve."""
    out: dict = {}
    for k in keys:
        vals = np.array([v[k] for v in videos], dtype=np.float64)
        out[k] = float(vals.mean())
        out[f"{k}_std"] = float(vals.std())
    lengths = {len(v["per_frame"][keys[0]]) for v in videos}
    if len(lengths) == 1:
        out["per_frame"] = {k: [float(x) for x in np.mean([v["per_frame"][k] for v in videos], axis=0)] for k in keys}
    for k, v in out.items():
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{k} is {v}")  # callers check inputs are finite; this is a bug
    return out

"""Swap target linears for quantized ones, and measure what that did to each layer's output."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.adapter import QuantTarget, set_submodule
from ..models.wan.layers import input_groups
from .formats import QuantFormat
from .fused import install as install_fused
from .linear import QuantLinear, SmoothedLinear

# Groups whose smoothing factor lives in lightx2v's per-block affine_norm vectors (applied at run time).
RUNTIME_SMOOTHED_GROUPS = [g for g in input_groups(i2v=False) if g.fold in ("affine_norm1", "affine_norm3")]


def materialize(transformer: torch.nn.Module, targets: list[QuantTarget], fmt: QuantFormat,
                chosen_codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                runtime_smoothing: dict[int, dict[str, torch.Tensor]] | None = None,
                compute_dtype: dict[str, torch.dtype] | None = None) -> dict[str, QuantLinear]:
    """Replace each target ``nn.Linear`` in place; returns name -> QuantLinear.

    A linear whose input group carries a runtime smoothing vector (affine_norm1/3) scales its input by 1/s.
    ``compute_dtype``: block-relative name -> dtype the quantized layer computes in (default: its weight's).
    Blocks that got quantized linears then quantize each input group once, fused with the op before it
    (fused.install; same outputs bit for bit as quantizing per linear).
    """
    out = {}
    for t in tqdm(targets, desc="quantize", unit="linear", leave=False, disable=len(targets) < 50):
        codes, scale = chosen_codes.get(t.name, (None, None))
        smooth = runtime_smoothing_for(t, runtime_smoothing or {})
        if not fmt.quantizes:
            if smooth is not None:  # transforms without quantization (format=none) still need 1/s at run time
                set_submodule(transformer.blocks[t.block], t.local_name, SmoothedLinear(t.module, smooth))
            continue
        try:
            dtype = (compute_dtype or {}).get(t.local_name)
            q = QuantLinear(t.module, fmt, codes, scale, smooth, dtype=dtype)
        except ValueError as e:
            raise UserError(f"cannot quantize {t.name}: {e}; the checkpoint's weights are corrupt (reconvert or redownload it)") from None
        set_submodule(transformer.blocks[t.block], t.local_name, q)
        out[t.name] = q
    if out:
        install_fused(transformer, {t.block for t in targets if t.name in out})
    return out


def runtime_smoothing_for(target: QuantTarget, runtime_smoothing: dict[int, dict[str, torch.Tensor]]):
    for group in RUNTIME_SMOOTHED_GROUPS:
        if target.local_name in group.linears:
            return runtime_smoothing.get(target.block, {}).get(group.fold)
    return None

"""Swap target linears for quantized ones, then let the model's adapter fuse the quantized blocks."""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.adapter import QuantTarget, adapter_for, set_submodule
from ..quant.scheme import Scheme, choose_scales
from ..quant.linear import QuantLinear, SmoothedLinear
from .registry import BlockContext


def quantized_linear(linear: nn.Linear, scheme: Scheme | None, codes: torch.Tensor | None = None,
                     scale: torch.Tensor | None = None, smooth: torch.Tensor | None = None,
                     dtype: torch.dtype | None = None, input_scale: torch.Tensor | None = None) -> nn.Module:
    """What one target becomes: a `QuantLinear` under ``scheme`` (``codes``/``scale``: chosen codes, else round to
    nearest), or for ``scheme`` None the float linear (in ``dtype``), wrapped in a `SmoothedLinear` when a runtime
    smoothing ``smooth`` divides its input. Raises ValueError on weights that cannot be quantized."""
    if scheme is None:
        if dtype is not None:
            linear.to(dtype)
        return linear if smooth is None else SmoothedLinear(linear, smooth)
    return QuantLinear(linear, scheme, codes, scale, smooth, dtype=dtype, input_scale=input_scale)


def runtime_vector_of(groups) -> dict[str, str]:
    """Block-relative linear name -> the runtime vector (a "runtime" group's fold) that divides its input."""
    return {name: g.fold for g in groups if g.kind == "runtime" for name in g.linears}


def materialize(transformer: torch.nn.Module, targets: list[QuantTarget], schemes: Scheme | dict[str, Scheme | None] | None,
                chosen_codes: dict[str, tuple[torch.Tensor, torch.Tensor]],
                runtime_smoothing: dict[int, dict[str, torch.Tensor]] | None = None,
                compute_dtype: dict[str, torch.dtype] | None = None,
                input_scales: dict[str, torch.Tensor] | None = None) -> dict[str, QuantLinear]:
    """Replace each target ``nn.Linear`` in place under its scheme (``schemes``: full name -> scheme, None or
    absent: it stays float; or one scheme for all); returns name -> QuantLinear. ``input_scales``: full name ->
    calibrated scale of a static activation scheme.

    ``runtime_smoothing``: block -> {runtime vector name: s}; a linear whose input group folds its factor into a
    runtime vector ("runtime" groups, e.g. Wan's affine_norm1/3) scales its input by 1/s.
    ``compute_dtype``: block-relative name -> dtype the quantized layer computes in (default: its weight's).
    Blocks that got quantized linears then get the adapter's fused forward (`ModelAdapter.install_fused`: each
    input group quantized once, fused with the op before it; the same outputs bit for bit as quantizing per linear).
    """
    if schemes is None or isinstance(schemes, Scheme):  # one scheme (or none) for every target
        schemes = dict.fromkeys((t.name for t in targets), schemes)
    adapter = adapter_for(transformer)
    vector_of = runtime_vector_of(adapter.input_groups(transformer))
    out = {}
    for t in tqdm(targets, desc="quantize", unit="linear", leave=False, disable=len(targets) < 50):
        codes, scale = chosen_codes.get(t.name, (None, None))
        smooth = (runtime_smoothing or {}).get(t.block, {}).get(vector_of.get(t.local_name))
        scheme = schemes.get(t.name)
        if scheme is None:
            if smooth is not None:  # a float layer under a transform still needs 1/s at run time
                set_submodule(transformer, t.name, quantized_linear(t.module, None, smooth=smooth))
            continue
        try:
            dtype = (compute_dtype or {}).get(t.local_name)
            q = quantized_linear(t.module, scheme, codes, scale, smooth, dtype, (input_scales or {}).get(t.name))
        except ValueError as e:
            raise UserError(f"cannot quantize {t.name}: {e}; the checkpoint's weights are corrupt (reconvert or redownload it)") from None
        set_submodule(transformer, t.name, q)
        out[t.name] = q
    if out:
        adapter.install_fused(transformer, {t.block for t in targets if t.name in out})
    return out

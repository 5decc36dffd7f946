"""Swap target linears for quantized ones, then let the model's adapter fuse the quantized blocks."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..errors import UserError
from ..models.adapter import QuantTarget, adapter_for, set_submodule
from ..quant.scheme import Scheme
from ..quant.linear import QuantLinear, SmoothedLinear


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
    vector_of = {name: g.fold for g in adapter.input_groups(transformer) if g.kind == "runtime" for name in g.linears}
    out = {}
    for t in tqdm(targets, desc="quantize", unit="linear", leave=False, disable=len(targets) < 50):
        codes, scale = chosen_codes.get(t.name, (None, None))
        smooth = (runtime_smoothing or {}).get(t.block, {}).get(vector_of.get(t.local_name))
        scheme = schemes.get(t.name)
        if scheme is None:
            if smooth is not None:  # a float layer under a transform still needs 1/s at run time
                set_submodule(transformer, t.name, SmoothedLinear(t.module, smooth))
            continue
        try:
            dtype = (compute_dtype or {}).get(t.local_name)
            q = QuantLinear(t.module, scheme, codes, scale, smooth, dtype=dtype,
                            input_scale=(input_scales or {}).get(t.name))
        except ValueError as e:
            raise UserError(f"cannot quantize {t.name}: {e}; the checkpoint's weights are corrupt (reconvert or redownload it)") from None
        set_submodule(transformer, t.name, q)
        out[t.name] = q
    if out:
        adapter.install_fused(transformer, {t.block for t in targets if t.name in out})
    return out

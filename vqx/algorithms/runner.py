"""Block-by-block quantization over the captured calibration calls.

For block i: run every call's block input through the float block while streaming statistics of each
input group; run the recipe's steps; swap the block's targets for quantized linears; measure each
linear's output error on calibration samples (round-to-nearest before, the algorithm after); then
compute block i+1's inputs from the float (`calib.propagate=fp`) or quantized (`quant`) block.
Only the current block's statistics live on the device; block inputs stay on the host between blocks.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..calib.blocks import BlockInputs, first_block_inputs, run_block
from ..calib.capture import Capture
from ..calib.stats import GroupStats
from ..errors import Fault
from ..models.wan import QuantTarget, input_groups, is_i2v
from ..quant.formats import FORMATS, QuantFormat
from ..quant.linear import QuantLinear
from ..quant.materialize import materialize
from .registry import BlockContext, run_steps

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    quantized: dict[str, torch.nn.Module] = field(default_factory=dict)
    runtime_smoothing: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)


def search_format(fmt: QuantFormat) -> QuantFormat:
    """Search losses need quantization; with format=none or weight-only, W8A8 stands in as the proxy."""
    return fmt if fmt.activation_grid is not None else FORMATS["w8a8"]


def _block_inputs(transformer, capture: Capture, device) -> list[BlockInputs]:
    inputs, rotary_by_shape = [], {}
    for call in tqdm(capture.calls, desc="block inputs", unit="call", leave=False):
        inp = first_block_inputs(transformer, {k: v.to(device) for k, v in call.items()})
        key = tuple(call["hidden_states"].shape)
        rotary = rotary_by_shape.setdefault(key, inp.rotary)  # identical for every call of one shape
        inputs.append(BlockInputs(inp.hidden.cpu(), inp.encoder.cpu(), inp.temb.cpu(), rotary))
    return inputs


@torch.no_grad()
def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    d = ref.norm()
    return float((y - ref).norm() / d) if d > 0 else float((y - ref).norm())


def quantize_blockwise(transformer, capture: Capture, targets: list[QuantTarget], fmt: QuantFormat,
                       algo: DictConfig, calib: DictConfig) -> QuantResult:
    device = next(transformer.parameters()).device
    steps = list(algo.steps)
    want_hessian = "gptq" in steps
    by_block: dict[int, dict[str, QuantTarget]] = defaultdict(dict)
    for t in targets:
        by_block[t.block][t.local_name] = t
    groups_all = input_groups(is_i2v(transformer))
    result = QuantResult()
    inputs = _block_inputs(transformer, capture, device)
    last = max(by_block) if by_block else -1

    for i, block in enumerate(tqdm(transformer.blocks, desc=f"quantize ({'+'.join(steps)})", unit="block")):
        if i > last:
            break
        block_targets = by_block.get(i, {})
        groups = [g for g in groups_all if any(n in block_targets for n in g.linears)]
        stats = {g.name: GroupStats(block.get_submodule(g.linears[0]).in_features, calib.loss_tokens,
                                    calib.hessian_tokens, want_hessian, seed=calib.seed * 7919 + i, device=device)
                 for g in groups}
        hooks = [block.get_submodule(g.linears[0]).register_forward_pre_hook(
            lambda m, args, st=stats[g.name]: st.update(args[0])) for g in groups]
        outputs = []
        try:
            for c, inp in enumerate(inputs):
                out = run_block(block, inp.to(device))
                if not torch.isfinite(out).all():
                    raise Fault(f"non-finite activations in block {i} (float model) for calibration call {c} "
                                f"({capture.meta[c]}): the float model overflows; try model.dtype=float32")
                outputs.append(out.cpu())
        except FloatingPointError:
            raise Fault(f"non-finite inputs to a linear of block {i} during calibration; check the weights and model.dtype") from None
        finally:
            for h in hooks:
                h.remove()

        originals = {n: copy.deepcopy(t.module) for n, t in block_targets.items()}
        samples = {g.name: stats[g.name].sample_matrix() for g in groups}
        # Steps work on fp32 master weights, so a smoothed weight is rounded to the model dtype once,
        # by the quantizer, not first by the transform.
        model_dtype = {n: t.module.weight.dtype for n, t in block_targets.items()}
        for t in block_targets.values():
            t.module.float()
        ctx = BlockContext(i, block, groups, block_targets, stats, fmt, search_format(fmt), algo)
        run_steps(ctx, steps)
        if ctx.runtime_smoothing:
            result.runtime_smoothing[i] = ctx.runtime_smoothing
        quantized = materialize(transformer, list(block_targets.values()), fmt, ctx.chosen_codes,
                                {i: ctx.runtime_smoothing} if ctx.runtime_smoothing else {}, compute_dtype=model_dtype)
        for n, t in block_targets.items():
            if t.name not in quantized:  # left float (format=none): back to the model dtype
                t.module.to(model_dtype[n])
        result.quantized.update(quantized)
        result.layers += _layer_report(ctx, block, originals, samples, groups, fmt)
        result.groups += [{"block": i, "group": g.name, **ctx.choices.get(g.name, {})} for g in groups if g.name in ctx.choices]

        if calib.propagate == "quant":
            outputs = [run_block(block, inp.to(device)).cpu() for inp in inputs]
        inputs = [BlockInputs(o, inp.encoder, inp.temb, inp.rotary) for o, inp in zip(outputs, inputs)]
    return result


@torch.no_grad()
def _layer_report(ctx: BlockContext, block, originals, samples, groups, fmt) -> list[dict]:
    rows = []
    for g in groups:
        x = samples[g.name]
        for local in g.linears:
            if local not in ctx.targets:
                continue
            orig = originals[local]
            dev = orig.weight.device
            xd = x.to(dev)
            ref = torch.nn.functional.linear(xd, orig.weight.float(), None if orig.bias is None else orig.bias.float())
            row = {"name": ctx.full_name(local), "native_name": ctx.targets[local].native_name, **ctx.choices.get(local, {})}
            if fmt.quantizes:
                rtn = QuantLinear(orig, fmt)
                row["output_error_rtn"] = _relative_error(rtn(xd.to(orig.weight.dtype)).float(), ref)
            now = block.get_submodule(local)
            xin = xd / ctx.input_scale[local].to(dev) if local in ctx.input_scale else xd
            y = now(xin.to(orig.weight.dtype)).float()
            if local in ctx.output_scale:
                y = y * ctx.output_scale[local].to(dev)
            row["output_error"] = _relative_error(y, ref)
            rows.append(row)
    return rows

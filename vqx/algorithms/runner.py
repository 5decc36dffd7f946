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
import time
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from ..calib.blocks import BlockInputs, first_block_inputs, run_block
from ..calib.capture import Capture, first_nonfinite_layer
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


def _residency(transformer, capture: Capture, device: torch.device) -> torch.device:
    """Where block inputs live between blocks: on the GPU when all of them fit in half of its free memory
    (no transfers), else in pinned host memory (bounded GPU use, e.g. 14B at high resolution)."""
    if device.type != "cuda":
        return device
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    p = transformer.config.patch_size
    tokens = [c["hidden_states"][0, 0].numel() // (p[0] * p[1] * p[2]) for c in capture.calls]
    need = sum(tokens) * hidden * next(transformer.parameters()).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    return device if need < 0.5 * free else torch.device("cpu")


def _block_inputs(transformer, capture: Capture, device, home: torch.device) -> list[BlockInputs]:
    inputs, rotary_by_shape = [], {}
    pin = home.type == "cpu" and device.type == "cuda"
    for call in tqdm(capture.calls, desc="block inputs", unit="call", leave=False):
        inp = first_block_inputs(transformer, {k: v.to(device) for k, v in call.items()})
        key = tuple(call["hidden_states"].shape)
        rotary = rotary_by_shape.setdefault(key, inp.rotary)  # identical for every call of one shape
        hidden = inp.hidden.to(home)
        inputs.append(BlockInputs(hidden.pin_memory() if pin else hidden, inp.encoder, inp.temb, rotary))
    return inputs


def _with_hidden(inp: BlockInputs, out: torch.Tensor) -> BlockInputs:
    """``inp`` with its hidden states replaced by ``out``, kept where ``inp.hidden`` lives. A host copy
    reuses the call's pinned buffer (allocating pinned memory per call and block is slow)."""
    if inp.hidden.device == out.device:
        return BlockInputs(out, inp.encoder, inp.temb, inp.rotary)
    inp.hidden.copy_(out)
    return inp


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
    home = _residency(transformer, capture, device)
    inputs = _block_inputs(transformer, capture, device, home)
    log.info("block inputs of %d calls kept on %s", len(inputs), home)
    t_start = time.perf_counter()
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
        bad = None  # (call index, its block input) of the first call whose block output is not finite
        try:
            for c, inp in enumerate(inputs):
                try:
                    out = run_block(block, inp.to(device, non_blocking=True))
                except FloatingPointError:  # a statistic saw NaN/Inf inputs of a linear
                    out = None
                if out is None or not torch.isfinite(out).all():
                    bad = (c, inp)
                    break
                if calib.propagate == "fp":  # the input is no longer needed: overwrite it (halves host memory)
                    inputs[c] = _with_hidden(inp, out)
        finally:
            for h in hooks:
                h.remove()
        if bad is not None:
            c, inp = bad
            m = capture.meta[c]
            layer = first_nonfinite_layer(block, lambda: run_block(block, inp.to(device)), prefix=f"blocks.{i}.")
            raise Fault(f"non-finite activations (NaN/Inf) in the float model during calibration: first in {layer}, "
                        f"for calibration prompt {m['prompt']} at denoising step {m['step']} ({m['branch']} branch)"
                        f"{'' if calib.propagate == 'fp' else ' with the earlier blocks quantized (calib.propagate=quant)'}"
                        "; the block overflows in this dtype: try model.dtype=float32, or check that layer's weights")

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
            inputs = [_with_hidden(inp, run_block(block, inp.to(device, non_blocking=True))) for inp in inputs]
        log.info("block %d/%d quantized (%.1f s elapsed)", i + 1, last + 1, time.perf_counter() - t_start)
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

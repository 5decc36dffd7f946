"""Block-by-block quantization over the captured calibration calls.

For block i: run every call's block input through the float block while streaming statistics of each
input group; run the recipe's steps; swap the block's targets for quantized linears; measure each
linear's output error on calibration samples (round-to-nearest before, the algorithm after); then
compute block i+1's inputs from the float (`calib.propagate=fp`) or quantized (`quant`) block.
Only the current block's statistics live on the device; block inputs stay on the host between blocks.

When a step searches on the block's output (needs ``block_error``, `block_search`), the runner also guards the
result: the block the steps made and plain round-to-nearest are scored on every calibration call, and a block
whose error is above round-to-nearest's is reset to round-to-nearest (a warning, and ``fallback`` in the
per-block report, `QuantResult.blocks`).

Under torchrun each rank runs its share of the calls (`Capture.share`) through the block, the statistics
are reduced across ranks (`GroupStats.reduce`), and every rank then runs the recipe on the same statistics,
so every rank ends up with the same quantized model (checked block by block) without sending weights.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from .. import distributed
from ..cache import DiskCache
from ..calib.blocks import first_block_inputs, run_block
from ..calib.capture import Capture
from ..diagnostics import first_nonfinite_layer
from ..calib.stats import GroupStats
from ..errors import Fault
from ..models.adapter import BlockInputs, QuantTarget, adapter_for
from ..quant.linear import QuantLinear
from ..quant.scheme import Scheme
from . import shared_stats
from .act_calib import calibrated_input_scales, needs_samples
from .block_search import BlockScorer, score_terms, scratch, search_keys
from .materialize import materialize
from .registry import BlockContext, BlockHooks, plan_steps, run_steps, stats_needed
from .shared_stats import shareable

log = logging.getLogger(__name__)


@dataclass
class QuantResult:
    quantized: dict[str, torch.nn.Module] = field(default_factory=dict)
    runtime_smoothing: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    groups: list[dict] = field(default_factory=list)
    # per block, for recipes that search on the block output: its error and round-to-nearest's (block_search)
    blocks: list[dict] = field(default_factory=list)




def _block_tokens(transformer, capture: Capture) -> list[int]:
    adapter = adapter_for(transformer)
    return [adapter.tokens_per_call(transformer, c) for c in capture.calls]


def _residency(transformer, capture: Capture, device: torch.device) -> torch.device:
    """Where block inputs live between blocks: on the GPU when all of them fit in half of its free memory
    (no transfers), else in pinned host memory (bounded GPU use, e.g. 14B at high resolution)."""
    if device.type != "cuda":
        return device
    adapter = adapter_for(transformer)
    row_bytes = adapter.hidden_size(transformer) * adapter.block_dtype(transformer).itemsize
    need = sum(_block_tokens(transformer, capture)) * row_bytes
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # cached by torch, reusable
    return device if need < 0.5 * free else torch.device("cpu")


def _block_inputs(transformer, capture: Capture, device, home: torch.device) -> list[BlockInputs]:
    pinned, offsets = None, None
    if home.type == "cpu" and device.type == "cuda":
        # One pinned buffer for all calls: pinning per tensor rounds each up to a power of two (14B at
        # 480p: 335 MB -> 512 MB per call) and goes through a pageable copy first.
        hidden_dim = adapter_for(transformer).hidden_size(transformer)
        offsets = [0]
        for n in _block_tokens(transformer, capture):
            offsets.append(offsets[-1] + n * hidden_dim)
    inputs, shared = [], {}  # shared: inputs identical for every call of one shape (the adapter says which)
    for c, call in enumerate(tqdm(capture.calls, desc="block inputs", unit="call", leave=False)):
        inp = first_block_inputs(transformer, {k: v.to(device) for k, v in call.items()}, shared)
        if offsets is not None:
            if pinned is None:  # in the blocks' dtype (a model may keep some parameters in fp32)
                pinned = torch.empty(offsets[-1], dtype=inp.hidden.dtype, pin_memory=True)
            hidden = pinned[offsets[c]:offsets[c + 1]].view(inp.hidden.shape)
            hidden.copy_(inp.hidden)
        else:
            hidden = inp.hidden.to(home)
        inputs.append(inp.with_hidden(hidden))
    return inputs


def _with_hidden(inp: BlockInputs, out: torch.Tensor) -> BlockInputs:
    """``inp`` with its hidden states replaced by ``out``, kept where ``inp.hidden`` lives. A host copy
    reuses the call's pinned buffer (allocating pinned memory per call and block is slow)."""
    if inp.hidden.device == out.device:
        return inp.with_hidden(out)
    inp.hidden.copy_(out)
    return inp


@torch.no_grad()
def _relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    d = ref.norm()
    return float((y - ref).norm() / d) if d > 0 else float((y - ref).norm())


def quantize_blockwise(transformer, capture: Capture, targets: list[QuantTarget], schemes: Scheme | dict[str, Scheme | None] | None,
                       algo: DictConfig, calib: DictConfig, cache: DiskCache | None = None) -> QuantResult:
    """Quantize block by block; ``schemes``: each target's scheme by full name (None: it stays float, while
    the algorithm's transforms still apply to it), or one scheme for all. With ``cache`` and steps that need only shared statistics
    (see `shared_stats`), the float pass comes from (or goes into) the cache instead of running here. Without a
    ``capture`` (no step reads calibration data: plain rounding) there is no float pass and no layer-error report."""
    if schemes is None or isinstance(schemes, Scheme):  # one scheme (or none) for every target
        schemes = dict.fromkeys((t.name for t in targets), schemes)
    device = next(transformer.parameters()).device
    adapter = adapter_for(transformer)
    dtype = adapter.block_dtype(transformer)
    blocks = adapter.blocks(transformer)
    plan = plan_steps(algo)
    want_hessian = "hessian" in stats_needed(plan)
    guarded = "block_error" in stats_needed(plan)  # a step searches on the block output: keep inputs, guard
    hooks = {p.name: p.step.hooks(p.params) for p in plan if p.step.hooks is not None}
    by_block: dict[int, dict[str, QuantTarget]] = defaultdict(dict)
    for t in targets:
        by_block[t.block][t.local_name] = t
    groups_all = adapter.input_groups(transformer)
    block_groups = {i: [g for g in groups_all if any(n in by_block[i] for n in g.linears)] for i in sorted(by_block)}
    result = QuantResult()
    last = max(by_block) if by_block else -1

    # static activation scales (fp8_static) and NVFP4's activation global scale come from calibration statistics
    calibrated = any(s is not None and s.activation is not None and s.activation.calibrated for s in schemes.values())
    if capture is None and (stats_needed(plan) or hooks or calibrated):
        raise ValueError(f"algorithm {algo.name} with these schemes reads calibration data (statistics, or calibrated "
                         "activation scales); no capture was given")
    objective = calib.get("block_objective", "branches")
    search = search_keys(capture.total_calls, calib.get("search_calls"), objective) if guarded else []
    terms = score_terms(capture.meta, capture.indices, objective, calib.guidance) if guarded else []
    shared, inputs = None, None
    if capture is None:
        pass  # nothing reads activations: no block inputs, no float pass
    # a percentile or search over the token sample needs the float pass's full sample, not the cached report sample
    elif cache is not None and capture.identity is not None and shareable(plan, calib) \
            and not (calibrated and needs_samples(calib)):
        key = shared_stats.identity(capture.identity, {i: [g.name for g in gs] for i, gs in block_groups.items()},
                                    calib, dtype, device)

        def build(folder: Path) -> None:
            inputs = _prepare_inputs(transformer, capture, device)
            for i, block in enumerate(tqdm(blocks[:last + 1], desc="float pass", unit="block")):
                stats = _float_pass(block, i, adapter.block_name(i), inputs, block_groups.get(i, []), capture, calib,
                                    False, device, {})
                shared_stats.save_block(folder, i, stats, _report_samples(stats, calib, i), dtype)

        shared, hit = cache.get_or_build("block_stats", key, build, lambda entry: entry)
        log.info("float-model block statistics %s", "from the cache" if hit else "computed and cached")
        inputs = None
    else:
        inputs = _prepare_inputs(transformer, capture, device)
    t_start = time.perf_counter()

    for i, block in enumerate(tqdm(blocks, desc=f"quantize ({'+'.join(p.name for p in plan)})", unit="block")):
        if i > last:
            break
        block_targets = by_block.get(i, {})
        groups = block_groups.get(i, [])
        guard = guarded and bool(block_targets)
        for h in hooks.values():
            h.block_start(i, block, groups)
        if capture is None:
            stats, samples = {}, None
        elif shared is not None:
            stats, samples = shared_stats.load_block(shared, i, calib, device)
        else:
            stats = _float_pass(block, i, adapter.block_name(i), inputs, groups, capture, calib, want_hessian, device,
                                hooks, keep_inputs=guard)
            samples = _report_samples(stats, calib, i)

        originals = {n: copy.deepcopy(t.module) for n, t in block_targets.items()} if samples is not None else {}
        reference = copy.deepcopy(block) if guard else None  # the float block, for the block errors
        # Steps work on fp32 master weights, so a smoothed weight is rounded to the model dtype once,
        # by the quantizer, not first by the transform.
        model_dtype = {n: t.module.weight.dtype for n, t in block_targets.items()}
        for t in block_targets.values():
            t.module.float()
        block_schemes = {n: schemes.get(t.name) for n, t in block_targets.items()}
        ctx = BlockContext(i, block, groups, block_targets, stats, block_schemes, hooks=hooks)
        rtn_input_scales = calibrated_input_scales(ctx, calib)  # before the steps rescale the statistics
        identity = None
        if guard:
            identity = scratch(ctx)  # the block before any step: what round-to-nearest quantizes
            ctx.scorer = BlockScorer(reference, inputs, terms, search, device, model_dtype, calib)
        if block_targets:  # a block the format keeps float: nothing for a step to choose (nor a block to score)
            run_steps(ctx, plan)
        input_scales = calibrated_input_scales(ctx, calib)
        if guard:
            input_scales = _guard(ctx, identity, reference, inputs, calib, result, input_scales, rtn_input_scales)
        if ctx.runtime_smoothing:
            result.runtime_smoothing[i] = ctx.runtime_smoothing
        quantized = materialize(transformer, list(block_targets.values()), schemes, ctx.chosen_codes,
                                {i: ctx.runtime_smoothing} if ctx.runtime_smoothing else {}, compute_dtype=model_dtype,
                                input_scales=input_scales)
        for n, t in block_targets.items():
            if t.name not in quantized:  # left float (format=none): back to the model dtype
                t.module.to(model_dtype[n])
        result.quantized.update(quantized)
        if samples is not None:
            result.layers += _layer_report(ctx, block, originals, samples, groups, rtn_input_scales)
        result.groups += [{"block": i, "group": g.name, **ctx.choices.get(g.name, {})} for g in groups if g.name in ctx.choices]

        for h in hooks.values():
            h.block_end(ctx)
        _check_same_on_all_ranks(block, ctx, i)
        if calib.propagate == "quant" and inputs is not None:
            inputs = [_with_hidden(inp, run_block(block, inp.to(device, non_blocking=True))) for inp in inputs]
        log.info("block %d/%d quantized (%.1f s elapsed)", i + 1, last + 1, time.perf_counter() - t_start)
    return result


def _guard(ctx: BlockContext, identity: BlockContext, reference: torch.nn.Module, inputs: list[BlockInputs],
           calib: DictConfig, result: QuantResult, input_scales: dict, rtn_input_scales: dict) -> dict:
    """Score the block the steps made against round-to-nearest on every calibration call; reset it to
    round-to-nearest where it is worse. Records the block's row in ``result.blocks``; returns the static input
    scales the block is then quantized with. Under calib.propagate=fp it also moves every call's input on to the
    float block's output (the float pass left the inputs in place for the guard)."""
    scorer: BlockScorer = ctx.scorer

    def propagate(k: int, out: torch.Tensor) -> None:
        if calib.propagate == "fp":
            inputs[k] = _with_hidden(inputs[k], out)

    error, error_rtn = scorer.guard(ctx, identity, propagate)
    row = {"block": ctx.index, "error": error, "error_rtn": error_rtn, "fallback": False,
           "search_terms": scorer.search_total, "evaluations": scorer.evaluations,
           "objective": calib.get("block_objective", "branches")}
    if error > error_rtn:
        log.warning("block %d: the searched transforms' block error %.4g is above round-to-nearest's %.4g on the "
                    "calibration calls; the block falls back to round-to-nearest", ctx.index, error, error_rtn)
        with torch.no_grad():  # the float tensors the steps changed (weights, folded norms and value rows)
            ctx.block.load_state_dict(reference.state_dict())
        ctx.chosen_codes.clear()
        ctx.runtime_smoothing.clear()
        ctx.input_scale.clear()
        ctx.output_scale.clear()
        for key, choice in list(ctx.choices.items()):  # what the steps chose is reported, marked as undone
            ctx.choices[key] = {**choice, "fallback": True}
        row.update(error=error_rtn, error_searched=error, fallback=True)
        input_scales = rtn_input_scales
    ctx.scorer = None
    result.blocks.append(row)
    return input_scales


def _prepare_inputs(transformer, capture: Capture, device: torch.device) -> list[BlockInputs]:
    home = _residency(transformer, capture, device)
    inputs = _block_inputs(transformer, capture, device, home)
    log.info("block inputs of %d calls kept on %s", len(inputs), home)
    return inputs


def _report_samples(stats: dict[str, GroupStats], calib: DictConfig, i: int) -> dict[str, torch.Tensor]:
    return {name: shared_stats.report_sample(st, calib.report_tokens, calib.seed * 7919 + i) for name, st in stats.items()}


def _float_pass(block, i: int, name: str, inputs: list[BlockInputs], groups, capture: Capture, calib: DictConfig,
                want_hessian: bool, device: torch.device, hooks: dict[str, BlockHooks],
                keep_inputs: bool = False) -> dict[str, GroupStats]:
    """Run every call through float block ``i``, streaming its input groups' statistics (reduced over
    torchrun ranks) and showing each group's input to the steps' hooks. With propagate=fp each call's input
    is replaced by the block's output (unless ``keep_inputs``: the guard needs them and propagates itself)."""
    stats = {g.name: GroupStats(block.get_submodule(g.linears[0]).in_features, calib.loss_tokens,
                                calib.hessian_tokens, want_hessian, seed=calib.seed * 7919 + i, device=device)
             for g in groups}
    current = [0]  # the running call's index in the whole capture: it seeds the call's token sample
    def see(group: str, x: torch.Tensor) -> None:
        stats[group].update(x, current[0])
        for h in hooks.values():
            h.group_input(group, x, current[0])

    handles = [block.get_submodule(g.linears[0]).register_forward_pre_hook(
        lambda m, args, name=g.name: see(name, args[0])) for g in groups]
    bad = None  # (call index, its block input) of the first call whose block output is not finite
    try:
        for c, inp in enumerate(inputs):
            current[0] = capture.indices[c]
            try:
                out = run_block(block, inp.to(device, non_blocking=True))
            except FloatingPointError:  # a statistic saw NaN/Inf inputs of a linear
                out = None
            if out is None or not torch.isfinite(out).all():
                bad = (c, inp)
                break
            if calib.propagate == "fp" and not keep_inputs:  # the input is no longer needed: overwrite it (halves host memory)
                inputs[c] = _with_hidden(inp, out)
    finally:
        for h in handles:
            h.remove()
    failure = None
    if bad is not None:
        c, inp = bad
        m = capture.meta[c]
        layer = first_nonfinite_layer(block, lambda: run_block(block, inp.to(device)), prefix=f"{name}.")
        failure = (capture.indices[c], f"non-finite activations (NaN/Inf) in the float model during calibration: "
                   f"first in {layer}, for calibration prompt {m['prompt']} at denoising step {m['step']} "
                   f"({m['branch']} branch)"
                   f"{'' if calib.propagate == 'fp' else ' with the earlier blocks quantized (calib.propagate=quant)'}"
                   "; the block overflows in this dtype: try model.dtype=float32, or check that layer's weights")
    failures = [f for f in distributed.all_gather_object(failure) if f is not None]
    if failures:  # every rank stops, with the message of the earliest failing call
        raise Fault(min(failures)[1])
    for g in groups:
        stats[g.name].reduce()
    return stats


def _check_same_on_all_ranks(block, ctx: BlockContext, i: int) -> None:
    """Under torchrun: the ranks ran the recipe on the same statistics, so their quantized blocks must agree bit
    for bit; a nondeterministic kernel would otherwise give ranks different models and wrong metrics silently."""
    if not distributed.is_distributed():
        return
    h = hashlib.sha256()
    tensors = [*block.state_dict().items(), *sorted(ctx.runtime_smoothing.items())]
    for name, t in tensors:
        t = t.detach().reshape(-1).contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{t.numel()}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    digests = distributed.all_gather_object(h.hexdigest())
    if len(set(digests)) > 1:
        raise Fault(f"the torchrun ranks quantized block {i} differently (a nondeterministic kernel, or unlike GPUs); "
                    "calibrate on one GPU, then evaluate with torchrun (the capture is cached)")


@torch.no_grad()
def _layer_report(ctx: BlockContext, block, originals, samples, groups, rtn_input_scales) -> list[dict]:
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
            scheme = ctx.schemes.get(local)
            if scheme is not None:
                rtn = QuantLinear(orig, scheme, input_scale=rtn_input_scales.get(ctx.full_name(local)))
                row["output_error_rtn"] = _relative_error(rtn(xd.to(orig.weight.dtype)).float(), ref)
            now = block.get_submodule(local)
            xin = xd / ctx.input_scale[local].to(dev) if local in ctx.input_scale else xd
            y = now(xin.to(orig.weight.dtype)).float()
            if local in ctx.output_scale:
                y = y * ctx.output_scale[local].to(dev)
            row["output_error"] = _relative_error(y, ref)
            rows.append(row)
    return rows

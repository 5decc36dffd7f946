"""Scoring a block's transforms on what the next block sees: the quantized block's output on calibration calls.

A search step (SmoothQuant ``alpha=auto``, AWQ's ratios, AWQ's clipping) proposes candidates per input group and asks
`BlockContext.block_error(transform)`: the transform is applied to a scratch copy of the block that holds
everything chosen so far, every target linear of the copy is quantized as `materialize` quantizes it (a block
with no quantized linear at all, format=none, is scored with every target under the W8A8 proxy the per-linear
search losses use, so that its searches still have something to choose), and the copy runs on calibration
calls. The error is

    sqrt( sum over calls ||Q(x) - F(x)||^2  /  sum over calls ||F(x) - x||^2 )

relative to the block's update (output minus input, as the export verifier measures it), where F is the float
block before any step and x the block's input as calibration propagates it (`calib.propagate`: the float or the
quantized earlier blocks). The copy runs unfused (each QuantLinear quantizes its own input): the same outputs, bit
for bit, as the fused block `materialize` installs.

Searches score on `calib.search_calls` calls spread evenly over the capture (null: every call); the runner's guard
(`BlockScorer.guard`) then scores the block the steps made and plain round-to-nearest on every call. Per-call sums
are gathered and added in the capture's call order, so under torchrun every rank gets the single process's numbers
and choices.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from .. import distributed
from ..calib.blocks import run_block
from ..models.adapter import BlockInputs, set_submodule
from .act_calib import calibrated_input_scales
from .materialize import quantized_linear, runtime_vector_of
from .registry import BlockContext

Transform = Callable[[BlockContext], None]


def spread_calls(total: int, count: int | None) -> list[int]:
    """``count`` call indices spread evenly over ``range(total)`` (every call for None or count >= total)."""
    if count is None or count >= total:
        return list(range(total))
    return sorted({int((k + 0.5) * total / count) for k in range(count)})


def shortlisted(losses: dict, k: int) -> list:
    """The ``k`` keys of ``losses`` (a search grid's cheap per-linear losses) with the lowest values, in grid order;
    k=0: all of them. Ties go to the earlier grid point."""
    if not k or k >= len(losses):
        return list(losses)
    keep = set(sorted(losses, key=losses.get)[:k])
    return [key for key in losses if key in keep]


def scratch(ctx: BlockContext) -> BlockContext:
    """A copy of ``ctx`` on a deep copy of its block: transforms applied to it leave ``ctx`` as it is. Its
    statistics are per-channel summaries (`GroupStats.summary_copy`: no token samples), enough to place factors and
    calibrate static activation scales."""
    block = copy.deepcopy(ctx.block)
    return dataclasses.replace(
        ctx, block=block, targets={n: dataclasses.replace(t, module=block.get_submodule(n)) for n, t in ctx.targets.items()},
        stats={name: st.summary_copy() for name, st in ctx.stats.items()}, chosen_codes=dict(ctx.chosen_codes),
        runtime_smoothing=dict(ctx.runtime_smoothing), input_scale=dict(ctx.input_scale),
        output_scale=dict(ctx.output_scale), choices={}, scorer=None)


def quantize_scratch(ctx: BlockContext, dtypes: dict[str, torch.dtype], calib) -> nn.Module:
    """Quantize the targets of a scratch context's block in place, as `materialize` would (see the module doc for
    a block with nothing quantized), and return the block (it runs as the diffusers block with QuantLinears)."""
    schemes = {n: ctx.schemes.get(n) for n in ctx.targets}
    if all(s is None for s in schemes.values()):
        schemes = {n: ctx.search_scheme(n) for n in ctx.targets}
    scales = calibrated_input_scales(ctx, calib, schemes)
    vector_of = runtime_vector_of(ctx.groups)
    for local, t in ctx.targets.items():
        codes, scale = ctx.chosen_codes.get(t.name, (None, None))
        smooth = ctx.runtime_smoothing.get(vector_of.get(local))
        new = quantized_linear(ctx.block.get_submodule(local), schemes[local], codes, scale, smooth, dtypes[local],
                               scales.get(t.name))
        set_submodule(ctx.block, local, new)
    return ctx.block


def _sq(d: torch.Tensor) -> float:
    return float(d.float().pow(2).sum())


def _sum_in_call_order(rows: list[tuple]) -> tuple[float, ...]:
    """Column sums of this rank's (call index, value, ...) rows and every other rank's, added in call order."""
    rows = sorted(r for part in distributed.all_gather_object(rows) for r in part)
    width = len(rows[0]) - 1 if rows else 0
    return tuple(math.fsum(r[1 + j] for r in rows) for j in range(width))


def _ratio(num: float, den: float) -> float:
    err = math.sqrt(num / den if den > 0 else num)
    return err if math.isfinite(err) else math.inf  # a block that overflows loses to every finite candidate


class BlockScorer:
    """Block errors of candidate transforms over one block's calibration calls (see the module doc)."""

    def __init__(self, reference: nn.Module, inputs: list[BlockInputs], indices: list[int], search: list[int],
                 device: torch.device, dtypes: dict[str, torch.dtype], calib):
        """``reference``: the float block before any step; ``inputs``: this rank's block inputs, one per call;
        ``indices``: each call's index in the whole capture; ``search``: the capture indices searches score on;
        ``dtypes``: block-relative target name -> the dtype its quantized layer computes in; ``calib``: the
        calibration settings (calibrated activation values are computed as the run computes them)."""
        self.reference, self.inputs, self.indices, self.device, self.dtypes = reference, inputs, indices, device, dtypes
        self.calib = calib
        chosen = set(search)
        self.search = [k for k, c in enumerate(indices) if c in chosen]  # this rank's share of them
        self.search_total = len(chosen)
        self._reference_out: dict[int, torch.Tensor] = {}
        self.evaluations = 0  # block errors computed by searches (each runs the search calls through a block copy)

    @torch.no_grad()
    def _reference(self, k: int, x: BlockInputs) -> torch.Tensor:
        if k not in self._reference_out:
            self._reference_out[k] = run_block(self.reference, x)
        return self._reference_out[k]

    @torch.no_grad()
    def error(self, ctx: BlockContext, transform: Transform | None = None) -> float:
        """The block error, on the search calls, of ``ctx``'s block with ``transform`` applied on top of it."""
        trial = scratch(ctx)
        if transform is not None:
            transform(trial)
        block = quantize_scratch(trial, self.dtypes, self.calib)
        rows = []
        for k in self.search:
            x = self.inputs[k].to(self.device, non_blocking=True)
            ref = self._reference(k, x)
            rows.append((self.indices[k], _sq(run_block(block, x) - ref), _sq(ref - x.hidden)))
        self.evaluations += 1
        return _ratio(*_sum_in_call_order(rows))

    @torch.no_grad()
    def guard(self, ctx: BlockContext, identity: BlockContext,
              on_reference: Callable[[int, torch.Tensor], None] | None = None) -> tuple[float, float]:
        """(block error of ``ctx``'s block as the steps left it, block error of ``identity``: the block before any
        step, i.e. round-to-nearest), both on every calibration call. ``on_reference(k, F(x))`` sees each call's
        float output (the runner propagates it under calib.propagate=fp)."""
        chosen = quantize_scratch(scratch(ctx), self.dtypes, self.calib)
        rtn = quantize_scratch(scratch(identity), self.dtypes, self.calib)
        rows = []
        for k, inp in enumerate(self.inputs):
            x = inp.to(self.device, non_blocking=True)
            ref = self._reference_out.pop(k, None)
            ref = run_block(self.reference, x) if ref is None else ref
            den = _sq(ref - x.hidden)
            rows.append((self.indices[k], _sq(run_block(chosen, x) - ref), _sq(run_block(rtn, x) - ref), den))
            if on_reference is not None:
                on_reference(k, ref)
        num, num_rtn, den = _sum_in_call_order(rows)
        return _ratio(num, den), _ratio(num_rtn, den)

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

`calib.block_objective` says what a term of those sums is. ``branches``: one call, each guidance branch on its own.
``guided``: one (prompt, step) pair, its two branches combined as the sampler combines the transformer's outputs,
g * cond + (1 - g) * uncond with g = calib.guidance. At g = 5 an error the transform adds to one branch and not to
the other is amplified up to 9x in the guided prediction, while one both branches share passes through at 1x; the
branch-wise sum weighs both alike. (Later blocks are not linear, so the guided block error is a proxy for the
guided output's, as the branch-wise one is for each branch's.)

Searches score on `calib.search_calls` calls spread evenly over the capture (null: every call; guided: half as many
pairs); the runner's guard
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


@dataclasses.dataclass(frozen=True)
class ScoreTerm:
    """One term of the block error's sums: calls of this rank, each with its weight in the combination."""
    key: int  # its ordinal among all ranks' terms: the sums are added in this order, the search picks by it
    calls: tuple[tuple[int, float], ...]  # (this rank's call index, weight)


def score_terms(meta: list[dict], indices: list[int], objective: str, guidance: float) -> list[ScoreTerm]:
    """The block error's terms (see the module doc) for this rank's calls: ``meta`` and ``indices`` as the
    capture holds them. Raises ValueError (one line) when ``guided`` finds a step without both branches."""
    if objective == "branches":
        return [ScoreTerm(c, ((k, 1.0),)) for k, c in enumerate(indices)]
    if objective != "guided":
        raise ValueError(f"calib.block_objective={objective!r} is unknown; valid: branches, guided")
    terms = []
    for k, (m, c) in enumerate(zip(meta, indices)):
        if m["branch"] != "cond":
            continue
        pair = k + 1 < len(meta) and indices[k + 1] == c + 1 and c % 2 == 0 and meta[k + 1]["branch"] == "uncond" \
            and (meta[k + 1]["prompt"], meta[k + 1]["step"]) == (m["prompt"], m["step"])
        if not pair:
            raise ValueError(f"calib.block_objective=guided needs both guidance branches at every captured step; "
                             f"calibration prompt {m['prompt']} at step {m['step']} has no uncond call next to its "
                             f"cond call (calib.guidance={guidance} runs both only above 1); use "
                             f"calib.block_objective=branches")
        terms.append(ScoreTerm(c // 2, ((k, guidance), (k + 1, 1.0 - guidance))))
    if 2 * len(terms) != len(indices):
        raise ValueError("calib.block_objective=guided needs both guidance branches at every captured step; the "
                         "capture has an uncond call without its cond call; use calib.block_objective=branches")
    return terms


def search_keys(total_calls: int, search_calls: int | None, objective: str) -> list[int]:
    """The keys of the terms searches score on: ``search_calls`` calls spread evenly over the capture, or under
    ``guided`` half as many (prompt, step) pairs (at least one), so that a search runs as many block calls."""
    if objective == "guided":
        return spread_calls(total_calls // 2, None if search_calls is None else max(1, search_calls // 2))
    return spread_calls(total_calls, search_calls)


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


def _accumulate(total: torch.Tensor | None, t: torch.Tensor, w: float) -> torch.Tensor:
    """``total + w * t``, in fp32 when weighted (a branch-wise term, one call at w = 1, is ``t`` itself: its sums
    stay bit for bit what they were before terms existed)."""
    t = t if w == 1.0 else t.float() * w
    return t if total is None else total + t


def _in_call_order(rows: list[tuple]) -> list[tuple]:
    """This rank's (term key, value, ...) rows and every other rank's, in the terms' order."""
    return sorted(r for part in distributed.all_gather_object(rows) for r in part)


def _column_sums(rows: list[tuple]) -> tuple[float, ...]:
    width = len(rows[0]) - 1 if rows else 0
    return tuple(math.fsum(r[1 + j] for r in rows) for j in range(width))


class BlockError(float):
    """A block error: the number searches compare and record, carrying its terms' squared errors (in term order) so
    that `params.accepts` can ask whether a decrease is consistent over the terms, not carried by a few."""
    terms: tuple[float, ...]

    def __new__(cls, value: float, terms: tuple[float, ...]):
        error = super().__new__(cls, value)
        error.terms = terms
        return error

    def __reduce__(self):  # float's own pickling would call __new__ without the terms
        return BlockError, (float(self), self.terms)


def _ratio(num: float, den: float) -> float:
    err = math.sqrt(num / den if den > 0 else num)
    return err if math.isfinite(err) else math.inf  # a block that overflows loses to every finite candidate


class BlockScorer:
    """Block errors of candidate transforms over one block's calibration calls (see the module doc)."""

    def __init__(self, reference: nn.Module, inputs: list[BlockInputs], terms: list[ScoreTerm], search: list[int],
                 device: torch.device, dtypes: dict[str, torch.dtype], calib):
        """``reference``: the float block before any step; ``inputs``: this rank's block inputs, one per call;
        ``terms``: the error's terms over them (`score_terms`); ``search``: the keys of the terms searches score on,
        among all ranks'; ``dtypes``: block-relative target name -> the dtype its quantized layer computes in;
        ``calib``: the calibration settings (calibrated activation values are computed as the run computes them)."""
        self.reference, self.inputs, self.terms, self.device, self.dtypes = reference, inputs, terms, device, dtypes
        self.calib = calib
        chosen = set(search)
        self.search = [t for t in terms if t.key in chosen]  # this rank's share of them
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
        """The block error, on the search terms, of ``ctx``'s block with ``transform`` applied on top of it."""
        trial = scratch(ctx)
        if transform is not None:
            transform(trial)
        block = quantize_scratch(trial, self.dtypes, self.calib)
        rows = []
        for term in self.search:
            out, ref, hidden = self._combined(term, {"q": block})
            rows.append((term.key, _sq(out["q"] - ref), _sq(ref - hidden)))
        self.evaluations += 1
        rows = _in_call_order(rows)
        return BlockError(_ratio(*_column_sums(rows)), tuple(r[1] for r in rows))

    def _combined(self, term: ScoreTerm, blocks: dict[str, nn.Module], keep: bool = True,
                  on_reference: Callable[[int, torch.Tensor], None] | None = None):
        """The weighted sums over ``term``'s calls of each block's output, of the float block's output and of the
        input: ({name: sum of outputs}, sum of references, sum of inputs). ``keep``: cache the references."""
        outs, ref_sum, hidden_sum = {}, None, None
        for k, w in term.calls:
            x = self.inputs[k].to(self.device, non_blocking=True)
            ref = self._reference(k, x) if keep else self._reference_out.pop(k, None)
            ref = run_block(self.reference, x) if ref is None else ref
            for name, block in blocks.items():
                outs[name] = _accumulate(outs.get(name), run_block(block, x), w)
            ref_sum, hidden_sum = _accumulate(ref_sum, ref, w), _accumulate(hidden_sum, x.hidden, w)
            if on_reference is not None:
                on_reference(k, ref)
        return outs, ref_sum, hidden_sum

    @torch.no_grad()
    def guard(self, ctx: BlockContext, identity: BlockContext,
              on_reference: Callable[[int, torch.Tensor], None] | None = None) -> tuple[float, float]:
        """(block error of ``ctx``'s block as the steps left it, block error of ``identity``: the block before any
        step, i.e. round-to-nearest), both on every term. ``on_reference(k, F(x))`` sees each call's float output
        (the runner propagates it under calib.propagate=fp)."""
        blocks = {"chosen": quantize_scratch(scratch(ctx), self.dtypes, self.calib),
                  "rtn": quantize_scratch(scratch(identity), self.dtypes, self.calib)}
        rows = []
        for term in self.terms:
            out, ref, hidden = self._combined(term, blocks, keep=False, on_reference=on_reference)
            rows.append((term.key, _sq(out["chosen"] - ref), _sq(out["rtn"] - ref), _sq(ref - hidden)))
        num, num_rtn, den = _column_sums(_in_call_order(rows))
        return _ratio(num, den), _ratio(num_rtn, den)

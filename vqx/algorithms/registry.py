"""The step registry, recipes, and the per-block context steps work on.

A step is registered with what it needs, so that nothing outside it decides by its name:
- ``params``: a dataclass of its parameters (defaults, and ranges/choices as field metadata);
- ``needs``: the statistics it reads (a set of `STATS`, or a function of its parameters): ``absmax``,
  ``mean_abs``, ``samples`` (the full token sample: search losses), ``hessian`` (X^T X), ``block_error`` (it
  scores candidates on the quantized block's output, `BlockContext.block_error`; the runner then keeps the block's
  inputs, checks the result against round-to-nearest on every calibration call and falls back to it if worse);
- ``hooks``: optionally a `BlockHooks` class whose instance sees the block loop (block start, each input
  group's float inputs during the float pass, block end), for a step that collects its own statistics.
The runner, the shared-statistics cache and `needs_calibration` derive everything from these.

A recipe (``algorithm.steps``) lists steps by name or as ``{name: ..., <param>: ...}``. A step's parameters
are its defaults, overridden by the recipe's flat keys (``algorithm.alpha``, what sweeps set) and then by
its own entry. Blocks are processed in order (`runner.py`); each step gets a `BlockContext`: it may
transform float weights (smoothing, through `smoothing.apply_smoothing`) or choose weight codes (GPTQ), and
records what it chose. After the last step the block's targets become `QuantLinear`s.
A new algorithm is one module that calls `register_step` plus one yaml.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..calib.stats import GroupStats
from ..models.adapter import InputGroup, QuantTarget
from ..quant.formats import SEARCH_PROXY
from ..quant.scheme import Scheme
from ..registry import Registry
from .params import declare_step, param_fields, resolve_params

STATS = ("absmax", "mean_abs", "samples", "hessian", "block_error")
SHAREABLE_STATS = frozenset({"absmax", "mean_abs"})  # what the shared float-pass cache holds (shared_stats.py)


class BlockHooks:
    """What a step sees of the block loop besides its turn in the recipe. One instance per run."""

    def __init__(self, params: Any):
        self.params = params

    def block_start(self, index: int, block: torch.nn.Module, groups: list[InputGroup]) -> None: ...

    def group_input(self, group: str, x: torch.Tensor, call: int) -> None:
        """Each calibration call's float input of each input group of the current block (the float pass)."""

    def block_end(self, ctx: "BlockContext") -> None: ...


@dataclass
class BlockContext:
    index: int
    block: torch.nn.Module
    groups: list[InputGroup]  # the block's input groups that hold at least one target
    targets: dict[str, QuantTarget]  # block-relative linear name -> target
    stats: dict[str, GroupStats]  # group name -> statistics of its (current) input
    schemes: dict[str, Scheme | None]  # block-relative linear name -> its scheme (None: stays float)
    params: Any = None  # the running step's parameters (attributes), set by `run_steps`
    hooks: dict[str, BlockHooks] = field(default_factory=dict)  # step name -> its hooks' instance
    chosen_codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # full name -> (codes, scale)
    # runtime vector (a "runtime" group's fold, e.g. Wan's affine_norm1) -> s, applied at run time by QuantLinears
    runtime_smoothing: dict[str, torch.Tensor] = field(default_factory=dict)
    # linear -> s its input is now divided by through an exact fold upstream (a norm, value rows)
    input_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    # linear -> s its output rows were divided by (value projections under a v->o fold)
    output_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # group or linear -> what steps chose
    scorer: Any = None  # block_search.BlockScorer, for steps that need "block_error"

    def group_linears(self, group: InputGroup) -> list[torch.nn.Linear]:
        return [self.block.get_submodule(n) for n in group.linears]

    def full_name(self, local: str) -> str:
        return self.targets[local].name

    def block_error(self, transform: Callable[["BlockContext"], None] | None = None) -> float:
        """The quantized block's output error on the search calls with ``transform(scratch_ctx)`` applied on top of
        everything chosen so far (None: as it is now); see `block_search`. Needs ``block_error`` among the step's needs."""
        if self.scorer is None:
            raise RuntimeError("block_error() needs the step to declare needs={'block_error', ...}")
        return self.scorer.error(self, transform)

    def search_scheme(self, local: str) -> Scheme:
        """The scheme a search loss quantizes ``local`` with: its own (a weight-only scheme with 16-bit inputs, as
        the layer runs: AWQ's own setting, and int4 groups' search needs its own grid), or a W8A8 proxy where it is
        kept float."""
        scheme = self.schemes.get(local)
        return scheme if scheme is not None and scheme.weight is not None else SEARCH_PROXY


StepFn = Callable[[BlockContext], None]


@dataclass(frozen=True)
class Step:
    name: str
    apply: StepFn
    params: type | None = None  # dataclass of parameters
    needs: frozenset[str] | Callable[[Any], frozenset[str]] = frozenset()
    hooks: type[BlockHooks] | None = None

    def stats_needed(self, params: Any) -> frozenset[str]:
        needs = frozenset(self.needs(params) if callable(self.needs) else self.needs)
        unknown = needs - set(STATS)
        if unknown:
            raise ValueError(f"step {self.name} needs unknown statistics {sorted(unknown)}; valid: {', '.join(STATS)}")
        return needs

    def param_fields(self) -> dict[str, dataclasses.Field]:
        return param_fields(self.params)


STEPS: Registry[Step] = Registry("algorithm step")


def register_step(name: str, *, params: type | None = None, needs=frozenset(), hooks: type[BlockHooks] | None = None):
    """Register ``fn(ctx)`` as step ``name`` (see the module doc); the recipe schema grows its parameters."""
    def deco(fn: StepFn) -> StepFn:
        declare_step(name, params)  # the built-in steps' parameters are declared already (params.py)
        STEPS.register(name)(Step(name, fn, params, needs, hooks))
        return fn

    return deco


@dataclass(frozen=True)
class PlannedStep:
    step: Step
    params: Any  # attribute access to the resolved parameters

    @property
    def name(self) -> str:
        return self.step.name

    def stats_needed(self) -> frozenset[str]:
        return self.step.stats_needed(self.params)


def plan_steps(algo: Any, check_value: Callable[[str, Any, dict], None] | None = None) -> list[PlannedStep]:
    """The recipe's steps with resolved parameters (`params.resolve_params`); raises ValueError (one line) on
    unknown steps or parameters. ``check_value(key, value, field_metadata)`` validates each value (ranges, choices)."""
    known = {name: step.params for name, step in STEPS.items()}
    return [PlannedStep(STEPS[name], values) for name, values in resolve_params(algo, known, check_value)]


def stats_needed(plan: list[PlannedStep]) -> frozenset[str]:
    return frozenset().union(*(p.stats_needed() for p in plan)) if plan else frozenset()


def needs_calibration(plan: list[PlannedStep]) -> bool:
    """Whether any step reads statistics or watches the block loop (else no calibration data is needed)."""
    return bool(stats_needed(plan)) or any(p.step.hooks is not None for p in plan)


def run_steps(ctx: BlockContext, plan: list[PlannedStep]) -> None:
    for planned in plan:
        ctx.params = planned.params
        planned.step.apply(ctx)
    ctx.params = None


"""The step registry and the per-block context steps work on.

A recipe (``algorithm.steps``) lists steps by name. Blocks are processed in order (`runner.py`); for
each block every step gets a `BlockContext`: it may transform float weights (smoothing, through
`smoothing.apply_smoothing`) or choose weight codes (GPTQ), and records what it chose. After the last
step the block's targets become `QuantLinear`s, using chosen codes or rounding to nearest.
A new algorithm is one module that calls `register_step` (and registers its config schema) plus one yaml.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from ..calib.stats import GroupStats
from ..models.adapter import InputGroup, QuantTarget
from ..quant.formats import QuantFormat
from ..registry import Registry


@dataclass
class BlockContext:
    index: int
    block: torch.nn.Module
    groups: list[InputGroup]  # the block's input groups that hold at least one target
    targets: dict[str, QuantTarget]  # block-relative linear name -> target
    stats: dict[str, GroupStats]  # group name -> statistics of its (current) input
    format: QuantFormat  # what the block is quantized to
    search_format: QuantFormat  # grids used by search losses (a quantizing proxy when `format` has none)
    params: DictConfig  # the algorithm config (steps read their keys from it)
    chosen_codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # full name -> (codes, scale)
    # runtime vector (a "runtime" group's fold, e.g. Wan's affine_norm1) -> s, applied at run time by QuantLinears
    runtime_smoothing: dict[str, torch.Tensor] = field(default_factory=dict)
    # linear -> s its input is now divided by through an exact fold upstream (a norm, value rows)
    input_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    # linear -> s its output rows were divided by (value projections under a v->o fold)
    output_scale: dict[str, torch.Tensor] = field(default_factory=dict)
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # group or linear -> what steps chose

    def group_linears(self, group: InputGroup) -> list[torch.nn.Linear]:
        return [self.block.get_submodule(n) for n in group.linears]

    def full_name(self, local: str) -> str:
        return self.targets[local].name


StepFn = Callable[[BlockContext], None]
STEPS: Registry[StepFn] = Registry("algorithm step")
register_step = STEPS.register


def run_steps(ctx: BlockContext, steps: list[str]) -> None:
    for name in steps:
        STEPS.lookup(name)(ctx)

"""The step registry and the context steps work on.

A recipe (``algorithm.steps``) lists steps by name; each step transforms float weights (smoothing) or
chooses weight codes (GPTQ), recording what it chose. After the last step, `quantize.materialize` turns
every target linear into a `QuantLinear`, using the codes a step chose or rounding to nearest.
A new algorithm is one module that calls `register_step` plus one yaml file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from omegaconf import DictConfig

from ..models.wan import QuantTarget
from ..registry import Registry
from ..quant.formats import QuantFormat


class LayerInputs(Protocol):
    """Gives a target linear's calibration (or probe) inputs as [tokens, in_features]."""

    def __call__(self, target: QuantTarget) -> torch.Tensor: ...


@dataclass
class QuantContext:
    transformer: torch.nn.Module
    targets: list[QuantTarget]
    format: QuantFormat
    params: DictConfig  # the algorithm config node (all steps read their keys from it)
    inputs: LayerInputs
    chosen_codes: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # name -> (codes, scale)
    # Smoothing factors that must be applied at run time (lightx2v's affine_norm1/affine_norm3 vectors):
    # block index -> {"affine_norm1" | "affine_norm3": s [in_features]}; the linears reading that input
    # already had their weight columns multiplied by s.
    runtime_smoothing: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    choices: dict[str, Any] = field(default_factory=dict)  # what steps chose (alpha, ratio, ...) by name


StepFn = Callable[[QuantContext], None]
STEPS: Registry[StepFn] = Registry("algorithm step")
register_step = STEPS.register


def run_steps(ctx: QuantContext, steps: list[str]) -> None:
    for name in steps:
        STEPS.lookup(name)(ctx)

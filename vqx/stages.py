"""The registries of the run's pluggable stages after quantization, and the state they share.

An exporter, evaluator or logger is registered under the ``name`` its config option declares; the
experiment looks it up by that name. New ones arrive as a module (imported by its package's ``__init__`` or
`vqx.plugins`, so that it registers) + a yaml file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from .models.adapter import QuantTarget
from .quant.formats import Format
from .registry import Registry


@dataclass
class RunState:
    """What the stages after quantization read; they add their results to ``metrics``."""

    cfg: DictConfig
    run_dir: Path
    pipe: Any  # the diffusers pipeline, its transformer now quantized
    format: Format  # the run's rules (vqx.quant.formats)
    targets: list[QuantTarget]  # the layers the algorithm worked on; `format.scheme_for(name)` says how each was quantized
    quantized: dict[str, torch.nn.Module]  # name -> QuantLinear
    runtime_smoothing: dict[int, dict[str, torch.Tensor]]  # see QuantContext.runtime_smoothing
    metrics: dict[str, Any] = field(default_factory=dict)
    attention: Any = None  # the installed quantized attention (vqx.quant.attention_plan.AttentionRuntime), or None


# An exporter checks in `check` (called before any model is built) that it can write the run's
# format, in `check_model` (once the model is loaded, before calibration) what depends on the layers' shapes,
# then `export(state)` writes and returns a summary for metrics.json.
@dataclass(frozen=True)
class Exporter:
    check: Callable[[DictConfig], None]
    export: Callable[[RunState], dict]
    check_model: Callable[[DictConfig, Any], None] = lambda cfg, transformer: None


class Evaluator:
    """Scores the quantized model. ``before_quantization`` sees the float pipeline (e.g. to generate or
    load cached 16-bit references); ``evaluate`` runs after quantization and returns metrics."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir

    def check(self) -> None:
        """Validate settings before any model is built (raise UserError)."""

    def before_quantization(self, pipe: Any) -> None: ...

    def evaluate(self, state: RunState) -> dict:
        return {}


class Logger:
    """Experiment tracking: ``start`` before the work, ``finish`` always (also on failure)."""

    def __init__(self, cfg: DictConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir

    def start(self) -> None: ...

    def finish(self, metrics: dict | None, error: str | None) -> None: ...


EXPORTERS: Registry[Exporter] = Registry("exporter")
EVALUATORS: Registry[type[Evaluator]] = Registry("evaluator")
LOGGERS: Registry[type[Logger]] = Registry("logger")

EXPORTERS.register("none")(Exporter(check=lambda cfg: None, export=lambda state: {}))
EVALUATORS.register("none")(Evaluator)
LOGGERS.register("none")(Logger)

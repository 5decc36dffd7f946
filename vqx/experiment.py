"""One run, stage by stage: config -> model -> calibration -> algorithm -> quantized model -> export /
evaluation -> logging. This module owns the order and the run directory; stages do not call each other."""

from __future__ import annotations

import copy
import logging
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import __version__
from .algorithms import registry as algo_registry
from .calib.probe import ProbeInputs
from .config.validate import validate
from .io import write_json_atomic, write_text_atomic
from .models.loading import load_pipeline
from .models.wan import LayerSelection, quant_targets
from .quant.formats import get_format
from .quant.materialize import materialize, relative_output_error
from .stages import EVALUATORS, EXPORTERS, LOGGERS, Evaluator, Exporter, RunState

log = logging.getLogger("vqx")


class Timings(dict):
    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[f"{stage}_s"] = round(time.perf_counter() - t0, 3)


def layer_selection(fmt_cfg: DictConfig) -> LayerSelection:
    return LayerSelection(fmt_cfg.skip_first_blocks, fmt_cfg.skip_last_blocks, tuple(fmt_cfg.skip_patterns))


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Run every stage; write ``config.yaml`` first and ``metrics.json`` last (only when all succeeded)."""
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    exporter = EXPORTERS.lookup(cfg.export.name)
    exporter.check(cfg)
    evaluator = EVALUATORS.lookup(cfg.eval.name)(cfg, run_dir)
    evaluator.check()
    logger = LOGGERS.lookup(cfg.logger.name)(cfg, run_dir)
    logger.start()
    try:
        metrics = _run_stages(cfg, run_dir, exporter, evaluator)
    except BaseException as e:
        logger.finish(None, f"{type(e).__name__}: {e}")
        raise
    logger.finish(metrics, None)
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.info("metrics written to %s", run_dir / "metrics.json")
    return metrics


def _run_stages(cfg: DictConfig, run_dir: Path, exporter: Exporter, evaluator: Evaluator) -> dict:
    timings = Timings()
    t_start = time.perf_counter()
    fmt = get_format(cfg.format.name)

    with timings("load"):
        pipe = load_pipeline(cfg.model)
    transformer = pipe.transformer
    targets = quant_targets(transformer, layer_selection(cfg.format))
    log.info("model %s: %d blocks, %d target linears, format %s, algorithm %s",
             cfg.model.name, len(transformer.blocks), len(targets), fmt.name, cfg.algorithm.name)

    with timings("reference"):
        evaluator.before_quantization(pipe)
    with timings("calibrate"):
        inputs = ProbeInputs(cfg.calib.probe_tokens, cfg.calib.seed)
    float_layers = {t.name: copy.deepcopy(t.module) for t in targets}

    with timings("quantize"):
        ctx = algo_registry.QuantContext(transformer, targets, fmt, cfg.algorithm, inputs)
        algo_registry.run_steps(ctx, list(cfg.algorithm.steps))
        quantized = materialize(transformer, targets, fmt, ctx.chosen_codes, ctx.runtime_smoothing)

    layers = []
    for t in targets:
        entry = {"name": t.name, "native_name": t.native_name, **ctx.choices.get(t.name, {})}
        if t.name in quantized:
            entry["output_error"] = relative_output_error(float_layers[t.name], quantized[t.name], inputs(t))
        layers.append(entry)
    errors = [e["output_error"] for e in layers if "output_error" in e]

    state = RunState(cfg, run_dir, pipe, fmt, targets, quantized, ctx.runtime_smoothing)
    state.metrics.update({
        "status": "complete",
        "vqx_version": __version__,
        "model": cfg.model.name,
        "task": cfg.model.task,
        "format": fmt.name,
        "algorithm": cfg.algorithm.name,
        "quantized_layers": len(quantized),
        "layer_error": _summary(errors),
        "layers": layers,
    })
    with timings("export"):
        state.metrics["export"] = exporter.export(state)
    with timings("eval"):
        state.metrics.update(evaluator.evaluate(state))
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    state.metrics["timings"] = dict(timings)
    return state.metrics


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "max": max(values), "min": min(values),
            "median": statistics.median(values)}

"""One run, stage by stage: config -> model -> calibration -> algorithm -> quantized model -> export /
evaluation -> logging. This module owns the order and the run directory; stages do not call each other."""

from __future__ import annotations

import logging
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from . import __version__, distributed
from .algorithms.registry import needs_calibration as steps_need_calibration, plan_steps
from .algorithms.runner import QuantResult, quantize_blockwise
from .cache import DiskCache
from .calib.capture import load_or_capture
from .prompts import load_prompt_set
from .config.presets import attention_preset
from .config.validate import validate
from .errors import UserError
from .io import write_json_atomic, write_text_atomic
from .models.fingerprint import model_fingerprint
from .models.loading import load_pipeline
from .models.adapter import LayerSelection, QuantTarget, adapter_for, adapter_named
from .quant.attention_plan import (AttentionPlan, AttentionRuntime, plan_from_config, sageattention_kernel,
                                   suspended)
from .quant.formats import Format, format_from_config
from .quant.scheme import Scheme
from .stages import EVALUATORS, EXPORTERS, LOGGERS, Evaluator, Exporter, RunState
from .track.run_log import log_header, log_summary

log = logging.getLogger("vqx")


class Timings(dict):
    """Seconds per stage (``<stage>_s``), each also logged (run.log) when the stage ends or fails."""

    @contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            self[f"{stage}_s"] = round(time.perf_counter() - t0, 3)
            log.info("stage %s %s in %.1f s", stage, "done" if ok else "failed", self[f"{stage}_s"])


def steps_need_data(cfg: DictConfig, fmt: Format) -> bool:
    """Whether quantizing itself reads calibration data: steps that read statistics, calibrated activation values
    (fp8_static's static scale, NVFP4's activation global scale)."""
    calibrated = any(s.activation is not None and s.activation.calibrated for s in fmt.schemes())
    return steps_need_calibration(plan_steps(cfg.algorithm)) or calibrated


def needs_calibration(cfg: DictConfig, fmt: Format) -> bool:
    """Whether the run captures calibration data: for the steps, or (``calib.layer_report``) only for the
    layer-error report of a run whose steps read none (plain rounding)."""
    return steps_need_data(cfg, fmt) or (fmt.quantizes and cfg.calib.layer_report != "none")


def calibration_settings(cfg: DictConfig, fmt: Format) -> tuple[DictConfig, str]:
    """(the calibration settings the run captures with, what its layer report is computed on). A run whose steps
    read no data captures a small sample for the report (``calib.layer_report=sample``): the first prompt at two
    denoising steps of the trajectory (its first and last)."""
    if steps_need_data(cfg, fmt):
        return cfg.calib, "the calibration capture"
    why = f"no step of algorithm={cfg.algorithm.name} reads calibration data"
    if cfg.calib.layer_report == "none":
        return cfg.calib, f"skipped (calib.layer_report=none): {why}, so none was captured"
    if cfg.calib.layer_report == "full":
        return cfg.calib, f"the whole calibration capture (calib.layer_report=full; {why})"
    steps = min(2, cfg.calib.capture_steps or cfg.calib.steps)
    sample = OmegaConf.merge(cfg.calib, {"num_prompts": 1, "capture_steps": steps})
    return sample, (f"a small sample, 1 prompt at {steps} denoising step{'s' if steps > 1 else ''}: {why} "
                    "(calib.layer_report=full uses the whole capture, none skips it)")


def plan_targets(transformer, fmt: Format) -> tuple[list[QuantTarget], dict[str, Scheme | None]]:
    """The block linears the algorithm works on and each one's scheme (None: stays float), from the rules."""
    every = adapter_for(transformer).quant_targets(transformer, LayerSelection())
    by_block: dict[int, list[str]] = {}
    for t in every:
        by_block.setdefault(t.block, []).append(t.name)
    schemes = fmt.assign(by_block)
    for rule in fmt.unused_rules(t.name for t in every):
        log.warning("format rule {pattern: %r, scheme: %s} decides no layer of this model (shadowed by an earlier "
                    "rule, or matching nothing)", rule.pattern, rule.scheme.name if rule.scheme else "none")
    return [t for t in every if t.name in schemes], schemes


def prepare(cfg: DictConfig, run_dir: Path) -> tuple[Exporter, Evaluator, object]:
    """Every check that needs no model (settings, prompt files, the model folder, what the exporter and
    evaluator accept, the logger's mode): a bad value fails here, before anything is written or started.
    Returns the run's exporter, evaluator and (not yet started) logger."""
    validate(cfg)
    # a local model folder: complete, readable headers, weights matching their config (seconds; wan_mini's was
    # checked by validate, before its prompt files are read)
    adapter_named(cfg.model.family).check_model_folder(cfg.model)
    fmt = format_from_config(cfg.format)
    attention_plan(cfg)  # sites and steps
    if needs_calibration(cfg, fmt):  # a bad prompt file fails now, not after the model is loaded
        load_prompt_set(cfg.calib.path, cfg.model.task, "calib", limit=cfg.calib.num_prompts)
    check_ranks(cfg)
    exporter = EXPORTERS.lookup(cfg.export.name)
    exporter.check(cfg)
    evaluator = EVALUATORS.lookup(cfg.eval.name)(cfg, run_dir)
    evaluator.check()
    logger = LOGGERS.lookup(cfg.logger.name if distributed.is_main() else "none")(cfg, run_dir)
    return exporter, evaluator, logger


def run(cfg: DictConfig, run_dir: Path, prepared: tuple | None = None) -> dict:
    """Run every stage; write ``config.yaml`` first and ``metrics.json`` last (only when all succeeded).
    ``prepared``: what `prepare` returned, when the caller checked the config first.

    Under torchrun every rank runs the stages on its share of the work (calibration prompts, eval samples) and
    rank 0 alone writes the run dir: config, export, videos, W&B, metrics."""
    exporter, evaluator, logger = prepared if prepared is not None else prepare(cfg, run_dir)
    main = distributed.is_main()
    log_header(cfg)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    torch.manual_seed(cfg.seed)
    logger.start()
    try:
        # console log lines go through tqdm.write while a progress bar is live, above it instead of through it
        with logging_redirect_tqdm(loggers=[logging.getLogger()]):
            metrics = _run_stages(cfg, run_dir, exporter, evaluator)
    except BaseException as e:
        logger.finish(None, f"{type(e).__name__}: {e}")
        raise
    logger.finish(metrics, None)
    if main:
        write_json_atomic(run_dir / "metrics.json", metrics)
        log.info("metrics written to %s", run_dir / "metrics.json")
        log_summary(metrics, run_dir)
    return metrics


def check_ranks(cfg: DictConfig) -> None:
    """Under torchrun each rank takes its own GPU (cuda:LOCAL_RANK); a pinned cuda:N would put them all on one."""
    device = str(cfg.model.device)
    if distributed.is_distributed() and device.startswith("cuda:"):
        raise UserError(f"model.device={device} pins every torchrun rank to one GPU; use model.device=auto or cuda "
                        "(each rank then takes cuda:LOCAL_RANK)")


def _run_stages(cfg: DictConfig, run_dir: Path, exporter: Exporter, evaluator: Evaluator) -> dict:
    timings = Timings()
    t_start = time.perf_counter()
    with timings("load"):
        pipe = load_pipeline(cfg.model)
    exporter.check_model(cfg, pipe.transformer)
    state = quantize_pipeline(cfg, run_dir, pipe, evaluator, timings)
    with timings("export"), suspended(state.attention):  # the same model on every rank: rank 0 writes it once
        state.metrics["export"] = exporter.export(state) if distributed.is_main() else {}
    with timings("eval"):
        state.metrics.update(evaluator.evaluate(state))
    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    state.metrics["timings"] = dict(timings)
    state.metrics["ranks"] = distributed.world_size()
    return state.metrics


def quantize_pipeline(cfg: DictConfig, run_dir: Path, pipe, evaluator: Evaluator, timings: Timings) -> RunState:
    """The run's middle stages on a loaded pipeline: the evaluator's 16-bit references (before anything changes),
    calibration, the algorithm block by block. ``pipe``'s transformer is quantized in place. Returns the state
    export and evaluation read, its ``metrics`` holding what the quantization reports (layers, groups, blocks)."""
    transformer = pipe.transformer
    num_blocks = len(adapter_for(transformer).blocks(transformer))
    fmt = format_from_config(cfg.format, num_blocks=num_blocks)
    targets, schemes = plan_targets(transformer, fmt)
    log.info("model %s: %d blocks, %d target linears (%d quantized), format %s, algorithm %s",
             cfg.model.name, num_blocks, len(targets), sum(s is not None for s in schemes.values()),
             fmt.name, cfg.algorithm.name)

    with timings("reference"):
        evaluator.before_quantization(pipe)
    capture, cache = None, None
    calib, report = calibration_settings(cfg, fmt)
    if fmt.quantizes:
        log.info("layer-error report on %s", report)
    if needs_calibration(cfg, fmt):
        with timings("calibrate"):
            model_identity = {"name": cfg.model.name, "dtype": cfg.model.dtype,
                              "weights": model_fingerprint(cfg.model, transformer)}
            cache = DiskCache(cfg.cache_dir)
            capture = load_or_capture(pipe, calib, cfg.model.task, model_identity, cache)
    if capture is not None or fmt.quantizes:
        with timings("quantize"):
            result = quantize_blockwise(transformer, capture, targets, schemes, cfg.algorithm, calib, cache)
    else:
        result = QuantResult()  # format=none with plain rounding: nothing to calibrate or change
    layers = result.layers
    errors = [e["output_error"] for e in layers]

    runtime = install_attention(cfg, pipe)
    state = RunState(cfg, run_dir, pipe, fmt, targets, result.quantized, result.runtime_smoothing, attention=runtime)
    state.metrics.update({
        "status": "complete",
        "vqx_version": __version__,
        "model": cfg.model.name,
        "task": cfg.model.task,
        "format": fmt.name,
        "algorithm": cfg.algorithm.name,
        "quantized_layers": len(result.quantized),
        "attention": runtime.report() if runtime is not None else {"name": "none"},
        "calibration": None if capture is None else {
            "calls": capture.total_calls, "prompts": calib.num_prompts, "steps": calib.steps,
            "cache_hit": capture.cache_hit},
        "layer_report": report if fmt.quantizes else "nothing quantized",
        "layer_error": _summary(errors),
        "layer_error_rtn": _summary([e["output_error_rtn"] for e in layers if "output_error_rtn" in e]),
        "groups": result.groups,
        "blocks": result.blocks,
        "layers": layers,
    })
    return state


def attention_plan(cfg: DictConfig) -> AttentionPlan | None:
    """The run's quantized attention (None: 16-bit); "last" of ``full_precision_steps`` is the last step of the
    evaluation's sampler (the model's, without an evaluation)."""
    steps = cfg.eval.steps if "steps" in cfg.eval else cfg.model.sampler.steps
    try:
        return plan_from_config(cfg.attention, int(steps), adapter_named(cfg.model.family).attention_site_names)
    except ValueError as e:
        raise UserError(str(e)) from None


def install_attention(cfg: DictConfig, pipe) -> AttentionRuntime | None:
    """The run's quantized attention (``attention=``) in every transformer of ``pipe``; None for attention=none."""
    plan = attention_plan(cfg)
    if plan is None:
        return None
    kernel = why = None
    if cfg.eval.get("gemm") == "kernel":  # the real kernel where there is one; the emulation otherwise, said once
        kernel, why = sageattention_kernel(plan.scheme, attention_preset("sage1"))
        if kernel is None:
            log.warning("eval.gemm=kernel: attention=%s is emulated: %s", plan.scheme.name, why)
    runtime = AttentionRuntime(plan, kernel, why)
    adapter = adapter_for(pipe.transformer)
    runtime.install(adapter, adapter.transformers(pipe))
    return runtime


def _summary(values: list[float]) -> dict:
    if not values:
        return {}
    return {"mean": statistics.fmean(values), "max": max(values), "min": min(values),
            "median": statistics.median(values)}

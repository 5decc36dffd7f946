"""What a run says about itself in run.log and on the console: how it was started and on what (`log_header`),
how it ended (`log_summary`, `log_failure`). Stage timings are logged by the stages' timer (`experiment.Timings`)."""

from __future__ import annotations

import logging
import os
import platform
import shlex
import sys
from pathlib import Path

log = logging.getLogger("vqx")


def command_line() -> str:
    return shlex.join([Path(sys.executable).name, *sys.argv])


def versions() -> str:
    import diffusers
    import torch

    from .. import __version__

    return (f"vqx {__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"python {platform.python_version()}")


def device_line(device_setting: str) -> str:
    """The device ``model.device`` resolves to, with the GPU's name or the CPU's core count."""
    import torch

    from ..runtime import resolve_device

    device = resolve_device(str(device_setting))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"{device} ({torch.cuda.get_device_name(index)}; {torch.cuda.device_count()} visible)"
    return f"{device} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def log_header(cfg) -> None:
    log.info("command: %s", command_line())
    log.info("versions: %s", versions())
    log.info("device: %s (model.device=%s, model.dtype=%s)", device_line(cfg.model.device), cfg.model.device,
             cfg.model.dtype)


def summary_lines(metrics: dict, run_dir: Path) -> list[str]:
    """The end-of-run summary: time, scores against the noise floor, layer errors, the export and its check."""
    total = (metrics.get("timings") or {}).get("total_s")
    attention = (metrics.get("attention") or {}).get("name", "none")
    lines = [f"result: complete{f' in {total:.1f} s' if total is not None else ''}: "
             f"{metrics.get('format')} {metrics.get('algorithm')}"
             f"{f' + attention={attention}' if attention != 'none' else ''} on {metrics.get('model')}, "
             f"{metrics.get('quantized_layers')} layers quantized; metrics in {Path(run_dir) / 'metrics.json'}"]
    if all(isinstance(metrics.get(k), (int, float)) for k in ("lpips", "psnr", "ssim")):
        scores = (f"scores (mean over {len(metrics.get('videos') or [])} videos): LPIPS {metrics['lpips']:.4f}, "
                  f"PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f}")
        floor = metrics.get("noise_floor") or {}
        if all(isinstance(floor.get(k), (int, float)) for k in ("lpips", "psnr", "ssim")):
            scores += (f"; noise floor ({floor.get('method')}): LPIPS {floor['lpips']:.4f}, PSNR {floor['psnr']:.2f} dB, "
                       f"SSIM {floor['ssim']:.4f}")
        else:
            scores += f"; noise floor: {floor.get('description', 'none')}"
        lines.append(scores)
    err = metrics.get("layer_error") or {}
    if "mean" in err:
        rtn = (metrics.get("layer_error_rtn") or {}).get("mean")
        lines.append(f"layer output error: mean {err['mean']:.4g}, max {err['max']:.4g}"
                     + (f" (round to nearest: mean {rtn:.4g})" if rtn is not None else ""))
    export = metrics.get("export") or {}
    if export.get("dir"):
        line = f"export: {export['dir']} ({export.get('kind')}, {export.get('files')} files"
        line += f", {export['bytes'] / 1e6:.1f} MB)" if isinstance(export.get("bytes"), int) else ")"
        verify = export.get("verify")
        if verify is None:
            line += "; not verified (vqx verify-export checks it)"
        elif verify.get("kept"):
            line += "; kept: the intact export of this run config, its files checked against the manifest"
        elif verify.get("ok"):
            worst = verify.get("max_block_error")
            line += ("; verified OK" + (f" (block outputs: max relative error {worst:.3g}, tolerance "
                                         f"{verify.get('tolerance'):.3g})" if worst is not None else ""))
        else:
            line += "; verification FAILED: " + "; ".join(verify.get("problems") or [])
        lines.append(line)
    return lines


def log_summary(metrics: dict, run_dir: Path) -> None:
    for line in summary_lines(metrics, run_dir):
        log.info("%s", line)


def log_failure(message: str) -> None:
    """The error that ends a run, into run.log only (the console already gets it as the one ``vqx: error:`` line)."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "result: failed: %s", (message,), None)
    for handler in logging.getLogger().handlers + log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)

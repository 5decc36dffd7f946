"""Where a quantized model's video breaks: per-step latent divergence and per-block errors along one prompt's trajectory.

For one eval prompt (``--prompt``, wan_mini's by default) the 16-bit model, round-to-nearest and each ``--point``
(a label and its run.py overrides) generate from the same seed. Reported per point:

- free-running: per denoising step, the relative L2 distance of the latent the transformer is called with (the
  conditional branch) to the 16-bit run's latent at that step, and the final video's PSNR against the 16-bit video;
- teacher-forced on the 16-bit trajectory: for every transformer call of the 16-bit run (each step, both guidance
  branches) the quantized transformer gets the same inputs, and per block
  ``local``: the quantized block on the 16-bit block's input against the 16-bit block's output (what the block
  search scores), ``accumulated``: the quantized model's block output against the 16-bit one, both relative to
  the 16-bit block's update (output minus input);
- per step, on the 16-bit trajectory, the transformer output's error per guidance branch, the cosine between the two
  branches' errors, and the error of the guided prediction the sampler integrates (correlated branch errors cancel
  in it, uncorrelated ones grow with the guidance scale);
- the same output errors on the quantized run's own trajectory (both models called with its latents): whether the
  quantized model errs more where its own errors took it;
- ``first_divergence``: the first step (in sampling order) whose latent divergence exceeds ``--factor`` times RTN's,
  and at that step the block whose local error is the most above RTN's (ratio), with its accumulated ratio.

    python bench/trajectory_divergence.py --note "..." --prompt 0 \\
        --point "sq0.75=algorithm=smoothquant algorithm.alpha=0.75" --point "sq_auto=algorithm=smoothquant"
    python bench/trajectory_divergence.py --smoke --note "script check"       # wan_tiny on CPU

Every point shares the calibration capture (one cache_dir). Writes bench/results/<--out> and prints a summary.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common import ROOT, write_results


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _quantized_pipeline(cfg):
    """The pipeline of ``cfg``'s model, quantized as a run of ``cfg`` quantizes it (same stages as vqx.experiment)."""
    from vqx import experiment
    from vqx.algorithms.runner import quantize_blockwise
    from vqx.cache import DiskCache
    from vqx.calib.capture import load_or_capture
    from vqx.config.validate import validate
    from vqx.models.adapter import adapter_for
    from vqx.models.fingerprint import model_fingerprint
    from vqx.models.loading import load_pipeline
    from vqx.quant.backends import set_backend
    from vqx.quant.formats import format_from_config

    validate(cfg)
    pipe = load_pipeline(cfg.model)
    tr = pipe.transformer
    fmt = format_from_config(cfg.format, num_blocks=len(adapter_for(tr).blocks(tr)))
    targets, schemes = experiment.plan_targets(tr, fmt)
    calib, _ = experiment.calibration_settings(cfg, fmt)
    capture, cache = None, DiskCache(cfg.cache_dir)
    if experiment.needs_calibration(cfg, fmt):
        identity = {"name": cfg.model.name, "dtype": cfg.model.dtype, "weights": model_fingerprint(cfg.model, tr)}
        capture = load_or_capture(pipe, calib, cfg.model.task, identity, cache)
    result = quantize_blockwise(tr, capture, targets, schemes, cfg.algorithm, calib, cache)
    set_backend(tr, cfg.eval.gemm if "gemm" in cfg.eval else "fake")
    experiment.install_attention(cfg, pipe)  # attention=... as the run evaluates it
    return pipe, result


class Recorder:
    """Records every transformer call's keyword arguments (the latent it is called with among them)."""

    def __init__(self, transformer):
        self.calls: list[dict] = []
        self.handle = transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})

    def close(self):
        self.handle.remove()


def _generate(pipe, sample, settings, image=None) -> tuple[np.ndarray, list[dict]]:
    from vqx.eval.videoio import to_uint8
    from vqx.models.sampling import generate

    rec = Recorder(pipe.transformer)
    try:
        video = generate(pipe, sample.prompt, settings, sample.seed, image=image)
    finally:
        rec.close()
    return to_uint8(video), rec.calls


def _rel(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor | None = None) -> float:
    d = (a.float() - b.float()).norm()
    n = (b.float() if ref is None else ref.float()).norm()
    return float(d / n) if n > 0 else float(d)


def _integrated(errors: list[torch.Tensor], flows: list[torch.Tensor], sigmas: list[float]) -> dict:
    """The sampler's first-order view of per-step prediction errors e_t: the latent moves by dt_t * prediction, so to
    first order the final latent is off by sum dt_t e_t. ``relative``: that against sum dt_t * (16-bit prediction);
    ``coherence``: |sum dt_t e_t| / sqrt(sum |dt_t e_t|^2): 1 for errors that are independent between steps, up to
    sqrt(steps) for errors that point the same way at every step (they add up instead of averaging out)."""
    dts = [a - b for a, b in zip(sigmas[:-1], sigmas[1:])]
    total = sum(dt * e for dt, e in zip(dts, errors))
    moved = sum(dt * f for dt, f in zip(dts, flows))
    rms = float(sum((dt * e).norm() ** 2 for dt, e in zip(dts, errors)) ** 0.5)
    return {"relative": _rel(total, torch.zeros_like(total), moved), "coherence": float(total.norm()) / max(rms, 1e-30)}


@torch.no_grad()
def _block_errors(float_tr, quant_tr, calls: list[dict], calls_per_step: int, guidance: float,
                  sigmas: list[float]) -> dict:
    """Per transformer call, per block: local and accumulated errors (see the module doc); per step, the errors of
    the transformer's outputs on the 16-bit trajectory: each branch's, their cosine, and the guided prediction's
    (uncond + guidance * (cond - uncond): what the sampler integrates; correlated branch errors cancel in it)."""
    from vqx.models.adapter import adapter_for

    fb, qb = adapter_for(float_tr).blocks(float_tr), adapter_for(quant_tr).blocks(quant_tr)
    local, accumulated, outputs = [], [], []
    for call in calls:
        f_in, f_out, q_out = {}, {}, {}
        hooks = []
        for i, block in enumerate(fb):
            hooks.append(block.register_forward_pre_hook(
                lambda m, args, kwargs, i=i: f_in.__setitem__(i, (args, kwargs)), with_kwargs=True))
            hooks.append(block.register_forward_hook(lambda m, args, out, i=i: f_out.__setitem__(i, out)))
        for i, block in enumerate(qb):
            hooks.append(block.register_forward_hook(lambda m, args, out, i=i: q_out.__setitem__(i, out)))
        try:
            outputs.append((float_tr(**call)[0].float(), quant_tr(**call)[0].float()))
        finally:
            for h in hooks:
                h.remove()
        row_local, row_acc = [], []
        for i in range(len(fb)):
            args, kwargs = f_in[i]
            update = f_out[i] - args[0]
            row_local.append(_rel(qb[i](*args, **kwargs), f_out[i], update))
            row_acc.append(_rel(q_out[i], f_out[i], update))
        local.append(row_local)
        accumulated.append(row_acc)
    steps, predictions = [], []  # predictions: (16-bit, quantized) of what the sampler integrates, per step
    for k in range(0, len(outputs) - calls_per_step + 1, calls_per_step):
        (fc, qc), *rest = outputs[k:k + calls_per_step]
        row = {"cond": _rel(qc, fc)}
        predictions.append((fc, qc))
        if rest:  # classifier-free guidance: the second call of the step is the unconditional branch
            fu, qu = rest[0]
            ec, eu = (qc - fc).flatten(), (qu - fu).flatten()
            guided_f, guided_q = fu + guidance * (fc - fu), qu + guidance * (qc - qu)
            row.update(uncond=_rel(qu, fu), branch_error_cosine=float(torch.nn.functional.cosine_similarity(ec, eu, dim=0)),
                       guided=_rel(guided_q, guided_f))
            predictions[-1] = (guided_f, guided_q)
        steps.append(row)
    integrated = _integrated([q - f for f, q in predictions], [f for f, _ in predictions], sigmas)
    return {"local": local, "accumulated": accumulated, "output_per_step": steps, "integrated_output_error": integrated}


def _point(label: str, overrides: list[str], base: list[str], sample, settings, image, ref_video, ref_calls, float_tr,
           sigmas: list[float]):
    from vqx.eval.metrics import psnr_frames
    from vqx.eval.videoio import to_float

    t0 = time.perf_counter()
    cfg = _compose([*base, *overrides])
    pipe, result = _quantized_pipeline(cfg)
    video, calls = _generate(pipe, sample, settings, image)
    steps = settings.steps
    stride = len(ref_calls) // steps  # transformer calls per step: both guidance branches, conditional first
    assert len(calls) == len(ref_calls) == stride * steps, (len(calls), len(ref_calls), steps)
    latent = [_rel(calls[k * stride]["hidden_states"], ref_calls[k * stride]["hidden_states"]) for k in range(steps)]
    errors = _block_errors(float_tr, pipe.transformer, ref_calls, stride, settings.guidance, sigmas)
    own = _block_errors(float_tr, pipe.transformer, calls, stride, settings.guidance, sigmas)["output_per_step"]
    return {"label": label, "overrides": overrides, "video_psnr": float(np.mean(psnr_frames(to_float(ref_video), to_float(video)))),
            "latent_divergence": latent, "block_errors": errors, "own_trajectory_output_per_step": own,
            "calls_per_step": stride,
            "blocks_report": result.blocks, "groups": result.groups, "seconds": round(time.perf_counter() - t0, 1)}


def _first_divergence(point: dict, rtn: dict, factor: float) -> dict | None:
    for step, (a, r) in enumerate(zip(point["latent_divergence"], rtn["latent_divergence"])):
        if a > factor * max(r, 1e-12):
            calls = range(step * point["calls_per_step"], (step + 1) * point["calls_per_step"])
            n_blocks = len(point["block_errors"]["local"][0])
            ratio = [max(point["block_errors"]["local"][c][b] / max(rtn["block_errors"]["local"][c][b], 1e-12)
                         for c in calls) for b in range(n_blocks)]
            worst = int(np.argmax(ratio))
            acc = max(point["block_errors"]["accumulated"][c][worst] / max(rtn["block_errors"]["accumulated"][c][worst], 1e-12)
                      for c in calls)
            return {"step": step, "latent_divergence": a, "latent_divergence_rtn": r, "block": worst,
                    "local_error_ratio_to_rtn": ratio[worst], "accumulated_error_ratio_to_rtn": acc,
                    "local_error_ratio_per_block": ratio}
    return None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--note", required=True)
    p.add_argument("--prompt", type=int, default=0, help="index into the model's eval prompts")
    p.add_argument("--point", action="append", default=[],
                   help='"label=override override ..." (repeatable); default: SmoothQuant 0.75 and the default recipe')
    p.add_argument("--factor", type=float, default=1.5, help="latent divergence this many times RTN's counts as diverged")
    p.add_argument("--smoke", action="store_true", help="wan_tiny on CPU: checks the script")
    p.add_argument("--out", default="trajectory_divergence.json", help="file name under bench/results/")
    p.add_argument("overrides", nargs="*", help="run.py overrides for every model (e.g. format=fp8 model.outliers.channels=8)")
    args = p.parse_args()

    sys.path.insert(0, str(ROOT))
    import vqx.plugins  # noqa: F401
    from vqx.eval.generation import EvalSamples
    from vqx.models.loading import load_pipeline
    from vqx.models.sampling import SamplerSettings
    from vqx.prompts import load_prompt_set

    work = Path(tempfile.mkdtemp(prefix="vqx_trajectory_"))
    base = ["model=wan_tiny", "model.device=cpu"] if args.smoke else ["model=wan_mini"]
    base += ["export=none", "logger=none", "eval=video", f"cache_dir={work / 'cache'}", *args.overrides]
    points = [("rtn", ["algorithm=rtn"])]
    for spec in args.point or ["smoothquant_0.75=algorithm=smoothquant algorithm.alpha=0.75",
                               "smoothquant_auto=algorithm=smoothquant"]:
        label, _, rest = spec.partition("=")
        points.append((label, rest.split()))

    cfg = _compose(base)
    samples = load_prompt_set(cfg.eval.path or cfg.model.prompts.eval, cfg.model.task, "eval")
    settings = SamplerSettings.from_config(cfg.eval)
    eval_samples = EvalSamples(samples, settings, cfg.model.task == "i2v")
    sample, image = eval_samples[args.prompt], eval_samples.image(args.prompt)
    ref_pipe = load_pipeline(cfg.model)
    ref_video, ref_calls = _generate(ref_pipe, sample, eval_samples.settings(args.prompt), image)
    sigmas = [float(x) for x in ref_pipe.scheduler.sigmas]  # the schedule the run used, with its final 0
    print(f"prompt {args.prompt}: {sample.prompt!r}, seed {sample.seed}, {len(ref_calls)} transformer calls", flush=True)

    rows = []
    for label, overrides in points:
        rows.append(_point(label, overrides, base, sample, eval_samples.settings(args.prompt), image, ref_video,
                           ref_calls, ref_pipe.transformer, sigmas))
        r = rows[-1]
        print(f"{label}: video PSNR {r['video_psnr']:.2f} dB; latent divergence per step "
              + " ".join(f"{x:.4f}" for x in r["latent_divergence"]), flush=True)
    rtn = rows[0]
    for r in rows[1:]:
        r["first_divergence"] = _first_divergence(r, rtn, args.factor)
        fd = r["first_divergence"]
        print(f"{r['label']}: " + ("never diverges beyond RTN x%.1f" % args.factor if fd is None else
              f"first diverges at step {fd['step']} (latent {fd['latent_divergence']:.4f} vs RTN's "
              f"{fd['latent_divergence_rtn']:.4f}); block {fd['block']}'s local error is "
              f"{fd['local_error_ratio_to_rtn']:.2f}x RTN's there (accumulated {fd['accumulated_error_ratio_to_rtn']:.2f}x)"))
        mean_local = np.mean(r["block_errors"]["local"], axis=0) / np.mean(rtn["block_errors"]["local"], axis=0)
        print(f"{r['label']}: mean local block error / RTN's, per block: " + " ".join(f"{x:.2f}" for x in mean_local))
    for r in rows:
        i = r["block_errors"]["integrated_output_error"]
        print(f"{r['label']}: integrated prediction error on the 16-bit trajectory {i['relative']:.4f} of the "
              f"displacement, coherence {i['coherence']:.2f} (1: independent steps, sqrt(steps): one direction)")
    for r in rows:
        for where, out in (("the 16-bit", r["block_errors"]["output_per_step"]), ("its own", r["own_trajectory_output_per_step"])):
            print(f"{r['label']}: transformer output error per step on {where} trajectory, cond: "
                  + " ".join(f"{o['cond']:.4f}" for o in out)
                  + ("" if "guided" not in out[0] else "; guided: " + " ".join(f"{o['guided']:.4f}" for o in out)
                     + "; cos(cond err, uncond err): " + " ".join(f"{o['branch_error_cosine']:.2f}" for o in out)))
    path = write_results(args.out, rows, {"note": args.note, "command": " ".join(sys.argv), "prompt": sample.prompt,
                                          "seed": sample.seed, "prompt_index": args.prompt, "base_overrides": base,
                                          "factor": args.factor})
    print(f"written {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

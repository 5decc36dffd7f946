"""Transforms preserve the model: every fold type on a block, and whole videos with format=none."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import vqx.plugins  # noqa: F401
from vqx.algorithms.materialize import materialize
from vqx.algorithms.registry import BlockContext
from vqx.algorithms.runner import quantize_blockwise
from vqx.algorithms.smoothing import apply_smoothing
from vqx.cache import DiskCache
from vqx.calib.blocks import first_block_inputs, run_block
from vqx.calib.capture import capture_step_indices, load_or_capture
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.sampling import SamplerSettings, generate
from vqx.models.wan.layers import input_groups
from vqx.models.wan.tiny import build_tiny_pipeline
from vqx.quant.formats import SCHEMES

CONF = Path(__file__).resolve().parents[1] / "conf"
SETTINGS = SamplerSettings(32, 32, 5, 4, 5.0, 3.0)


def _calib(**kw):
    base = dict(path=None, num_prompts=2, steps=4, capture_steps=None, height=32, width=32, num_frames=5,
                guidance=5.0, shift=3.0, negative_prompt="", loss_tokens=64, report_tokens=2048, share_stats=True,
                hessian_tokens=None, propagate="fp", seed=0)
    return OmegaConf.create({**base, **kw})


def _psnr(a, b):
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_every_fold_type_preserves_block_outputs(task):
    """Random factors on every foldable group: block outputs equal the untransformed block's (fp32)."""
    pipe = build_tiny_pipeline(task, dtype=torch.float32)
    tr = pipe.transformer
    g = torch.Generator().manual_seed(0)
    in_ch = tr.config.in_channels
    call = {"hidden_states": torch.randn(1, in_ch, 2, 8, 8, generator=g), "timestep": torch.tensor([500.0]),
            "encoder_hidden_states": torch.randn(1, 12, 32, generator=g)}
    if task == "i2v":
        call["encoder_hidden_states_image"] = torch.randn(1, 5, 32, generator=g)
    inp = first_block_inputs(tr, call)
    block = tr.blocks[0]
    before = run_block(block, inp)
    targets = {t.local_name: t for t in quant_targets(tr, LayerSelection()) if t.block == 0}
    groups = input_groups(task == "i2v")
    ctx = BlockContext(0, block, groups, targets, {}, dict.fromkeys(targets), OmegaConf.create({}))
    folded = []
    for group in groups:
        if group.fold is None:
            continue
        s = torch.rand(block.get_submodule(group.linears[0]).in_features, generator=g) * 8 + 0.125
        apply_smoothing(ctx, group, s)
        folded.append(group.fold)
    assert sorted(set(folded)) == ["affine_norm1", "affine_norm3", "norm2", "v_rows"]
    transformed_raw = run_block(block, inp)
    assert (transformed_raw - before).abs().max() > 1e-3  # runtime vectors not applied yet: outputs differ
    materialize(tr, list(targets.values()), None, {}, {0: ctx.runtime_smoothing})
    after = run_block(block, inp)
    rel = ((after - before).norm() / before.norm()).item()
    assert rel < 1e-5, rel  # fp32 rounding of the rescaled weights only


@pytest.mark.parametrize("task", ["t2v", "i2v"])
@pytest.mark.parametrize("algorithm,params", [
    ("smoothquant", {"alpha": 0.5}), ("smoothquant", {"alpha": "auto"}), ("awq", {"grid": 4, "clip": False}),
])
def test_format_none_video_matches_the_untransformed_model(tmp_path, task, algorithm, params):
    pipe = build_tiny_pipeline(task, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = None
    if task == "i2v":
        from vqx.prompts import load_prompt_set

        image = load_prompt_set(None, "i2v", "eval", limit=1)[0].load_image()
    reference = generate(pipe, "a red ball bounces", SETTINGS, seed=3, image=image)
    calib = _calib()
    capture = load_or_capture(pipe, calib, task, {"test": task}, DiskCache(tmp_path))
    targets = quant_targets(pipe.transformer, LayerSelection())
    algo = OmegaConf.create({"name": algorithm, "steps": [algorithm], **params})
    result = quantize_blockwise(pipe.transformer, capture, targets, None, algo, calib)
    assert result.runtime_smoothing and not result.quantized
    transformed = generate(pipe, "a red ball bounces", SETTINGS, seed=3, image=image)
    assert _psnr(reference, transformed) >= 100.0, _psnr(reference, transformed)
    assert max(e["output_error"] for e in result.layers) < 1e-5


def test_capture_steps_cover_the_whole_trajectory():
    assert capture_step_indices(50, 8) == [0, 7, 14, 21, 28, 35, 42, 49]
    assert capture_step_indices(10, None) == list(range(10))
    assert capture_step_indices(4, 10) == [0, 1, 2, 3]
    # calib.capture_window: a part of the trajectory, its ends included
    assert capture_step_indices(10, None, (0.0, 0.3)) == [0, 1, 2, 3]
    assert capture_step_indices(10, 2, (0.0, 0.3)) == [0, 3]
    assert capture_step_indices(50, 4, (0.7, 1.0)) == [34, 39, 44, 49]


def test_capture_records_both_cfg_branches_and_hits_the_cache(tmp_path):
    pipe = build_tiny_pipeline("t2v")
    pipe.set_progress_bar_config(disable=True)
    calib = _calib(capture_steps=2)
    cache = DiskCache(tmp_path)
    first = load_or_capture(pipe, calib, "t2v", {"m": 1}, cache)
    assert not first.cache_hit
    assert [(m["step"], m["branch"]) for m in first.meta if m["prompt"] == 0] == [
        (0, "cond"), (0, "uncond"), (3, "cond"), (3, "uncond")]
    second = load_or_capture(pipe, calib, "t2v", {"m": 1}, cache)
    assert second.cache_hit and len(second.calls) == len(first.calls) == 2 * 2 * 2
    for a, b in zip(first.calls, second.calls):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # timesteps differ across captured steps: the capture spans the noise range
    t0 = {float(c["timestep"].flatten()[0]) for c in first.calls}
    assert len(t0) == 2
    other = load_or_capture(pipe, _calib(capture_steps=3), "t2v", {"m": 1}, cache)
    assert not other.cache_hit  # a different capture setting is a different entry

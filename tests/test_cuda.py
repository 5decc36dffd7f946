"""Paths that exist only on a GPU (skipped on CPU machines; run them on one: `python -m pytest tests/test_cuda.py`)."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vqx.plugins  # noqa: F401
from vqx.algorithms import runner
from vqx.cache import DiskCache
from vqx.calib.capture import load_or_capture
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.synthetic import build_synthetic_pipeline
from vqx.quant.formats import SCHEMES


CONF = Path(__file__).resolve().parents[1] / "conf"
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_pinned_host_block_inputs_equal_gpu_resident(tmp_path, monkeypatch):
    """Block inputs in the shared pinned host buffer (large models) give the GPU-resident results exactly."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "model=wan_tiny", "calib.num_prompts=2", "calib.steps=3", "calib.height=96", "calib.width=160", "calib.num_frames=9",
            "calib.share_stats=false"])
    reports = {}
    for home in ("cuda", "cpu"):
        pipe = build_synthetic_pipeline("1.3B", torch.bfloat16, "cuda", num_layers=2)
        capture = load_or_capture(pipe, cfg.calib, "t2v", {"synthetic": "1.3B"}, DiskCache(tmp_path))
        monkeypatch.setattr(runner, "_residency", lambda *a, home=home: torch.device(home))
        result = runner.quantize_blockwise(pipe.transformer, capture, quant_targets(pipe.transformer, LayerSelection()),
                                           SCHEMES["w8a8"], cfg.algorithm, cfg.calib)
        reports[home] = result.layers
    assert reports["cpu"] == reports["cuda"]


def test_e8m0_scales_on_cuda_are_the_cpu_powers_of_two():
    """MX scales of an all-zero or subnormal block are 2^-127 on the GPU too (CUDA's exp2 would miss it)."""
    from vqx.quant.scheme import choose_scales

    amax = torch.tensor([0.0, 1e-39, 3e-39, 1e-30, 0.75, 1.0, 448.0, 3e38])
    x = torch.zeros(len(amax), 32)
    x[:, 5] = amax
    for name in ("mxfp8", "mxfp4", "mxfp6"):
        ts = SCHEMES[name].activation
        got = choose_scales(x.cuda(), ts).cpu()
        want = choose_scales(x, ts)
        assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (name, got, want)

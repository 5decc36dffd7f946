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


def test_fp8_b128_kernel_backend_on_cuda_matches_its_emulation():
    """The blockwise torch._scaled_mm path against the fp32 sum of the same block-scaled products, on the shapes of
    Wan2.1 1.3B and 14B (K = 8960 is one cuBLAS gets wrong silently: K/128 is not a multiple of 4) and an odd M."""
    from torch import nn

    from vqx.quant import backends, fastpath
    from vqx.quant.linear import QuantLinear

    torch.manual_seed(0)
    for k, n, m in ((1536, 8960, 192), (8960, 1536, 192), (5120, 5120, 512), (13824, 5120, 190)):
        q = QuantLinear(nn.Linear(k, n).bfloat16().cuda(), SCHEMES["fp8_b128"])
        backends.set_backend(q, "kernel")
        x = (torch.randn(m, k, device="cuda") * 3).bfloat16()
        act = fastpath.quantize_act(x, q.quant_spec())
        got = backends._fp8_block_mm(act.codes, q.weight_codes, act.scale, q.weight_scale, q.bias).float()
        a = (act.codes.float().reshape(m, -1, 128) * act.scale[..., None]).reshape(m, k)
        want = (a @ q.dequantized_weight_fp32().t()).bfloat16().float() + q.bias.float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (k, n, m)
    assert not backends.fallbacks()["blockwise_scaled_mm_emulated"]


@pytest.mark.parametrize("name", ["sage1", "sage2", "sage2_k_int8_v_fp8", "fp8", "nvfp4"])
def test_attention_prep_on_cuda_equals_the_eager_quantizer_and_the_kernel_passes_its_check(name):
    """The fused attention's Triton prep gives the eager quantizer's codes and scales bit for bit on the GPU too (an
    ulp of a scale flips codes: torch divided by a Python number through its reciprocal on CUDA), and the kernel
    passes its own pre-use check at Wan's head dim."""
    from vqx.config.presets import attention_preset
    from vqx.quant.attention_kernel import compare, prep_mismatches

    s = attention_preset(name)
    assert prep_mismatches(s, 128, torch.bfloat16, torch.device("cuda")) == []
    ok, detail = compare(s, 128, torch.bfloat16, torch.device("cuda"))
    assert ok, detail

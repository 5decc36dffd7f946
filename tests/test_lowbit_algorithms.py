"""Algorithms at group granularity: GPTQ's group scales (as the sweep reaches each group, or static), GPTQ against
RTN with the same groups for every low-bit format, AWQ's per-group clipping with a global scale."""

from types import SimpleNamespace

import pytest
import torch

from lowbit_reference import ref_cast_to_fp4
from vqx.algorithms.gptq import gptq_quantize
from vqx.quant.formats import SCHEMES
from vqx.quant.scheme import TensorScheme, choose_scales, dequantize, global_scale_of, quantize

F32 = torch.float32
LOWBIT_WEIGHTS = ["nvfp4", "mxfp8", "mxfp6", "mxfp4", "w4a16_g128", "fp8_static", "fp8_b128"]


def calibration(n_in: int, tokens: int = 512, seed: int = 0) -> torch.Tensor:
    """Correlated inputs with a few large channels, as a DiT's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + torch.eye(n_in)
    x = torch.randn(tokens, n_in, generator=g) @ mix
    x[:, :4] *= 8
    return x


def hinv_of(x: torch.Tensor, damp: float) -> torch.Tensor:
    h = x.T @ x / x.shape[0]
    h = h + damp * torch.mean(torch.diag(h)) * torch.eye(h.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def ref_gptq(w: torch.Tensor, x: torch.Tensor, group: int, scale_of, round_col, damp: float = 0.01):
    """GPTQ column by column (no lazy batches): at a group's first column its scale comes from the group's
    current weights; each column is rounded, its error spread over the later columns."""
    w = w.clone().float()
    hinv = hinv_of(x, damp)
    codes, scales = torch.zeros_like(w), torch.zeros(w.shape[0], w.shape[1] // group)
    for j in range(w.shape[1]):
        if j % group == 0:
            scales[:, j // group] = scale_of(w[:, j:j + group])
        s = scales[:, j // group]
        q = round_col(w[:, j], s)
        codes[:, j] = q
        err = (w[:, j] - q * s) / hinv[j, j]
        w[:, j:] -= err[:, None] * hinv[j, j:][None, :]
    return codes, scales


def test_gptq_group_scales_come_from_the_updated_weights_of_each_group():
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(24, 64, generator=g), calibration(64)
    h = x.T @ x / x.shape[0]
    ts = TensorScheme("int4", "group", group_size=16)
    codes, scale = gptq_quantize(w, h, ts, block_size=64)
    want_codes, want_scale = ref_gptq(w, x, 16, lambda grp: grp.abs().amax(dim=1) / 7.0,
                                      lambda col, s: torch.clamp(torch.round(col / s), -8, 7))
    assert torch.equal(scale, want_scale) and torch.equal(codes, want_codes)
    static_codes, static_scale = gptq_quantize(w, h, ts, block_size=64, static_groups=True)
    assert torch.equal(static_scale, quantize(w, ts)[1]) and not torch.equal(static_scale, scale)


def test_gptq_nvfp4_groups_keep_the_weights_global_scale():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(16, 64, generator=g), calibration(64, seed=2)
    ts = SCHEMES["nvfp4"].weight
    G = (2688.0 / w.bfloat16().abs().max()).float()
    one_sixth = torch.tensor(1 / 6, dtype=F32)

    def s8_of(grp):
        return torch.clamp(G * (grp.abs().amax(dim=1) * one_sixth), max=448).to(torch.float8_e4m3fn).float()

    def round_col(col, s8):
        out = G * torch.where(s8 == 0, torch.zeros_like(s8), 1.0 / s8)
        return torch.tensor([ref_cast_to_fp4(float(v)) for v in torch.clamp(col * out, -6, 6)])

    # scales as effective ones (s8 / G): the error feedback uses codes x s8 / G, the dequantized weight
    want_codes, want_eff = ref_gptq(w, x, 16, lambda grp: s8_of(grp) / G, lambda col, e: round_col(col, e * G))
    codes, scale = gptq_quantize(w, x.T @ x / x.shape[0], ts, block_size=64)
    assert torch.equal(codes, want_codes) and torch.equal(scale, want_eff)


def test_gptq_lazy_batches_that_split_a_group_agree_with_one_batch():
    g = torch.Generator().manual_seed(3)
    w, x = torch.randn(32, 128, generator=g), calibration(128, seed=3)
    h = x.T @ x / x.shape[0]
    ts = TensorScheme("int4", "group", group_size=32)
    one = gptq_quantize(w, h, ts, block_size=128)
    split = gptq_quantize(w, h, ts, block_size=24)  # batches end inside groups
    assert (one[0] == split[0]).float().mean() > 0.99  # fp32 summation order only: rare flips at ties
    assert torch.allclose(one[1], split[1], rtol=1e-5)


@pytest.mark.parametrize("name", LOWBIT_WEIGHTS)
@pytest.mark.parametrize("static_groups", [False, True])
def test_gptq_with_groups_beats_rtn_with_the_same_groups(name, static_groups):
    ts = SCHEMES[name].weight
    g = torch.Generator().manual_seed(4)
    w, x = torch.randn(256, 256, generator=g) * 0.05, calibration(256, tokens=1024, seed=4)
    h = x.T @ x / x.shape[0]
    codes, scale = gptq_quantize(w, h, ts, static_groups=static_groups)
    rtn_codes, rtn_scale = quantize(w, ts)
    if static_groups:
        assert torch.equal(scale, rtn_scale)  # the same groups, the same scales: only the codes differ

    def err(c, s):
        return float((x @ (dequantize(c, s, ts) - w).T).norm())

    assert err(codes, scale) < 0.9 * err(rtn_codes, rtn_scale), name


def test_gptq_refuses_act_order_with_groups_unless_static():
    w, x = torch.randn(8, 64), calibration(64)
    h = x.T @ x / x.shape[0]
    ts = SCHEMES["mxfp4"].weight
    with pytest.raises(ValueError, match="act_order=true with group scales needs algorithm.static_groups=true"):
        gptq_quantize(w, h, ts, act_order=True)
    codes, scale = gptq_quantize(w, h, ts, act_order=True, static_groups=True)
    assert torch.equal(scale, quantize(w, ts)[1])
    gptq_quantize(w, h, SCHEMES["w8a8"].weight, act_order=True)  # per channel: nothing to order


def test_awq_clip_search_per_group_keeps_nvfp4_scales_on_the_global_grid():
    from omegaconf import OmegaConf

    from vqx.algorithms.awq import search_clipping
    from vqx.algorithms.registry import BlockContext
    from vqx.calib.stats import GroupStats
    from vqx.models.adapter import InputGroup, QuantTarget
    from torch import nn

    g = torch.Generator().manual_seed(5)
    block = nn.Module()
    block.lin = nn.Linear(64, 32)
    with torch.no_grad():
        block.lin.weight.copy_(torch.randn(32, 64, generator=g))
    stats = GroupStats(64, None, None, False, seed=0, device=torch.device("cpu"))
    stats.update(calibration(64, tokens=256, seed=5))
    scheme = SCHEMES["nvfp4"]
    ctx = BlockContext(0, block, [InputGroup("in", ("lin",))], {"lin": QuantTarget(0, "lin", block.lin, "b.lin", "l")},
                       {"in": stats}, {"lin": scheme}, OmegaConf.create({"clip_min": 0.5, "clip_grid": 5, "min_gain": 0.0, "min_t": 0.0}))
    # the block objective is test_block_search's; here every clipped linear is kept (its block error 0 < 1)
    ctx.scorer = SimpleNamespace(error=lambda ctx, transform=None: 0.0)
    search_clipping(ctx, current=1.0)
    assert ctx.choices["lin"]["clip_kept"]
    codes, scale = ctx.chosen_codes["b.lin"]
    w = block.lin.weight.detach()
    G = global_scale_of(w, scheme.weight)
    s8 = (scale * G).to(torch.float8_e4m3fn).float()
    assert torch.equal(s8 / G, scale)  # every clipped group scale is still an e4m3 value over the weight's G
    assert bool((scale <= choose_scales(w, scheme.weight, G)).all())
    x = stats.sample_matrix()
    rtn = quantize(w, scheme.weight)
    assert float((x @ (dequantize(codes, scale, scheme.weight) - w).T).norm()) <= float(
        (x @ (dequantize(*rtn, scheme.weight) - w).T).norm())


def test_act_order_with_a_grouped_format_is_refused_before_any_work(vqx_run_in_process, tmp_path):
    r = vqx_run_in_process(["format=nvfp4", "algorithm=gptq", "algorithm.act_order=true", "export=none", "eval=none",
                 "logger=none", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == (
        "vqx: error: format=nvfp4: algorithm.act_order=true with group scales needs algorithm.static_groups=true "
        "(scales chosen as the sweep reaches a group would follow the permuted column order; kernels read "
        "contiguous groups)")


def test_searches_quantize_weight_only_layers_with_their_own_scheme():
    """AWQ's and SmoothQuant's losses for an int4-g128 weight-only layer use int4 groups and 16-bit inputs, not the
    W8A8 stand-in a float layer gets."""
    from torch import nn

    from vqx.algorithms.registry import BlockContext
    from vqx.quant.formats import SEARCH_PROXY

    ctx = BlockContext(0, nn.Module(), [], {}, {}, {"a": SCHEMES["w4a16_g128"], "b": None, "c": SCHEMES["nvfp4"]})
    assert ctx.search_scheme("a") is SCHEMES["w4a16_g128"] and ctx.search_scheme("c") is SCHEMES["nvfp4"]
    assert ctx.search_scheme("b") is SEARCH_PROXY

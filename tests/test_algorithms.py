"""SmoothQuant, AWQ and GPTQ: what each promises, on synthetic layers and on tiny Wan end to end."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vqx.plugins  # noqa: F401
from vqx import experiment
from vqx.algorithms.awq import awq_scale
from vqx.algorithms.gptq import gptq_quantize
from vqx.algorithms import losses
from vqx.algorithms.losses import GroupQuantLoss, group_quant_loss
from vqx.algorithms.smoothquant import smoothquant_scale
from vqx.quant.formats import SCHEMES
from vqx.quant.linear import quantize_weight
from vqx.quant.scheme import TensorScheme, dequantize, fake_quantize
from conftest import pin_tiny

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_run(overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=pin_tiny(overrides))


def _outlier_layer(seed=0, n=2048, d_in=256, d_out=128, outlier_channels=(3, 77, 150), outlier_scale=60.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    x[:, list(outlier_channels)] *= outlier_scale
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    return x, w


@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_smoothquant_beats_rtn_on_outlier_channels(fmt):
    x, w = _outlier_layer()
    f = SCHEMES[fmt]
    rtn = group_quant_loss(x, [w], f)
    s = smoothquant_scale(x.abs().amax(0), w.abs().amax(0), alpha=0.5)
    sq = group_quant_loss(x, [w], f, s)
    # int8 per-token activations lose the small channels next to 60x outliers; smoothing recovers them
    assert sq < 0.5 * rtn, (sq, rtn)


def _loss_per_candidate(x, weights, schemes, s, chunk):
    """The search loss written out for one candidate: every chunk's x W^T recomputed (the former implementation)."""
    num, den = 0.0, 0.0
    wq = [(w.float(), dequantize(*quantize_weight(w.float() if s is None else w.float() * s[None, :], sc.weight),
                                 sc.weight), sc.activation) for w, sc in zip(weights, schemes)]
    for start in range(0, x.shape[0], chunk):
        xb = x[start:start + chunk]
        xs = xb if s is None else xb / s[None, :]
        quantized = {}
        for w, wdq, act in wq:
            if act not in quantized:
                quantized[act] = xs if act is None else fake_quantize(xs, act)
            ref = xb @ w.T
            num += float(((quantized[act] @ wdq.T) - ref).pow(2).sum())
            den += float(ref.pow(2).sum())
    return num / den


@pytest.mark.parametrize("cache_bytes", [losses.REFERENCE_CACHE_BYTES, 0])
def test_group_loss_over_candidates_equals_each_candidate_computed_alone(cache_bytes, monkeypatch):
    """GroupQuantLoss keeps x W^T between candidates (or recomputes it past its memory bound): the losses are the
    per-candidate computation's bit for bit, over several chunks and two linears of different schemes."""
    monkeypatch.setattr(losses, "REFERENCE_CACHE_BYTES", cache_bytes)
    x, w = _outlier_layer(n=1000)
    w2 = torch.randn(96, w.shape[1], generator=torch.Generator().manual_seed(1)) / 16
    schemes = [SCHEMES["w8a8"], SCHEMES["fp8"]]
    loss = GroupQuantLoss(x, [w, w2], schemes, chunk=300)
    assert loss.cache == (cache_bytes > 0)
    w_absmax = torch.maximum(w.abs().amax(0), w2.abs().amax(0))
    for alpha in (None, 0.0, 0.5, 0.85):
        s = None if alpha is None else smoothquant_scale(x.abs().amax(0), w_absmax, alpha)
        assert loss(s) == _loss_per_candidate(x, [w, w2], schemes, s, chunk=300), alpha
    assert len(loss._refs) == (8 if cache_bytes else 0)  # 4 chunks x 2 linears, kept once


def test_awq_scale_ratio_zero_is_identity():
    m = torch.rand(64) * 10
    assert torch.allclose(awq_scale(m, 0.0), torch.ones(64))


def test_gptq_reconstruction_beats_rtn_on_calibration_inputs():
    g = torch.Generator().manual_seed(1)
    # correlated inputs: GPTQ's error feedback exploits the Hessian's off-diagonal structure
    base = torch.randn(4096, 32, generator=g)
    x = base @ torch.randn(32, 192, generator=g) + 0.1 * torch.randn(4096, 192, generator=g)
    w = torch.randn(96, 192, generator=g)
    for name in ("int8", "fp8_e4m3"):
        ts = TensorScheme(name, "channel", scale_dtype="bf16")
        grid = ts.grid_
        codes, scale = gptq_quantize(w, x.T @ x / x.shape[0], ts, damp=0.01, block_size=32)
        rtn_codes, rtn_scale = quantize_weight(w, ts)
        assert torch.equal(scale, rtn_scale)  # same per-channel scales; only the codes differ
        err_gptq = (x @ (codes * scale - w).T).norm()
        err_rtn = (x @ (rtn_codes * rtn_scale - w).T).norm()
        assert err_gptq < 0.8 * err_rtn, (name, err_gptq, err_rtn)
        assert torch.equal(grid.round_to_grid(codes), codes)  # every code lies on the grid (int8 includes -128)


def test_gptq_act_order_gives_valid_codes():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 5, 64)
    w = torch.randn(16, 64, generator=g)
    ts = SCHEMES["w8a8"].weight
    codes, scale = gptq_quantize(w, x.T @ x / 512, ts, act_order=True, block_size=8)
    assert torch.equal(codes, codes.round()) and codes.min() >= -128 and codes.max() <= 127
    assert (x @ (codes * scale - w).T).norm() < (x @ (quantize_weight(w, ts)[0] * scale - w).T).norm()


# Relative layer output errors on wan_tiny / wan_tiny_i2v (calib 2 prompts x 4 steps), measured over the 16 cases
# below and RTN: w8a8 0.0028-0.0109, fp8 0.0083-0.0380 (algorithm and RTN alike). Bounds: half the smallest and
# 1.6x the largest, per format; a wrong scale or a lost smoothing factor costs an order of magnitude.
LAYER_ERROR_BOUNDS = {"w8a8": (0.0014, 0.0175), "fp8": (0.004, 0.061)}


@pytest.mark.parametrize("model", ["wan_tiny", "wan_tiny_i2v"])
@pytest.mark.parametrize("algorithm", ["smoothquant", "awq", "gptq", "smoothquant_gptq"])
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_algorithm_end_to_end(tmp_path, model, algorithm, fmt, shared_cache):
    cfg = compose_run([f"model={model}", f"algorithm={algorithm}", f"format={fmt}", f"cache_dir={shared_cache}",
                       "calib.num_prompts=2", "calib.steps=4", "logger=none"])  # W&B: tests/test_wandb.py
    m = experiment.run(cfg, tmp_path)
    per_block = 12 if model.endswith("i2v") else 10
    assert m["quantized_layers"] == 2 * per_block
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "complete"
    low, high = LAYER_ERROR_BOUNDS[fmt]
    for layer in m["layers"]:
        assert low < layer["output_error"] < high and low < layer["output_error_rtn"] < high, layer
    if algorithm == "awq":
        groups = [g for g in m["groups"] if "ratio" in g]
        assert len(groups) == 2 * 5  # per block: self_attn_in, self_attn_out, cross_attn_q, cross_attn_out, ffn_in
    if algorithm == "gptq":
        assert m["blocks"] == []  # no step searched on the block output: nothing guarded
    else:  # AWQ and SmoothQuant's default alpha=auto search on the block; the identity is always a candidate
        for g in m["groups"]:
            assert g["block_error"] <= g["block_error_identity"]
        assert [b["block"] for b in m["blocks"]] == [0, 1]
        assert all(b["error"] <= b["error_rtn"] for b in m["blocks"])  # the runner's guard, on every call
        # With the identity among the candidates no group can lose to it; the search must also find better ones:
        # measured, 4 to 10 of the 10 groups strictly below their identity (AWQ w8a8 on wan_tiny: 4). Bound: half.
        assert sum(g["block_error"] < g["block_error_identity"] for g in m["groups"]) >= 2, m["groups"]
    if "gptq" in algorithm:
        assert all(layer["method"] == "gptq" for layer in m["layers"])
        assert m["layer_error"]["mean"] < m["layer_error_rtn"]["mean"]


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


# wan_tiny with 2 of its 32 input channels per site 32x larger (model.outliers; the float model unchanged), W8A8,
# mean relative layer error, measured (t2v / i2v): RTN 0.0254 / 0.0209; SmoothQuant (alpha=auto) 3.61x / 3.21x
# lower, AWQ 3.56x / 3.03x, SmoothQuant+GPTQ 4.04x / 3.60x, GPTQ 1.06x / 1.06x (it only compensates weight error;
# the activations' rounding dominates). Bounds: 2x for the algorithms that move the range into the weights (1.5x
# below the smallest measured), 1.02x for GPTQ (GPTQ is deterministic; measured 1.06x on both).
BEATS_RTN_BY = {"smoothquant": 2.0, "awq": 2.0, "smoothquant_gptq": 2.0, "gptq": 1.02}


@pytest.mark.parametrize("algorithm", list(BEATS_RTN_BY))
def test_algorithms_beat_rtn_on_injected_outliers(tmp_path, algorithm, shared_cache):
    cfg = compose_run(["model=wan_tiny", "model.outliers.channels=2", f"algorithm={algorithm}", "format=w8a8",
                       f"cache_dir={shared_cache}", "calib.num_prompts=2", "calib.steps=4", "export=none", "eval=none",
                       "logger=none"])
    m = experiment.run(cfg, tmp_path)
    rtn, ours = m["layer_error_rtn"]["mean"], m["layer_error"]["mean"]
    # the outliers do hurt plain rounding: measured 0.0254, 4x the model without them (0.0063) and above the largest
    # single-layer error any algorithm or RTN reaches there
    assert rtn > LAYER_ERROR_BOUNDS["w8a8"][1]
    assert ours * BEATS_RTN_BY[algorithm] < rtn, (algorithm, ours, rtn)


def test_sweep_points_share_the_float_model_statistics(tmp_path, caplog):
    """SmoothQuant at a fixed alpha reads only float-model statistics: a second alpha reuses the cached
    float pass, and the result is bit for bit what computing the float pass itself gives."""
    import logging

    from safetensors.torch import load_file

    base = ["algorithm=smoothquant", "eval=none", "logger=none", "export=lightx2v", f"cache_dir={tmp_path / 'cache'}",
            "calib.num_prompts=2", "calib.steps=4"]
    runs = {}
    for name, extra in (("a", ["algorithm.alpha=0.5"]), ("b", ["algorithm.alpha=0.8"]),
                        ("b_own", ["algorithm.alpha=0.8", "calib.share_stats=false"])):
        with caplog.at_level(logging.INFO, logger="vqx.algorithms.runner"):
            caplog.clear()
            runs[name] = experiment.run(compose_run(base + extra), tmp_path / name)
            runs[name]["log"] = caplog.text
    assert "computed and cached" in runs["a"]["log"]
    assert "from the cache" in runs["b"]["log"]
    assert "float-model block statistics" not in runs["b_own"]["log"]  # computed in the run, block by block
    assert runs["b"]["layers"] == runs["b_own"]["layers"] and runs["b"]["groups"] == runs["b_own"]["groups"]
    assert runs["a"]["groups"] != runs["b"]["groups"]  # the alphas differ, the statistics are shared
    wa, wb = (load_file(str(next((tmp_path / n / "export").rglob("*.safetensors")))) for n in ("b", "b_own"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    # Search steps (AWQ) and GPTQ's Hessians are not in the shared statistics: they compute their own.
    cfg = compose_run(base + ["algorithm=awq"])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vqx.algorithms.runner"):
        experiment.run(cfg, tmp_path / "awq")
    assert "float-model block statistics" not in caplog.text

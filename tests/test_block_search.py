"""Searches judged on the quantized block's output: the identity is always a candidate, the result is never worse
than round-to-nearest on its own objective, and the runner's guard undoes a block that is."""

import copy
import logging

import pytest
import torch
from omegaconf import OmegaConf

import vqx.plugins  # noqa: F401
from vqx.algorithms import awq as awq_module
from vqx.algorithms import smoothquant as sq_module
from vqx.algorithms.block_search import shortlisted, spread_calls
from vqx.algorithms.registry import register_step
from vqx.algorithms.runner import quantize_blockwise
from vqx.algorithms.smoothing import apply_smoothing, smoothable
from vqx.cache import DiskCache
from vqx.calib.capture import load_or_capture
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.outliers import inject_outliers
from vqx.quant.formats import get_scheme


@register_step("test_harmful_smoothing", needs=frozenset({"absmax", "block_error"}))
def _harmful_smoothing(ctx):
    """Declares a block search but applies a factor that wrecks int8 weights, without asking: the guard's case."""
    for group in ctx.groups:
        if smoothable(group):
            s = torch.ones(ctx.stats[group.name].absmax.numel())
            s[::2] = 1e4  # half the weight columns 1e4 times larger: the other half rounds to zero
            apply_smoothing(ctx, group, s)


def _calib(**kw):
    return OmegaConf.create({"num_prompts": 1, "steps": 3, "capture_steps": None, "height": 32, "width": 32,
                             "num_frames": 5, "guidance": 5.0, "shift": 3.0, "negative_prompt": "", "loss_tokens": 64,
                             "report_tokens": 64, "hessian_tokens": None, "propagate": "fp", "seed": 0, "path": None,
                             "share_stats": True, "search_calls": 4, **kw})


def _quantize(pipe, tmp_path, algo, fmt="w8a8", **calib_kw):
    calib = _calib(**calib_kw)
    capture = load_or_capture(pipe, calib, "t2v", {"test": "block_search", "id": id(pipe)}, DiskCache(tmp_path))
    targets = quant_targets(pipe.transformer, LayerSelection())
    return quantize_blockwise(pipe.transformer, capture, targets, get_scheme(fmt), OmegaConf.create(algo), calib)


def _codes(result):
    return {n: (q.weight_codes.clone(), q.weight_scale.clone()) for n, q in result.quantized.items()}


def _same_codes(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[n][0], b[n][0]) and torch.equal(a[n][1], b[n][1]) for n in a)


@pytest.fixture
def outlier_pipe(tiny_t2v):
    pipe = copy.deepcopy(tiny_t2v)
    inject_outliers(pipe.transformer, channels=2, scale=32, seed=0)
    return pipe


def test_spread_calls_are_even_and_distinct():
    assert spread_calls(60, None) == list(range(60)) and spread_calls(10, 16) == list(range(10))
    picked = spread_calls(60, 16)
    assert len(picked) == 16 and picked == sorted(set(picked)) and 0 <= picked[0] and picked[-1] < 60
    assert {c % 2 for c in picked} == {0, 1}  # both guidance branches (calls alternate cond/uncond)
    assert max(b - a for a, b in zip(picked, picked[1:])) <= 4


def test_shortlist_keeps_the_lowest_losses_in_grid_order():
    losses = {0.0: 3.0, 0.25: 1.0, 0.5: 2.0, 0.75: 1.0, 1.0: 5.0}
    assert shortlisted(losses, 2) == [0.25, 0.75] and shortlisted(losses, 3) == [0.25, 0.5, 0.75]
    assert shortlisted(losses, 0) == shortlisted(losses, 9) == list(losses)


@pytest.mark.parametrize("algo", [
    {"name": "sq", "steps": ["smoothquant"], "alpha": "auto"},
    {"name": "awq", "steps": ["awq"], "grid": 10, "clip": True},
], ids=["smoothquant_auto", "awq_clip"])
@pytest.mark.parametrize("fmt", ["w8a8", "fp8"])
def test_search_never_loses_to_rtn_on_any_block(outlier_pipe, tmp_path, algo, fmt):
    result = _quantize(outlier_pipe, tmp_path, algo, fmt)
    assert [b["block"] for b in result.blocks] == [0, 1]
    for b in result.blocks:  # on every calibration call, not only the search calls
        assert b["error"] <= b["error_rtn"] and not b["fallback"], b
    gain = sum(b["error"] for b in result.blocks) / sum(b["error_rtn"] for b in result.blocks)
    assert gain < (0.5 if fmt == "w8a8" else 0.95), gain  # it helps: int8 loses small channels next to outliers
    for g in result.groups:  # group by group, the block error only goes down from the identity's
        if "block_error" in g:
            assert g["block_error"] <= g["block_error_identity"], g
    key = "alpha" if "alpha" in algo else "ratio"
    assert any(g.get(key) for g in result.groups)  # with 32x outlier channels some group is smoothed


def test_identity_wins_when_every_candidate_is_worse(tiny_t2v, tmp_path, monkeypatch):
    """Every alpha (and every AWQ ratio above 0) made harmful: the searches keep every group's identity, so the
    result is plain rounding, code for code, with no smoothing vectors."""
    rtn = _codes(_quantize(copy.deepcopy(tiny_t2v), tmp_path, {"name": "rtn", "steps": ["rtn"]}))

    def harmful(stat, *args):
        s = torch.ones_like(stat, dtype=torch.float32)
        s[::2] = 1e4
        return s

    monkeypatch.setattr(sq_module, "smoothquant_scale", harmful)
    monkeypatch.setattr(awq_module, "awq_scale", lambda mean_abs, ratio: torch.ones_like(mean_abs) if ratio == 0
                        else harmful(mean_abs))
    for algo in ({"name": "sq", "steps": ["smoothquant"], "alpha": "auto", "shortlist": 0},
                 {"name": "awq", "steps": ["awq"], "grid": 4}):
        result = _quantize(copy.deepcopy(tiny_t2v), tmp_path, algo)
        smoothed = [g for g in result.groups if g.get("alpha") is not None or g.get("ratio")]
        assert not smoothed and len(result.groups) == 2 * 5, result.groups
        assert not result.runtime_smoothing
        assert _same_codes(_codes(result), rtn)
        assert all(b["error"] == b["error_rtn"] for b in result.blocks)


def test_guard_resets_a_block_worse_than_rtn(tiny_t2v, tmp_path, caplog):
    rtn = _codes(_quantize(copy.deepcopy(tiny_t2v), tmp_path, {"name": "rtn", "steps": ["rtn"]}))
    pipe = copy.deepcopy(tiny_t2v)
    with caplog.at_level(logging.WARNING, logger="vqx.algorithms.runner"):
        result = _quantize(pipe, tmp_path, {"name": "bad", "steps": ["test_harmful_smoothing"]})
    assert [b["fallback"] for b in result.blocks] == [True, True]
    for b in result.blocks:
        assert b["error_searched"] > b["error_rtn"] and b["error"] == b["error_rtn"]
    assert "falls back to round-to-nearest" in caplog.text
    assert not result.runtime_smoothing
    assert _same_codes(_codes(result), rtn)  # weights, folded norms and value rows restored before rounding
    for block_r, block_f in zip(pipe.transformer.blocks, tiny_t2v.transformer.blocks):
        assert torch.equal(block_r.norm2.weight, block_f.norm2.weight)  # the cross-attention norm fold is undone


def test_fixed_alpha_neither_searches_nor_guards(tiny_t2v, tmp_path):
    result = _quantize(copy.deepcopy(tiny_t2v), tmp_path, {"name": "sq", "steps": ["smoothquant"], "alpha": 0.5})
    assert result.blocks == [] and result.runtime_smoothing
    assert {g["alpha"] for g in result.groups} == {0.5}


def test_a_block_kept_float_is_left_alone_by_the_search(tiny_t2v, tmp_path):
    """format.skip_first_blocks=1 with the searched default: block 0 has no targets, so no step runs on it (the
    search once asked it for a block error it had no scorer for) and block 1 is searched and guarded as usual."""
    pipe = copy.deepcopy(tiny_t2v)
    calib = _calib()
    capture = load_or_capture(pipe, calib, "t2v", {"test": "block_search", "id": id(pipe)}, DiskCache(tmp_path))
    targets = [t for t in quant_targets(pipe.transformer, LayerSelection()) if t.block != 0]
    result = quantize_blockwise(pipe.transformer, capture, targets, get_scheme("w8a8"),
                                OmegaConf.create({"name": "sq", "steps": ["smoothquant"], "alpha": "auto"}), calib)
    assert result.quantized and not any(n.startswith("blocks.0.") for n in result.quantized)
    assert [b["block"] for b in result.blocks] == [1]


@pytest.mark.parametrize("algo", [{"name": "sq", "steps": ["smoothquant"], "alpha": 0.5},
                                  {"name": "awq", "steps": ["awq"], "grid": 4, "shortlist": 0}])
def test_groups_restrict_smoothing_to_the_named_input_groups(outlier_pipe, tmp_path, algo):
    """algorithm.groups=[...]: the step smooths only those groups (LLMC's sites, say); an unnamed group's linear is
    quantized from its original weight (round to nearest, bit for bit) and records no choice."""
    from vqx.quant.linear import quantize_weight

    only = ["self_attn_in", "cross_attn_q"]
    pipe = copy.deepcopy(outlier_pipe)
    before = {n: m.weight.detach().clone() for n, m in pipe.transformer.named_modules() if n.endswith("attn2.to_out.0")}
    result = _quantize(pipe, tmp_path, {**algo, "groups": only})
    chosen = {g["group"] for g in result.groups}
    assert chosen == set(only)
    assert before
    for name, w in before.items():  # cross_attn_out (value rows -> output columns) was left alone
        codes, scale = quantize_weight(w.float(), get_scheme("w8a8").weight)
        q = result.quantized[name]
        assert torch.equal(q.weight_codes, codes) and torch.equal(q.weight_scale.float(), scale.float())

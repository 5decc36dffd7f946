"""Steps declare what they need; the runner, the shared statistics and calibration follow without edits."""

import copy
from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

import vqx.plugins  # noqa: F401
from vqx.algorithms import registry
from vqx.algorithms.registry import BlockHooks, plan_steps, register_step, stats_needed
from vqx.algorithms.runner import quantize_blockwise
from vqx.algorithms.shared_stats import shareable
from vqx.cache import DiskCache
from vqx.calib.capture import load_or_capture
from vqx.config.schema import bounded
from vqx.errors import UserError
from vqx.models.adapter import LayerSelection, quant_targets
from vqx.quant.formats import get_scheme

SEEN: dict[str, list] = {}


@dataclass
class _HessianProbeParams:
    scale: float = bounded(1.0, 0.0, None, exclusive_low=True)


@register_step("test_hessian_probe", params=_HessianProbeParams, needs=frozenset({"hessian"}))
def _hessian_probe(ctx):
    for g in ctx.groups:
        SEEN.setdefault("hessian", []).append((ctx.index, g.name, ctx.stats[g.name].normalized_hessian() * ctx.params.scale))


class _CountTokens(BlockHooks):
    def block_start(self, index, block, groups):
        SEEN.setdefault("starts", []).append(index)

    def group_input(self, group, x, call):
        SEEN.setdefault("tokens", []).append((group, call, x.reshape(-1, x.shape[-1]).shape[0]))

    def block_end(self, ctx):
        SEEN.setdefault("ends", []).append(ctx.index)


@register_step("test_token_counter", hooks=_CountTokens)
def _token_counter(ctx):
    assert isinstance(ctx.hooks["test_token_counter"], _CountTokens)


def _calib():
    return OmegaConf.create({"num_prompts": 1, "steps": 2, "capture_steps": None, "height": 32, "width": 32,
                             "num_frames": 5, "guidance": 5.0, "shift": 3.0, "negative_prompt": "", "loss_tokens": 64,
                             "report_tokens": 64, "hessian_tokens": None, "propagate": "fp", "seed": 0, "path": None,
                             "share_stats": True, "search_calls": 4})


def test_a_step_that_asks_for_hessians_gets_them_without_a_runner_change(tiny_t2v, tmp_path):
    pipe = copy.deepcopy(tiny_t2v)
    calib = _calib()
    capture = load_or_capture(pipe, calib, "t2v", {"test": "steps"}, DiskCache(tmp_path))
    targets = quant_targets(pipe.transformer, LayerSelection())
    algo = OmegaConf.create({"name": "probe", "steps": [{"name": "test_hessian_probe", "scale": 2.0}, "rtn"]})
    SEEN.clear()
    quantize_blockwise(pipe.transformer, capture, targets, get_scheme("w8a8"), algo, calib, DiskCache(tmp_path))
    got = SEEN["hessian"]
    assert [(b, g) for b, g, _ in got][:2] == [(0, "self_attn_in"), (0, "self_attn_out")]
    for _, _, h in got:  # a symmetric, positive semi-definite X^T X / n, scaled by the step's own parameter
        assert torch.allclose(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > -1e-6 * h.abs().max()


def test_hooks_see_the_block_loop_and_every_calibration_input(tiny_t2v, tmp_path):
    pipe = copy.deepcopy(tiny_t2v)
    calib = _calib()
    capture = load_or_capture(pipe, calib, "t2v", {"test": "steps"}, DiskCache(tmp_path))
    targets = quant_targets(pipe.transformer, LayerSelection())
    algo = OmegaConf.create({"name": "count", "steps": ["test_token_counter"]})
    SEEN.clear()
    # hooks need the float pass, so the shared statistics are not used even with a cache
    assert not shareable(plan_steps(algo), calib)
    quantize_blockwise(pipe.transformer, capture, targets, get_scheme("w8a8"), algo, calib, DiskCache(tmp_path))
    assert SEEN["starts"] == SEEN["ends"] == [0, 1]
    calls = {c for _, c, _ in SEEN["tokens"]}
    assert calls == set(range(len(capture.calls)))  # every captured call, both blocks, every group
    assert len(SEEN["tokens"]) == 2 * len(capture.calls) * 7  # wan_tiny T2V: 7 input groups per block


def test_needs_drive_sharing_and_calibration():
    plan = lambda steps, **flat: plan_steps({"name": "r", "steps": steps, **flat})  # noqa: E731
    assert stats_needed(plan(["rtn"])) == frozenset() and not registry.needs_calibration(plan(["rtn"]))
    assert stats_needed(plan(["smoothquant"], alpha=0.75)) == {"absmax"}  # a fixed alpha: what sweeps set
    assert stats_needed(plan(["smoothquant"])) == {"absmax", "samples", "block_error"}  # the default searches
    assert stats_needed(plan(["smoothquant"], alpha="auto")) == {"absmax", "samples", "block_error"}
    assert stats_needed(plan(["awq"])) == {"mean_abs", "samples", "block_error"}
    assert stats_needed(plan(["smoothquant", "gptq"], alpha=0.5)) == {"absmax", "hessian"}
    calib = OmegaConf.create({"share_stats": True, "propagate": "fp"})
    assert shareable(plan(["smoothquant"], alpha=0.5), calib) and not shareable(plan(["awq"]), calib)
    assert not shareable(plan(["smoothquant"], alpha="auto"), calib) and not shareable(plan(["gptq"]), calib)


def test_recipe_parameters_resolve_per_step_then_flat_then_defaults():
    p = plan_steps({"name": "r", "alpha": 0.6, "damp": None,
                    "steps": ["smoothquant", {"name": "smoothquant", "alpha": 0.3}, {"name": "gptq", "damp": 0.05}]})
    assert [(s.name, vars(s.params)) for s in p] == [
        ("smoothquant", {"alpha": 0.6, "shortlist": 4, "groups": None, "min_gain": 0.0, "min_t": 0.0}),
        ("smoothquant", {"alpha": 0.3, "shortlist": 4, "groups": None, "min_gain": 0.0, "min_t": 0.0}),
        ("gptq", {"damp": 0.05, "block_size": 128, "act_order": False, "static_groups": False})]


@pytest.mark.parametrize("algo,message", [
    ({"steps": ["nope"]}, "algorithm step 'nope' is unknown; valid steps:"),
    ({"steps": ["rtn"], "alpha": 0.5}, "algorithm.alpha is not a parameter of any step of this recipe (rtn)"),
    ({"steps": [{"name": "gptq", "dmp": 1}]}, "algorithm.steps[0] (gptq) has unknown parameter 'dmp'; valid: damp"),
    ({"steps": [{"name": "gptq", "damp": 2.0}]}, "algorithm.steps[0].damp=2.0 is out of range"),
    ({"steps": [{"alpha": 0.5}]}, "must be a step name or {name: <step>"),
])
def test_bad_recipes_are_one_line_errors(algo, message):
    from vqx.config.validate import _check_value

    with pytest.raises((ValueError, UserError)) as e:
        plan_steps({"name": "r", **algo}, check_value=_check_value)
    assert message in str(e.value) and "\n" not in str(e.value)

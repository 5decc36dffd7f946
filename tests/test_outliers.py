"""Injected activation outliers: the float model computes the same bits, its linears' inputs get outlier channels."""

import copy

import pytest
import torch

from vqx.errors import UserError
from vqx.models.wan.outliers import SITES, inject_outliers
from vqx.models.wan.tiny import _transformer, cast_transformer


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 16, 2, 8, 8, generator=g).bfloat16(), timestep=torch.tensor([500.0]),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g).bfloat16(), return_dict=False)


def _input_absmax(model, names, kw):
    """Per-channel absmax of the inputs of the named linears over one call."""
    seen, hooks = {}, []
    for name in names:
        def hook(_m, args, name=name):
            seen[name] = args[0].float().abs().flatten(0, -2).amax(0)
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(**kw)
    for h in hooks:
        h.remove()
    return seen


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return cast_transformer(_transformer(False), torch.bfloat16).eval()


def test_float_model_is_unchanged_bit_for_bit(base):
    model = copy.deepcopy(base)
    chosen = inject_outliers(model, channels=3, scale=64, seed=1)
    assert set(chosen) == {f"blocks.{i}.{s}" for i in range(len(model.blocks)) for s in SITES}
    assert all(len(c) == 3 for c in chosen.values())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))  # weights did change
    for seed in (0, 1):
        with torch.no_grad():
            assert torch.equal(model(**_inputs(seed))[0].view(torch.int16), base(**_inputs(seed))[0].view(torch.int16))


def test_chosen_channels_grow_by_the_scale(base):
    model = copy.deepcopy(base)
    chosen = inject_outliers(model, channels=2, scale=32, seed=0)
    before, after = _input_absmax(base, chosen, _inputs()), _input_absmax(model, chosen, _inputs())
    for name, channels in chosen.items():
        others = [c for c in range(before[name].numel()) if c not in channels]
        assert torch.equal(after[name][channels], before[name][channels] * 32), name  # powers of two: exact
        assert torch.equal(after[name][others], before[name][others]), name


def test_rtn_error_grows_and_smoothquant_recovers_it(base):
    from vqx.algorithms.smoothquant import smoothquant_scale
    from vqx.quant.formats import get_scheme
    from vqx.algorithms.losses import group_quant_loss

    fmt = get_scheme("w8a8")
    model = copy.deepcopy(base)
    chosen = inject_outliers(model, channels=2, scale=64, seed=0)
    name = next(n for n in chosen if n.endswith("attn2.to_q"))
    x = {}
    for m, key in ((base, "plain"), (model, "outliers")):
        h = m.get_submodule(name).register_forward_pre_hook(lambda _m, a, key=key: x.__setitem__(key, a[0].float().flatten(0, -2)))
        with torch.no_grad():
            m(**_inputs())
        h.remove()
    w_plain = base.get_submodule(name).weight.float()
    w = model.get_submodule(name).weight.float()
    rtn_plain = group_quant_loss(x["plain"], [w_plain], fmt)
    rtn = group_quant_loss(x["outliers"], [w], fmt)
    s = smoothquant_scale(x["outliers"].abs().amax(0), w.abs().amax(0), alpha=0.5)
    smoothed = group_quant_loss(x["outliers"], [w], fmt, s)
    assert rtn > 3 * rtn_plain
    assert smoothed < rtn / 3


@pytest.mark.parametrize("scale", [1, 3, 48.0])
def test_scale_must_be_a_power_of_two(base, scale):
    with pytest.raises(UserError, match=f"model.outliers.scale={scale:g} must be a power of two"):
        inject_outliers(copy.deepcopy(base), channels=1, scale=scale)

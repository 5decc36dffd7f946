"""Injected activation outliers: the float model computes the same bits, its linears' inputs get outlier channels."""

import copy

import pytest
import torch

from vqx.errors import UserError
from vqx.models.wan.outliers import ALL_SITES, DEFAULT_SITES, SITES, inject_outliers
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


SITE_SETS = {
    "default": DEFAULT_SITES,
    "ffn_out": ("ffn_out",),
    "cross_attn_text": ("cross_attn_text",),
    "all": ALL_SITES,
}
SITE_LINEARS = {"cross_attn_q": ["attn2.to_q"], "self_attn_out": ["attn1.to_out.0"], "cross_attn_out": ["attn2.to_out.0"],
                "ffn_out": ["ffn.net.2"], "cross_attn_text": ["attn2.to_k", "attn2.to_v"]}


@pytest.mark.parametrize("sites", SITE_SETS.values(), ids=SITE_SETS.keys())
def test_float_model_is_unchanged_bit_for_bit(base, sites):
    model = copy.deepcopy(base)
    chosen = inject_outliers(model, channels=3, scale=64, seed=1, sites=sites)
    assert set(chosen) == {f"blocks.{i}.{n}" for i in range(len(model.blocks)) for s in sites for n in SITE_LINEARS[s]}
    assert all(len(c) == 3 for c in chosen.values())
    assert any(not torch.equal(a, b) for a, b in zip(model.parameters(), base.parameters()))  # weights did change
    for seed in (0, 1):
        with torch.no_grad():
            assert torch.equal(model(**_inputs(seed))[0].view(torch.int16), base(**_inputs(seed))[0].view(torch.int16))


def test_default_sites_keep_their_channels(base):
    """The default sites draw the channels they drew before sites could be chosen (block by block, in site order,
    from the seed's generator), and adding sites moves no other site's channels."""
    assert SITES == ("attn2.to_q", "attn1.to_out.0", "attn2.to_out.0")
    g = torch.Generator().manual_seed(3)
    old = {f"blocks.{i}.{site}": torch.randperm(base.blocks[i].norm2.weight.numel(), generator=g)[:4].sort().values.tolist()
           for i in range(len(base.blocks)) for site in SITES}
    assert inject_outliers(copy.deepcopy(base), channels=4, scale=32, seed=3) == old
    every = inject_outliers(copy.deepcopy(base), channels=4, scale=32, seed=3, sites=ALL_SITES)
    assert {name: every[name] for name in old} == old
    alone = inject_outliers(copy.deepcopy(base), channels=4, scale=32, seed=3, sites=("ffn_out",))
    assert alone == {name: c for name, c in every.items() if name.endswith("ffn.net.2")}


@pytest.mark.parametrize("sites", SITE_SETS.values(), ids=SITE_SETS.keys())
def test_chosen_channels_grow_by_the_scale(base, sites):
    model = copy.deepcopy(base)
    chosen = inject_outliers(model, channels=2, scale=32, seed=0, sites=sites)
    before, after = _input_absmax(base, chosen, _inputs()), _input_absmax(model, chosen, _inputs())
    for name, channels in chosen.items():
        others = [c for c in range(before[name].numel()) if c not in channels]
        assert torch.equal(after[name][channels], before[name][channels] * 32), name  # powers of two: exact
        assert torch.equal(after[name][others], before[name][others]), name
    text = [chosen[f"blocks.{i}.attn2.to_k"] for i in range(len(model.blocks)) if "cross_attn_text" in sites]
    assert all(c == text[0] for c in text)  # one set for the text embedding all blocks read


def test_text_site_shares_its_channels_and_ffn_site_is_not_exportable(base):
    from vqx.models.wan.outliers import structure_change

    assert structure_change(DEFAULT_SITES) is None and structure_change(("cross_attn_text",)) is None
    assert "ffn.net.1" in structure_change(("ffn_out",))
    with pytest.raises(UserError, match=r"model.outliers.sites=\['attn2.to_q'\] has unknown site 'attn2.to_q'; valid: "
                                        r"cross_attn_q, self_attn_out, cross_attn_out, ffn_out, cross_attn_text"):
        inject_outliers(copy.deepcopy(base), channels=1, scale=32, sites=("attn2.to_q",))


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


def _compose(overrides):
    from pathlib import Path

    from hydra import compose, initialize_config_dir

    import vqx.plugins  # noqa: F401

    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=["model=wan_tiny", *overrides])


def test_new_sites_raise_the_rounding_error_of_their_linears(tmp_path):
    """A quantized run with outliers after the FFN's GELU and on the text embedding: plain rounding of ffn.net.2 and
    attn2.to_k/to_v gets worse, the other linears are as without outliers."""
    from vqx import experiment

    base = ["algorithm=rtn", "format=w8a8", "export=none", "eval=none", "logger=none", f"cache_dir={tmp_path / 'cache'}",
            "calib.num_prompts=1", "calib.steps=2"]
    plain = experiment.run(_compose(base), tmp_path / "plain")
    hit = experiment.run(_compose([*base, "model.outliers.channels=2", "model.outliers.scale=64",
                                   "model.outliers.sites=[ffn_out,cross_attn_text]"]), tmp_path / "outliers")
    before = {r["name"]: r["output_error_rtn"] for r in plain["layers"]}
    after = {r["name"]: r["output_error_rtn"] for r in hit["layers"]}
    assert before.keys() == after.keys() and len(before) == 20
    for name in before:
        if name.endswith(("ffn.net.2", "attn2.to_k", "attn2.to_v")):
            assert after[name] > 2 * before[name], (name, before[name], after[name])
        else:  # the float model is the same bit for bit: so are the other linears' inputs and errors
            assert after[name] == before[name], name


@pytest.mark.parametrize("overrides,message", [
    (["model.outliers.sites=[ffn_out]", "export=lightx2v"],
     "model.outliers.sites=['ffn_out'] cannot be exported with export=lightx2v: the ffn_out site multiplies the GELU "
     "output by a per-channel vector (ffn.net.1) that no Wan2.1 checkpoint holds; use export=none"),
    (["model.outliers.sites=[ffn]", "export=none"], "model.outliers.sites=['ffn'] has unknown site 'ffn'; valid: "),
    (["model.outliers.sites=[]", "export=none"], "model.outliers.sites=[] names no site"),
])
def test_bad_sites_are_refused_before_the_model(overrides, message):
    from vqx.config.validate import validate

    with pytest.raises(UserError) as e:
        validate(_compose(["model.outliers.channels=2", *overrides]))
    assert message in str(e.value) and "\n" not in str(e.value)

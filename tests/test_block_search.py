"""Searches judged on the quantized block's output: the identity is always a candidate, the result is never worse
than round-to-nearest on its own objective, and the runner's guard undoes a block that is."""

import copy
import json
import logging
import pickle

import pytest
import torch
from omegaconf import OmegaConf

import vqx.plugins  # noqa: F401
from vqx.algorithms import awq as awq_module
from vqx.algorithms import smoothquant as sq_module
from vqx.algorithms.block_search import BlockError, BlockScorer, ScoreTerm, score_terms, search_keys, shortlisted, spread_calls
from vqx.algorithms.params import accepts, paired_t
from vqx.algorithms.registry import register_step
from vqx.algorithms.runner import quantize_blockwise
from vqx.algorithms.smoothing import apply_smoothing, smoothable
from vqx.cache import DiskCache
from vqx.calib.capture import load_or_capture
from vqx.models.adapter import BlockInputs, LayerSelection, quant_targets
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


def _meta(prompts, steps):
    return [{"prompt": p, "step": s, "branch": b} for p in prompts for s in steps for b in ("cond", "uncond")]


def test_guided_terms_pair_each_steps_branches():
    meta = _meta([0, 1], [0, 5])
    assert score_terms(meta, list(range(8)), "branches", 5.0) == [ScoreTerm(c, ((c, 1.0),)) for c in range(8)]
    guided = score_terms(meta, list(range(8)), "guided", 5.0)
    assert guided == [ScoreTerm(j, ((2 * j, 5.0), (2 * j + 1, -4.0))) for j in range(4)]
    # a rank holding prompt 1 only (capture indices 4..7): its local calls, the keys of the whole capture
    assert score_terms(meta[4:], [4, 5, 6, 7], "guided", 5.0) == [ScoreTerm(2, ((0, 5.0), (1, -4.0))),
                                                                 ScoreTerm(3, ((2, 5.0), (3, -4.0)))]
    cond_only = [m for m in meta if m["branch"] == "cond"]
    with pytest.raises(ValueError, match="^calib.block_objective=guided needs both guidance branches at every "
                                         "captured step; calibration prompt 0 at step 0 has no uncond call"):
        score_terms(cond_only, list(range(4)), "guided", 1.0)
    assert search_keys(60, 16, "branches") == spread_calls(60, 16)
    assert search_keys(60, 16, "guided") == spread_calls(30, 8) and len(search_keys(60, 1, "guided")) == 1
    assert search_keys(60, None, "guided") == list(range(30))


def test_a_guided_term_is_the_samplers_combination_of_the_branches():
    """The sums of a guided term: g * cond + (1 - g) * uncond of each block's output, of the float block's output and
    of the input, per (prompt, step); a branch-wise term is the call's own tensors, unchanged."""
    torch.manual_seed(0)
    ref, quant = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
    inputs = [BlockInputs(torch.randn(1, 3, 8)) for _ in range(2)]
    terms = score_terms(_meta([0], [0]), [0, 1], "guided", 5.0)
    scorer = BlockScorer(ref, inputs, terms, [0], torch.device("cpu"), {}, None)
    with torch.no_grad():
        outs, ref_sum, hidden_sum = scorer._combined(terms[0], {"q": quant})
        guided = lambda f: 5.0 * f(inputs[0].hidden) - 4.0 * f(inputs[1].hidden)  # noqa: E731
        torch.testing.assert_close(outs["q"], guided(quant), rtol=0, atol=1e-6)
        torch.testing.assert_close(ref_sum, guided(ref), rtol=0, atol=1e-6)
        torch.testing.assert_close(hidden_sum, guided(lambda h: h), rtol=0, atol=0)
        plain = score_terms(_meta([0], [0]), [0, 1], "branches", 5.0)
        outs, ref_sum, hidden_sum = scorer._combined(plain[1], {"q": quant})
        assert torch.equal(outs["q"], quant(inputs[1].hidden)) and hidden_sum is inputs[1].hidden


def test_guided_objective_searches_and_guards_on_pairs(outlier_pipe, tmp_path):
    """calib.block_objective=guided end to end: the guard holds on the guided error of every (prompt, step), the
    search scored search_calls / 2 pairs, the rows say which objective they are, and the errors differ from the
    branch-wise ones (they are another quantity)."""
    algo = {"name": "sq", "steps": ["smoothquant"], "alpha": "auto"}
    guided = _quantize(copy.deepcopy(outlier_pipe), tmp_path, algo, block_objective="guided")
    branches = _quantize(copy.deepcopy(outlier_pipe), tmp_path, algo)
    assert [(b["objective"], b["search_terms"]) for b in guided.blocks] == [("guided", 2)] * 2
    assert [(b["objective"], b["search_terms"]) for b in branches.blocks] == [("branches", 4)] * 2
    for g, b in zip(guided.blocks, branches.blocks):
        assert g["error"] <= g["error_rtn"] and not g["fallback"], g
        assert g["error_rtn"] != b["error_rtn"]


def test_min_t_wants_a_decrease_the_terms_share():
    """paired_t by hand: decreases (0.1, 0.1, 0.05) have mean 1/12 and standard deviation sqrt(1/1200), so t = 5.0; a
    decrease carried by one term (0.3, -0.05, -0.05) has t = (1/15) / (0.2021 / sqrt(3)) = 0.571 and fails min_t=2
    although its sum goes down more; a decrease every term shares exactly passes any bar; no decrease is t = 0."""
    current = BlockError(1.0, (1.0, 2.0, 3.0))
    shared = BlockError(0.99, (0.9, 1.9, 2.95))
    carried = BlockError(0.98, (0.7, 2.05, 3.05))
    assert paired_t(shared, current) == pytest.approx(5.0, rel=1e-12)
    assert paired_t(carried, current) == pytest.approx(0.5714, abs=1e-4)
    assert accepts(shared, current, 0.0, 4.9) and not accepts(shared, current, 0.0, 5.1)
    assert accepts(carried, current, 0.0) and not accepts(carried, current, 0.0, 2.0)
    assert paired_t(BlockError(0.9, (0.5, 1.5, 2.5)), current) == float("inf")
    assert paired_t(BlockError(1.1, (1.1, 2.1, 3.0)), current) == 0.0
    assert not accepts(BlockError(1.0, (0.5, 1.5, 4.0)), current, 0.0)  # a tie of the sums keeps what is there
    copied = pickle.loads(pickle.dumps(shared))  # the runner's records may be pickled (caches, torchrun)
    assert (float(copied), copied.terms) == (0.99, shared.terms) and json.loads(json.dumps({"e": shared})) == {"e": 0.99}


def test_min_t_end_to_end(outlier_pipe, tmp_path):
    """Block errors carry one squared error per search term; an unreachable min_t keeps every group's identity (the
    result is round-to-nearest code for code), a moderate one keeps the most consistent of the default's choices."""
    rtn = _codes(_quantize(copy.deepcopy(outlier_pipe), tmp_path, {"name": "rtn", "steps": ["rtn"]}))
    seen = []
    original = BlockScorer.error

    def recording(self, ctx, transform=None):
        seen.append(original(self, ctx, transform))
        return seen[-1]

    algo = {"name": "sq", "steps": ["smoothquant"], "alpha": "auto"}
    try:
        BlockScorer.error = recording
        strict = _quantize(copy.deepcopy(outlier_pipe), tmp_path, {**algo, "min_t": 1e9})
    finally:
        BlockScorer.error = original
    assert seen and all(isinstance(e, BlockError) and len(e.terms) == 4 for e in seen)
    assert all(g.get("alpha") is None for g in strict.groups) and _same_codes(_codes(strict), rtn)
    default = _quantize(copy.deepcopy(outlier_pipe), tmp_path, algo)
    moderate = _quantize(copy.deepcopy(outlier_pipe), tmp_path, {**algo, "min_t": 2.0})
    for result, bar in ((default, 0.0), (moderate, 2.0)):
        for g in result.groups:  # each group's record says how consistent its best candidate's decrease was
            passed = g["gain_t"] is None or g["gain_t"] > bar
            assert (g["alpha"] is not None) == (g["block_error"] < g["block_error_identity"] and passed), g
    kept = [g for g in moderate.groups if g["alpha"] is not None]
    assert kept and len(kept) < len([g for g in default.groups if g["alpha"] is not None])


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

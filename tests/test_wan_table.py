"""The layer table matches diffusers' Wan modules and maps every tensor to a native name."""

import pytest
import torch

from vqx.models.adapter import LayerSelection, quant_targets
from vqx.models.wan.layers import BLOCK_LINEARS_T2V, input_groups, is_i2v, native_key


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_every_block_linear_is_a_target_and_every_tensor_has_a_native_name(task):
    from vqx.models.wan.tiny import build_tiny_pipeline

    tr = build_tiny_pipeline(task).transformer
    i2v = task == "i2v"
    assert is_i2v(tr) == i2v
    linears = {f"blocks.{i}.{n}" for i, b in enumerate(tr.blocks) for n, m in b.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = quant_targets(tr, LayerSelection())
    assert {t.name for t in targets} == linears
    assert len(targets) == len(tr.blocks) * (12 if i2v else 10)
    native = [native_key(k) for k in tr.state_dict()]
    assert len(set(native)) == len(native)
    assert not any("attn1" in k or "attn2" in k or "condition_embedder" in k for k in native)
    assert native_key("blocks.3.norm2.weight") == "blocks.3.norm3.weight"
    assert native_key("blocks.0.attn2.add_k_proj.weight") == "blocks.0.cross_attn.k_img.weight"
    assert native_key("scale_shift_table") == "head.modulation"
    grouped = [n for g in input_groups(i2v) for n in g.linears]
    assert sorted(grouped) == sorted(n for n in (list(BLOCK_LINEARS_T2V) + (["attn2.add_k_proj", "attn2.add_v_proj"] if i2v else [])))

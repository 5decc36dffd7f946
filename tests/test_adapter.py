"""The model adapter: the registry finds Wan's adapter, which answers for the Wan family."""

import pytest
import torch

from vqx.models.adapter import adapter_for, adapter_named
from vqx.models.wan.adapter import WanAdapter


def test_wan_adapter_is_found_for_the_transformer_and_the_pipeline(tiny_t2v):
    tr = tiny_t2v.transformer
    adapter = adapter_for(tr)
    assert isinstance(adapter, WanAdapter) and adapter_for(tiny_t2v) is adapter is adapter_named("wan")
    assert adapter.transformers(tiny_t2v) == [tr]
    assert len(adapter.blocks(tr)) == tr.config.num_layers
    assert adapter.block_dtype(tr) == tr.blocks[0].ffn.net[2].weight.dtype
    assert adapter.hidden_size(tr) == tr.blocks[0].norm2.normalized_shape[0]
    assert set(adapter.attention_sites(tr.blocks[0])) == {"self", "cross"}
    grouped = [n for g in adapter.input_groups(tr) for n in g.linears]
    assert sorted(grouped) == sorted(adapter.block_linears(tr))
    with pytest.raises(TypeError, match="no model adapter for Linear"):
        adapter_for(torch.nn.Linear(2, 2))


def test_wan_shape_rules(tiny_t2v):
    adapter = adapter_for(tiny_t2v)
    assert adapter.check_frames(9) is None and adapter.check_frames(81) is None
    assert "4k+1" in adapter.check_frames(8)
    tr = tiny_t2v.transformer
    latents = torch.zeros(1, 16, 3, 4, 6)  # 9 frames of 32 x 48 pixels
    assert adapter.video_tokens(tr, 32, 48, 9) == adapter.tokens_per_call(tr, {"hidden_states": latents}) == 3 * 2 * 3

"""Wan's attention with a replaceable attention function (quantized attention, vqx.quant.attention_plan).

`QuantAttnProcessor` is diffusers' `WanAttnProcessor`, op for op, except that the attention itself (the
``dispatch_attention_fn`` calls, I2V's image attention included) goes through ``attend(q, k, v)`` when that
says it is active for the current call; otherwise it is diffusers' own call, so an inactive processor
leaves every output bit-identical.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import (
    WanAttnProcessor,
    _get_added_kv_projections,
    _get_qkv_projections,
)
from torch import nn

from . import ops


class QuantAttnProcessor(WanAttnProcessor):
    """WanAttnProcessor whose attention runs ``attend(q, k, v)`` (q/k/v [B, L, H, D] as diffusers lays them out,
    returning [B, Lq, H, D]) while ``attend.active()`` (module doc)."""

    def __init__(self, attend, base: WanAttnProcessor):
        super().__init__()
        self.attend = attend
        self._attention_backend = base._attention_backend
        self._parallel_config = base._parallel_config
        self.base = base

    def attention(self, query, key, value, parallel_config=None) -> torch.Tensor:
        """[B, Lq, H, D] out, like dispatch_attention_fn."""
        if self.attend.active():
            return self.attend(query, key, value)
        return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend, parallel_config=parallel_config)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if attention_mask is not None:  # Wan never passes one; diffusers' own path handles it exactly
            return self.base(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            # 512 is the context length of the text encoder, hardcoded in diffusers
            image_context_length = encoder_hidden_states.shape[1] - 512
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        query, key, value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = ops.rope(query, *rotary_emb)
            key = ops.rope(key, *rotary_emb)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img, value_img = _get_added_kv_projections(attn, encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))
            hidden_states_img = self.attention(query, key_img, value_img).flatten(2, 3).type_as(query)

        parallel = self._parallel_config if encoder_hidden_states is None else None
        hidden_states = self.attention(query, key, value, parallel).flatten(2, 3).type_as(query)
        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img
        return attn.to_out[1](attn.to_out[0](hidden_states))


def install(sites: dict[str, nn.Module], attend_by_site: dict[str, object]) -> int:
    """Give the attention modules of the named sites a `QuantAttnProcessor` (idempotent: an installed one gets
    the new ``attend``); returns how many modules changed. Only diffusers' WanAttnProcessor is replaced."""
    done = 0
    for site, attend in attend_by_site.items():
        attn = sites[site]
        proc = attn.processor
        if isinstance(proc, QuantAttnProcessor):
            proc.attend = attend
        elif type(proc) is WanAttnProcessor:
            attn.processor = QuantAttnProcessor(attend, proc)
        else:
            raise TypeError(f"vqx cannot quantize the {site} attention: its processor is "
                            f"{type(proc).__name__}, not diffusers' WanAttnProcessor")
        done += 1
    return done


def uninstall(sites: dict[str, nn.Module]) -> None:
    for attn in sites.values():
        if isinstance(attn.processor, QuantAttnProcessor):
            attn.processor = attn.processor.base
